"""The CPU engine: requests from many clients batched into transformers' `generate`, on one worker thread.

    engine = Engine(ModelCache(budget_bytes, "cpu"))
    engine.start()
    request = engine.submit(EngineRequest(...))    # on the event loop; events arrive on request.events
    engine.close()

Batching is dynamic: while a batch runs, new requests wait; when it ends, the worker takes every
waiting request on the same base model as the oldest one (up to `max_batch_rows` rows, one row per
choice), LoRA adapters of that base mixed in one batch through PEFT's `adapter_names`, and runs one
left-padded `generate`. Before starting, it waits (at most `batch_wait_s`) for the clients the last
batch answered to come back and join those that waited meanwhile: without that, closed-loop clients
split into groups that take turns, each running half-empty batches. Requests sent together into an
idle engine start together (`BURST_S`).

Why not transformers' continuous batching (`generate_batch` / `transformers serve
--continuous-batching`, read in transformers 5.x): it feeds the model its own packed inputs, so PEFT
cannot route rows to different adapters; sampling settings come from one `GenerationConfig` set when
the manager starts (the per-request processors cover temperature/top-p/top-k only, and `transformers
serve` still shares one config); it has no stop strings and no per-request seed. Rows that finish
early in a static batch idle until the batch ends; requests with very different `max_tokens` share a
batch anyway. That is the price of keeping every OpenAI parameter and mixed adapters.

Generation never runs on the event loop: the worker thread loads models, tokenizes, generates, and
hands events back with `call_soon_threadsafe`. A streaming client that goes away cancels its request:
dropped if still waiting, its rows ended at the next step if running (a non-streamed request runs to
its end: the HTTP server does not tell its handler that the client left).

Seeds: a seeded request draws from its own `torch.Generator`, so its tokens do not depend on what
else is in the batch, except through float rounding, which differs slightly with the batch's shape
(padding, batch size) and can in rare near-ties change a token. Same seed and same request alone:
same output.

Not covered: prompt (prefix) caching, speculative decoding, a KV-cache budget (a batch's cache is
not counted in the memory budget), priorities or fairness between clients beyond arrival order.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers import GenerationConfig, LogitsProcessorList, StoppingCriteriaList

from training_core.serving.models import BudgetInUse, Key, LoadedBase, ModelCache, check_model_directory
from training_core.serving.protocol import EngineError
from training_core.serving.rows import ChoiceFinished, Row, RowProgress, RowSampler, TextDelta

logger = logging.getLogger(__name__)

BURST_S = 0.02
"""Requests sent together (within this) start together, even into an idle engine."""


@dataclass
class Started:
    """The request's prompts are tokenized and its rows are in a batch: generation is under way."""

    prompt_tokens: int


@dataclass
class Failed:
    error: EngineError


Event = Started | TextDelta | ChoiceFinished | Failed


@dataclass
class EngineRequest:
    """One API request: a chat (`messages`) or one or more completion prompts, each with `n` choices."""

    model: str
    adapter: str | None
    messages: list[dict[str, str]] | None = None
    prompts: list[str] | None = None
    n: int = 1
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    stream: bool = False
    events: asyncio.Queue[Event] = field(default_factory=asyncio.Queue)
    loop: asyncio.AbstractEventLoop | None = None
    cancelled: bool = False

    @property
    def choices(self) -> int:
        return self.n * (1 if self.messages is not None else len(self.prompts or []))

    def is_cancelled(self) -> bool:
        return self.cancelled

    def emit(self, event: Event) -> None:
        assert self.loop is not None, "submit() sets the loop"
        self.loop.call_soon_threadsafe(self.events.put_nowait, event)


