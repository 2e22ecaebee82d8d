"""The service's long-lived resources, opened once by a lifespan and passed to every tool."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from sqlalchemy import Engine

from server.settings import Settings
from server.store import agents as auth
from server.store.db import make_engine, migrate
from server.workers.executor import LocalExecutor


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    executor: LocalExecutor | None

    def wake_workers(self) -> None:
        if self.executor is not None:
            self.executor.wake()


@contextmanager
def open_service(settings: Settings, *, workers: bool = True) -> Iterator[ServiceContext]:
    """Migrate the store, make the home's folders, start the embedded workers; undo on exit."""
    for directory in (settings.home, settings.datasets_dir, settings.runs_dir, settings.models_dir):
        directory.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    auth.ensure_local_agent(engine, settings)
    executor = LocalExecutor(engine, settings) if workers and settings.worker_slots > 0 else None
    if executor is not None:
        executor.start()
    try:
        yield ServiceContext(settings=settings, engine=engine, executor=executor)
    finally:
        if executor is not None:
            executor.stop()
        engine.dispose()


class ServiceRef:
    """Where transports built before start-up find the service once a lifespan has opened it."""

    def __init__(self, ctx: ServiceContext | None = None):
        self.ctx = ctx

    def get(self) -> ServiceContext:
        if self.ctx is None:
            raise RuntimeError("the service is not started (its lifespan has not run)")
        return self.ctx
