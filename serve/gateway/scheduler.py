"""The retrain scheduler inside the gateway: when a persona has gathered enough new
preference pairs since its last run (a cheap count, ``feedback.pending``: the run
itself builds the exact pairs with the recipe's rules), they come from at least the
recipe's ``min_voters`` distinct voters, and its last run is at least ``interval``
ago, it starts a run.

A run is one task here, which owns it from start to end: the gateway exports a
snapshot of its store (in a thread; this process owns the store), then starts
``persona retrain --here --snapshot DIR --gateway URL`` at lower CPU priority, so
serving keeps going. That process (``train/loop.py``) builds the pairs from the
snapshot, runs the training step and the gate, and records the run and asks for
the hot swap over this gateway's admin API. A process that exits with an error
cannot record its own end, so the task records it as failed; one that failed before
it recorded anything gets a failed record of its own, so no failure is silent. One
run per persona at a time, and no scheduled one while the persona has an A/B
experiment running (its candidate is the one under test; a run asked for by hand
still starts).

The run process reaches this gateway at ``gateway_url``, the address it is bound to
(``serve.processes.url_of``), with the admin key of the environment it inherits: the
variable's, else the key file's (``feedback.keys``). A token of the gateway's own for
its children would be a second admin credential to guard; the key file is the one
the operator already manages, re-read per request, so a run uses what the gateway
accepts.

Each tick also reads the running A/B experiments (``Gateway.experiments``), so one whose
time limit passed is decided even when no vote comes; that happens with the scheduled
retrains off (``--no-scheduler``) too.

serve does not import train: the CLI root (``serve/cli_up.py``) reads the recipe and
hands in its pair rules and min_voters.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

from feedback import pairs, runs
from feedback.errors import APIError
from feedback.pending import new_evidence

log = logging.getLogger(__name__)

POLL_SECONDS = 1.0  # how often a run's task looks at its process (works with any event loop)


@dataclass
class ScheduleConfig:
    enabled: bool = True
    min_new_pairs: int = 32       # new DPO pairs since the persona's last run
    interval: float = 3600.0      # seconds between two runs of one persona, at least
    check_every: float = 60.0     # seconds between checks
    gateway_url: str = "http://127.0.0.1:7860"
    log_dir: Path = Path(".")
    recipe: str = "dpo"           # preference recipe of the runs
    rules: pairs.PairRules = field(default_factory=pairs.PairRules)  # that recipe's pair rules
    min_voters: int = 1           # distinct voters the persona's DPO pairs must come from (the recipe's)


class Scheduler:
    def __init__(self, gateway, config: ScheduleConfig):
        self.gateway, self.config = gateway, config
        self.running: dict[str, asyncio.Task] = {}
        self.last_start: dict[str, float] = {}
        self.short_of_voters: dict[str, int] = {}  # persona -> voters, when it last waited for more
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        self._task = asyncio.create_task(self._loop())  # disabled, it still checks the experiments' time limits

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for task in self.running.values():
            task.cancel()  # the task terminates its process
        await asyncio.gather(*self.running.values(), return_exceptions=True)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_every)
            try:
                await self.tick()
            except Exception:  # keep scheduling whatever one check did
                log.exception("retrain check failed")

    def busy(self, persona: str) -> bool:
        task = self.running.get(persona)
        return task is not None and not task.done()

    def under_test(self, persona: str) -> bool:
        """Whether the persona has a running A/B experiment (a stand-in gateway may have none)."""
        experiments = getattr(self.gateway, "experiments", None)
        return experiments is not None and persona in experiments.running

    async def tick(self) -> list[str]:
        """Decide the experiments whose time is up; start the retrains that are due (the personas started)."""
        experiments = getattr(self.gateway, "experiments", None)
        if experiments is not None:
            await experiments.check_all()
        if not self.config.enabled:
            return []
        started = []
        for target in self.gateway.catalog.active_targets():
            persona = target.persona
            if self.busy(persona) or time.monotonic() - self.last_start.get(persona, -1e12) < self.config.interval:
                continue
            if self.under_test(persona):
                continue
            new, voters = await asyncio.to_thread(self.pending, persona)
            if new < self.config.min_new_pairs:
                continue
            if voters < self.config.min_voters:
                if self.short_of_voters.get(persona) != voters:  # said once, not at every check
                    log.info("%s has %d new preference pairs, from %d voter(s); a run needs %d (min_voters)",
                             persona, new, voters, self.config.min_voters)
                self.short_of_voters[persona] = voters
                continue
            self.short_of_voters.pop(persona, None)
            log.info("%s has %d new preference pairs from %d voters: starting a retrain", persona, new, voters)
            self.launch(persona)
            started.append(persona)
        return started

    def pending(self, persona: str) -> tuple[int, int]:
        """New DPO pairs since the persona's last run that trained, and their distinct voters:
        a count query (``feedback.pending``), not a pair build, on the live store every check."""
        store = self.gateway.store
        return new_evidence(store, persona, runs.last_trained_start(store, persona),
                            self.config.rules.include_own_system_prompt)

    def launch(self, persona: str, force: bool = False, promotion: str | None = None) -> dict:
        """Start a run of ``persona`` (called in the event loop); answers at once, with its log.
        ``promotion`` ("gate" or "ab") overrides the recipe's for this run."""
        if persona not in self.gateway.catalog.personas:
            raise APIError(404, f"No persona {persona!r}.", param="persona")
        if self.busy(persona):
            raise APIError(409, f"A retrain of {persona} is already running.", param="persona")
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.log_dir / f"retrain-{persona}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        self.running[persona] = asyncio.create_task(self._run(persona, force, log_path, promotion))
        self.last_start[persona] = time.monotonic()
        return {"persona": persona, "status": "started", "log": str(log_path)}

    def command(self, persona: str, force: bool, snapshot: str) -> list[str]:
        return [sys.executable, "-m", "serve.cli", "retrain", "--persona", persona, "--here", "--snapshot", snapshot,
                "--gateway", self.config.gateway_url, "--recipe", self.config.recipe] + (["--force"] if force else [])

    async def _run(self, persona: str, force: bool, log_path: Path, promotion: str | None = None) -> int | None:
        """One run: the snapshot, the run process on it, and its end when the process failed.
        A run that fails before it recorded itself (no snapshot, no process, a process the
        gateway refused) is recorded here as failed, with why, so it shows in /admin/runs."""
        started = runs.now()
        try:
            snapshot = await asyncio.to_thread(self.gateway.snapshot)
            command = self.command(persona, force, snapshot) + (["--promotion", promotion] if promotion else [])
            with open(log_path, "ab") as out:
                proc = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT,
                                        stdin=subprocess.DEVNULL, preexec_fn=lambda: os.nice(10))
        except Exception as exc:  # noqa: BLE001 - no run process: the failure is recorded here
            log.exception("the retrain of %s could not start", persona)
            await self._record_unstarted(persona, started, f"the run could not start: {exc}")
            return None
        try:
            while (code := proc.poll()) is None:
                await asyncio.sleep(POLL_SECONDS)
        except asyncio.CancelledError:  # the gateway stops, and so does its run
            proc.terminate()
            raise
        if code != 0:
            log.error("the retrain of %s exited with code %s (log: %s)", persona, code, log_path)
            store = self.gateway.store
            closed = await asyncio.to_thread(runs.close_interrupted, store, persona, store.record_run,
                                             f"{runs.INTERRUPTED} (exit code {code})")
            if not closed:  # it ended before it recorded anything
                await self._record_unstarted(persona, started, f"the run process exited with code {code} before it "
                                                               f"recorded the run: {last_line(log_path)} (log: {log_path})")
        return code

    async def _record_unstarted(self, persona: str, started: str, message: str) -> None:
        """Record as failed a run that never recorded itself; a store that cannot write it
        leaves the gateway's log as the only trace (said there)."""
        run = {"id": f"{persona}-failed-{uuid.uuid4().hex[:12]}", "persona": persona, "kind": "dpo",
               "status": "failed", "started_at": started, "finished_at": runs.now(), "message": message}
        try:
            await asyncio.to_thread(self.gateway.store.record_run, run)
        except Exception:  # noqa: BLE001 - the run's failure is in the log already
            log.exception("the failed retrain of %s could not be recorded", persona)


def last_line(path: Path) -> str:
    """The last non-empty line of a run's log (its error message), or a placeholder."""
    try:
        with open(path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 4096))
            lines = [line.strip() for line in f.read().decode("utf-8", "replace").splitlines() if line.strip()]
    except OSError:
        return "(its log cannot be read)"
    return lines[-1][:500] if lines else "(its log is empty)"