class Engine:
    def __init__(self, models: ModelCache, max_batch_rows: int = 32, batch_wait_s: float = 0.05,
                 default_max_tokens: int = 512) -> None:
        self.models, self.max_batch_rows = models, max_batch_rows
        self.batch_wait_s, self.default_max_tokens = batch_wait_s, default_max_tokens
        self._waiting: list[tuple[float, EngineRequest]] = []
        self._wakeup = threading.Condition()
        self._closing = False
        self._thread = threading.Thread(target=self._work, name="engine-worker", daemon=True)
        self.requests_per_batch: Counter[int] = Counter()
        self.rows_per_batch: Counter[int] = Counter()
        self._running: list[Row] = []
        self._last_batch_end = 0.0
        self._expected: tuple[str, int] = ("", 0)
        """(model, rows): the last batch's rows and those that waited for it, expected back together."""
        self.models_per_batch: Counter[int] = Counter()
        """How many of the base and its adapters one batch served: above 1, PEFT's mixed-adapter batches."""

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._wakeup:
            self._closing = True
            self._wakeup.notify()
        self._thread.join(timeout=30)

    def submit(self, request: EngineRequest) -> EngineRequest:
        """Queue a request (call on the event loop); refuses a model or adapter that is not there (404)."""
        check_model_directory(request.model, request.adapter)
        request.loop = asyncio.get_running_loop()
        with self._wakeup:
            self._waiting.append((time.monotonic(), request))
            self._wakeup.notify()
        return request

    def cancel(self, request: EngineRequest) -> None:
        """The client went away: a waiting request is dropped, a running one's rows end at the next step."""
        request.cancelled = True

    def stats(self) -> dict[str, Any]:
        with self._wakeup:
            waiting = len(self._waiting)
        return {"batches": sum(self.requests_per_batch.values()), "waiting_requests": waiting,
                "running_rows": sum(not row.done for row in self._running),
                "requests_per_batch": dict(sorted(self.requests_per_batch.items())),
                "rows_per_batch": dict(sorted(self.rows_per_batch.items())),
                "models_per_batch": dict(sorted(self.models_per_batch.items())),
                "memory_bytes": self.models.used_bytes(), "memory_budget_bytes": self.models.budget_bytes,
                "loads": self.models.loads, "evictions": self.models.evictions,
                "loaded": [{"id": model, "parent": parent} for model, parent in self.models.listing()]}

    # --- the worker thread ---

    def _work(self) -> None:
        while True:
            batch = self._next_batch()
            if batch is None:
                return
            try:
                self._run(batch)
            except Exception as error:  # loading failed in a way nobody foresaw: say so, serve the next batch
                logger.exception("batch failed before generating")
                failure = EngineError(500, f"the engine failed: {type(error).__name__}: {error}",
                                      code="engine_error", type="server_error")
                for request in batch:
                    request.emit(Failed(failure))

    def _next_batch(self) -> list[EngineRequest] | None:
        """Wait for requests and for the last batch's clients, take those on the oldest one's base model."""
        with self._wakeup:
            while not self._closing:
                self._waiting = [(at, r) for at, r in self._waiting if not r.cancelled]
                if not self._waiting:
                    self._wakeup.wait()
                    continue
                oldest_at, oldest = self._waiting[0]
                rows = sum(r.choices for _, r in self._waiting if r.model == oldest.model)
                now = time.monotonic()
                # Clients answered by the last batch come back within milliseconds: wait for them to join
                # those that waited meanwhile (never longer than batch_wait_s after the batch ended or the
                # oldest arrived), so that clients stay together instead of splitting into groups that take
                # turns, each running half-empty batches.
                model, expected = self._expected
                if model != oldest.model or now - self._last_batch_end >= self.batch_wait_s:
                    expected = 1
                deadline = max(oldest_at, self._last_batch_end) + self.batch_wait_s
                wake_at = oldest_at + BURST_S if rows >= min(expected, self.max_batch_rows) else deadline
                if now < min(wake_at, deadline):
                    self._wakeup.wait(min(wake_at, deadline) - now)  # or sooner: each arrival notifies
                    continue
                batch: list[EngineRequest] = []
                rows = 0
                for _, request in self._waiting:
                    fits = not batch or rows + request.choices <= self.max_batch_rows
                    if request.model == oldest.model and fits:
                        batch.append(request)
                        rows += request.choices
                self._waiting = [(at, r) for at, r in self._waiting if all(r is not b for b in batch)]
                return batch
        return None

    def _requeue(self, request: EngineRequest) -> None:
        with self._wakeup:
            self._waiting.insert(0, (time.monotonic() - self.batch_wait_s, request))

    def _run(self, batch: list[EngineRequest]) -> None:
        base_key: Key = (batch[0].model, None)
        try:
            base = self.models.base(batch[0].model, pinned={base_key})
        except EngineError as error:
            for request in batch:
                request.emit(Failed(error))
            return
        pinned, rows, taken = {base_key}, [], []
        for request in batch:
            try:
                adapter_name = "__base__"
                if request.adapter is not None:
                    adapter_name = self.models.adapter(base, request.adapter, pinned)
                    pinned.add((base.directory, request.adapter))
                request_rows, prompt_tokens = self._rows(base, request, adapter_name)
            except BudgetInUse:
                self._requeue(request)  # first in line next time, when this batch's models are not pinned
                continue
            except EngineError as error:
                request.emit(Failed(error))
                continue
            rows += request_rows
            taken.append(request)
            request.emit(Started(prompt_tokens))
        if not rows:
            return
        with self._wakeup:
            self.requests_per_batch[len(taken)] += 1
            self.rows_per_batch[len(rows)] += 1
            self.models_per_batch[len({row.adapter_name for row in rows})] += 1
        self._running = rows
        try:
            self._generate(base, rows)
        except Exception as error:  # the batch's clients get the error; the engine goes on
            logger.exception("generation failed")
            failure = EngineError(500, f"generation failed: {type(error).__name__}: {error}",
                                  code="engine_error", type="server_error")
            for request in taken:
                request.emit(Failed(failure))
        finally:
            self._running = []
            with self._wakeup:
                waited = sum(r.choices for _, r in self._waiting if r.model == base.directory)
                self._expected = (base.directory, len(rows) + waited)
                self._last_batch_end = time.monotonic()

    def _rows(self, base: LoadedBase, request: EngineRequest, adapter_name: str) -> tuple[list[Row], int]:
        """One row per choice; refuses prompts that leave no room in the model's context (400)."""
        tokenizer = base.tokenizer
        if request.messages is not None:
            if not tokenizer.chat_template:
                raise EngineError(400, f"model {request.model!r} has no chat template; use /v1/completions",
                                  code="no_chat_template", param="messages")
            try:
                text = tokenizer.apply_chat_template(request.messages, add_generation_prompt=True,
                                                     tokenize=False)
            except Exception as error:  # noqa: BLE001 -- a template raises what its author chose (jinja errors)
                raise EngineError(400, f"the model's chat template refused these messages: {error}",
                                  code="invalid_value", param="messages") from None
            prompts, param = [tokenizer(text, add_special_tokens=False)["input_ids"]], "messages"
        else:
            prompts, param = [tokenizer(text)["input_ids"] for text in request.prompts or []], "prompt"
        seed = request.seed if request.seed is not None else secrets.randbits(63)
        generator = torch.Generator().manual_seed(seed)
        temperature = base.default_temperature if request.temperature is None else request.temperature
        top_p = base.default_top_p if request.top_p is None else request.top_p
        rows = []
        for number, prompt_ids in enumerate(prompts):
            room = base.context_length - len(prompt_ids)
            if not prompt_ids or room < 1:
                raise EngineError(400, f"{param} is {len(prompt_ids)} tokens; the model takes 1 to "
                                  f"{base.context_length - 1} so that it can answer",
                                  code="context_length_exceeded", param=param)
            if request.max_tokens is not None and request.max_tokens > room:
                raise EngineError(400, f"max_tokens is {request.max_tokens} but the {param} already takes "
                                  f"{len(prompt_ids)} of the model's {base.context_length} tokens; ask for "
                                  f"at most {room}", code="context_length_exceeded", param="max_tokens")
            max_tokens = min(request.max_tokens or self.default_max_tokens, room)
            rows += [Row(index=number * request.n + choice, prompt_ids=prompt_ids, max_tokens=max_tokens,
                         temperature=temperature, top_p=top_p, stops=request.stop, stream=request.stream,
                         generator=generator, adapter_name=adapter_name, emit=request.emit,
                         is_cancelled=request.is_cancelled)
                     for choice in range(request.n)]
        return rows, sum(len(prompt) for prompt in prompts)

    def _generate(self, base: LoadedBase, rows: list[Row]) -> None:
        tokenizer = base.tokenizer
        inputs = tokenizer.pad({"input_ids": [row.prompt_ids for row in rows]}, padding_side="left",
                               return_tensors="pt").to(base.model.device)

        def decode(ids: list[int]) -> str:
            return str(tokenizer.decode(ids, skip_special_tokens=True))

        progress = RowProgress(rows, base.eos_ids, decode)
        config = GenerationConfig(max_new_tokens=max(row.max_tokens for row in rows), do_sample=False,
                                  eos_token_id=sorted(base.eos_ids), pad_token_id=tokenizer.pad_token_id)
        extra: dict[str, Any] = {}
        if base.peft is not None:
            extra["adapter_names"] = [row.adapter_name for row in rows]
        with torch.inference_mode():
            base.generator_model.generate(**inputs, generation_config=config,  # type: ignore[operator]
                                          logits_processor=LogitsProcessorList([RowSampler(rows)]),
                                          stopping_criteria=StoppingCriteriaList([progress]), **extra)
        progress.finish_unended()
