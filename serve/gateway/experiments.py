"""A/B promotion inside the gateway: a challenger version of a persona against its active one.

With ``promotion: ab`` a gate-passing candidate is not promoted at once: the loop asks
``POST /admin/experiments`` to start an experiment. From then until it is decided:

* every side-by-side round of the persona pits the active version against the
  challenger (``contenders``);
* a share of the API clients is served by the challenger when they ask for the persona
  by name (``challenger_target``), sticky per client: a stable hash of (voter, experiment
  id) below the share. A pinned ``teto@v3`` is served as asked. The response's ``model``
  says which version answered;
* after each comparison and thumbs vote (coalesced, off the event loop), and on the
  scheduler's tick (for the time limit), ``feedback.abtest`` reads the pairwise verdicts:
  ``promote`` makes the challenger active (hot swap), ``retire`` marks it retired in the
  registry, after which it is never served again, not even by pin. Either way the
  decision is recorded with its figures, in the experiment and on the run that made the
  challenger.

serve does not import train: the CLI root hands in the registry's functions
(``RegistryActions``); a gateway without them cannot start experiments (503).

    experiments = Experiments(gateway, RegistryActions(registry.set_candidate, registry.set_active,
                                                       registry.retire))
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
from dataclasses import dataclass
from typing import Callable

import httpx

from feedback import experiments as store_experiments
from feedback import runs
from feedback.abtest import ABRules, ABResult, analyse
from feedback.errors import APIError, UserError
from feedback.naming import engine_name
from serve.gateway.catalog import Catalog, Target, UnknownModel
from serve.protocol import ExperimentRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class RegistryActions:
    """The adapter registry's changes an experiment makes (from ``train.registry``)."""

    set_candidate: Callable[[str, int | None], object]   # (persona, version or None to clear)
    promote: Callable[[str, int, str], object]           # (persona, version, reason): make it active
    retire: Callable[[str, int, str], object]            # (persona, version, reason): never served again


def bucket(voter: str, experiment_id: str) -> float:
    """A client's place in [0, 1) for one experiment: stable across requests and restarts
    (so a client keeps its version), independent between experiments."""
    digest = hashlib.sha256(f"{experiment_id}\0{voter}".encode()).digest()
    return int.from_bytes(digest[:8], "big") / 2**64


def check_challenger(catalog: Catalog, persona: str, version: int) -> int:
    """The persona's active version, when ``version`` may be tested against it; else the error."""
    info = catalog.personas.get(persona)
    if info is None:
        raise APIError(404, f"No persona {persona!r}.", param="persona")
    if info.active is None:
        raise APIError(409, f"{persona} has no active version to test a challenger against.", param="persona")
    if version not in info.versions:
        known = ", ".join(f"v{v}" for v in sorted(info.versions)) or "none"
        raise APIError(404, f"{persona} has no v{version} (versions: {known}).", param="challenger")
    if version == info.active:
        raise APIError(400, f"{persona} v{version} is the active version, not a challenger.", param="challenger")
    if version in info.unservable:
        raise APIError(409, f"{persona} v{version} was {info.unservable[version]}; it is not served again.",
                       param="challenger")
    return info.active


