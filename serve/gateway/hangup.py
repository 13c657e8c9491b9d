"""A caller that hangs up stops its work: the non-streaming chat's counterpart of what a
stream gets from Starlette (which stops a streaming response when its client leaves).

    data = await unless_hung_up(request, answer())   # None: the caller left (answer() cancelled)

While ``work`` runs, the request's channel is watched for ``http.disconnect``; when the
caller goes first, ``work`` is cancelled. For a chat turn that ends the turn (``ChatTurn``
closes the engine's response, so the engine aborts the sequence: the embedded engine
watches its own caller, as vLLM does) and frees its slots at once, instead of when the
engine would have finished an answer nobody reads.
"""

from __future__ import annotations

import asyncio
import contextlib
from typing import Awaitable, TypeVar

from starlette.requests import Request

T = TypeVar("T")


async def unless_hung_up(request: Request, work: Awaitable[T]) -> T | None:
    """``work``'s result, or None (``work`` cancelled) when the caller hangs up first. Call it
    once the body has been read: from then on the channel carries only the disconnect."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_hang_up(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for pending in (watcher, task):
            if not pending.done():
                pending.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await watcher
    if not task.done() or task.cancelled():
        with contextlib.suppress(asyncio.CancelledError):
            await task  # let its cleanup (the turn's end) run to completion before returning
        return None
    return task.result()


async def _hang_up(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass  # a body part after the body was read: none comes from a well-behaved server
