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
from mcp_types import Tool as MCPTool
from mcp_types import ToolAnnotations
from starlette.requests import Request

from server.context import ServiceRef
from server.errors import WeightsmithError
from server.store import agents as auth
from server.store.tables import Agent
from tools import check_drift as drift_tool
from tools import datasets as dataset_tools
from tools import eval_suites as eval_suite_tools
from tools import generate_synthetic_data as synth_tools
from tools import jobs as job_tools
from tools import models as model_tools
from tools import quota as quota_tools
from tools import read_eval_report as report_tool
from tools import run_eval as run_eval_tool
from tools import tune_hyperparameters as tune_tools
from tools.check_drift import DriftResult
from tools.datasets import DatasetList, UploadDatasetRequest, ValidationView
from tools.eval_suites import SuiteList, SuiteView
from tools.generate_synthetic_data import SynthLaunch
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
from tools.read_eval_report import ReportView
from tools.run_eval import RunEvalRequest, RunEvalResult
from tools.tune_hyperparameters import TuneRequest, TuneStarted
from tools.views import JobView, compact_schema
from training_core.methods import MethodName

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


class _CompactSchemas(MCPServer):
    """Lists tools with compacted schemas (`tools.views.compact_schema`); calls are still validated
    against the full ones."""

    async def list_tools(self) -> list[MCPTool]:
        listed = await super().list_tools()
        for tool in listed:
            tool.input_schema = compact_schema(tool.input_schema)
            if tool.output_schema is not None:
                tool.output_schema = compact_schema(tool.output_schema)
        return listed


