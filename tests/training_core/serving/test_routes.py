"""The engine's OpenAI-compatible routes, over HTTP against the real process (the official client mostly)."""

from __future__ import annotations

import json
import threading
import time
from pathlib import Path

import httpx
import openai
import pytest
from transformers import AutoTokenizer

from tests.conftest import posted_on_a_raw_socket, wait_until
from tests.training_core.serving.conftest import stats

QUESTION = [{"role": "user", "content": "What is a red-drop?"}]


def client(engine_url: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=engine_url, api_key="unused", max_retries=0, timeout=120)


def test_chat_completion_renders_the_models_chat_template_and_reports_usage(engine_url: str,
                                                                            tiny_model: Path):
    reply = client(engine_url).chat.completions.create(model=str(tiny_model), messages=QUESTION, max_tokens=8,
                                                       temperature=0)

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    rendered = tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True, tokenize=False)
    assert reply.object == "chat.completion" and reply.model == str(tiny_model)
    assert reply.choices[0].message.role == "assistant"
    assert reply.choices[0].finish_reason in {"stop", "length"}
    assert reply.usage.prompt_tokens == len(tokenizer(rendered, add_special_tokens=False)["input_ids"])
    assert 1 <= reply.usage.completion_tokens <= 8
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_completions_give_n_choices_for_each_prompt_and_stop_at_max_tokens(engine_url: str, tiny_model: Path):
    prompts = ["The quiet", "T2 tickets"]
    reply = client(engine_url).completions.create(model=str(tiny_model), prompt=prompts, n=2, max_tokens=5,
                                                  temperature=0.9, seed=1)

    assert [choice.index for choice in reply.choices] == [0, 1, 2, 3]
    lengths_hit = [choice for choice in reply.choices if choice.finish_reason == "length"]
    assert reply.usage.completion_tokens <= 4 * 5 and len(lengths_hit) >= 1
    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model))
    assert reply.usage.prompt_tokens == sum(len(tokenizer(p)["input_ids"]) for p in prompts)


def test_streamed_chunks_reassemble_into_the_whole_greedy_text(engine_url: str, tiny_model: Path):
    api = client(engine_url)
    for prompt in ["A red-drop is", "The quiet window", "Splice cabinets"]:
        whole = api.completions.create(model=str(tiny_model), prompt=prompt, max_tokens=24, temperature=0)
        chunks = list(api.completions.create(model=str(tiny_model), prompt=prompt, max_tokens=24,
                                             temperature=0, stream=True))
        assert "".join(c.choices[0].text for c in chunks if c.choices) == whole.choices[0].text
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == whole.choices[0].finish_reason
        assert chunks[-1].choices == []
        assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens

    whole_chat = api.chat.completions.create(model=str(tiny_model), messages=QUESTION, max_tokens=24,
                                             temperature=0)
    chat_chunks = list(api.chat.completions.create(model=str(tiny_model), messages=QUESTION, max_tokens=24,
                                                   temperature=0, stream=True))
    streamed = "".join(c.choices[0].delta.content or "" for c in chat_chunks if c.choices)
    assert streamed == whole_chat.choices[0].message.content
    assert chat_chunks[-1].usage.total_tokens == whole_chat.usage.total_tokens


