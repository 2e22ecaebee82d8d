"""Following a job from the terminal: a live progress bar (step, loss, tokens/s, ETA), or a live
table of a study's trials, until it ends; then its summary (an eval job's report)."""

from __future__ import annotations

import json
from typing import Any

import typer
from rich.console import Console
from rich.live import Live
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from server.cli.client import call
from tools.read_eval_report import ReportView
from tools.views import JobView

FINAL = ("succeeded", "failed", "cancelled")
console = Console()


def follow_result(result: dict[str, Any], as_json: bool) -> None:
    """Follow the job a tool's result started (a launch's `job`, a study's `study_id`)."""
    job = result.get("job") or {}
    job_id = job.get("id") or result.get("study_id")
    if job_id:
        follow(job_id, as_json)


def follow(job_id: str, as_json: bool = False) -> None:
    job = _wait(job_id, 0)
    ended = _study_table(job_id) if job["kind"] == "tune" else _progress_bar(job_id)
    if as_json:
        typer.echo(json.dumps(ended, indent=2))
    elif ended["kind"] == "eval" and ended["state"] == "succeeded":
        typer.echo(ReportView.model_validate(call("GET", f"/v1/reports/{job_id}")).summary())
    else:
        typer.echo(JobView.model_validate(ended).summary())
    if ended["state"] != "succeeded":
        raise typer.Exit(1)


def _wait(job_id: str, seconds: float) -> dict[str, Any]:
    return call("POST", f"/v1/jobs/{job_id}/wait", body={"timeout_seconds": seconds})


def _progress_bar(job_id: str) -> dict[str, Any]:
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, console=console, transient=True) as bar:
        task = bar.add_task(job_id, total=None, info="")
        while True:
            job = _wait(job_id, 2)
            p = job.get("progress") or {}
            info = " ".join(f"{k} {v:.4g}" for k, v in (("loss", p.get("loss")), ("tok/s", p.get("tokens_per_second")))
                            if v is not None)
            bar.update(task, total=p.get("max_steps"), completed=p.get("step") or 0,
                       description=f"{job_id} {job['state']}", info=info)
            if job["state"] in FINAL:
                return job


def _study_table(study_id: str) -> dict[str, Any]:
    with Live(trials_table({}), console=console, refresh_per_second=2) as live:
        while True:
            study = _wait(study_id, 2)
            # The job view lists a large study's best and newest trials only: the table shows them all.
            trials = call("GET", f"/v1/studies/{study_id}/trials")["trials"]
            live.update(trials_table({**study, "metrics": {**(study.get("metrics") or {}), "trials": trials}}))
            if study["state"] in FINAL:
                break
    if not console.is_terminal:  # Live ends its last frame with a newline only on a terminal
        console.line()
    if study.get("model_id"):
        console.print(study_model_line(study), highlight=False)
    return study


def study_model_line(study: dict[str, Any]) -> str:
    """What the study hands over: its model (the final retrain's, else the best trial's), with what it scored."""
    result = study.get("metrics") or {}
    retrained = result.get("final_job_id") not in (None, result.get("best_job_id"))
    source = "retrained on all the data" if retrained else f"trial {result.get('best_trial')}"
    if retrained and result.get("final_value") is not None:
        source += f", {result['objective']} {result['final_value']:.4g}"
    return f"model {study['model_id']} ({source}); best parameters {json.dumps(result.get('best_params'))}"


def trials_table(study: dict[str, Any]) -> Table:
    result = study.get("metrics") or {}
    trials = result.get("trials", [])
    names = sorted({name for trial in trials for name in trial["params"]})
    best = result.get("best_value")
    title = (f"study {study.get('id', '')} {study.get('state', 'starting')}"
             + (f", best {best:.4g} (trial {result['best_trial']})" if best is not None else "")
             + (f", stopped: {result['stopped_reason']}" if result.get("stopped_reason") else ""))
    table = Table("trial", "state", *names, result.get("objective", "value"), "step", "FLOPs", title=title)
    for trial in trials:
        params = [f"{trial['params'][n]:.3g}" if isinstance(trial["params"].get(n), float)
                  else str(trial["params"].get(n, "-")) for n in names]
        value = f"{trial['value']:.4g}" if trial["value"] is not None else "-"
        style = "bold green" if trial["number"] == result.get("best_trial") else None
        table.add_row(str(trial["number"]), trial["state"], *params, value, str(trial["step"] or "-"),
                      f"{trial['flops_used']:.3g}", style=style)
    return table
