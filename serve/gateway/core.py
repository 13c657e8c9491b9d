"""The gateway's state and its non-HTTP logic: key rings, persona resolution,
the count of chat turns in flight, adapter hot-swap, pinned versions loaded on
demand (and unloaded past a cap), vote quotas, admin actions, turn records,
and the A/B experiments (``experiments.py``, told of every vote).

The routes (``serve/gateway/routes/``) and the browser UI call it; ``chat.py``
runs one chat turn through it.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import Counter, OrderedDict
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Callable

import httpx

from feedback import settings
from feedback.errors import APIError
from feedback.naming import engine_name
from feedback.snapshot import remove_partials
from feedback.store import Store, Turn
from feedback.votes import Vote, record_comparison
from serve.gateway.auth import KeyRing
from serve.gateway.catalog import Catalog, Target
from serve.gateway.engines import EnginePool, Replica, parse_error
from serve.gateway.experiments import Experiments, RegistryActions
from serve.gateway.metrics import Metrics
from serve.gateway.quota import DAY, MINUTE, VoteQuota
from serve.gateway.store_writer import StoreWriter
from serve.gateway.slots import Slots, TurnSlot
from serve.gateway.vote_queue import VoteQueue
from serve.protocol import LoadLoRAAdapterRequest, UnloadLoRAAdapterRequest

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


def inside_root(path: str, root: Path) -> str:
    """``path`` resolved (symlinks and ``..``; relative to ``root``) when it lies inside
    ``root``; otherwise a 400 naming both. An admin key loads adapters, not any file."""
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        resolved = None
    if resolved is None or not resolved.is_relative_to(root):
        raise APIError(400, f"lora_path must lie inside {root} (the adapters folder); {path!r} does not.",
                       param="lora_path")
    return str(resolved)


@dataclass
class GatewayConfig:
    api_keys: tuple[str, ...] = ()
    admin_keys: tuple[str, ...] = ()
    # Key files accepted besides the keys, re-read when they change (KeyRing); read from the
    # settings when the config is made, unless given.
    api_key_file: Path | None = field(default_factory=lambda: settings.get("PERSONA_API_KEY_FILE"))
    admin_key_file: Path | None = field(default_factory=lambda: settings.get("PERSONA_ADMIN_KEY_FILE"))
    # /v1/load_lora_adapter loads only from here (PERSONA_HOME's adapters folder unless given).
    adapters_root: Path = field(default_factory=lambda: settings.adapters_dir().resolve())
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
    # Votes (thumbs and side by side) per voter a minute and a day; more get 429 (0: no limit).
    vote_quota_minute: int = field(default_factory=lambda: settings.get("PERSONA_VOTE_QUOTA_MINUTE"))
    vote_quota_day: int = field(default_factory=lambda: settings.get("PERSONA_VOTE_QUOTA_DAY"))
    # One client's share (slots.py): answers in flight at once (n counts as n) and chat requests
    # a minute; more get 429 with Retry-After (0: no limit).
    key_max_in_flight: int = field(default_factory=lambda: settings.get("PERSONA_KEY_MAX_IN_FLIGHT"))
    key_requests_minute: int = field(default_factory=lambda: settings.get("PERSONA_KEY_REQUESTS_MINUTE"))
    # The HTTP edge (edge.py): the Host names and the other pages' origins served, how long a
    # body may take to arrive and an idle connection may stay, whose proxy headers count.
    allowed_hosts: tuple[str, ...] = field(default_factory=lambda: settings.get("PERSONA_ALLOWED_HOSTS"))
    allowed_origins: tuple[str, ...] = field(default_factory=lambda: settings.get("PERSONA_ALLOWED_ORIGINS"))
    body_timeout: float = field(default_factory=lambda: settings.get("PERSONA_BODY_TIMEOUT"))
    keep_alive_timeout: float = field(default_factory=lambda: settings.get("PERSONA_KEEP_ALIVE_TIMEOUT"))
    forwarded_allow_ips: tuple[str, ...] = ()  # `persona up --forwarded-allow-ips`
    # Pinned versions (teto@v2) kept loaded on the engines besides the active and candidate ones;
    # past it the least recently used is unloaded (each loaded adapter holds engine memory).
    max_pinned: int = 4
    # Seconds between two heartbeat writes of the store (StoreWriter): how soon /health sees a
    # store that broke while idle, and how soon writing resumes once it recovers.
    store_probe_seconds: float = 5.0


class Gateway:
    def __init__(self, load_catalog: Callable[[], Catalog], pool: EnginePool, store: Store,
                 config: GatewayConfig | None = None, registry: RegistryActions | None = None):
        """``registry``: the adapter registry's changes an A/B experiment makes (the CLI root
        passes ``train.registry``'s); without them the gateway runs no experiments."""
        self.load_catalog = load_catalog
        self.catalog = load_catalog()
        self.pool = pool
        self.store = store
        self.config = config or GatewayConfig()
        self.api_keys = KeyRing(self.config.api_keys, self.config.api_key_file)
        self.admin_keys = KeyRing(self.config.admin_keys, self.config.admin_key_file)
        if not self.api_keys.required:
            log.warning("PERSONA_API_KEY is not set: the API serves loopback clients only")
        if not self.admin_keys.required:
            log.warning("PERSONA_ADMIN_KEY is not set: admin routes serve loopback clients only")
        self.metrics = Metrics()
        self.writer = StoreWriter(store, self.config.store_probe_seconds)  # every turn and vote write
        self.votes = VoteQueue(store, self.config.vote_batch, run=self.writer.write)
        self.quota = VoteQuota({MINUTE: self.config.vote_quota_minute, DAY: self.config.vote_quota_day})
        self.pinned: OrderedDict[str, None] = OrderedDict()  # pinned adapters loaded, least recently used first
        self.scheduler = None  # a serve.gateway.scheduler.Scheduler when retraining is scheduled
        self.experiments = Experiments(self, registry)
        self.draining = False  # set on SIGTERM: new requests get 503 while running ones finish
        self.slots = Slots(self.config)  # who may start a chat turn now (slots.py)
        self.turns: Counter[str] = self.slots.adapters  # adapter -> slots its turns hold, kept by TurnSlot
        self.metrics.in_flight.set_function(lambda: self.in_flight)
        self._health_task: asyncio.Task | None = None
        self._recheck: asyncio.Task | None = None
        self._reload_lock = asyncio.Lock()
        self._pinned_lock = asyncio.Lock()

    # ---- life cycle --------------------------------------------------------------------
    async def start(self) -> None:
        await self.pool.wait_healthy(self.config.engine_wait)
        for target in self.catalog.active_targets():
            await self.pool.ensure_loaded(target.adapter, target.path)
        await asyncio.to_thread(self.sync_store)
        await asyncio.to_thread(self.experiments.load)
        await asyncio.to_thread(remove_partials)  # snapshots a killed process left half-written
        self.writer.start()
        self.votes.start()
        if self.scheduler:
            self.scheduler.start()
        self._health_task = asyncio.create_task(self._watch_health())
        log.info("gateway ready: %s", ", ".join(t.model_id for t in self.catalog.active_targets()) or "no personas")

    async def stop(self) -> None:
        if self._health_task:
            self._health_task.cancel()
        await self.votes.stop()
        await self.experiments.close()
        if self.scheduler:
            await self.scheduler.stop()
        await self.writer.stop()
        await self.pool.close()

    def engine_failed(self, replica: Replica) -> None:
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

    # ---- chat turns --------------------------------------------------------------------
    @property
    def in_flight(self) -> int:
        """Slots held by the chat turns in flight (a turn holds its ``n``), every adapter's together."""
        return sum(self.turns.values())

    def admit(self, target: Target, client: str, weight: int = 1) -> TurnSlot:
        """Slots for one chat turn of ``client`` (``weight``: its ``n``), or at once a 429 with
        Retry-After past ``max_in_flight`` or the client's share (``slots.py``)."""
        return self.slots.admit(target.adapter, client, weight)

    def retry_after(self) -> dict[str, str]:
        return self.slots.retry_after()

    async def send(self, target: Target, upstream: dict) -> tuple[Replica, httpx.Response]:
        """Send a chat request to an engine that has the target's adapter; the replica and its
        open (streamed) response, which the caller hands to ``pool.finish``.

        An engine that answers 404 for the adapter lost it (a restart between two health
        checks, an unload by hand): the adapter is loaded again and the request retried once.
        """
        await self.prepare(target)
        try:
            return await self.pool.post_chat(upstream)
        except APIError as exc:
            if exc.status != 404:
                raise
            log.warning("an engine no longer has %s; loading it again", target.adapter)
            for replica in self.pool.replicas:
                replica.loaded.discard(target.adapter)
            await self.prepare(target)
            return await self.pool.post_chat(upstream)

    async def record(self, turn: Turn, target: Target) -> None:
        """Count a served turn in the metrics and write it to the store (off the event loop;
        a 503 ``StoreUnavailable`` when the store cannot write)."""
        self._count(turn, target)
        await self.writer.write(self.store.add_turn, turn)

    def record_later(self, turn: Turn, target: Target) -> None:
        """``record`` without waiting for the write: a turn that ended early (its reader went
        away), which nobody waits for."""
        self._count(turn, target)
        self.writer.submit(self.store.add_turn, turn, what=f"writing turn {turn.id}")

    def _count(self, turn: Turn, target: Target) -> None:
        labels = (target.persona, target.adapter)
        self.metrics.requests.labels(*labels, turn.status).inc()
        self.metrics.latency.labels(*labels).observe(turn.latency_ms / 1000)
        if turn.ttft_ms is not None:
            self.metrics.ttft.labels(*labels).observe(turn.ttft_ms / 1000)
        self.metrics.tokens.labels(*labels, "prompt").inc(turn.prompt_tokens or 0)
        self.metrics.tokens.labels(*labels, "completion").inc(turn.completion_tokens or 0)

    # ---- votes -------------------------------------------------------------------------
    async def vote(self, vote: Vote, voter: str) -> str:
        """Record a thumbs vote (the API's and the UI's) within ``voter``'s quota: past it a 429
        with Retry-After, and nothing written."""
        self.quota.take(voter)
        status = await self.votes.submit(vote)
        self.experiments.notify()  # the thumbs per arm of a running experiment
        return status

    async def compare(self, turn_a: str, turn_b: str, choice: str, left: str, client: str,
                      user_name: str | None = None, voter: str | None = None) -> str:
        """Record which of two answers won (the API's and the UI's side-by-side votes), within
        the quota of ``voter`` (the client unless given)."""
        self.quota.take(voter or client)
        comparison_id = await self.writer.write(record_comparison, self.store, turn_a, turn_b, choice, left, client,
                                                user_name)
        self.experiments.notify()  # a verdict a running experiment may decide on
        return comparison_id

    # ---- adapters ----------------------------------------------------------------------
    async def prepare(self, target: Target) -> None:
        """Make sure the target's adapter is on the engines: pinned versions load on first use,
        and loading one past ``max_pinned`` unloads the least recently used."""
        persona = self.catalog.personas.get(target.persona)
        if persona is None or persona.active != target.version:
            self.pinned[target.adapter] = None
            self.pinned.move_to_end(target.adapter)
        if not all(target.adapter in r.loaded for r in self.pool.replicas if r.healthy):
            await self.pool.ensure_loaded(target.adapter, target.path)
            await self.unload_pinned()

    async def unload_pinned(self) -> None:
        """Unload pinned versions past ``max_pinned``, least recently used first; never an active,
        candidate or challenger version (they do not count), nor one with turns in flight (it
        stays, over the cap, until a later load finds it idle)."""
        async with self._pinned_lock:
            kept = self.catalog.kept_adapters() | self.experiments.kept_adapters()
            pinned = [name for name in self.pinned if name not in kept]
            for name in pinned[:max(0, len(pinned) - self.config.max_pinned)]:
                if not self.turns[name]:
                    await self._unload(name, "a pinned version past the cap, least recently used")

    async def _unload(self, name: str, why: str) -> None:
        """Unload an adapter from the engines; a failure is logged, never the caller's error."""
        self.pinned.pop(name, None)
        try:
            await self.pool.unload(name)
        except (APIError, httpx.HTTPError) as exc:
            log.warning("could not unload adapter %s: %s", name, exc)
            return
        log.info("adapter %s unloaded: %s", name, why)

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
            # Swapped out, or refused since (a candidate the gate rejected): they go once drained.
            refused = new.unservable_adapters() & set(self.pool.wanted)
            for name in sorted((old_names - new_names) | refused):
                await self._drain(name)
                await self._unload(name, "refused by the registry" if name in refused else "swapped out")
            await self.unload_pinned()
            return {t.persona: t.adapter for t in new.active_targets()}

    async def _drain(self, adapter: str) -> None:
        deadline = time.monotonic() + self.config.drain_timeout
        while self.turns[adapter] and time.monotonic() < deadline:
            await asyncio.sleep(0.1)

    async def load_adapter(self, body: LoadLoRAAdapterRequest) -> str:
        """vLLM's load request, sent to every engine; the folder must lie in the adapters folder."""
        body.lora_path = inside_root(body.lora_path, self.config.adapters_root)
        return await self._broadcast("/v1/load_lora_adapter", body.model_dump(exclude_none=True))

    async def unload_adapter(self, body: UnloadLoRAAdapterRequest) -> str:
        return await self._broadcast("/v1/unload_lora_adapter", body.model_dump(exclude_none=True))

    async def _broadcast(self, route: str, body: dict) -> str:
        """An admin request to every engine: their answer's text, or the first refusal."""
        resp = await self.pool.broadcast(route, body)
        if resp.status_code != 200:
            raise parse_error(resp.status_code, resp.content)
        return resp.text

    def sync_store(self) -> None:
        """Mirror the catalog's adapter versions (with their metadata) into the store."""
        rows = []
        for p in self.catalog.personas.values():
            for version, path in p.versions.items():
                meta = _read_meta(path)
                # The adapters table knows no "rejected": a version the registry refuses is retired there.
                status = ("active" if version == p.active else "candidate" if version == p.candidate
                          else "retired" if version in p.unservable else "available")
                rows.append({"name": engine_name(p.name, version), "persona": p.name, "version": version,
                             "path": path, "kind": meta.get("kind"), "parent_version": meta.get("parent_version"),
                             "status": status, "metrics": meta.get("metrics"),
                             "created_at": _timestamp(meta.get("created_at"))})
        self.store.sync_adapters(rows)

    # ---- training ----------------------------------------------------------------------
    def snapshot(self) -> str:
        """Export the store as Parquet for other processes (the live file is this process's)."""
        from feedback.snapshot import new_snapshot_path, prune

        folder = self.store.snapshot(new_snapshot_path())
        prune()
        return str(folder)

    def retrain(self, persona: str, force: bool = False, promotion: str | None = None) -> dict:
        """Start a retrain of ``persona`` now (the scheduler's run, outside its timer);
        ``promotion`` ("gate" or "ab") overrides the recipe's."""
        if persona not in self.catalog.personas:
            raise APIError(404, f"No persona {persona!r}.", param="persona")
        if self.scheduler is None:
            raise APIError(503, "This gateway has no retrain scheduler.")
        return self.scheduler.launch(persona, force, **({"promotion": promotion} if promotion else {}))
