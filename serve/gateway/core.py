"""The gateway's state and its non-HTTP logic: persona resolution, adapter
hot-swap, turn records. ``app.py`` holds the routes."""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

from feedback.store import Store, Turn
from serve.gateway.catalog import Catalog, Target, engine_name
from serve.gateway.engines import EnginePool, UpstreamError
from serve.gateway.metrics import Metrics
from serve.gateway.vote_queue import VoteQueue

log = logging.getLogger(__name__)


def _read_meta(adapter_path: str) -> dict:
    """An adapter folder's meta.json (kind, parent, metrics), or {} when it has none."""
    try:
        return json.loads((Path(adapter_path) / "meta.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}


def _timestamp(text: str | None) -> datetime | None:
    try:
        return datetime.strptime(text, "%Y-%m-%dT%H:%M:%SZ") if text else None
    except ValueError:
        return None


class GatewayError(Exception):
    """An error for the caller, answered in OpenAI's error shape with this status
    (and ``headers``, e.g. ``Retry-After`` on a 429 or 503)."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers


@dataclass
class GatewayConfig:
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    max_body_bytes: int = 1 << 20      # 1 MiB of JSON per request
    # Concurrent chat requests; more get a 429 with Retry-After at once. The embedded engine
    # decodes 32 sequences together (--max-batch) and queues the rest, so on a CPU a deeper
    # queue only makes time to first token grow: 64 is one batch running and one waiting.
    max_in_flight: int = 64
    retry_after: int = 1               # seconds a refused caller is told to wait (Retry-After)
    health_interval: float = 10.0      # seconds between engine health checks
    engine_wait: float = 600.0         # how long start-up waits for the engines
    drain_timeout: float = 120.0       # how long a swapped-out adapter may finish its requests
    vote_batch: int = 512              # most votes written in one transaction (group commit)
    shutdown_timeout: float = 30.0     # on SIGTERM, how long running requests may take to finish


class Gateway:
    def __init__(self, load_catalog: Callable[[], Catalog], pool: EnginePool, store: Store,
                 config: GatewayConfig | None = None):
        self.load_catalog = load_catalog
        self.catalog = load_catalog()
        self.pool = pool
        self.store = store
        self.config = config or GatewayConfig()
        self.metrics = Metrics()
        self.votes = VoteQueue(store, self.config.vote_batch)
        self.scheduler = None  # a serve.gateway.scheduler.Scheduler when retraining is scheduled
        self.in_flight = 0
        self.draining = False  # set on SIGTERM: new requests get 503 while running ones finish
        self.adapter_in_flight: Counter[str] = Counter()
        self._health_task: asyncio.Task | None = None
        self._recheck: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()

    # ---- life cycle --------------------------------------------------------------------
    async def start(self) -> None:
        await self.pool.wait_healthy(self.config.engine_wait)
        for target in self.catalog.active_targets():
            await self.pool.ensure_loaded(target.adapter, target.path)
        await asyncio.to_thread(self.sync_store)
        self.votes.start()
        if self.scheduler:
            self.scheduler.start()
        self._health_task = asyncio.create_task(self._watch_health())
        log.info("gateway ready: %s", ", ".join(t.model_id for t in self.catalog.active_targets()) or "no personas")

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        await self.votes.stop()
        if self.scheduler:
            await self.scheduler.stop()
        await self.pool.close()

    def engine_failed(self, replica) -> None:
        """An engine broke off a request: take it out of rotation and check the engines now
        (a dead engine that ``persona up`` started is started again, and gets its adapters back)."""
        replica.healthy = False
        if self._recheck is None or self._recheck.done():
            self._recheck = asyncio.create_task(self.pool.check())

    async def _watch_health(self) -> None:
        while True:
            await asyncio.sleep(self.config.health_interval)
            try:
                await self.pool.check()
            except Exception:  # keep watching whatever one check did
                log.exception("engine health check failed")

    # ---- requests ----------------------------------------------------------------------
    def begin(self, target: Target) -> None:
        self.in_flight += 1
        self.adapter_in_flight[target.adapter] += 1
        self.metrics.in_flight.inc()

    def end(self, target: Target) -> None:
        self.in_flight -= 1
        self.adapter_in_flight[target.adapter] -= 1
        self.metrics.in_flight.dec()

    # ---- adapters ----------------------------------------------------------------------
    async def prepare(self, target: Target) -> None:
        """Make sure the target's adapter is on the engines (pinned versions load on first use)."""
        if not all(target.adapter in r.loaded for r in self.pool.replicas if r.healthy):
            await self.pool.ensure_loaded(target.adapter, target.path)

    async def open_chat(self, target: Target, upstream: dict):
        """Send a chat request to an engine that has the target's adapter.

        An engine that answers 404 for the adapter lost it (a restart between two health
        checks, an unload by hand): the adapter is loaded again and the request retried once.
        """
        await self.prepare(target)
        try:
            return await self.pool.open_chat(upstream)
        except UpstreamError as exc:
            if exc.status != 404:
                raise
            log.warning("an engine no longer has %s; loading it again", target.adapter)
            for replica in self.pool.replicas:
                replica.loaded.discard(target.adapter)
            await self.pool.ensure_loaded(target.adapter, target.path)
            return await self.pool.open_chat(upstream)

    async def reload(self) -> dict:
        """Re-read the catalog and hot-swap: load each newly active adapter under its own
        name, switch the alias, let requests on the old version finish, then unload it."""
        async with self._reload_lock:
            new = self.load_catalog()
            for target in new.active_targets():
                await self.pool.ensure_loaded(target.adapter, target.path)
            old_names = {t.adapter for t in self.catalog.active_targets()}
            self.catalog = new  # the switch: new requests resolve to the new versions from here
            await asyncio.to_thread(self.sync_store)
            new_names = {t.adapter for t in new.active_targets()}
            for name in sorted(old_names - new_names):
                await self._drain(name)
                await self.pool.unload(name)
                log.info("adapter %s unloaded after the swap", name)
            return {t.persona: t.adapter for t in new.active_targets()}

    async def _drain(self, adapter: str) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self.adapter_in_flight[adapter] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    def sync_store(self) -> None:
        """Mirror the catalog's adapter versions (with their metadata) into the store."""
        rows = []
        for p in self.catalog.personas.values():
            for version, path in p.versions.items():
                meta = _read_meta(path)
                status = ("active" if version == p.active else "candidate" if version == p.candidate
                          else "available")
                rows.append({"name": engine_name(p.name, version), "persona": p.name, "version": version,
                             "path": path, "kind": meta.get("kind"), "parent_version": meta.get("parent_version"),
                             "status": status, "metrics": meta.get("metrics"),
                             "created_at": _timestamp(meta.get("created_at"))})
        self.store.sync_adapters(rows)

    def snapshot(self) -> str:
        """Export the store as Parquet for other processes (the live file is this process's)."""
        from feedback.snapshot import new_snapshot_path, prune

        folder = self.store.snapshot(new_snapshot_path())
        prune()
        return str(folder)

    # ---- turns -------------------------------------------------------------------------
    def record(self, turn: Turn, target: Target) -> None:
        """Write a served turn to the store and count it in the metrics."""
        self.store.add_turn(turn)
        labels = (target.persona, target.adapter)
        self.metrics.requests.labels(*labels, turn.status).inc()
        self.metrics.latency.labels(*labels).observe(turn.latency_ms / 1000)
        if turn.ttft_ms is not None:
            self.metrics.ttft.labels(*labels).observe(turn.ttft_ms / 1000)
        self.metrics.tokens.labels(*labels, "prompt").inc(turn.prompt_tokens or 0)
        self.metrics.tokens.labels(*labels, "completion").inc(turn.completion_tokens or 0)
