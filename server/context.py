"""The service's long-lived resources, opened once (`server.service.open_service`) and passed to
every tool and core function that needs them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol

from sqlalchemy import Engine

from server.settings import Settings


class Workers(Protocol):
    """What the rest of the service needs of an executor (local child processes, or Ray)."""

    owner: str

    def wake(self) -> None:
        """Look for work now rather than at the next poll (a job was just queued)."""

    def max_devices(self) -> int:
        """The most devices (GPUs, or CPU processes where there are none) one job can be given."""


@dataclass
class ServiceContext:
    settings: Settings
    engine: Engine
    executor: Workers | None = None
    """None where this process runs no workers (a second API process; tests of the store)."""
    serving: Any = None
    """The gateway to the serving engine (`server.serving.gateway.Gateway`; typed loosely because the
    gateway itself needs this context). `gateway_of(ctx)` gets it."""

    def wake_workers(self) -> None:
        if self.executor is not None:
            self.executor.wake()


class ServiceRef:
    """Where transports built before start-up find the service once a lifespan has opened it."""

    def __init__(self, ctx: ServiceContext | None = None):
        self.ctx = ctx

    def get(self) -> ServiceContext:
        if self.ctx is None:
            raise RuntimeError("the service is not started (its lifespan has not run)")
        return self.ctx
