"""Opening the service: migrate the store, make the home's folders, start the embedded workers."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

from server.context import ServiceContext
from server.settings import Settings
from server.store.agents import ensure_local_agent
from server.store.db import make_engine, migrate
from server.workers.executor import LocalExecutor


@contextmanager
def open_service(settings: Settings, *, workers: bool = True) -> Iterator[ServiceContext]:
    """The service's context, open until the block ends; undoes everything on exit."""
    for directory in (settings.home, settings.datasets_dir, settings.runs_dir, settings.models_dir):
        directory.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    ensure_local_agent(engine, settings)
    executor = LocalExecutor(engine, settings) if workers and settings.worker_slots > 0 else None
    if executor is not None:
        executor.start()
    try:
        yield ServiceContext(settings=settings, engine=engine, executor=executor)
    finally:
        if executor is not None:
            executor.stop()
        engine.dispose()
