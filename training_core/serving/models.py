"""The models the engine holds: loaded on first use, evicted least-recently-used within a byte budget.

    cache = ModelCache(budget_bytes=2 << 30, device="cpu")
    base = cache.base("/abs/model", pinned=set())             # loads it, or returns it from the cache
    name = cache.adapter(base, "/abs/adapter", pinned={...})  # the adapter's PEFT name on that base

A LoRA model is its PEFT adapter on the cached base, never a merged copy: the first adapter of a base
wraps it in a `PeftModel` (which injects the LoRA layers into the same modules), later ones are
`load_adapter`ed beside it, and a batch names each row's adapter (`adapter_names`, "__base__" for the
base itself). When a base's last adapter is evicted, `unload()` gives the plain model back; an adapter
that fails to load (made for another base) is undone the same way and answered with a 404.

What counts against the budget: the weights and buffers of every base and every adapter, measured
after loading (before loading, the safetensors files' sizes are the estimate used to make room). Not
counted: the KV cache and activations of a running batch, the tokenizers, Python's own overhead;
leave headroom for them. Eviction never touches what the batch being prepared uses (`pinned`).

Only this engine's worker thread calls `base` and `adapter`; `listing` and `used_bytes` are read from
the HTTP side under the same lock.
"""

from __future__ import annotations

import gc
import json
import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from peft import PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from training_core.modelinfo import weight_files
from training_core.serving.protocol import EngineError

ADAPTER_WEIGHTS = ("adapter_model.safetensors", "adapter_model.bin")

Key = tuple[str, str | None]
"""(base directory, adapter directory or None for the base itself)."""


@dataclass
class LoadedBase:
    directory: str
    model: PreTrainedModel
    tokenizer: PreTrainedTokenizerBase
    bytes: int
    eos_ids: set[int]
    context_length: int
    default_temperature: float
    default_top_p: float
    peft: PeftModel | None = None
    adapters: dict[str, tuple[str, int]] = field(default_factory=dict)
    """Adapter directory -> (its PEFT name, its bytes)."""

    @property
    def generator_model(self) -> PreTrainedModel | PeftModel:
        return self.peft if self.peft is not None else self.model


def check_model_directory(model: str, adapter: str | None) -> None:
    """Refuse, before any queueing, a `model` or `adapter` that is not a directory we could load (404)."""
    path = Path(model)
    if not path.is_absolute() or not path.is_dir():
        raise EngineError(404, f"model {model!r} is not the absolute path of a model directory here",
                          code="model_not_found", param="model")
    if not (path / "config.json").is_file():
        hint = (": it is a LoRA adapter; pass its base model's directory as model and this one as adapter"
                if (path / "adapter_config.json").is_file() else ": it has no config.json")
        raise EngineError(404, f"model {model!r} is not a Hugging Face model directory{hint}",
                          code="model_not_found", param="model")
    if adapter is not None:
        adapter_path = Path(adapter)
        if not adapter_path.is_absolute() or not (adapter_path / "adapter_config.json").is_file():
            raise EngineError(404, f"adapter {adapter!r} is not an absolute path of a PEFT adapter directory "
                              "(one with adapter_config.json)", code="model_not_found", param="adapter")


