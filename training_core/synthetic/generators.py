"""The generators a synth job can use: template filling, a local model, an operator's endpoint.

- `fill` (the `template` generator) needs no model: a template is a record with `{slot}` holes,
  filled from slot values drawn with the job's seeded `random.Random`, so a seed gives one dataset.
- `LocalModel` runs a Hugging Face directory on this machine's device: batched `generate` with
  left padding, greedy unless a temperature is given, so greedy runs repeat exactly.
- `Endpoint` speaks the OpenAI chat completions API to an endpoint the operator configured
  (vLLM, llama.cpp's server, Ollama, a hosted API): bounded concurrency, a rate limit, and
  retries with exponential backoff on 429 and 5xx that honour `Retry-After`. Its key is read from
  the environment variable the operator named and goes only into the Authorization header: never
  into a record, an event, the manifest or an error message.

`LocalModel` and `Endpoint` share one shape: `complete(conversations) -> list[Completion]`, with
`tokens_generated` and `flops_used` counted as they go.
"""

from __future__ import annotations

import asyncio
import os
import random
import re
import time
from dataclasses import dataclass
from typing import Any, Protocol

from training_core.spec import JobError

Conversation = list[dict[str, str]]
_SLOT = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass
class Completion:
    text: str
    tokens: int


class TextGenerator(Protocol):
    name: str
    tokens_generated: int
    flops_used: float

    def complete(self, conversations: list[Conversation]) -> list[Completion]: ...


# ---- template ------------------------------------------------------------------------------------

def slots_in(template: Any) -> set[str]:
    """Every `{slot}` a template (any JSON value) refers to."""
    if isinstance(template, str):
        return set(_SLOT.findall(template))
    if isinstance(template, dict):
        return set().union(*(slots_in(v) for v in template.values())) if template else set()
    if isinstance(template, list):
        return set().union(*(slots_in(v) for v in template)) if template else set()
    return set()


def fill(template: Any, values: dict[str, str]) -> Any:
    """The template with each `{slot}` replaced by its value; `{{` and `}}` stay literal braces."""
    if isinstance(template, str):
        protected = template.replace("{{", "\x00").replace("}}", "\x01")
        filled = _SLOT.sub(lambda m: values.get(m.group(1), m.group(0)), protected)
        return filled.replace("\x00", "{").replace("\x01", "}")
    if isinstance(template, dict):
        return {key: fill(value, values) for key, value in template.items()}
    if isinstance(template, list):
        return [fill(value, values) for value in template]
    return template


def draw_slots(rng: random.Random, names: set[str], slots: dict[str, list[str]]) -> dict[str, str]:
    """One value for each named slot, drawn in sorted name order so the draw depends only on the seed."""
    return {name: rng.choice(slots[name]) for name in sorted(names) if name in slots}


# ---- a local model -------------------------------------------------------------------------------

class LocalModel:
    """Batched generation with a Hugging Face causal LM from a local directory."""

    def __init__(self, model_dir: str, *, max_new_tokens: int, temperature: float, batch_size: int,
                 name: str | None = None) -> None:
        import torch
        from transformers import AutoModelForCausalLM, AutoTokenizer

        self.name = name or model_dir
        self.device = "cuda" if torch.cuda.is_available() else "cpu"
        dtype = torch.bfloat16 if self.device == "cuda" and torch.cuda.is_bf16_supported() else torch.float32
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
        if self.tokenizer.pad_token is None:
            self.tokenizer.pad_token = self.tokenizer.eos_token
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.parameters = sum(p.numel() for p in self.model.parameters())
        self.max_new_tokens, self.temperature, self.batch_size = max_new_tokens, temperature, batch_size
        self.tokens_generated, self.flops_used = 0, 0.0

    def prompt_text(self, conversation: Conversation) -> str:
        if self.tokenizer.chat_template:
            return self.tokenizer.apply_chat_template(conversation, tokenize=False, add_generation_prompt=True)
        return "\n\n".join(turn["content"] for turn in conversation) + "\n"

    def complete(self, conversations: list[Conversation]) -> list[Completion]:
        texts = [self.prompt_text(c) for c in conversations]
        # Batches of prompts of like length waste less on padding; the order is restored after.
        lengths = [len(ids) for ids in self.tokenizer(texts, add_special_tokens=False)["input_ids"]]
        order = sorted(range(len(texts)), key=lambda i: lengths[i])
        out: list[Completion | None] = [None] * len(texts)
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for index, completion in zip(chunk, self.generate_batch([texts[i] for i in chunk]), strict=True):
                out[index] = completion
        return [c for c in out if c is not None]

    def generate_batch(self, texts: list[str]) -> list[Completion]:
        import torch

        # Chat templates already carry their special tokens; adding BOS again would double it.
        inputs = self.tokenizer(texts, return_tensors="pt", padding=True, add_special_tokens=False).to(self.device)
        sampling = {"do_sample": True, "temperature": self.temperature} if self.temperature > 0 else {
            "do_sample": False}
        with torch.inference_mode():
            output = self.model.generate(**inputs, max_new_tokens=self.max_new_tokens,
                                         pad_token_id=self.tokenizer.pad_token_id, **sampling)
        new = output[:, inputs["input_ids"].shape[1]:]
        completions = []
        for row in new:
            kept = _until_eos(row.tolist(), self.tokenizer.eos_token_id, self.tokenizer.pad_token_id)
            completions.append(Completion(self.tokenizer.decode(kept, skip_special_tokens=True).strip(), len(kept)))
        # Every row of the batch runs all the decode steps, finished or not: that is the compute spent.
        spent = new.shape[0] * new.shape[1]
        self.tokens_generated += sum(c.tokens for c in completions)
        self.flops_used += 2.0 * self.parameters * spent
        return completions


