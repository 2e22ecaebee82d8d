"""The weightsmith command line: runs the service, administers agents, and is a thin client of the
REST API for every tool (`server/cli/commands.py` registers those from `tools.TOOLS`).

    weightsmith serve [--stdio] [--toolsets core]    weightsmith worker [--slots N]
    weightsmith agents add|list|rotate|revoke NAME    weightsmith demo
    weightsmith train ... | synth ... | tune ...     weightsmith jobs list|show|wait|watch|cancel|events|metrics
    weightsmith datasets upload|list|show            weightsmith models list|show
    weightsmith eval suite|suites|run|report|drift   weightsmith quota

Client commands talk to WEIGHTSMITH_URL (default http://127.0.0.1:8765) with WEIGHTSMITH_API_KEY.
"""

from __future__ import annotations

import signal
import sys
import threading
from typing import Annotated

import typer
from rich.console import Console
from rich.table import Table

from server.cli import watch
from server.cli.client import ClientError
from server.cli.commands import add_tool_commands
from server.settings import Settings

app = typer.Typer(help="Train and own domain models.", no_args_is_help=True, pretty_exceptions_enable=False)
agents_app = typer.Typer(help="Agent identities, keys and limits (operates on the local store).")
jobs_app = typer.Typer(help="Follow and control jobs.")
app.add_typer(agents_app, name="agents")
app.add_typer(jobs_app, name="jobs")
console = Console()


def main() -> None:
    """The console script: the commands below, and one command per tool."""
    from server.errors import WeightsmithError

    try:
        app(prog_name="weightsmith", standalone_mode=True)
    except WeightsmithError as err:  # the local administration commands: one line, never a traceback
        typer.secho(f"error: {err.message}", fg="red", err=True)
        sys.exit(2)


# ---- the service ---------------------------------------------------------------------------------

Executor = Annotated[str | None, typer.Option(help="Where jobs run: local (default) or ray "
                                                "(WEIGHTSMITH_EXECUTOR).")]
RayAddress = Annotated[str | None, typer.Option(help="The Ray head's dashboard, http://HEAD:8265 "
                                                     "(WEIGHTSMITH_RAY_ADDRESS).")]


def _settings(executor: str | None, ray_address: str | None) -> Settings:
    overrides = {k: v for k, v in (("executor", executor), ("ray_address", ray_address)) if v is not None}
    return Settings(**overrides)  # type: ignore[arg-type]


@app.command()
def serve(stdio: Annotated[bool, typer.Option("--stdio", help="MCP over stdin/stdout, for local agents.")] = False,
          host: str | None = None, port: int | None = None,
          toolsets: Annotated[str, typer.Option(help="MCP tool lists, comma-separated: core (the default), "
                                                     "inspect (details), all.")] = "core",
          executor: Executor = None, ray_address: RayAddress = None) -> None:
    """Run the service: REST /v1, MCP /mcp, the OpenAI-compatible /openai/v1, docs /docs, and the workers."""
    settings = _settings(executor, ray_address)
    settings.host, settings.port = host or settings.host, port or settings.port  # what list_models tells agents
    chosen = tuple(t.strip() for t in toolsets.split(",") if t.strip())
    if stdio:
        import anyio

        from server.api.mcp import build_mcp_server
        from server.context import ServiceRef
        from server.service import open_service

        async def run() -> None:
            with open_service(settings) as ctx:
                await build_mcp_server(ServiceRef(ctx), toolsets=chosen).run_stdio_async()

        anyio.run(run)
        return
    import uvicorn

    from server.api.app import create_app

    uvicorn.run(create_app(settings, toolsets=chosen), host=settings.host, port=settings.port,
                log_level="info")


@app.command()
def worker(slots: Annotated[int | None, typer.Option(help="Jobs at once (default: worker_slots).")] = None,
           executor: Executor = None, ray_address: RayAddress = None) -> None:
    """Run workers only, against the same database as the service."""
    from server.service import open_service

    settings = _settings(executor, ray_address)
    if slots is not None:
        settings.worker_slots = slots
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    with open_service(settings, scheduler=False) as ctx:
        console.print(f"worker {ctx.executor.owner if ctx.executor else '-'}: {settings.worker_slots} slot(s), "
                      f"store {settings.db_url}", style="dim")
        stop.wait()


