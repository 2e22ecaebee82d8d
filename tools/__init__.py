"""The agent-facing operations, one module per tool; `TOOLS` is the one list MCP, REST and the CLI
are registered from (see `tools/base.py`)."""

from __future__ import annotations

from tools import (
    cancel_job,
    check_drift,
    create_eval_suite,
    generate_synthetic_data,
    get_job,
    get_job_events,
    get_metric_history,
    get_model,
    get_quota,
    launch_training,
    list_datasets,
    list_eval_suites,
    list_jobs,
    list_models,
    list_schedules,
    promote_model,
    read_eval_report,
    run_eval,
    sample_model,
    schedule_run,
    tune_hyperparameters,
    update_schedule,
    upload_dataset,
    validate_dataset,
    wait_for_job,
)
from tools.base import Tool

TOOLS: tuple[Tool, ...] = (
    upload_dataset.TOOL, validate_dataset.TOOL, list_datasets.TOOL,
    launch_training.TOOL, get_job.TOOL, wait_for_job.TOOL, list_jobs.TOOL, cancel_job.TOOL,
    get_job_events.TOOL, get_metric_history.TOOL,
    list_models.TOOL, get_model.TOOL, sample_model.TOOL, get_quota.TOOL,
    generate_synthetic_data.TOOL, tune_hyperparameters.TOOL,
    create_eval_suite.TOOL, list_eval_suites.TOOL, run_eval.TOOL, read_eval_report.TOOL, check_drift.TOOL,
    schedule_run.TOOL, list_schedules.TOOL, update_schedule.TOOL, promote_model.TOOL,
)
BY_NAME = {tool.name: tool for tool in TOOLS}