def _until_eos(ids: list[int], eos: int | None, pad: int | None) -> list[int]:
    for index, token in enumerate(ids):
        if token == eos or token == pad:
            return ids[:index]
    return ids


# ---- an OpenAI-compatible endpoint ---------------------------------------------------------------

RETRIED_STATUSES = {429, 500, 502, 503, 504}


class Endpoint:
    """Chat completions against an operator-configured endpoint (see the module docstring)."""

    def __init__(self, config: dict[str, Any], *, max_new_tokens: int, temperature: float,
                 max_retries: int = 5, backoff_seconds: float = 0.5) -> None:
        self.name = config["name"]
        self.base_url = config["base_url"].rstrip("/")
        self.model = config["model"]
        self.max_concurrency = int(config.get("max_concurrency") or 4)
        self.requests_per_second = float(config.get("requests_per_second") or 0) or None
        self.max_new_tokens, self.temperature = max_new_tokens, temperature
        self.max_retries, self.backoff_seconds = max_retries, backoff_seconds
        self.retries = 0
        self.tokens_generated, self.flops_used = 0, 0.0  # the endpoint's compute is not this machine's
        key_env = config.get("api_key_env")
        self._headers = {}
        if key_env:
            key = os.environ.get(key_env)
            if not key:
                raise JobError("endpoint_key_missing", f"endpoint {self.name!r} needs its key in the environment "
                               f"variable {key_env}, which the worker does not have; ask the operator to set it",
                               param="generator.endpoint")
            self._headers["Authorization"] = f"Bearer {key}"

    def complete(self, conversations: list[Conversation]) -> list[Completion]:
        return asyncio.run(self._complete_all(conversations))

    async def _complete_all(self, conversations: list[Conversation]) -> list[Completion]:
        import httpx

        limit = asyncio.Semaphore(self.max_concurrency)
        pacer = _Pacer(self.requests_per_second)
        async with httpx.AsyncClient(base_url=self.base_url, headers=self._headers, timeout=120) as client:
            async def one(conversation: Conversation) -> Completion:
                async with limit:
                    return await self._request(client, pacer, conversation)

            completions = await asyncio.gather(*(one(c) for c in conversations))
        self.tokens_generated += sum(c.tokens for c in completions)
        return list(completions)

    async def _request(self, client: Any, pacer: _Pacer, conversation: Conversation) -> Completion:
        import httpx

        body = {"model": self.model, "messages": conversation, "max_tokens": self.max_new_tokens,
                "temperature": self.temperature}
        for attempt in range(self.max_retries + 1):
            await pacer.wait()
            response = None
            try:
                response = await client.post("/chat/completions", json=body)
            except httpx.TransportError as error:
                failure = f"{type(error).__name__}"
            else:
                if response.status_code == 200:
                    return _parse_completion(response.json(), self.name)
                failure = f"HTTP {response.status_code}"
                if response.status_code not in RETRIED_STATUSES:
                    raise JobError("endpoint_error", f"endpoint {self.name!r} answered {failure}: "
                                   f"{response.text[:200]}", param="generator.endpoint")
            if attempt == self.max_retries:
                break
            self.retries += 1
            await asyncio.sleep(self._delay(attempt, response))
        raise JobError("endpoint_error", f"endpoint {self.name!r} still failed after {self.max_retries + 1} tries "
                       f"(last: {failure}); try again later or lower its requests_per_second",
                       param="generator.endpoint")

    def _delay(self, attempt: int, response: Any) -> float:
        """Retry-After when the server sent one (seconds form), else exponential backoff with jitter."""
        retry_after = response.headers.get("retry-after") if response is not None else None
        if retry_after is not None:
            try:
                return min(60.0, max(0.0, float(retry_after)))
            except ValueError:
                pass  # an HTTP date: fall back to our own backoff
        return self.backoff_seconds * (2 ** attempt) * (1 + random.random() / 4)


def _parse_completion(payload: dict[str, Any], name: str) -> Completion:
    try:
        text = payload["choices"][0]["message"]["content"] or ""
    except (KeyError, IndexError, TypeError) as error:
        raise JobError("endpoint_error", f"endpoint {name!r} answered without choices[0].message.content",
                       param="generator.endpoint") from error
    usage = payload.get("usage") or {}
    # ~4 characters a token when the server does not say.
    tokens = int(usage.get("completion_tokens") or max(1, len(text) // 4))
    return Completion(text.strip(), tokens)


class _Pacer:
    """Spaces request starts at least 1/rate seconds apart (no limit when rate is None)."""

    def __init__(self, rate: float | None) -> None:
        self.interval = 1.0 / rate if rate else 0.0
        self.next_start = 0.0
        self.lock = asyncio.Lock()

    async def wait(self) -> None:
        if not self.interval:
            return
        async with self.lock:
            now = time.monotonic()
            start = max(now, self.next_start)
            self.next_start = start + self.interval
        await asyncio.sleep(start - now)


def build(spec: dict[str, Any]) -> TextGenerator:
    """The generator a resolved spec names (`model` or `openai_compatible`); templates need none."""
    if spec["type"] == "model":
        return LocalModel(spec["model_dir"], max_new_tokens=spec["max_new_tokens"],
                          temperature=spec["temperature"], batch_size=spec["batch_size"], name=spec["model"])
    return Endpoint(spec["endpoint_config"], max_new_tokens=spec["max_new_tokens"], temperature=spec["temperature"])
