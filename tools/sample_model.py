"""sample_model: a quick look at what a model generates, on a few prompts, through the serving engine."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal

from pydantic import Field

from server.context import ServiceContext
from server.serving.gateway import gateway_of
from server.store.tables import Agent
from tools.base import Command, Route, Tool, ToolRequest, ToolResult
from tools.list_models import openai_base_url

SHOWN_CHARS = 600
"""Of each completion: eight of them stay well inside a small result."""


class SampleModelRequest(ToolRequest):
    model: str = Field(description="A model id (mdl_...), its name, or an alias (production).")
    prompts: list[str] = Field(min_length=1, max_length=8, description="1 to 8 prompts, answered together.")
    mode: Literal["chat", "text"] = Field("chat", description="chat: each prompt is a user message under the "
                                          "model's chat template; text: raw text the model continues.")
    max_tokens: int = Field(64, ge=1, le=512, description="New tokens per prompt.")
    temperature: float = Field(0.0, ge=0.0, le=2.0, description="0 is greedy (the same answer each time).")


class Sample(ToolResult):
    prompt: str
    completion: str
    finish_reason: str | None


class SampleView(ToolResult):
    model: str
    samples: list[Sample]
    tokens: int = Field(description="Prompt and completion tokens, charged to your budget like training.")
    seconds: float
    openai_base_url: str = Field(description="Where the same model answers the openai client.")

    def summary(self) -> str:
        lines = [f"{self.model}: {self.tokens} tokens in {self.seconds:.1f} s"]
        for sample in self.samples:
            lines += [f"> {sample.prompt}", sample.completion, ""]
        return "\n".join(lines)


def sample_model(ctx: ServiceContext, agent: Agent, request: SampleModelRequest) -> SampleView:
    gateway = gateway_of(ctx)
    settings: dict[str, Any] = {"model": request.model, "max_tokens": request.max_tokens,
                                "temperature": request.temperature, "seed": 0}
    started = time.monotonic()
    if request.mode == "text":  # one request: the engine batches its prompts
        answer = gateway.sample(agent, request.model, {**settings, "prompt": request.prompts})
        texts = [(choice["text"], choice.get("finish_reason")) for choice in answer["choices"]]
        tokens = answer["usage"]["total_tokens"]
    else:  # one conversation a request, sent at once so the engine batches them
        def ask(prompt: str) -> dict[str, Any]:
            return gateway.sample(agent, request.model, {**settings, "messages": [{"role": "user",
                                                                                   "content": prompt}]})
        with ThreadPoolExecutor(len(request.prompts)) as pool:
            answers = list(pool.map(ask, request.prompts))
        texts = [(a["choices"][0]["message"]["content"], a["choices"][0].get("finish_reason")) for a in answers]
        tokens = sum(a["usage"]["total_tokens"] for a in answers)
    samples = [Sample(prompt=_shown(prompt, 200), completion=_shown(text, SHOWN_CHARS), finish_reason=reason)
               for prompt, (text, reason) in zip(request.prompts, texts, strict=True)]
    return SampleView(model=request.model, samples=samples, tokens=tokens,
                      seconds=round(time.monotonic() - started, 2), openai_base_url=openai_base_url(ctx))


def _shown(text: str, limit: int) -> str:
    return text if len(text) <= limit else text[:limit] + f"... [{len(text) - limit} more chars]"


TOOL = Tool(
    name="sample_model", request=SampleModelRequest, result=SampleView, function=sample_model, access="write",
    description="Generate from one of your models on up to 8 prompts and see the completions: a quick look after "
                "training. Costs compute like training (2 x parameters x tokens). For real use, point the "
                "openai client at openai_base_url.",
    route=Route("POST", "/models/{model}/sample"), command=Command(("models", "sample"), args=("model",)))