@app.command()
def demo() -> None:
    """Train on the bundled sample corpus through the real MCP client, end to end."""
    from server.cli.demo import run_demo

    sys.exit(run_demo(console))


# ---- agents (local administration) ----------------------------------------------------------------

@agents_app.command("add")
def agents_add(name: str,
               max_request_flops: float | None = None, max_request_seconds: float | None = None,
               max_request_params: int | None = None, max_request_tokens: int | None = None,
               max_dataset_bytes: int | None = None, budget_flops: float | None = None,
               budget_window_seconds: float | None = None, max_concurrent_jobs: int | None = None) -> None:
    """Create an agent and print its API key (shown once, stored as a hash)."""
    from server.store import agents

    agent, key = agents.create_agent(
        _engine(), Settings(), name, max_request_flops=max_request_flops, max_request_seconds=max_request_seconds,
        max_request_params=max_request_params, max_request_tokens=max_request_tokens,
        max_dataset_bytes=max_dataset_bytes, budget_flops=budget_flops, budget_window_seconds=budget_window_seconds,
        max_concurrent_jobs=max_concurrent_jobs)
    console.print(f"agent {agent.name} ({agent.id}); its key, shown once:", style="dim", highlight=False)
    print(key)


@agents_app.command("rotate")
def agents_rotate(name: str) -> None:
    """Issue a new key for agent NAME and print it; the old key is refused from now on."""
    from server.store import agents

    agent, key = agents.rotate_key(_engine(), name)
    console.print(f"agent {agent.name}: new key, shown once (the old one no longer works):", style="dim",
                  highlight=False)
    print(key)


@agents_app.command("revoke")
def agents_revoke(name: str) -> None:
    """Refuse agent NAME's key from now on (over REST, MCP and the OpenAI endpoint); its objects stay."""
    from server.store import agents

    agent = agents.revoke_key(_engine(), name)
    console.print(f"agent {agent.name}: key revoked; 'weightsmith agents rotate {name}' issues a new one")


@agents_app.command("set")
def agents_set(name: str, limits: Annotated[list[str], typer.Argument(
        help="LIMIT=VALUE pairs, e.g. budget_flops=1e15 max_concurrent_jobs=2.")]) -> None:
    """Change agent NAME's limits (see 'weightsmith agents list' for their names and values)."""
    from server.store import agents

    values: dict[str, float] = {}
    for pair in limits:
        field, _, value = pair.partition("=")
        try:
            values[field] = float(value)
        except ValueError:
            raise typer.BadParameter(f"{pair!r}: write LIMIT=NUMBER, e.g. budget_flops=1e15") from None
    agent = agents.set_limits(_engine(), name, values)
    console.print(f"agent {agent.name}: " + ", ".join(f"{k}={getattr(agent, k):g}" for k in values))


@agents_app.command("list")
def agents_list() -> None:
    """Agents and their limits."""
    from sqlmodel import Session, select

    from server.store.agents import LIMIT_FIELDS
    from server.store.tables import Agent

    table = Table("name", "id", "key", *LIMIT_FIELDS)
    with Session(_engine()) as session:
        for agent in session.exec(select(Agent)):
            key = "revoked" if agent.revoked_at else ("set" if agent.key_hash else "stdio")
            table.add_row(agent.name, agent.id, key, *(f"{getattr(agent, f):g}" for f in LIMIT_FIELDS))
    console.print(table)


def _engine():  # type: ignore[no-untyped-def]
    from server.store.db import make_engine, migrate

    settings = Settings()
    settings.home.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    return engine


# ---- following jobs ---------------------------------------------------------------------------------

@jobs_app.command("watch")
def jobs_watch(job_id: str,
               as_json: Annotated[bool, typer.Option("--json", help="Print the ended job as JSON.")] = False) -> None:
    """A live progress bar (or a study's live trials table) until the job ends; then its summary."""
    try:
        watch.follow(job_id, as_json)
    except ClientError as err:
        typer.secho(f"error: {err}", fg="red", err=True)
        raise typer.Exit(err.exit_code) from err


add_tool_commands(app, {"jobs": jobs_app, "agents": agents_app})

if __name__ == "__main__":
    main()
