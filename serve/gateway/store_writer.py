"""The gateway's writes to its store, off the event loop, and whether the store can write.

A write waits for the store's lock (held meanwhile by a snapshot, a vote batch or a
read of the scheduler) and for the disk. The event loop serves every stream, so it
never waits for either: the writes of chat turns and votes run on this one thread,
in the order they were handed in (so a vote sent after its turn ended finds the
turn written, even one written without waiting: an aborted stream's).

    await writer.write(store.add_turn, turn)     # committed when it returns, or a 503 (StoreUnavailable)
    writer.submit(store.add_turn, turn)          # not waited for: an aborted turn, as it stands
    writer.check()                               # a 503 with Retry-After while the store cannot write

The store reports the outcome of every write (``Store.health``). While its writes
fail (a full disk), new chat turns are refused before anything is generated,
``/health`` answers 503, votes are answered 503 (never acknowledged, so never
lost), and a probe rewrites the store's heartbeat row every ``probe_seconds``: once
it succeeds, writing resumes without a restart. The probe also runs while all is
well, so a store that breaks while idle shows in ``/health`` within that time.
"""

from __future__ import annotations

import asyncio
import logging
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Callable

from feedback.store import Store, StoreUnavailable

log = logging.getLogger(__name__)


class StoreWriter:
    def __init__(self, store: Store, probe_seconds: float = 5.0):
        self.store, self.probe_seconds = store, probe_seconds
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="store-writer")
        self._probe: asyncio.Task | None = None

    def start(self) -> None:
        self._probe = asyncio.create_task(self._probe_loop())

    async def stop(self) -> None:
        """Stop probing and wait for the writes handed in (aborted turns) to land."""
        if self._probe:
            self._probe.cancel()
        await asyncio.to_thread(self._pool.shutdown, wait=True)

    async def write(self, fn: Callable, *args):
        """``fn(*args)`` on the writer thread; its result once committed. A caller that goes
        away meanwhile does not take the write with it (it is shielded): what was handed in
        is written."""
        inner = asyncio.wrap_future(self._pool.submit(fn, *args))
        inner.add_done_callback(_retrieved)  # a caller gone away leaves no "never retrieved" warning
        return await asyncio.shield(inner)

    def submit(self, fn: Callable, *args, what: str = "a write") -> Future | None:
        """``fn(*args)`` on the writer thread, not waited for; a failure is logged."""
        try:
            future = self._pool.submit(fn, *args)
        except RuntimeError:  # shut down: the gateway is stopping, and its loop with it
            log.warning("%s came after the store writer stopped; written at once", what)
            fn(*args)
            return None
        future.add_done_callback(lambda f: _log_failure(f, what))
        return future

    def check(self) -> None:
        """Raise ``StoreUnavailable`` (503, Retry-After) while the store's writes fail."""
        if not self.store.health.ok:
            raise StoreUnavailable(self.store.health.error)

    def health(self) -> dict:
        return self.store.health.status()

    async def _probe_loop(self) -> None:
        while True:
            await asyncio.sleep(self.probe_seconds)
            try:
                await self.write(self.store.probe)
            except StoreUnavailable:
                pass  # the store's health has it, logged once when it began
            except Exception:  # keep probing whatever one probe did
                log.exception("the store's heartbeat failed")


def _retrieved(future: asyncio.Future) -> None:
    if not future.cancelled():
        future.exception()


def _log_failure(future: Future, what: str) -> None:
    if future.cancelled():
        return
    exc = future.exception()
    if exc is not None and not isinstance(exc, StoreUnavailable):  # StoreUnavailable: logged by the store
        log.error("%s failed: %s", what, exc, exc_info=exc)