def build_mcp_server(service: ServiceRef, local_key: str | None = None) -> MCPServer:
    """`local_key` picks the identity of callers without HTTP headers (stdio, in-memory)."""
    mcp = _CompactSchemas("weightsmith", instructions=INSTRUCTIONS, version="0.1.0", log_level="WARNING")

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
        ctx: Context, datasets: list[str], method: MethodName = "sft", base_model: str | None = None,
        options: dict[str, Any] | None = None, adapter: Literal["full", "lora"] = "lora",
        hyperparameters: Hyperparameters | None = None, lora: LoraOptions | None = None,
        merge_adapter: bool = False, devices: int = 1, limits: RequestLimits | None = None,
        model_name: str | None = None, idempotency_key: str | None = None, dry_run: bool = False,
        eval_suite: str | None = None,
    ) -> LaunchResult:
        """Start a training job; returns its handle at once. method: pretrain (text; no base_model; options
        {preset: tiny|small|medium|125m|350m|1b, vocab_size, special_tokens, chat_template}),
        continued_pretrain (text; {reference_dataset}), sft (text, prompt/completion, messages), dpo
        (prompt/chosen/rejected; {beta, loss_type}), grpo (prompt[, reference]; {rewards: [grader
        {type: exact|contains|regex|json_schema|length|similarity, ...} or {type: python, source,
        function}], num_generations, max_completion_length}). base_model: mdl_... or a model directory.
        Hyperparameters may be "auto". eval_suite: evaluate the new model on it when done. idempotency_key
        makes retries safe; dry_run prices the request (FLOPs ~ 6 x params x tokens) and starts nothing."""
        try:
            request = LaunchTrainingRequest(
                base_model=base_model, datasets=datasets, method=method, adapter=adapter, options=options,
                hyperparameters=hyperparameters or Hyperparameters(), lora=lora or LoraOptions(),
                merge_adapter=merge_adapter, devices=devices, limits=limits or RequestLimits(),
                model_name=model_name, idempotency_key=idempotency_key, dry_run=dry_run,
                eval_suite=eval_suite)
        except ValueError as err:
            raise ToolError(f"invalid_request: {err}") from err
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

    # --- issue 6: generate_synthetic_data tools ---
    @mcp.tool(annotations=WRITE)
    async def generate_synthetic_data(
        ctx: Context, task: Literal["instructions", "qa_from_documents", "preferences", "workflow_traces", "prompts"],
        generator: dict[str, Any], num_records: int, sources: list[str] | None = None,
        seed_examples: list[dict[str, Any]] | None = None, options: dict[str, Any] | None = None, seed: int = 0,
        dry_run: bool = False,
    ) -> SynthLaunch:
        """Start a job that generates, filters and registers a dataset (wait_for_job; metrics.dataset_id).
        generator: {"type":"template","templates":[..],"slots":{..}}, {"type":"model","model":"mdl_.."} or
        {"type":"openai_compatible","endpoint":NAME}. options: see README."""
        raw = {"task": task, "generator": generator, "num_records": num_records, "sources": sources or [],
               "seed_examples": seed_examples or [], "options": options or {}, "seed": seed, "dry_run": dry_run}
        try:
            request = synth_tools.parse_request(raw)
        except WeightsmithError as err:
            raise ToolError(str(err)) from err
        return await call(ctx, synth_tools.generate_synthetic_data, request)

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
        (tpe|random|cmaes|gp), pruner (hyperband|median|successive_halving|none), objective (eval_loss, or
        kpi:SUITE/KPI: each trial is evaluated on that suite, in the KPI's direction, unpruned). get_job shows
        trials, best."""
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

    @mcp.resource("weightsmith://studies/{study_id}/trials", mime_type="application/json")
    async def study_trials_resource(study_id: str, ctx: Context) -> str:
        """A study's whole trials table (get_job shows its best and newest trials)."""
        trials = await call(ctx, job_tools.study_trials, study_id)
        return json.dumps({"study_id": study_id, "trials": trials})

    # --- issue 4: evaluation tools ---
    # Optional strings default to "" (not None) in these signatures: a nullable schema costs twice the
    # tokens, and the whole tool list has a context budget (run_eval's dry_run is REST-only for it).
    @mcp.tool(annotations=IDEMPOTENT_WRITE)
    async def create_eval_suite(ctx: Context, definition: str) -> SuiteView:
        """Declare an eval suite in YAML or JSON (fields: README): dataset, KPIs with graders and
        thresholds, composite."""
        return await call(ctx, eval_suite_tools.create_eval_suite, definition)

    @mcp.tool(annotations=READ)
    async def list_eval_suites(ctx: Context) -> SuiteList:
        """Your eval suites, newest first."""
        return await call(ctx, eval_suite_tools.list_eval_suites)

    @mcp.tool(annotations=WRITE)
    async def run_eval(ctx: Context, model: str, suite_id: str, baseline: str = "") -> RunEvalResult:
        """Evaluate model on a suite (an eval job), gated against baseline (default: parent; "none")."""
        request = RunEvalRequest(model=model, suite_id=suite_id, baseline=baseline or None)
        return await call(ctx, run_eval_tool.run_eval, request)

    @mcp.tool(annotations=READ)
    async def check_drift(ctx: Context, against: str, dataset_id: str = "", suite_id: str = "") -> DriftResult:
        """Data drift of dataset_id from against (a model's training data, or a dataset); KPI drift of
        against's reports on suite_id."""
        return await call(ctx, drift_tool.check_drift, against, dataset_id or None, suite_id or None)

    @mcp.tool(annotations=READ)
    async def read_eval_report(ctx: Context, ref: str, baseline: str = "", page: int = 0) -> ReportView:
        """Eval report (by report, job or model id): verdict, KPI gates vs baseline (delta, ci95, p), worst
        items, drift, next steps."""
        return await call(ctx, report_tool.read_eval_report, ref, baseline or None, page)

    # The .html template first: the JSON one would also match "rep_x.html".
    @mcp.resource("weightsmith://reports/{report_id}.html", mime_type="text/html")
    async def report_html_resource(report_id: str, ctx: Context) -> str:
        """An eval report as HTML with plots."""
        return await call(ctx, report_tool.read_eval_report_html, report_id)

    @mcp.resource("weightsmith://reports/{report_id}", mime_type="application/json")
    async def report_resource(report_id: str, ctx: Context) -> str:
        """An eval report as JSON (same as read_eval_report)."""
        view = await call(ctx, report_tool.read_eval_report, report_id)
        return json.dumps(view.model_dump(mode="json"))

    return mcp
