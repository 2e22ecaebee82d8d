"""The OpenAI-compatible endpoint of a live `weightsmith serve`, called with the official openai client.

One service process for the module: an agent trains a full fine-tune of the tiny model and a LoRA
adapter on top of it (real jobs), promotes the adapter to `production`, and then uses both as it
would any rented model. A second agent has no models; an unknown key has no agent.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from server.settings import Settings
from server.store import agents as auth
from server.store.db import make_engine, migrate
from tests.conftest import (
    ROOT,
    chat_records,
    posted_on_a_raw_socket,
    quick_hyperparameters,
    serve_process,
    wait_until,
    write_jsonl,
)

PROMPTS = ["What is a red-drop?", "When is the quiet window?", "Who handles T2 tickets?", "What does PARKED mean?",
           "Where are splice cabinets listed?", "What is an ONT reseat?", "What is an SC code?", "Who walks out?"]


@dataclass
class Live:
    url: str
    home: Path
    key: str
    other_key: str
    full: dict[str, Any]
    lora: dict[str, Any]

    def client(self, key: str | None = None) -> openai.OpenAI:
        return openai.OpenAI(base_url=f"{self.url}/openai/v1", api_key=key or self.key, max_retries=0, timeout=300)

    def rest(self, method: str, path: str, **kwargs: Any) -> httpx.Response:
        return httpx.request(method, f"{self.url}/v1{path}", headers={"Authorization": f"Bearer {self.key}"},
                             timeout=600, **kwargs)


def _trained(live: Live, request: dict[str, Any]) -> dict[str, Any]:
    launched = live.rest("POST", "/trainings", json=request)
    assert launched.status_code == 200, launched.text
    job_id = launched.json()["job"]["id"]
    ended = wait_until(lambda: _ended(live, job_id), timeout=900, interval=0)
    assert ended["state"] == "succeeded", ended
    detail = live.rest("GET", f"/models/{ended['model_id']}").json()
    return {**detail["model"], "merged_path": detail.get("merged_path")}


def _ended(live: Live, job_id: str) -> dict[str, Any] | None:
    job = live.rest("POST", f"/jobs/{job_id}/wait", json={"timeout_seconds": 45})
    assert job.status_code == 200, job.text
    return job.json() if job.json()["state"] in ("succeeded", "failed", "cancelled") else None


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory, tiny_model: Path) -> Iterator[Live]:
    root = tmp_path_factory.mktemp("serving")
    settings = Settings(home=root / "home", data_roots=[root, tiny_model.parent])
    engine = make_engine(settings.db_url)
    migrate(engine)
    _, key = auth.create_agent(engine, settings, "serving-a")
    _, other_key = auth.create_agent(engine, settings, "serving-b")
    engine.dispose()
    process, url = serve_process(settings, root / "serve.log", serve_max_tokens="256", serve_max_concurrent="8",
                                  serve_threads="1")
    try:
        live = Live(url=url, home=settings.home, key=key, other_key=other_key, full={}, lora={})
        data = write_jsonl(root / "chats.jsonl", chat_records(48))
        dataset = live.rest("POST", "/datasets", json={"path": str(data)}).json()["dataset"]["id"]
        live.full = _trained(live, {"base_model": str(tiny_model), "datasets": [dataset], "adapter": "full",
                                    "model_name": "support-full",
                                    "hyperparameters": quick_hyperparameters(max_steps=60, learning_rate=5e-3)})
        live.lora = _trained(live, {"base_model": live.full["id"], "datasets": [dataset], "adapter": "lora",
                                    "model_name": "support-lora",
                                    "hyperparameters": quick_hyperparameters(max_steps=30, learning_rate=2e-2)})
        promoted = live.rest("POST", "/aliases/production", json={"model": live.lora["id"]})
        assert promoted.status_code == 200, promoted.text
        yield live
    finally:
        process.terminate()
        process.wait(60)


def _chat(client: openai.OpenAI, model: str, prompt: str, **options: Any) -> str:
    reply = client.chat.completions.create(model=model, messages=[{"role": "user", "content": prompt}],
                                           max_tokens=options.pop("max_tokens", 12), temperature=0, **options)
    return reply.choices[0].message.content or ""


def test_chat_and_completions_answer_with_usage_and_are_charged_to_the_agent(live: Live) -> None:
    client = live.client()
    spent_before = live.rest("GET", "/quota").json()["budget_flops_spent"]

    chat = client.chat.completions.create(model=live.full["id"], max_tokens=8, temperature=0,
                                          messages=[{"role": "user", "content": PROMPTS[0]}])
    text = client.completions.create(model="support-full", prompt=["The quiet window", "T2 tickets"], max_tokens=6,
                                     temperature=0)

    assert chat.object == "chat.completion" and chat.choices[0].message.role == "assistant"
    assert chat.choices[0].finish_reason in {"stop", "length"} and 1 <= chat.usage.completion_tokens <= 8
    assert chat.usage.total_tokens == chat.usage.prompt_tokens + chat.usage.completion_tokens
    assert [c.index for c in text.choices] == [0, 1] and text.usage.completion_tokens <= 12
    spent = live.rest("GET", "/quota").json()["budget_flops_spent"] - spent_before
    tokens = chat.usage.total_tokens + text.usage.total_tokens
    assert spent == pytest.approx(2 * live.full["parameters"] * tokens, rel=1e-6)


def test_a_stream_is_openais_chunks_and_reassembles_into_the_whole_answer(live: Live) -> None:
    client = live.client()
    whole = client.chat.completions.create(model="support-full", max_tokens=16, temperature=0,
                                           messages=[{"role": "user", "content": PROMPTS[1]}])
    chunks = list(client.chat.completions.create(model="support-full", max_tokens=16, temperature=0, stream=True,
                                                 messages=[{"role": "user", "content": PROMPTS[1]}]))

    assert all(c.object == "chat.completion.chunk" for c in chunks)
    assert "".join(c.choices[0].delta.content or "" for c in chunks if c.choices) == whole.choices[0].message.content
    assert chunks[-1].usage is not None and chunks[-1].usage.total_tokens == whole.usage.total_tokens


def test_a_lora_model_is_served_as_its_adapter_beside_its_base_and_by_its_alias(live: Live) -> None:
    client = live.client()
    prompts = PROMPTS[:3]
    base_alone = [_chat(client, "support-full", p) for p in prompts]
    lora_alone = [_chat(client, "support-lora", p) for p in prompts]
    with ThreadPoolExecutor(6) as pool:  # both models in the engine's batches at once
        together = list(pool.map(lambda args: _chat(client, *args),
                                 [(m, p) for m in ("support-full", "support-lora") for p in prompts]))

    assert together == base_alone + lora_alone
    assert base_alone != lora_alone, "the adapter changed no greedy answer: is it applied?"
    assert live.lora["adapter"] == "lora" and not live.lora.get("merged_path")
    assert [_chat(client, name, prompts[0]) for name in ("production", "alias:production", live.lora["id"])] == [
        lora_alone[0]] * 3
    listed = {m.id for m in client.models.list()}
    assert {live.full["id"], live.lora["id"], "production"} <= listed


def test_another_agents_model_is_not_found_and_an_unknown_key_is_refused(live: Live) -> None:
    other = live.client(live.other_key)
    for name in (live.full["id"], "support-full", "production"):
        with pytest.raises(openai.NotFoundError) as missing:
            _chat(other, name, PROMPTS[0])
        assert missing.value.body["param"] == "model"
    assert [m.id for m in other.models.list()] == []
    with pytest.raises(openai.AuthenticationError):
        live.client("ws_not-a-key").models.list()
    no_key = httpx.get(f"{live.url}/openai/v1/models")
    assert no_key.status_code == 401 and no_key.json()["error"]["type"] == "authentication_error"


def test_eight_concurrent_clients_get_their_own_answers(live: Live) -> None:
    alone = [_chat(live.client(), "support-lora", p, max_tokens=24) for p in PROMPTS]
    answers: dict[int, str] = {}
    start = threading.Barrier(len(PROMPTS))

    def one_client(index: int) -> None:
        client = live.client()  # a client of its own, as eight separate agents would have
        start.wait()
        answers[index] = _chat(client, "support-lora", PROMPTS[index], max_tokens=24)

    threads = [threading.Thread(target=one_client, args=(i,)) for i in range(len(PROMPTS))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert [answers.get(i) for i in range(len(PROMPTS))] == alone


@pytest.mark.parametrize(("options", "param"), [
    ({"temperature": 5}, "temperature"),
    ({"max_tokens": 100_000}, "max_tokens"),  # over serve_max_tokens
    ({"extra_body": {"logprobs": True}}, "logprobs"),  # unsupported: refused by name, never ignored
    ({"extra_body": {"top_k": 5}}, "top_k"),
])
def test_a_bad_or_unsupported_parameter_answers_400_naming_it(live: Live, options: dict[str, Any],
                                                              param: str) -> None:
    with pytest.raises(openai.BadRequestError) as refused:
        live.client().chat.completions.create(model="support-full", messages=[{"role": "user", "content": "x"}],
                                              **options)
    assert refused.value.status_code == 400
    assert refused.value.body["param"] == param and refused.value.body["type"] == "invalid_request_error"


def test_a_request_over_the_agents_budget_answers_429_with_retry_after(live: Live) -> None:
    def set_budget(flops: str) -> None:
        subprocess.run([sys.executable, "-m", "server.cli.main", "agents", "set", "serving-a",
                        f"budget_flops={flops}"], env={**os.environ, "WEIGHTSMITH_HOME": str(live.home)}, cwd=ROOT,
                       check=True, capture_output=True)

    before = live.rest("GET", "/quota").json()["budget_flops"]
    set_budget("1000")
    try:
        with pytest.raises(openai.RateLimitError) as refused:
            _chat(live.client(), "support-full", PROMPTS[0])
    finally:
        set_budget(repr(before))
    assert refused.value.body["param"] == "budget_flops" and "budget_flops" in refused.value.body["message"]
    assert int(refused.value.response.headers["retry-after"]) >= 1
    _chat(live.client(), "support-full", PROMPTS[0])  # the budget back, it answers again


def test_sample_model_tool_and_list_models_point_the_agent_at_the_endpoint(live: Live) -> None:
    sampled = live.rest("POST", "/models/production/sample", json={"prompts": PROMPTS[:2], "max_tokens": 12})
    listed = live.rest("GET", "/models").json()

    assert sampled.status_code == 200, sampled.text
    assert [s["completion"] for s in sampled.json()["samples"]] == [
        _chat(live.client(), "production", p) for p in PROMPTS[:2]]
    assert listed["openai_base_url"] == f"{live.url}/openai/v1"
    assert sampled.json()["openai_base_url"] == listed["openai_base_url"]


def test_an_answer_that_does_not_stream_stops_generating_when_its_client_leaves(live: Live) -> None:
    body = {"model": "support-full", "prompt": "The quiet window", "max_tokens": 256, "temperature": 0}
    headers = {"Authorization": f"Bearer {live.key}"}
    url = f"{live.url}/openai/v1/completions"
    httpx.post(url, json=body, headers=headers, timeout=600).raise_for_status()  # the engine is up from here on
    began = time.monotonic()
    whole = httpx.post(url, json=body, headers=headers, timeout=600).json()
    full_run = time.monotonic() - began
    assert whole["choices"][0]["finish_reason"] == "length", "the prompt ended early; pick one the model loops on"
    engines = _engine_stats_urls()
    assert engines, "no engine process found"

    def running_rows() -> int:  # every engine of this test session: the others are idle now
        return sum(httpx.get(stats, timeout=30).json()["running_rows"] for stats in engines)

    with posted_on_a_raw_socket(url, body, headers):
        assert wait_until(lambda: running_rows() == 1, timeout=300, interval=0.02)
        left = time.monotonic()
    assert wait_until(lambda: running_rows() == 0, timeout=300, interval=0.02)
    # Without the cancel the service waits for the whole answer and the engine runs its 256 tokens for nobody.
    assert time.monotonic() - left < full_run / 3, (time.monotonic() - left, full_run)


def _engine_stats_urls() -> list[str]:
    """The `/stats` of each engine process running here: its ready file, named on its command line,
    holds its URL (the service picks the engine's port, and shows the engine to nobody)."""
    urls = []
    for cmdline in Path("/proc").glob("[0-9]*/cmdline"):
        try:
            argv = cmdline.read_bytes().split(b"\0")
            if b"training_core.serving" in argv and b"--ready-file" in argv:
                ready = Path(argv[argv.index(b"--ready-file") + 1].decode())
                urls.append(json.loads(ready.read_text(encoding="utf-8"))["url"].removesuffix("/v1") + "/stats")
        except (OSError, ValueError, KeyError):
            continue  # a process that ended meanwhile, or an engine still starting
    return urls