class ModelCache:
    def __init__(self, budget_bytes: int, device: str) -> None:
        self.budget_bytes, self.device = budget_bytes, device
        self._bases: dict[str, LoadedBase] = {}
        self._recent: OrderedDict[Key, int] = OrderedDict()  # least recently used first; value: bytes
        self._lock = threading.Lock()
        self._adapter_counter = 0
        self.loads = self.evictions = 0

    def base(self, directory: str, pinned: set[Key]) -> LoadedBase:
        key = (directory, None)
        if directory not in self._bases:
            estimate = sum(f.stat().st_size for f in _weight_files(directory))
            self._make_room(estimate, pinned | {key}, directory)
            loaded = _load_base(directory, self.device)
            with self._lock:
                self._bases[directory] = loaded
                self._recent[key] = loaded.bytes
                self.loads += 1
        self._touch(key)
        return self._bases[directory]

    def adapter(self, base: LoadedBase, directory: str, pinned: set[Key]) -> str:
        """The PEFT name of `directory`'s adapter on `base`, loading it if needed."""
        key = (base.directory, directory)
        if directory not in base.adapters:
            estimate = sum((Path(directory) / name).stat().st_size for name in ADAPTER_WEIGHTS
                           if (Path(directory) / name).is_file())
            self._make_room(estimate, pinned | {key, (base.directory, None)}, directory, base.bytes)
            self._adapter_counter += 1
            name = f"adapter_{self._adapter_counter}"  # PEFT names become module keys: no dots, no slashes
            try:
                # PeftModel.from_pretrained in two steps, so that a failure leaves a wrapper to undo it with.
                if base.peft is None:
                    config = PeftConfig.from_pretrained(directory)
                    config.inference_mode = True
                    base.peft = get_peft_model(base.model, config, adapter_name=name).eval()
                base.peft.load_adapter(directory, adapter_name=name)
            except Exception as error:  # noqa: BLE001 -- whatever PEFT raises, the request gets a 404 saying why
                _discard_adapter(base, name)
                raise EngineError(404, f"cannot load adapter {directory!r} on model {base.directory!r}: "
                                  f"{type(error).__name__}: {error}", code="model_not_found",
                                  param="adapter") from None
            size = sum(p.numel() * p.element_size() for n, p in base.peft.named_parameters()
                       if f".{name}." in n)
            with self._lock:
                base.adapters[directory] = (name, size)
                self._recent[key] = size
                self.loads += 1
        self._touch(key)
        return base.adapters[directory][0]

    def listing(self) -> list[tuple[str, str | None]]:
        """What is loaded, as (model or adapter directory, its base's directory for an adapter)."""
        with self._lock:
            return [(adapter or base, base if adapter else None) for base, adapter in self._recent]

    def used_bytes(self) -> int:
        with self._lock:
            return sum(self._recent.values())

    def _touch(self, key: Key) -> None:
        with self._lock:
            self._recent.move_to_end(key)

    def _make_room(self, needed: int, pinned: set[Key], what: str, alongside: int = 0) -> None:
        if needed + alongside > self.budget_bytes:
            raise EngineError(507, f"{what!r} needs about {_mb(needed + alongside)} MB with its base, "
                              f"more than the engine's whole memory budget ({_mb(self.budget_bytes)} MB); "
                              "start the engine with a larger --memory-mb", code="model_too_large",
                              param="model", type="server_error")
        while self.used_bytes() + needed > self.budget_bytes:
            victim = next((key for key in self._recent if _evictable(key, pinned)), None)
            if victim is None:
                raise BudgetInUse(what)
            self._evict(victim)

    def _evict(self, key: Key) -> None:
        base_dir, adapter_dir = key
        base = self._bases[base_dir]
        with self._lock:
            if adapter_dir is None:
                for directory in base.adapters:
                    del self._recent[(base_dir, directory)]
                del self._recent[key], self._bases[base_dir]
            else:
                name, _ = base.adapters.pop(adapter_dir)
                del self._recent[key]
            self.evictions += 1
        if adapter_dir is not None and base.peft is not None:
            if base.adapters:
                base.peft.delete_adapter(name)
            else:
                base.model, base.peft = base.peft.unload(), None
        gc.collect()
        if self.device == "cuda":
            torch.cuda.empty_cache()


def _discard_adapter(base: LoadedBase, name: str) -> None:
    """Undo an adapter that failed half-way (layers injected, weights refused), leaving the base as it was."""
    if base.peft is None or name not in base.peft.peft_config:
        return
    if len(base.peft.peft_config) > 1:
        base.peft.delete_adapter(name)
    else:
        base.model, base.peft = base.peft.unload(), None


class BudgetInUse(Exception):
    """The models the batch being prepared holds leave no room: the request waits for the next batch."""


def _evictable(key: Key, pinned: set[Key]) -> bool:
    # A base goes only with its adapters, so a base is kept while any of its adapters is pinned.
    return key not in pinned and (key[1] is not None or all(p[0] != key[0] for p in pinned))


def _weight_files(directory: str) -> list[Path]:
    try:
        return weight_files(directory)
    except FileNotFoundError:
        raise EngineError(404, f"model {directory!r} has no safetensors weights", code="model_not_found",
                          param="model") from None


def _load_base(directory: str, device: str) -> LoadedBase:
    try:
        model = AutoModelForCausalLM.from_pretrained(directory, dtype="auto")
        model = model.to(device).eval()  # type: ignore[arg-type]
        tokenizer = AutoTokenizer.from_pretrained(directory)
    except Exception as error:  # noqa: BLE001 -- whatever transformers raises, the request gets a 404 saying why
        raise EngineError(404, f"cannot load model {directory!r}: {type(error).__name__}: {error}",
                          code="model_not_found", param="model") from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only padding: left padding is masked out
    eos = model.generation_config.eos_token_id
    eos_ids = set(eos if isinstance(eos, list) else [eos] if eos is not None else [tokenizer.eos_token_id])
    # Sampling defaults: what the model's generation_config.json says, else OpenAI's (1.0, 1.0).
    saved = _saved_generation_config(directory)
    size = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    return LoadedBase(directory=directory, model=model, tokenizer=tokenizer, bytes=size, eos_ids=eos_ids,
                      context_length=model.config.max_position_embeddings,
                      default_temperature=float(saved.get("temperature", 1.0)),
                      default_top_p=float(saved.get("top_p", 1.0)))


def _saved_generation_config(directory: str) -> dict[str, Any]:
    path = Path(directory) / "generation_config.json"
    return json.loads(path.read_text(encoding="utf-8")) if path.is_file() else {}


def _mb(size: int) -> int:
    return -(-size // (1 << 20))
