"""The gateway between an agent's OpenAI-style request and the engine that generates.

A request names a model by its id (`mdl_...`), its name, or an alias (`production`, `alias:production`);
the gateway finds the agent's own model (another agent's is "not found"), admits the request under
the agent's limits, rewrites `model` into what the engine loads (the model directory, or for a LoRA
model its base directory and `adapter`), forwards it, and charges what it generated: 2 x parameters x
(prompt + completion tokens), counted in the agent's rolling budget like a job's compute.

Limits, each named in its refusal: `max_tokens` x `n` per request (`serve_max_tokens`), requests
generating at once per agent (`serve_max_concurrent`), and the rolling budget, which must hold the
request's price before it starts.

The engine is a child process started on first use (`training_core.serving`: batched generation
across clients, adapters on a shared cached base, least-recently-used eviction), or vLLM on a GPU
machine (`serve_engine: vllm`, one server per base model; untested here). Generation happens there:
this process only forwards, so its event loop and its other APIs never wait on it.
"""

from __future__ import annotations

import json
import threading
import time
from collections import defaultdict
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio.to_thread
import httpx
from sqlmodel import Session, col, select

from server.context import ServiceContext
from server.errors import InvalidRequest, LimitExceeded, NotFound
from server.store import aliases, reservations
from server.store.db import write_transaction
from server.store.tables import Agent, Model
from training_core.serving.client import EngineProcess
from training_core.serving.vllm import VllmServer

FLOPS_PER_PARAMETER_TOKEN = 2.0
"""A forward pass: generating (and reading the prompt) costs 2 x parameters a token."""


@dataclass(frozen=True)
class Served:
    """An agent's model as the engine loads it."""

    model: Model
    path: str
    """The full model directory, or the base a LoRA adapter sits on."""
    adapter: str | None


def gateway_of(ctx: ServiceContext) -> Gateway:
    if ctx.serving is None:
        raise InvalidRequest("this service process serves no models (it was opened without serving)")
    gateway: Gateway = ctx.serving
    return gateway