def test_a_stream_is_server_sent_events_ending_with_done(engine_url: str, tiny_model: Path):
    body = {"model": str(tiny_model), "messages": QUESTION, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", f"{engine_url}/chat/completions", json=body, timeout=120) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        events = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in events)
    assert events[-1] == "data: [DONE]"
    assert json.loads(events[-2].removeprefix("data: "))["usage"]["completion_tokens"] >= 1


def test_a_stop_string_ends_the_choice_before_it(engine_url: str, tiny_model: Path):
    api = client(engine_url)
    prompts = ["A red-drop is", "The quiet window", "Splice cabinets", "What does PARKED mean?"]
    free = {p: api.completions.create(model=str(tiny_model), prompt=p, max_tokens=24,
                                      temperature=0).choices[0].text for p in prompts}
    prompt, text = max(free.items(), key=lambda item: len(item[1]))
    assert len(text) >= 4, f"the tiny model said next to nothing to every prompt: {free}"
    stop = text[len(text) // 2:len(text) // 2 + 2]
    for stream in (False, True):
        reply = api.completions.create(model=str(tiny_model), prompt=prompt, max_tokens=24, temperature=0,
                                       stop=[stop, "never-generated"], stream=stream)
        chunks = list(reply) if stream else [reply]
        got = "".join(c.choices[0].text for c in chunks if c.choices)
        assert got == text[:text.index(stop)]
        assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "stop"


def test_the_same_seed_gives_the_same_sample_and_another_seed_another(engine_url: str, tiny_model: Path):
    def sample(seed: int) -> str:
        return client(engine_url).completions.create(model=str(tiny_model), prompt="The", max_tokens=16,
                                                     temperature=1.0, seed=seed).choices[0].text

    first = sample(7)
    assert sample(7) == first
    assert any(sample(seed) != first for seed in (8, 9, 10))


@pytest.mark.parametrize(("field", "value"), [("temperature", 5), ("top_p", 0), ("n", 0), ("max_tokens", -1),
                                              ("stop", ["a", "b", "c", "d", "e"])])
def test_a_bad_parameter_answers_400_in_openais_format_naming_it(engine_url: str, tiny_model: Path,
                                                                 field: str, value: object):
    body = {"model": str(tiny_model), "messages": QUESTION, field: value}
    response = httpx.post(f"{engine_url}/chat/completions", json=body, timeout=60)

    assert response.status_code == 400
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["param"] == field and field in error["message"] and error["type"] == "invalid_request_error"


@pytest.mark.parametrize(("field", "value"), [("logprobs", True), ("tools", [{"type": "function"}]),
                                              ("response_format", {"type": "json_object"})])
def test_an_unsupported_parameter_is_refused_by_name_not_ignored(engine_url: str, tiny_model: Path,
                                                                 field: str, value: object):
    with pytest.raises(openai.BadRequestError) as refused:
        client(engine_url).chat.completions.create(model=str(tiny_model), messages=QUESTION,
                                                   extra_body={field: value})
    assert refused.value.body["param"] == field and refused.value.body["code"] == "unsupported_parameter"


def test_an_unknown_field_and_an_oversized_request_answer_400(engine_url: str, tiny_model: Path):
    unknown = httpx.post(f"{engine_url}/completions",
                         json={"model": str(tiny_model), "prompt": "x", "top_k": 5})
    too_long = httpx.post(f"{engine_url}/completions", json={"model": str(tiny_model), "prompt": "x",
                                                              "max_tokens": 100_000}, timeout=60)

    assert unknown.status_code == 400 and unknown.json()["error"]["param"] == "top_k"
    assert too_long.status_code == 400 and too_long.json()["error"]["param"] == "max_tokens"
    assert too_long.json()["error"]["code"] == "context_length_exceeded"


def test_an_unknown_model_or_adapter_directory_answers_404(engine_url: str, tiny_model: Path,
                                                           lora_adapters: list[Path]):
    with pytest.raises(openai.NotFoundError) as missing:
        client(engine_url).chat.completions.create(model=str(tiny_model.parent / "nothing"),
                                                   messages=QUESTION)
    adapter_as_model = httpx.post(f"{engine_url}/completions",
                                  json={"model": str(lora_adapters[0]), "prompt": "x"})
    bad_adapter = httpx.post(f"{engine_url}/completions",
                             json={"model": str(tiny_model), "adapter": str(tiny_model), "prompt": "x"})

    assert missing.value.body["code"] == "model_not_found" and missing.value.body["param"] == "model"
    assert adapter_as_model.status_code == 404 and "adapter" in adapter_as_model.json()["error"]["message"]
    assert bad_adapter.status_code == 404 and bad_adapter.json()["error"]["param"] == "adapter"


def test_other_routes_answer_while_a_long_generation_runs(engine_url: str, tiny_model: Path):
    # A greedy loop that never reaches an end-of-sequence token runs to its max_tokens.
    prompts = ["The", "A red-drop is", "The quiet window", "Splice cabinets", "PARKED"]
    runs_on = [p for p in prompts if client(engine_url).completions.create(
        model=str(tiny_model), prompt=p, max_tokens=48, temperature=0).choices[0].finish_reason == "length"]
    assert runs_on, "every prompt ended early; pick prompts on which the tiny model loops"
    body = {"model": str(tiny_model), "prompt": runs_on[0], "max_tokens": 400, "temperature": 0}
    worker = threading.Thread(target=httpx.post, args=(f"{engine_url}/completions",), kwargs={"json": body,
                                                                                              "timeout": 600})
    worker.start()
    # /stats is answered by the event loop; had generation blocked it, it could only ever see 0 running rows.
    seen = wait_until(lambda: stats(engine_url)["running_rows"] == 1, timeout=300, interval=0.05)
    worker.join()
    assert seen and stats(engine_url)["running_rows"] == 0


def test_an_answer_that_does_not_stream_stops_generating_when_its_client_leaves(engine_url: str,
                                                                                  tiny_model: Path):
    body = {"model": str(tiny_model), "prompt": "The", "max_tokens": 900, "temperature": 0}
    began = time.monotonic()
    whole = httpx.post(f"{engine_url}/completions", json=body, timeout=600).json()
    full_run = time.monotonic() - began
    assert whole["choices"][0]["finish_reason"] == "length", "the prompt ended early; pick one the model loops on"

    with posted_on_a_raw_socket(f"{engine_url}/completions", body):
        assert wait_until(lambda: stats(engine_url)["running_rows"] == 1, timeout=300, interval=0.02)
        left = time.monotonic()
    assert wait_until(lambda: stats(engine_url)["running_rows"] == 0, timeout=300, interval=0.02)
    # Without the cancel the row runs its 900 tokens for nobody, as long as the whole answer took.
    assert time.monotonic() - left < full_run / 3, (time.monotonic() - left, full_run)
