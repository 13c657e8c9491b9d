"""The retrain scheduler inside the gateway: when a persona has gathered enough new
preference pairs (and its last run is at least ``interval`` ago), start a run.

A run is a subprocess (``persona retrain --here``) at lower CPU priority, so
serving keeps going; it talks to this gateway over HTTP (snapshot, run
records, hot swap) like any other client. One run per persona at a time.
"""

from __future__ import annotations

import asyncio
import logging
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from feedback import pairs
from serve.gateway.core import GatewayError

log = logging.getLogger(__name__)


@dataclass
class ScheduleConfig:
    enabled: bool = True
    min_new_pairs: int = 32       # new DPO pairs since the persona's last run
    interval: float = 3600.0      # seconds between two runs of one persona, at least
    check_every: float = 60.0     # seconds between checks
    gateway_url: str = "http://127.0.0.1:7860"
    log_dir: Path = Path(".")
    recipe: str = "dpo"           # preference recipe of the runs


class Scheduler:
    def __init__(self, gateway, config: ScheduleConfig):
        self.gateway, self.config = gateway, config
        self.running: dict[str, subprocess.Popen] = {}
        self.last_start: dict[str, float] = {}
        self._task: asyncio.Task | None = None

    def start(self) -> None:
        if self.config.enabled:
            self._task = asyncio.create_task(self._loop())

    async def stop(self) -> None:
        if self._task:
            self._task.cancel()
        for proc in self.running.values():
            if proc.poll() is None:
                proc.terminate()

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self.config.check_every)
            try:
                await self.tick()
            except Exception:  # keep scheduling whatever one check did
                log.exception("retrain check failed")

    def busy(self, persona: str) -> bool:
        proc = self.running.get(persona)
        return proc is not None and proc.poll() is None

    def reap(self) -> None:
        """A run process that died (crash, kill) cannot record its own end: record it failed."""
        from train.loop import INTERRUPTED, close_interrupted

        for persona, proc in list(self.running.items()):
            code = proc.poll()
            if code is None:
                continue
            del self.running[persona]
            if code != 0:
                log.warning("the retrain of %s exited with code %s", persona, code)
                close_interrupted(persona, None, self.gateway.store, f"{INTERRUPTED} (exit code {code})")

    async def tick(self) -> list[str]:
        self.reap()
        started = []
        for target in self.gateway.catalog.active_targets():
            persona = target.persona
            if self.busy(persona) or time.monotonic() - self.last_start.get(persona, -1e12) < self.config.interval:
                continue
            new = await asyncio.to_thread(self.new_pairs, persona)
            if new >= self.config.min_new_pairs:
                log.info("%s has %d new preference pairs: starting a retrain", persona, new)
                self.launch(persona)
                started.append(persona)
        return started

    def new_pairs(self, persona: str) -> int:
        """DPO pairs now, less those the persona's last finished run had."""
        store = self.gateway.store
        now = pairs.build(store, persona, kinds=("dpo",))["dpo"]
        used = store.query("SELECT coalesce(train_examples, 0) + coalesce(heldout_examples, 0) FROM training_runs "
                           "WHERE persona = ? AND kind = 'dpo' AND status IN ('promoted', 'rejected', 'failed') "
                           "ORDER BY started_at DESC LIMIT 1", [persona])
        return now - (used[0][0] if used else 0)

    def launch(self, persona: str, force: bool = False) -> dict:
        if persona not in self.gateway.catalog.personas:
            raise GatewayError(404, f"No persona {persona!r}.", param="persona")
        if self.busy(persona):
            raise GatewayError(409, f"A retrain of {persona} is already running.", param="persona")
        self.config.log_dir.mkdir(parents=True, exist_ok=True)
        log_path = self.config.log_dir / f"retrain-{persona}-{time.strftime('%Y%m%d-%H%M%S')}.log"
        cmd = [sys.executable, "-m", "serve.cli", "retrain", "--persona", persona, "--here",
               "--gateway", self.config.gateway_url, "--recipe", self.config.recipe] + (["--force"] if force else [])
        with open(log_path, "ab") as out:
            self.running[persona] = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT,
                                                     stdin=subprocess.DEVNULL, preexec_fn=lambda: os.nice(10))
        self.last_start[persona] = time.monotonic()
        return {"persona": persona, "status": "started", "log": str(log_path)}
