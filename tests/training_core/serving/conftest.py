"""A real engine process on the tiny model, and two LoRA adapters made for that model.

The tiny model is randomly initialised (training one to speak would cost the suite a minute), so tests
compare outputs across paths (streamed and whole, batched and alone, adapter and base) rather than
read them. The adapters start from random A and B matrices so that each visibly changes the output.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from training_core.serving.client import EngineProcess

# One torch thread: the test machine's cores are shared, and spinning threads slow a tiny model tenfold.
ENGINE_ENV = {"HF_HUB_ENGINE_ENV": "1", "TRANSFORMERS_ENGINE_ENV": "1", "OMP_NUM_THREADS": "1"}


def make_lora_adapter(base: Path, target: Path, seed: int) -> Path:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(str(base))
    config = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, config).save_pretrained(str(target))
    return target


@pytest.fixture(scope="session")
def lora_adapters(tiny_model: Path, tmp_path_factory: pytest.TempPathFactory) -> list[Path]:
    root = tmp_path_factory.mktemp("adapters")
    return [make_lora_adapter(tiny_model, root / f"lora{seed}", seed) for seed in (1, 2)]


@pytest.fixture(scope="session")
def engine_url(tiny_model: Path) -> Iterator[str]:
    """`http://127.0.0.1:PORT/v1` of an engine with room for everything these tests load (one for all of
    them: starting one costs seconds of imports)."""
    with EngineProcess(memory_mb=256, env=ENGINE_ENV) as engine:
        assert engine.base_url is not None
        yield engine.base_url


def stats(base_url: str) -> dict:
    return httpx.get(f"{base_url.removesuffix('/v1')}/stats", timeout=30).json()
