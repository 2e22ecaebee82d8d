"""The weightsmith command line: runs the service, and is a thin client of its REST API.

    weightsmith serve [--stdio]      weightsmith worker          weightsmith agents add NAME
    weightsmith datasets upload FILE weightsmith train ...       weightsmith jobs list|show|watch|cancel
    weightsmith synth REQUEST.json
    weightsmith tune STUDY.yaml
    weightsmith demo

Client commands talk to WEIGHTSMITH_URL (default http://127.0.0.1:8765) with WEIGHTSMITH_API_KEY.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import threading
from pathlib import Path
from typing import Annotated, Any

import httpx
import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn
from rich.table import Table

from server.settings import Settings

app = typer.Typer(help="Train and own domain models.", no_args_is_help=True, pretty_exceptions_enable=False)
agents_app = typer.Typer(help="Agent identities, keys and limits (operates on the local store).")
datasets_app = typer.Typer(help="Upload, list and validate datasets.")
jobs_app = typer.Typer(help="Follow and control jobs.")
app.add_typer(agents_app, name="agents")
app.add_typer(datasets_app, name="datasets")
app.add_typer(jobs_app, name="jobs")
console = Console()
FINAL = {"succeeded", "failed", "cancelled"}


# ---- the service ---------------------------------------------------------------------------------

@app.command()
def serve(stdio: Annotated[bool, typer.Option("--stdio", help="MCP over stdin/stdout, for local agents.")] = False,
          host: str | None = None, port: int | None = None) -> None:
    """Run the service: REST /v1, MCP /mcp, docs /docs, and the embedded workers."""
    settings = Settings()
    if stdio:
        import anyio

        from server.api.mcp import build_mcp_server
        from server.context import ServiceRef, open_service

        async def run() -> None:
            with open_service(settings) as ctx:
                await build_mcp_server(ServiceRef(ctx)).run_stdio_async()

        anyio.run(run)
        return
    import uvicorn

    from server.api.app import create_app

    uvicorn.run(create_app(settings), host=host or settings.host, port=port or settings.port, log_level="info")


@app.command()
def worker(slots: Annotated[int | None, typer.Option(help="Jobs at once (default: worker_slots).")] = None) -> None:
    """Run workers only, against the same database as the service."""
    from server.context import open_service

    settings = Settings()
    if slots is not None:
        settings.worker_slots = slots
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with open_service(settings) as ctx:
        console.print(f"worker {ctx.executor.owner if ctx.executor else '-'}: {settings.worker_slots} slot(s), "
                      f"store {settings.db_url}", style="dim")
        stop.wait()


# ---- agents (local administration) ----------------------------------------------------------------

@agents_app.command("add")
def agents_add(name: str,
               max_request_flops: float | None = None, max_request_seconds: float | None = None,
               max_request_params: int | None = None, max_request_tokens: int | None = None,
               max_dataset_bytes: int | None = None, budget_flops: float | None = None,
               budget_window_seconds: float | None = None, max_concurrent_jobs: int | None = None) -> None:
    """Create an agent and print its API key (shown once, stored hashed)."""
    from server.store import agents as auth
    from server.store.db import make_engine, migrate

    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    agent, key = auth.create_agent(
        engine, settings, name, max_request_flops=max_request_flops, max_request_seconds=max_request_seconds,
        max_request_params=max_request_params, max_request_tokens=max_request_tokens,
        max_dataset_bytes=max_dataset_bytes, budget_flops=budget_flops, budget_window_seconds=budget_window_seconds,
        max_concurrent_jobs=max_concurrent_jobs)
    console.print(f"agent {agent.name} ({agent.id}); its key, shown once:", style="dim", highlight=False)
    print(key)


@agents_app.command("list")
def agents_list() -> None:
    """Agents and their limits."""
    from sqlmodel import Session, select

    from server.store.agents import LIMIT_FIELDS
    from server.store.db import make_engine, migrate
    from server.store.tables import Agent

    settings = Settings()
    engine = make_engine(settings.db_url)
    migrate(engine)
    table = Table("name", "id", *LIMIT_FIELDS)
    with Session(engine) as session:
        for agent in session.exec(select(Agent)):
            table.add_row(agent.name, agent.id, *(f"{getattr(agent, f):g}" for f in LIMIT_FIELDS))
    console.print(table)


# ---- the REST client ------------------------------------------------------------------------------

def _client() -> httpx.Client:
    url = os.environ.get("WEIGHTSMITH_URL", f"http://{Settings().host}:{Settings().port}")
    key = os.environ.get("WEIGHTSMITH_API_KEY", "")
    return httpx.Client(base_url=url, headers={"Authorization": f"Bearer {key}"}, timeout=70)


def _call(method: str, path: str, **kwargs: Any) -> Any:
    with _client() as client:
        try:
            response = client.request(method, path, **kwargs)
        except httpx.ConnectError as err:
            console.print(f"cannot reach {client.base_url}: {err}; is `weightsmith serve` running?", style="red")
            raise typer.Exit(2) from err
    if response.status_code >= 400:
        error = response.json().get("error") or response.json()
        console.print(f"error: {json.dumps(error)}", style="red", highlight=False)
        raise typer.Exit(1)
    return response.json()


def _print(payload: Any) -> None:
    console.print_json(json.dumps(payload))


@datasets_app.command("upload")
def datasets_upload(file: Path, name: str | None = None,
                    by_path: Annotated[bool, typer.Option(help="Register the file in place (inside a data root).")] = False) -> None:
    """Upload FILE (.jsonl .csv .parquet .txt) and print its validation."""
    if by_path:
        body: dict[str, Any] = {"path": str(file.resolve()), "name": name}
    elif file.suffix == ".parquet":
        import base64

        body = {"filename": file.name, "content": base64.b64encode(file.read_bytes()).decode(), "encoding": "base64"}
    else:
        body = {"filename": file.name, "content": file.read_bytes().decode("utf-8", errors="surrogateescape"),
                "name": name}
    _print(_call("POST", "/v1/datasets", json=body))


@datasets_app.command("list")
def datasets_list() -> None:
    table = Table("id", "name", "format", "records", "valid", "hash")
    for d in _call("GET", "/v1/datasets")["datasets"]:
        table.add_row(d["id"], d["name"], str(d["format"]), str(d["records"]), str(d["valid"]), d["content_hash"][:12])
    console.print(table)


@datasets_app.command("validate")
def datasets_validate(dataset_id: str) -> None:
    _print(_call("GET", f"/v1/datasets/{dataset_id}/validation"))


@app.command()
def train(base_model: Annotated[str | None, typer.Option(help="Model id or local model directory.")] = None,
          dataset: Annotated[list[str] | None, typer.Option(help="Dataset id (repeat for several).")] = None,
          method: Annotated[str | None, typer.Option(help="pretrain, continued_pretrain, sft, dpo or grpo.")] = None,
          preset: Annotated[str | None, typer.Option(help="pretrain: the size preset (tiny ... 1b).")] = None,
          devices: Annotated[int | None, typer.Option(help="Processes to train on (accelerate).")] = None,
          adapter: str = "lora", max_steps: str = "auto", learning_rate: str = "auto",
          config: Annotated[Path | None, typer.Option(help="A JSON or YAML request file.")] = None,
          idempotency_key: str | None = None, dry_run: bool = False,
          watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False) -> None:
    """Launch a training job (flags, or a request file with the launch_training fields)."""
    body: dict[str, Any] = _load_request(config) if config else {}
    body.setdefault("hyperparameters", {})
    if base_model:
        body["base_model"] = base_model
    if dataset:
        body["datasets"] = dataset
    body.setdefault("adapter", adapter)
    if method:
        body["method"] = method
    if preset:
        body.setdefault("options", {})["preset"] = preset
    if devices:
        body["devices"] = devices
    for key, value in (("max_steps", max_steps), ("learning_rate", learning_rate)):
        if value != "auto":
            body["hyperparameters"][key] = float(value) if key == "learning_rate" else int(value)
    body.update({k: v for k, v in (("idempotency_key", idempotency_key), ("dry_run", dry_run)) if v})
    result = _call("POST", "/v1/trainings", json=body)
    _print(result)
    if watch and result.get("job"):
        jobs_watch(result["job"]["id"])


@app.command()
def synth(config: Annotated[Path, typer.Argument(help="A JSON or YAML generate_synthetic_data request.")],
          dry_run: bool = False,
          watch: Annotated[bool, typer.Option(help="Follow the job until it ends.")] = False) -> None:
    """Start a synth job from a request file; the job registers the dataset it makes."""
    body = _load_request(config) | ({"dry_run": True} if dry_run else {})
    result = _call("POST", "/v1/synthetic-data", json=body)
    _print(result)
    if watch and result.get("job_id"):
        jobs_watch(result["job_id"])


def _load_request(path: Path) -> dict[str, Any]:
    text = path.read_text(encoding="utf-8")
    if path.suffix in (".yaml", ".yml"):
        import yaml  # PyYAML comes with transformers

        return yaml.safe_load(text)
    return json.loads(text)


@app.command()
def tune(file: Annotated[Path, typer.Argument(help="A YAML or JSON tune_hyperparameters request.")],
         watch: Annotated[bool, typer.Option(help="Show a live table of trials until the study ends.")] = True) -> None:
    """Start a hyperparameter study (template, search_space, n_trials, strategy, budget_flops)."""
    started = _call("POST", "/v1/studies", json=_load_request(file))
    with_eval = f" + {started['eval_estimate_flops']:.3g} for its eval" if started.get("eval_estimate_flops") else ""
    console.print(f"study {started['study_id']}: budget {started['budget_flops']:.3g} FLOPs, "
                  f"{started['trial_estimate_flops']:.3g}{with_eval} a trial at most", highlight=False)
    if not watch:
        return
    from rich.live import Live

    with Live(_trials_table({}), console=console, refresh_per_second=2) as live:
        while True:
            study = _call("POST", f"/v1/jobs/{started['study_id']}/wait", params={"timeout_seconds": 2})
            # The job view lists a large study's best and newest trials only: the table shows them all.
            trials = _call("GET", f"/v1/studies/{started['study_id']}/trials")["trials"]
            live.update(_trials_table({**study, "metrics": {**(study["metrics"] or {}), "trials": trials}}))
            if study["state"] in FINAL:
                break
    if study["error"]:
        console.print(f"error: {study['error']['message']}", style="red", highlight=False)
    if study.get("model_id"):
        console.print(_study_model_line(study), highlight=False)
    if study["state"] != "succeeded":
        raise typer.Exit(1)


def _study_model_line(study: dict[str, Any]) -> str:
    """What the study hands over: its model (the final retrain's, else the best trial's), with what it scored."""
    result = study["metrics"] or {}
    retrained = result.get("final_job_id") not in (None, result.get("best_job_id"))
    source = "retrained on all the data" if retrained else f"trial {result.get('best_trial')}"
    if retrained and result.get("final_value") is not None:
        source += f", {result['objective']} {result['final_value']:.4g}"
    return f"model {study['model_id']} ({source}); best parameters {json.dumps(result.get('best_params'))}"


def _trials_table(study: dict[str, Any]) -> Table:
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


@jobs_app.command("list")
def jobs_list(state: list[str] | None = None, limit: int = 20) -> None:
    table = Table("id", "kind", "method", "state", "step", "loss", "created")
    for j in _call("GET", "/v1/jobs", params={"state": state or [], "limit": limit})["jobs"]:
        p = j["progress"]
        table.add_row(j["id"], j["kind"], j["method"], j["state"], f"{p.get('step')}/{p.get('max_steps')}",
                      f"{p['loss']:.4f}" if p.get("loss") is not None else "-", j["created_at"])
    console.print(table)


@jobs_app.command("show")
def jobs_show(job_id: str) -> None:
    _print(_call("GET", f"/v1/jobs/{job_id}"))


@jobs_app.command("cancel")
def jobs_cancel(job_id: str) -> None:
    _print(_call("POST", f"/v1/jobs/{job_id}/cancel"))


@jobs_app.command("watch")
def jobs_watch(job_id: str) -> None:
    """A live progress bar (step, loss, tokens/s, ETA) until the job ends."""
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[info]}"), TimeRemainingColumn())
    with Progress(*columns, console=console) as bar:
        task = bar.add_task(job_id, total=None, info="")
        while True:
            job = _call("POST", f"/v1/jobs/{job_id}/wait", params={"timeout_seconds": 2})
            p = job["progress"]
            info = " ".join(f"{k} {v:.4g}" for k, v in (("loss", p.get("loss")), ("tok/s", p.get("tokens_per_second")))
                            if v is not None)
            bar.update(task, total=p.get("max_steps"), completed=p.get("step") or 0,
                       description=f"{job_id} {job['state']}", info=info)
            if job["state"] in FINAL:
                break
    _print({k: job[k] for k in ("id", "state", "error", "model_id", "metrics")})
    if job["state"] != "succeeded":
        raise typer.Exit(1)


@app.command()
def demo() -> None:
    """Train on the bundled sample corpus through the real MCP client, end to end."""
    from server.cli.demo import run_demo

    sys.exit(run_demo(console))


# ---- issue 4: evaluation --------------------------------------------------------------------------

eval_app = typer.Typer(help="Eval suites, eval jobs, reports and drift.")
app.add_typer(eval_app, name="eval")


@eval_app.command("suite")
def eval_suite(file: Path) -> None:
    """Declare the eval suite in FILE (YAML or JSON)."""
    _print(_call("POST", "/v1/eval-suites", json={"definition": file.read_text(encoding="utf-8")}))


@eval_app.command("suites")
def eval_suites() -> None:
    """Your eval suites, newest first."""
    _print(_call("GET", "/v1/eval-suites"))


@eval_app.command("run")
def eval_run(model: str, suite_id: str,
             baseline: Annotated[str | None, typer.Option(help="Model id or directory; 'none': no gate.")] = None,
             dry_run: bool = False, watch: bool = True) -> None:
    """Evaluate MODEL on SUITE_ID against its parent (or --baseline), then print the report."""
    result = _call("POST", "/v1/evals", json={"model": model, "suite_id": suite_id, "baseline": baseline,
                                              "dry_run": dry_run})
    _print(result)
    if watch and result.get("job_id"):
        jobs_watch(result["job_id"])
        eval_report(result["job_id"])


@eval_app.command("report")
def eval_report(ref: str, baseline: str | None = None, page: int = 0,
                html: Annotated[Path | None, typer.Option(help="Also save the HTML report here.")] = None) -> None:
    """The report of REF: a report, job or model id."""
    report = _call("GET", f"/v1/reports/{ref}", params={"baseline": baseline, "page": page} if baseline
                   else {"page": page})
    _print(report)
    if html is not None:
        with _client() as client:
            html.write_text(client.get(report["html_url"]).text, encoding="utf-8")


@eval_app.command("drift")
def eval_drift(against: str, dataset: str | None = None, suite: str | None = None) -> None:
    """Data drift of --dataset from AGAINST (a model's training data, or a dataset); KPI drift on --suite."""
    params = {k: v for k, v in (("against", against), ("dataset_id", dataset), ("suite_id", suite)) if v}
    _print(_call("GET", "/v1/drift", params=params))


if __name__ == "__main__":
    app()
