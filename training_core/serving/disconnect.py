"""Cancelling work for an HTTP client that has gone away (the engine's routes and the service's proxy).

ASGI servers do not cancel a handler whose client disconnects (they only drop what it sends), so an
answer that does not stream would otherwise be generated to its end for nobody. Light on purpose:
the service imports it without torch.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

from starlette.requests import Request

T = TypeVar("T")
CLIENT_CLOSED_REQUEST = 499
"""The status logged for a request whose client left first (nginx's); nobody is there to read it."""


class ClientLeft(Exception):
    """The client disconnected before its answer was ready; the work for it was cancelled."""


async def unless_client_leaves(request: Request, work: Awaitable[T]) -> T:
    """`work`'s result, or ClientLeft once `work` is cancelled because the client disconnected first.
    Call only after the body has been read: the request's next message is then its disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_disconnected(request))
    try:
        done, _ = await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    except BaseException:
        task.cancel()
        raise
    finally:
        watcher.cancel()
    if task in done:
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)  # its clean-up runs before we answer
    raise ClientLeft


async def _disconnected(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass
