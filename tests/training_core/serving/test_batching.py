"""Requests from many clients share batches, and LoRA models share their base, without changing any answer."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from dataclasses import replace
from pathlib import Path

import httpx
import openai

from tests.training_core.serving.conftest import make_lora_adapter, stats
from training_core import presets
from training_core.modelinfo import weight_files
from training_core.shapes import PRESETS

PROMPTS = ["What is a red-drop?", "When is the quiet window?", "Who handles T2 tickets?",
           "What does PARKED mean?", "Where are splice cabinets listed?", "What is an ONT reseat?",
           "The quick brown fox", "Models learn"]


def greedy_chat(engine_url: str, model: Path, prompt: str, adapter: Path | None = None) -> str:
    api = openai.OpenAI(base_url=engine_url, api_key="unused", max_retries=0, timeout=300)
    reply = api.chat.completions.create(model=str(model), messages=[{"role": "user", "content": prompt}],
                                        max_tokens=24, temperature=0,
                                        extra_body={"adapter": str(adapter)} if adapter else None)
    return reply.choices[0].message.content or ""


def test_eight_concurrent_clients_get_their_own_greedy_completions_in_shared_batches(
        engine_url: str, tiny_model: Path):
    alone = [greedy_chat(engine_url, tiny_model, prompt) for prompt in PROMPTS]
    batches_before = stats(engine_url)["requests_per_batch"]

    with ThreadPoolExecutor(max_workers=8) as clients:
        together = list(clients.map(lambda prompt: greedy_chat(engine_url, tiny_model, prompt), PROMPTS))

    assert together == alone
    batches_after = stats(engine_url)["requests_per_batch"]
    shared = {size: count - batches_before.get(size, 0) for size, count in batches_after.items()}
    assert any(int(size) > 1 and count > 0 for size, count in shared.items()), batches_after


def test_a_lora_model_and_its_base_are_served_together_on_one_copy_of_the_base(
        engine_url: str, tiny_model: Path, lora_adapters: list[Path]):
    models: list[Path | None] = [None, *lora_adapters]
    alone = {model: [greedy_chat(engine_url, tiny_model, p, model) for p in PROMPTS[:3]] for model in models}

    with ThreadPoolExecutor(max_workers=9) as clients:
        jobs = {(model, p): clients.submit(greedy_chat, engine_url, tiny_model, p, model)
                for model in models for p in PROMPTS[:3]}
        together = {model: [jobs[model, p].result() for p in PROMPTS[:3]] for model in models}

    assert together == alone
    assert alone[None] != alone[lora_adapters[0]] != alone[lora_adapters[1]] != alone[None]
    state = stats(engine_url)
    loaded = {entry["id"]: entry["parent"] for entry in state["loaded"]}
    assert loaded[str(lora_adapters[0])] == loaded[str(lora_adapters[1])] == str(tiny_model)
    assert list(loaded.values()).count(None) == 1  # the base once, not a merged copy per adapter
    base_bytes = sum(f.stat().st_size for f in weight_files(tiny_model))
    assert state["memory_bytes"] < 1.2 * base_bytes
    assert any(int(mix) > 1 for mix in state["models_per_batch"]), state["models_per_batch"]
    listed = httpx.get(f"{engine_url}/models", timeout=30).json()["data"]
    assert {m["id"]: m["parent"] for m in listed} == loaded


def test_an_adapter_made_for_another_base_answers_404_and_leaves_the_base_as_it_was(
        engine_url: str, tiny_model: Path, lora_adapters: list[Path], tmp_path: Path):
    before = [greedy_chat(engine_url, tiny_model, prompt, adapter) for prompt in PROMPTS[:2]
              for adapter in (None, lora_adapters[0])]
    wider = presets.build_base_model(replace(PRESETS["tiny"], hidden_size=256), tiny_model, tmp_path / "wide")
    foreign = make_lora_adapter(wider, tmp_path / "foreign", seed=3)

    refused = httpx.post(f"{engine_url}/completions", timeout=120,
                         json={"model": str(tiny_model), "adapter": str(foreign), "prompt": "The"})

    assert refused.status_code == 404 and refused.json()["error"]["param"] == "adapter"
    assert [greedy_chat(engine_url, tiny_model, prompt, adapter) for prompt in PROMPTS[:2]
            for adapter in (None, lora_adapters[0])] == before
    assert str(foreign) not in {entry["id"] for entry in stats(engine_url)["loaded"]}
