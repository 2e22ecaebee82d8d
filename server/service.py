"""Opening the service: migrate the store, make the home's folders, start the embedded workers."""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager

from server.context import ServiceContext
from server.schedules.scheduler import Scheduler
from server.serving.gateway import Gateway
from server.settings import Settings
from server.store.agents import ensure_local_agent
from server.store.db import make_engine, migrate
from server.workers.executor import make_executor
from training_core import cgroups

log = logging.getLogger("weightsmith")


@contextmanager
def open_service(settings: Settings, *, workers: bool = True, scheduler: bool = True,
                 serving: bool = True) -> Iterator[ServiceContext]:
    """The service's context, open until the block ends; undoes everything on exit. `scheduler`:
    fire due schedules in this process (service processes do; `weightsmith worker` does not);
    `serving`: answer /openai/v1 and sample_model (the engine starts on the first such request)."""
    for directory in (settings.home, settings.datasets_dir, settings.runs_dir, settings.models_dir):
        directory.mkdir(parents=True, exist_ok=True)
    engine = make_engine(settings.db_url)
    migrate(engine)
    log.info("job and sandbox totals: %s", cgroups.available().reason)
    ensure_local_agent(engine, settings)
    executor = make_executor(engine, settings) if workers and settings.worker_slots > 0 else None
    if executor is not None:
        executor.start()
    ctx = ServiceContext(settings=settings, engine=engine, executor=executor)
    ctx.serving = Gateway(ctx) if serving else None
    firing = Scheduler(ctx, owner=executor.owner if executor else f"scheduler:{os.getpid()}") if scheduler else None
    if firing is not None:
        firing.start()
    try:
        yield ctx
    finally:
        if firing is not None:
            firing.stop()
        if executor is not None:
            executor.stop()
        if ctx.serving is not None:
            ctx.serving.close()
        engine.dispose()
