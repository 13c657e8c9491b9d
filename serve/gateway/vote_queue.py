"""Group commit for votes: concurrent votes are checked and written together.

Each vote waits for the batch it is in to commit, so an acknowledged vote is
on disk; while one batch commits, the next one gathers. Under load one
lookup and one insert serve many votes; alone, a vote is a batch of one.

    queue = VoteQueue(store); queue.start()
    status = await queue.submit(Vote(turn_id, "up", client))   # raises APIError if refused
"""

from __future__ import annotations

import asyncio
import logging
from typing import Awaitable, Callable

from feedback.store import Store, StoreUnavailable
from feedback.errors import APIError
from feedback.votes import Vote, record_votes

log = logging.getLogger(__name__)


class VoteQueue:
    def __init__(self, store: Store, max_batch: int = 512, run: Callable[..., Awaitable] = asyncio.to_thread):
        """``run(fn, *args)``: where a batch is written, off the event loop (the gateway's
        ``StoreWriter.write``; a thread of its own by default)."""
        self.store, self.max_batch, self.run = store, max_batch, run
        self._queue: asyncio.Queue | None = None
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._queue = asyncio.Queue()
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()

    async def submit(self, vote: Vote) -> str:
        if self._task is None:  # not started (no event loop of its own yet): write directly
            result = (await self.run(record_votes, self.store, [vote]))[0]
        else:
            future = asyncio.get_running_loop().create_future()
            await self._queue.put((vote, future))
            result = await future
        if isinstance(result, APIError):
            raise result
        return result

    async def _run(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self.max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            try:
                results = await self.run(record_votes, self.store, [v for v, _ in batch])
            except StoreUnavailable as exc:  # the store cannot write: each caller hears 503, nothing acknowledged
                results = [exc] * len(batch)
            except Exception as exc:  # the batch failed as a whole: every caller hears it
                log.exception("writing %d votes failed", len(batch))
                results = [exc] * len(batch)
            for (_, future), result in zip(batch, results):
                if future.done():
                    continue
                if isinstance(result, Exception) and not isinstance(result, APIError):
                    future.set_exception(result)
                else:
                    future.set_result(result)
