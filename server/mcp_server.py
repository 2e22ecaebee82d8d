"""The MCP transport: translates tool calls into `tools/` functions and errors into ToolError.

Over stdio the caller is the configured local agent (or the agent of WEIGHTSMITH_LOCAL_AGENT_KEY);
over HTTP it is the agent whose bearer key the request carries.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Callable
from typing import Any, Literal, TypeVar

import anyio.to_thread
from mcp.server.mcpserver import Context, MCPServer
from mcp.server.mcpserver.exceptions import ToolError
from mcp_types import ToolAnnotations
from starlette.requests import Request

from server import auth
from server.context import ServiceRef
from server.errors import WeightsmithError
from server.models import Agent
from tools import datasets as dataset_tools
from tools import jobs as job_tools
from tools import models as model_tools
from tools import quota as quota_tools
from tools import tune_hyperparameters as tune_tools
from tools.datasets import DatasetList, UploadDatasetRequest, ValidationView
from tools.jobs import EventPage, JobList, MetricHistory
from tools.launch_training import (
    Hyperparameters,
    LaunchResult,
    LaunchTrainingRequest,
    LoraOptions,
    RequestLimits,
)
from tools.launch_training import (
    launch_training as _launch,
)
from tools.models import ModelList
from tools.quota import Quota
from tools.tune_hyperparameters import TuneRequest, TuneStarted
from tools.views import JobView

T = TypeVar("T")

READ = ToolAnnotations(readOnlyHint=True, destructiveHint=False, idempotentHint=True, openWorldHint=False)
WRITE = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=False, openWorldHint=False)
IDEMPOTENT_WRITE = ToolAnnotations(readOnlyHint=False, destructiveHint=False, idempotentHint=True,
                                   openWorldHint=False)
DESTRUCTIVE = ToolAnnotations(readOnlyHint=False, destructiveHint=True, idempotentHint=True, openWorldHint=False)

INSTRUCTIONS = (
    "weightsmith trains models on your data within your compute limits. Typical flow: upload_dataset "
    "(check ok and problems) -> launch_training (dry_run first to see the estimate) -> wait_for_job "
    "(repeat until state is final) -> list_models. Jobs run in the background; nothing here blocks long."
)


def build_mcp_server(service: ServiceRef, local_key: str | None = None) -> MCPServer:
    """`local_key` picks the identity of callers without HTTP headers (stdio, in-memory)."""
    mcp = MCPServer("weightsmith", instructions=INSTRUCTIONS, version="0.1.0", log_level="WARNING")

    def agent_of(ctx: Context) -> Agent:
        svc = service.get()
        request = ctx.request_context.request  # the HTTP request; None over stdio and in memory
        if not isinstance(request, Request):
            key = local_key or svc.settings.local_agent_key
            return auth.agent_for_key(svc.engine, key) if key else auth.ensure_local_agent(svc.engine, svc.settings)
        bearer = request.headers.get("authorization", "")
        return auth.agent_for_key(svc.engine, bearer.removeprefix("Bearer ").strip() or None)

    async def call(ctx: Context, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run a tool function off the event loop; its errors reach the model with their message."""
        try:
            agent = agent_of(ctx)
            return await anyio.to_thread.run_sync(functools.partial(fn, service.get(), agent, *args, **kwargs))
        except WeightsmithError as err:
            raise ToolError(str(err)) from err

    @mcp.tool(annotations=WRITE)
    async def launch_training(
        ctx: Context, base_model: str, datasets: list[str], method: Literal["sft"] = "sft",
        adapter: Literal["full", "lora"] = "lora", hyperparameters: Hyperparameters | None = None,
        lora: LoraOptions | None = None, merge_adapter: bool = False, limits: RequestLimits | None = None,
        model_name: str | None = None, idempotency_key: str | None = None, dry_run: bool = False,
    ) -> LaunchResult:
        """Start a training job; returns its handle at once. base_model: a model id (mdl_...) or a local
        model directory. datasets: ids from upload_dataset. Any hyperparameter may be "auto". Give an
        idempotency_key so a retry never starts a second job. dry_run=true prices the request (FLOPs
        = 6 x params x tokens) against your limits and starts nothing; a refusal says what fits."""
        request = LaunchTrainingRequest(
            base_model=base_model, datasets=datasets, method=method, adapter=adapter,
            hyperparameters=hyperparameters or Hyperparameters(), lora=lora or LoraOptions(),
            merge_adapter=merge_adapter, limits=limits or RequestLimits(), model_name=model_name,
            idempotency_key=idempotency_key, dry_run=dry_run)
        return await call(ctx, _launch, request)

    @mcp.tool(annotations=READ)
    async def get_job(ctx: Context, job_id: str) -> JobView:
        """A job's state, progress (step, loss, tokens/s, ETA), error, metrics and model_id."""
        return await call(ctx, job_tools.get_job, job_id)

    @mcp.tool(annotations=READ)
    async def wait_for_job(ctx: Context, job_id: str, timeout_seconds: float = 45) -> JobView:
        """Wait until the job ends, at most timeout_seconds (<= 50), reporting progress; returns the
        job either way. Call again while state is not succeeded, failed or cancelled."""
        try:
            agent = agent_of(ctx)
            return await job_tools.wait_for_job(service.get(), agent, job_id, timeout_seconds,
                                                report=ctx.report_progress)
        except WeightsmithError as err:
            raise ToolError(str(err)) from err

    @mcp.tool(annotations=READ)
    async def list_jobs(ctx: Context, state: list[str] | None = None, kind: str | None = None, limit: int = 10,
                        cursor: float | None = None) -> JobList:
        """Your jobs, newest first, filtered by state and kind; pass next_cursor for the next page."""
        return await call(ctx, job_tools.list_jobs, state, kind, limit, cursor)

    @mcp.tool(annotations=DESTRUCTIVE)
    async def cancel_job(ctx: Context, job_id: str) -> JobView:
        """Stop a job: at once if not started; a running one stops at its next step (state cancelling,
        then cancelled). Its unused compute returns to your budget."""
        return await call(ctx, job_tools.cancel_job, job_id)

    @mcp.tool(annotations=READ)
    async def get_job_events(ctx: Context, job_id: str, after_seq: int = 0, limit: int = 50,
                             type: Literal["message", "metrics", "checkpoint"] | None = None) -> EventPage:
        """A job's events in order (messages, metrics, checkpoints); page with after_seq."""
        return await call(ctx, job_tools.get_job_events, job_id, after_seq, limit, type)

    @mcp.tool(annotations=READ)
    async def get_metric_history(ctx: Context, job_id: str, metric: str = "loss",
                                 max_points: int = 100) -> MetricHistory:
        """One metric (loss, learning_rate, tokens_per_second, eval_loss, ...) over steps."""
        return await call(ctx, job_tools.get_metric_history, job_id, metric, max_points)

    @mcp.tool(annotations=IDEMPOTENT_WRITE)
    async def upload_dataset(ctx: Context, filename: str | None = None, content: str | None = None,
                             encoding: Literal["utf-8", "base64"] = "utf-8", path: str | None = None,
                             name: str | None = None) -> ValidationView:
        """Register a dataset from inline content (filename's suffix: .jsonl .csv .parquet .txt) or
        from a path inside a data root, and validate it. Records: {"text"}, {"prompt","completion"}
        or {"messages":[{"role","content"}]}. Returns ok and every problem with its line."""
        try:
            request = UploadDatasetRequest(filename=filename, content=content, encoding=encoding, path=path,
                                           name=name)
        except ValueError as err:
            raise ToolError(f"invalid_request: {err}") from err
        return await call(ctx, dataset_tools.upload_dataset, request)

    @mcp.tool(annotations=READ)
    async def validate_dataset(ctx: Context, dataset_id: str, limit: int = 50) -> ValidationView:
        """A dataset's validation: ok, problems with line and field, counts and token statistics."""
        return await call(ctx, dataset_tools.validate_dataset, dataset_id, limit)

    @mcp.tool(annotations=READ)
    async def list_datasets(ctx: Context, limit: int = 50) -> DatasetList:
        """Your datasets, newest first."""
        return await call(ctx, dataset_tools.list_datasets, limit)

    @mcp.tool(annotations=READ)
    async def list_models(ctx: Context, limit: int = 20) -> ModelList:
        """Your registered models with lineage: path, base model, dataset hashes, job, metrics."""
        return await call(ctx, model_tools.list_models, limit)

    @mcp.tool(annotations=READ)
    async def get_quota(ctx: Context) -> Quota:
        """Your limits and what is left of your rolling compute budget."""
        return await call(ctx, quota_tools.get_quota)

    # --- issue 5: tune_hyperparameters tools ---

    @mcp.tool(annotations=WRITE)
    async def tune_hyperparameters(
        ctx: Context, template: dict[str, Any], search_space: dict[str, dict[str, Any]], n_trials: int = 10,
        n_parallel: int = 1, budget_flops: float | None = None, strategy: dict[str, Any] | None = None,
        final_retrain: bool = False, idempotency_key: str | None = None,
    ) -> TuneStarted:
        """An Optuna study (a tune job, returned at once) whose trials are train jobs from template
        (launch_training arguments). search_space: {"learning_rate": {"type": "float", "low": 1e-4, "high":
        1e-2, "log": true}, "lora.r": {"type": "categorical", "choices": [8, 16]}}. strategy: sampler
        (tpe|random|cmaes|gp), pruner (hyperband|median|successive_halving|none). get_job shows trials, best."""
        try:
            request = TuneRequest.model_validate({
                "template": template, "search_space": search_space, "n_trials": n_trials, "n_parallel": n_parallel,
                "budget_flops": budget_flops, "strategy": strategy or {}, "final_retrain": final_retrain,
                "idempotency_key": idempotency_key})
        except ValueError as err:
            raise ToolError(f"invalid_request: {err}") from err
        return await call(ctx, tune_tools.tune_hyperparameters, request)

    @mcp.resource("weightsmith://jobs/{job_id}", mime_type="application/json")
    async def job_resource(job_id: str, ctx: Context) -> str:
        """A job as JSON (same as get_job)."""
        view = await call(ctx, job_tools.get_job, job_id)
        return json.dumps(view.model_dump(mode="json"))

    return mcp