class Gateway:
    def __init__(self, ctx: ServiceContext):
        self.ctx = ctx
        self.settings = ctx.settings
        self._engine: EngineProcess | None = None
        self._vllm: dict[str, VllmServer] = {}
        """serve_engine vllm: one server per base model directory."""
        self._start_lock = threading.Lock()
        self._busy: dict[str, int] = defaultdict(int)
        self._client: httpx.AsyncClient | None = None

    # Which model.

    def resolve(self, agent: Agent, name: str) -> Served:
        with Session(self.ctx.engine) as session:
            ref = name if name.startswith(("mdl_", aliases.PREFIX)) else None
            model = aliases.resolve_model(session, agent.id, ref, "model") if ref else None
            if model is None and ref is None:
                if name in aliases.of_agent(session, agent.id):
                    model = aliases.resolve_model(session, agent.id, aliases.PREFIX + name, "model")
                else:
                    model = session.exec(select(Model).where(Model.agent_id == agent.id, Model.name == name)
                                         .order_by(col(Model.created_at).desc())).first()
        if model is None:
            raise NotFound(f"no model {name!r} of yours; GET /openai/v1/models lists them (ids, names, aliases)",
                           param="model")
        base = model.config.get("spec", {}).get("base_model")
        if model.adapter == "lora" and base and Path(base).is_dir():
            # The adapter on its base, even where a merged copy exists: one cached base serves them all.
            return Served(model, base, model.path)
        return Served(model, model.merged_path or model.path, None)

    def listed(self, agent: Agent) -> list[dict[str, Any]]:
        """The agent's models as /models lists them: each by id, and each alias as a model of its own."""
        with Session(self.ctx.engine) as session:
            models = session.exec(select(Model).where(Model.agent_id == agent.id)
                                  .order_by(col(Model.created_at).desc())).all()
            named = aliases.of_agent(session, agent.id)
        entries = [{"id": m.id, "object": "model", "created": int(m.created_at), "owned_by": agent.name,
                    "name": m.name} for m in models]
        entries += [{"id": alias, "object": "model", "created": int(time.time()), "owned_by": agent.name,
                     "alias_of": target} for alias, target in named.items()]
        return entries

    # Admission and charging.

    def admit(self, agent: Agent, served: Served, body: dict[str, Any]) -> None:
        """Refuse a request over a limit (LimitExceeded names it); else count it as generating."""
        asked = int(body.get("max_completion_tokens") or body.get("max_tokens") or 16) * int(body.get("n") or 1)
        if asked > self.settings.serve_max_tokens:
            raise InvalidRequest(f"max_tokens x n = {asked} is over serve_max_tokens ({self.settings.serve_max_tokens}"
                                 "): ask for fewer tokens", param="max_tokens")
        if self._busy[agent.id] >= self.settings.serve_max_concurrent:
            raise LimitExceeded(f"you have {self._busy[agent.id]} requests generating and may have "
                                f"{self.settings.serve_max_concurrent} at once (serve_max_concurrent): wait for "
                                "one to finish", param="serve_max_concurrent", details={"retry_after": 1})
        prompt_chars = len(json.dumps(body.get("messages") or body.get("prompt") or ""))
        price = FLOPS_PER_PARAMETER_TOKEN * served.model.parameters * (prompt_chars / 4 + asked)
        with Session(self.ctx.engine) as session:
            fresh = session.get(Agent, agent.id)
            assert fresh is not None
            now = time.time()
            left = fresh.budget_flops - reservations.budget_spent(session, fresh, now)
            if price > left:
                wait = reservations.seconds_until_budget_frees(session, fresh, now)
                raise LimitExceeded(f"this request costs about {price:.3g} FLOPs and {max(left, 0):.3g} of your "
                                    f"budget_flops ({fresh.budget_flops:.3g} per {fresh.budget_window_seconds:g} s) "
                                    "is left: ask for fewer tokens, or wait", param="budget_flops",
                                    details={"retry_after": int(wait) + 1})
        self._busy[agent.id] += 1

    def release(self, agent: Agent) -> None:
        """The request stopped generating (its answer is out): it no longer counts against the limit."""
        self._busy[agent.id] -= 1

    def charge(self, agent: Agent, served: Served, usage: dict[str, Any] | None) -> None:
        """Record what a request generated against the agent's budget. Called after its answer is sent:
        the client's next request need not wait on this write (clients that come back late miss the
        engine's next batch)."""
        if not usage:
            return
        tokens = int(usage.get("prompt_tokens", 0)) + int(usage.get("completion_tokens", 0))
        with write_transaction(self.ctx.engine) as session:
            reservations.record_usage(session, agent.id, "serve", served.model.id, tokens,
                                      FLOPS_PER_PARAMETER_TOKEN * served.model.parameters * tokens)

    # Forwarding.

    async def forward(self, route: str, served: Served, body: dict[str, Any]) -> httpx.Response:
        """The engine's whole answer to a request that does not stream."""
        url = await anyio.to_thread.run_sync(self._start, served)
        return await self._aclient().post(f"{url}/{route}", json=self._engine_body(served, body))

    def generate(self, route: str, served: Served, body: dict[str, Any]) -> httpx.Response:
        """`forward` for callers in a worker thread (a tool's function)."""
        with httpx.Client(timeout=httpx.Timeout(600.0, connect=10.0)) as client:
            return client.post(f"{self._start(served)}/{route}", json=self._engine_body(served, body))

    async def stream(self, route: str, served: Served, body: dict[str, Any]) -> AsyncIterator[bytes | dict[str, Any]]:
        """The engine's server-sent events as they come (bytes); last, the usage it reported (a dict)."""
        url = await anyio.to_thread.run_sync(self._start, served)
        usage: dict[str, Any] = {}
        async with self._aclient().stream("POST", f"{url}/{route}", json=self._engine_body(served, body)) as reply:
            if reply.status_code != 200:
                yield {"status": reply.status_code, "body": json.loads(await reply.aread())}
                return
            async for line in reply.aiter_lines():
                if line.startswith("data: {") and '"usage"' in line:
                    usage = json.loads(line.removeprefix("data: ")).get("usage") or usage
                yield (line + "\n").encode("utf-8")
        yield {"usage": usage}

    def _engine_body(self, served: Served, body: dict[str, Any]) -> dict[str, Any]:
        forwarded = {**body, "model": served.path}
        if served.adapter:
            forwarded["adapter"] = served.adapter
        if body.get("stream"):  # the engine reports usage at the end of a stream: the service charges it
            forwarded["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
        if self.settings.serve_engine == "vllm":
            return self._vllm[served.path].translate(forwarded)
        return forwarded

    def _start(self, served: Served) -> str:
        """The URL of the engine that serves this model, started on first use (the first requests all
        wait for one start)."""
        with self._start_lock:
            if self.settings.serve_engine == "vllm":
                log_path = Path(self.settings.home) / f"vllm-{len(self._vllm)}.log"
                server = self._vllm.setdefault(served.path, VllmServer(
                    served.path, port=8100 + len(self._vllm), log_path=log_path))
                return server.start()
            if self._engine is None or not self._engine.running:
                threads = self.settings.serve_threads
                self._engine = EngineProcess(memory_mb=self.settings.serve_memory_mb,
                                             log_path=Path(self.settings.home) / "engine.log",
                                             extra_args=["--threads", str(threads)] if threads else [])
            return self._engine.start()

    def _aclient(self) -> httpx.AsyncClient:
        if self._client is None:  # made in the event loop that uses it
            self._client = httpx.AsyncClient(timeout=httpx.Timeout(600.0, connect=10.0))
        return self._client

    async def aclose(self) -> None:
        if self._client is not None:
            await self._client.aclose()
            self._client = None

    def sample(self, agent: Agent, model: str, body: dict[str, Any]) -> dict[str, Any]:
        """One request from a worker thread (a tool), admitted and charged like the endpoint's."""
        served = self.resolve(agent, model)
        self.admit(agent, served, body)
        usage = None
        try:
            reply = self.generate("completions" if "prompt" in body else "chat/completions", served, body)
            answer = reply.json()
            if reply.status_code != 200:
                error = answer.get("error") or {}
                raise InvalidRequest(error.get("message", reply.text), param=error.get("param"))
            usage = answer.get("usage")
            return answer
        finally:
            self.release(agent)
            self.charge(agent, served, usage)

    def close(self) -> None:
        """Stop the engines this service started."""
        for server in [self._engine, *self._vllm.values()]:
            if server is not None:
                server.stop()
