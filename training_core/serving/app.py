"""The engine's HTTP face: OpenAI's chat and completions routes, as vLLM's server answers them.

    app = build_app(engine)     # python -m training_core.serving starts it (see __main__.py)

Routes: `POST /v1/chat/completions`, `POST /v1/completions`, `GET /v1/models` (what is loaded now),
`GET /stats` (batch sizes, memory, loads, evictions), `GET /health`.

A request names its model by directory: `model` is a full model's absolute path, or a LoRA base's
with `adapter` the adapter's (the service's proxy fills these in; agents never see paths). Every
response carries `usage`; a stream ends with a chunk of usage and no choices, then `data: [DONE]`.
Errors are OpenAI's `{"error": {message, type, param, code}}` with the status that fits (400, 404,
507, 500); an error after a stream has begun comes as such an object in a `data:` line.

Handlers only wait on the request's event queue: the engine's worker thread does the work. A client
that goes away cancels its request, streamed or not (`unless_client_leaves`).
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from typing import Any, Literal

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from training_core.serving.disconnect import CLIENT_CLOSED_REQUEST, ClientLeft, unless_client_leaves
from training_core.serving.engine import Engine, EngineRequest, Failed, Started
from training_core.serving.protocol import ChatCompletionRequest, CompletionRequest, EngineError
from training_core.serving.rows import ChoiceFinished, TextDelta

Kind = Literal["chat", "text"]


def build_app(engine: Engine, lifespan: Any = None) -> FastAPI:
    app = FastAPI(title="weightsmith engine", lifespan=lifespan)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, error: EngineError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(ClientLeft)
    async def _client_left(request: Request, error: ClientLeft) -> Response:
        return Response(status_code=CLIENT_CLOSED_REQUEST)

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        body = ChatCompletionRequest.parse(await _json(request))
        job = EngineRequest(model=body.model, adapter=body.adapter, n=body.n, max_tokens=body.max_tokens,
                            messages=[message.as_template_input() for message in body.messages],
                            temperature=body.temperature, top_p=body.top_p, stop=body.stop or [],
                            seed=body.seed, stream=body.stream)
        return await _respond(engine, job, "chat", request)

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        body = CompletionRequest.parse(await _json(request))
        job = EngineRequest(model=body.model, adapter=body.adapter, n=body.n, max_tokens=body.max_tokens,
                            prompts=body.prompt, temperature=body.temperature, top_p=body.top_p,
                            stop=body.stop or [], seed=body.seed, stream=body.stream)
        return await _respond(engine, job, "text", request)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        listing = [{"id": model, "object": "model", "created": 0, "owned_by": "weightsmith",
                    "root": model, "parent": parent} for model, parent in engine.models.listing()]
        return {"object": "list", "data": listing}

    @app.get("/stats")
    async def stats() -> dict[str, Any]:
        return engine.stats()

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    return app


async def _json(request: Request) -> Any:
    try:
        return json.loads(await request.body())
    except ValueError:
        raise EngineError(400, "the request body is not valid JSON", code="invalid_json") from None


async def _respond(engine: Engine, job: EngineRequest, kind: Kind, request: Request) -> Response:
    engine.submit(job)
    try:
        first = await unless_client_leaves(request, job.events.get())
    except BaseException:
        engine.cancel(job)  # the client went away before anything ran
        raise
    if isinstance(first, Failed):
        raise first.error
    assert isinstance(first, Started)
    reply = _Reply(job, kind, first.prompt_tokens)
    if job.stream:
        return StreamingResponse(_guarded(engine, job, reply.stream()), media_type="text/event-stream")
    try:
        return JSONResponse(await unless_client_leaves(request, reply.whole()))
    finally:
        engine.cancel(job)  # a no-op once every choice has finished; stops the rows if the client left


async def _guarded(engine: Engine, job: EngineRequest, chunks: AsyncIterator[str]) -> AsyncIterator[str]:
    try:
        async for chunk in chunks:
            yield chunk
    finally:
        engine.cancel(job)


class _Reply:
    """A request's events turned into OpenAI's response body, or into its stream of chunks."""

    def __init__(self, job: EngineRequest, kind: Kind, prompt_tokens: int) -> None:
        self.job, self.kind, self.prompt_tokens = job, kind, prompt_tokens
        self.id = f"{'chatcmpl' if kind == 'chat' else 'cmpl'}-{uuid.uuid4().hex}"
        self.created = int(time.time())
        self.model = job.adapter or job.model
        self.completion_tokens = 0

    async def whole(self) -> dict[str, Any]:
        texts, reasons = [""] * self.job.choices, [""] * self.job.choices
        finished = 0
        while finished < self.job.choices:
            event = await self.job.events.get()
            if isinstance(event, TextDelta):
                texts[event.index] += event.text
            elif isinstance(event, ChoiceFinished):
                reasons[event.index] = event.finish_reason
                self.completion_tokens += event.completion_tokens
                finished += 1
            elif isinstance(event, Failed):
                raise event.error
        if self.kind == "chat":
            choices = [{"index": i, "message": {"role": "assistant", "content": text},
                        "finish_reason": reason, "logprobs": None}
                       for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
        else:
            choices = [{"index": i, "text": text, "finish_reason": reason, "logprobs": None}
                       for i, (text, reason) in enumerate(zip(texts, reasons, strict=True))]
        return {"id": self.id, "object": "chat.completion" if self.kind == "chat" else "text_completion",
                "created": self.created, "model": self.model, "choices": choices, "usage": self._usage()}

    async def stream(self) -> AsyncIterator[str]:
        if self.kind == "chat":
            for index in range(self.job.choices):
                yield self._chunk(index, {"role": "assistant", "content": ""})
        finished = 0
        while finished < self.job.choices:
            event = await self.job.events.get()
            if isinstance(event, TextDelta):
                yield self._chunk(event.index, {"content": event.text} if self.kind == "chat" else event.text)
            elif isinstance(event, ChoiceFinished):
                self.completion_tokens += event.completion_tokens
                finished += 1
                yield self._chunk(event.index, {} if self.kind == "chat" else "", event.finish_reason)
            elif isinstance(event, Failed):
                yield _sse(event.error.body())
                break
        yield _sse({**self._head(), "choices": [], "usage": self._usage()})
        yield "data: [DONE]\n\n"

    def _chunk(self, index: int, delta: dict[str, str] | str, finish_reason: str | None = None) -> str:
        choice: dict[str, Any] = ({"index": index, "delta": delta} if isinstance(delta, dict)
                                  else {"index": index, "text": delta, "logprobs": None})
        choice["finish_reason"] = finish_reason
        return _sse({**self._head(), "choices": [choice]})

    def _head(self) -> dict[str, Any]:
        kind = "chat.completion.chunk" if self.kind == "chat" else "text_completion"
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}

    def _usage(self) -> dict[str, int]:
        return {"prompt_tokens": self.prompt_tokens, "completion_tokens": self.completion_tokens,
                "total_tokens": self.prompt_tokens + self.completion_tokens}


def _sse(payload: dict[str, Any]) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"