class Experiments:
    """The running experiments (persona -> its row, loaded from the store at start) and their decisions."""

    def __init__(self, gateway, actions: RegistryActions | None = None):
        self.gateway, self.actions = gateway, actions
        self.running: dict[str, dict] = {}
        self._dirty: set[str] = set()
        self._worker: asyncio.Task | None = None
        self._lock = asyncio.Lock()  # one change at a time: start, stop, a decision

    def load(self) -> None:
        self.running = {e["persona"]: e for e in store_experiments.running(self.gateway.store)}

    async def close(self) -> None:
        if self._worker:
            self._worker.cancel()

    # ---- serving ---------------------------------------------------------------------------
    def challenger_target(self, model: str, voter: str) -> Target | None:
        """The challenger's target when ``model`` names a persona under test and this voter falls
        in the challenger's share; else None (the catalog resolves the request as usual)."""
        exp = self.running.get(model)
        if exp is None or bucket(voter, exp["id"]) >= exp["share"]:
            return None
        try:
            return self.gateway.catalog.resolve(f"{model}@v{exp['challenger']}")
        except UnknownModel:  # refused since, its experiment about to close: the active one answers
            return None

    def contenders(self, persona: str) -> tuple[str, str] | None:
        """The two model ids of a side-by-side round while ``persona`` is under test: the tested
        active version (pinned, so that the traffic share cannot divert it) and the challenger."""
        exp = self.running.get(persona)
        return None if exp is None else (f"{persona}@v{exp['active']}", f"{persona}@v{exp['challenger']}")

    def kept_adapters(self) -> set[str]:
        """Engine names of the challengers: never unloaded as pinned versions."""
        return {engine_name(persona, exp["challenger"]) for persona, exp in self.running.items()}

    # ---- admin -----------------------------------------------------------------------------
    def _registry(self) -> RegistryActions:
        if self.actions is None:
            raise APIError(503, "This gateway cannot change the adapter registry, so it runs no experiments "
                                "(start it with `persona up`).")
        return self.actions

    async def start(self, body: ExperimentRequest) -> dict:
        """Make ``body.challenger`` the persona's candidate, load it on the engines and record the
        running experiment; returns its row."""
        persona, version = body.persona, body.challenger
        async with self._lock:
            if persona in self.running:
                current = self.running[persona]
                raise APIError(409, f"{persona} already has a running experiment, {current['id']} "
                                    f"(v{current['challenger']} against v{current['active']}); stop it first.",
                               param="persona")
            active = check_challenger(await asyncio.to_thread(self.gateway.load_catalog), persona, version)
            actions = self._registry()  # after the caller's mistakes, which are theirs to fix first
            try:
                await asyncio.to_thread(actions.set_candidate, persona, version)
            except UserError as exc:  # the registry changed in between
                raise APIError(409, str(exc), param="challenger") from None
            await self.gateway.reload()
            await self._load(actions, persona, version)
            exp = await asyncio.to_thread(store_experiments.start, self.gateway.store, persona, version, active,
                                          body.run_id, body.share, body.min_votes, body.alpha, body.max_hours)
            self.running[persona] = exp
        log.info("experiment %s: %s v%d against v%d, %.0f%% of API clients", exp["id"], persona, version, active,
                 100 * body.share)
        return exp

    async def _load(self, actions: RegistryActions, persona: str, version: int) -> None:
        """Load the challenger on every engine now; one that refuses it retires it."""
        target = self.gateway.catalog.resolve(f"{persona}@v{version}")
        try:
            await self.gateway.pool.ensure_loaded(target.adapter, target.path)
        except (APIError, httpx.HTTPError) as exc:
            why = f"an engine refused it: {getattr(exc, 'message', None) or type(exc).__name__}"
            await asyncio.to_thread(actions.retire, persona, version, why)
            await self.gateway.reload()
            raise APIError(getattr(exc, "status", 503), f"{persona} v{version} is not tested: {why}.",
                           param="challenger") from None

    def recent(self, persona: str | None = None, limit: int = 20) -> list[dict]:
        """The latest experiments, newest first (runs in a thread: it reads the store)."""
        return store_experiments.recent(self.gateway.store, persona, limit)

    async def stop(self, experiment_id: str) -> dict:
        """Stop a running experiment by hand: its challenger is retired (never served again)."""
        async with self._lock:
            exp = await asyncio.to_thread(store_experiments.get, self.gateway.store, experiment_id)
            reason = "stopped by an operator"
            if exp["status"] == "running":
                await self._retire(self._registry(), exp, f"experiment {experiment_id} {reason}")
            done = await asyncio.to_thread(store_experiments.stop, self.gateway.store, experiment_id, reason)
            self.running.pop(exp["persona"], None)
            await self.gateway.reload()
            await self._record_run(done, "retired", f"A/B experiment {experiment_id} {reason}")
        return done

    async def _retire(self, actions: RegistryActions, exp: dict, reason: str) -> None:
        try:
            await asyncio.to_thread(actions.retire, exp["persona"], exp["challenger"], reason)
        except UserError as exc:  # e.g. promoted by hand meanwhile: an operator's decision stands
            log.warning("experiment %s: v%d not retired: %s", exp["id"], exp["challenger"], exc)

    # ---- decisions -------------------------------------------------------------------------
    def notify(self) -> None:
        """A vote or comparison was recorded: analyse the running experiments again, in a task of
        its own (the vote has its answer already), coalescing a burst of votes into few analyses."""
        if not self.running:
            return
        self._dirty.update(self.running)
        if self._worker is None or self._worker.done():
            self._worker = asyncio.create_task(self._work())

    async def _work(self) -> None:
        while self._dirty:
            persona = self._dirty.pop()
            try:
                await self.check(persona)
            except Exception:  # noqa: BLE001 - a failed analysis never fails a vote; the next one retries
                log.exception("the A/B analysis of %s failed", persona)

    async def check_all(self) -> list[dict]:
        """Analyse every running experiment (the scheduler's tick: the time limits); the decided ones."""
        decided = []
        for persona in list(self.running):
            try:
                exp = await self.check(persona)
            except Exception:  # noqa: BLE001 - one experiment's failure does not stop the others' checks
                log.exception("the A/B analysis of %s failed", persona)
                continue
            if exp is not None and exp["status"] != "running":
                decided.append(exp)
        return decided

    def _analyse(self, exp: dict) -> tuple[ABResult, dict]:
        expired = store_experiments.hours_since(exp["started_at"]) >= exp["max_hours"]
        rules = ABRules(alpha=exp["alpha"], min_votes=exp["min_votes"])
        result = analyse(store_experiments.verdicts(self.gateway.store, exp), rules, expired=expired)
        return result, store_experiments.thumbs(self.gateway.store, exp)

    async def check(self, persona: str) -> dict | None:
        """Analyse the persona's running experiment and act on the decision; its row, or None."""
        async with self._lock:
            exp = self.running.get(persona)
            if exp is None:
                return None
            info = self.gateway.catalog.personas.get(persona)
            active = info.active if info else None
            if active != exp["active"]:
                return await self._superseded(exp, active)
            result, thumbs = await asyncio.to_thread(self._analyse, exp)
            figures = store_experiments.figures_of(result, thumbs)
            if result.decision == "continue":
                await asyncio.to_thread(store_experiments.record_figures, self.gateway.store, exp["id"], figures)
                exp["figures"] = figures
                return exp
            return await self._decide(exp, result, figures)

    async def _superseded(self, exp: dict, active: int | None) -> dict:
        """An operator made another version active meanwhile (promote, rollback): the test against
        the old one is moot. It stops; the challenger is retired unless it is the one made active."""
        reason = (f"stopped: v{active} was made active by hand while v{exp['challenger']} was tested "
                  f"against v{exp['active']}")
        if active != exp["challenger"]:
            await self._retire(self._registry(), exp, f"experiment {exp['id']} {reason}")
        done = await asyncio.to_thread(store_experiments.stop, self.gateway.store, exp["id"], reason)
        self.running.pop(exp["persona"], None)
        await self.gateway.reload()
        await self._record_run(done, "promoted" if active == exp["challenger"] else "retired",
                               f"A/B experiment {exp['id']} {reason}")
        return done

    async def _decide(self, exp: dict, result: ABResult, figures: dict) -> dict:
        status, reason = await self._apply(exp, result)
        done = await asyncio.to_thread(store_experiments.record_decision, self.gateway.store, exp["id"], status,
                                       figures, reason)
        self.running.pop(exp["persona"], None)
        await self._record_run(done, status, f"A/B experiment {exp['id']}: {status}: {reason}")
        log.info("experiment %s: %s v%d %s: %s", exp["id"], exp["persona"], exp["challenger"], status, reason)
        return done

    async def _apply(self, exp: dict, result: ABResult) -> tuple[str, str]:
        """Promote or retire the challenger in the registry and hot-swap; (status, reason). A
        promotion an engine refuses goes back to the version before, and retires the challenger."""
        actions, persona, version = self._registry(), exp["persona"], exp["challenger"]
        reason = result.reason
        if result.decision != "promote":
            await self._retire(actions, exp, f"lost A/B experiment {exp['id']}: {reason}")
            await self.gateway.reload()
            return "retired", reason
        previous = self.gateway.catalog.personas[persona].active
        await asyncio.to_thread(actions.promote, persona, version, f"won A/B experiment {exp['id']}: {reason}")
        try:
            await self.gateway.reload()
            return "promoted", reason
        except (APIError, httpx.HTTPError) as exc:
            why = f"{reason}; but an engine refused it ({getattr(exc, 'message', exc)}), so v{previous} stays"
            await asyncio.to_thread(actions.promote, persona, previous, why)
            await self._retire(actions, exp, why)
            await self.gateway.reload()
            return "retired", why

    async def _record_run(self, exp: dict, status: str, message: str) -> None:
        """The outcome on the run that made the challenger, when a run did (its record stays
        otherwise as it was: a finished run, now ``promoted`` or ``retired``)."""
        if exp.get("run_id"):
            await asyncio.to_thread(runs.record_outcome, self.gateway.store, exp["run_id"], status, message)
