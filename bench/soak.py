"""A long steady run: chats and votes at about 70% of capacity, then memory growth,
errors and lost votes, each against its target.

    persona bench soak [--minutes 20] [--load 0.7] [--max-tokens 32] [--probe-seconds 45]

The bench starts its own stack as ``persona up`` runs it (the embedded engine and
the gateway, each its own process, on a scratch database, on the real base model
and the personas' active adapters: run ``persona setup`` first). Then:

1. **Probe** (also the warm-up): ``--probe-users`` users chat and vote as fast as
   the gateway answers them (``persona bench load``'s users) for
   ``--probe-seconds``. Its chats per second are the capacity.
2. **Steady traffic** for ``--minutes``: a chat starts every ``1 / rate``
   seconds, ``rate = --load x capacity``, whatever the earlier ones are doing
   (an open loop, as users arrive), and each answered chat gets a thumbs vote.
   The gateway's and the engine's resident memory (RSS) is read every few
   seconds; the first reading is the start, after the probe's warm-up.
3. **Check**: the store is read through the gateway's snapshot API; every
   acknowledged vote (the probe's too) must be in it.

It prints one table against the targets (0 errors: any refused, failed, cut-off
or timed-out request counts; 0 lost votes; RSS growth under 10%) and exits 1
when one is missed. The figures and the RSS readings are saved as JSON under
PERSONA_HOME/runs/bench/.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

from bench import load

console = Console(width=120)
MAX_GROWTH = 0.10  # RSS growth after warm-up, as a share of the start
SAMPLE_SECONDS = 5.0  # between RSS readings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--minutes", type=float, default=20, help="how long the steady traffic runs")
    parser.add_argument("--load", type=float, default=0.7, help="share of the probed capacity to send (0 to 1)")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per answer")
    parser.add_argument("--probe-seconds", type=float, default=45, help="how long the capacity probe runs")
    parser.add_argument("--probe-users", type=int, default=16, help="concurrent users in the capacity probe")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds a request may take before it counts as timed out")


def rss_mb(pid: int) -> float:
    """A process's resident memory in MB (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


def errors(tally: load.Tally) -> int:
    """Every request that did not end as asked: refused, failed, cut off, timed out or dropped."""
    return (sum(tally.refused.values()) + tally.other_4xx + tally.server_5xx + tally.incomplete + tally.timeouts
            + tally.connection_errors + tally.feedback_refused)


async def probe(url: str, args: argparse.Namespace) -> tuple[float, load.Tally, list[str]]:
    """(chats per second at saturation, the probe's tally, the persona models); warms the stack up."""
    probe_args = argparse.Namespace(users=args.probe_users, seconds=args.probe_seconds, max_tokens=args.max_tokens,
                                    timeout=args.timeout)
    tally, seconds, models = await load.run_load(url, probe_args, {})
    return tally.chats_ok / seconds, tally, models


async def steady(url: str, models: list[str], rate: float, args: argparse.Namespace, tally: load.Tally,
                 watch) -> float:
    """Open-loop chats at ``rate`` per second for ``--minutes``, a vote on each answer; seconds taken."""
    import httpx

    rng = random.Random(0)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    limits = httpx.Limits(max_connections=256, max_keepalive_connections=64)
    async with httpx.AsyncClient(base_url=url, timeout=timeout, limits=limits) as http:

        async def one(n: int) -> None:
            from bench.serve_speed import PROMPTS

            messages = [{"role": "user", "content": PROMPTS[n % len(PROMPTS)]}]
            turn = await load.chat(http, models[n % len(models)], messages, args.max_tokens, tally)
            if turn:
                vote = rng.choice(["up", "up", "down"])
                if await load.feedback(http, "/v1/feedback", {"turn_id": turn, "vote": vote,
                                                              "reason": "bench-soak"}, tally):
                    tally.votes[turn] = vote

        started, n, running = time.monotonic(), 0, set()
        deadline = started + args.minutes * 60
        while (now := time.monotonic()) < deadline:
            watch(now - started)
            due = started + n / rate
            if due > now:
                await asyncio.sleep(min(due - now, 1.0))
                continue
            task = asyncio.create_task(one(n))
            running.add(task)
            task.add_done_callback(running.discard)
            n += 1
        if running:  # the last chats finish; a request still going after --timeout counts as timed out
            await asyncio.wait(set(running), timeout=args.timeout + 5)
        return time.monotonic() - started


class Watch:
    """RSS of the two processes every SAMPLE_SECONDS, shown on a progress bar."""

    def __init__(self, engine_pid: int, gateway_pid: int, progress, task, tally: load.Tally):
        self.pids = {"gateway": gateway_pid, "engine": engine_pid}
        self.progress, self.task, self.tally = progress, task, tally
        self.samples: list[dict] = []
        self.next = 0.0

    def read(self, elapsed: float) -> dict:
        sample = {"seconds": round(elapsed, 1), **{name: rss_mb(pid) for name, pid in self.pids.items()}}
        self.samples.append(sample)
        return sample

    def __call__(self, elapsed: float) -> None:
        if elapsed < self.next:
            return
        self.next = elapsed + SAMPLE_SECONDS
        s = self.read(elapsed)
        self.progress.update(self.task, completed=elapsed,
                             description=f"chats {self.tally.chats_ok}, errors {errors(self.tally)}, "
                                         f"RSS gateway {s['gateway']:.0f} MB, engine {s['engine']:.0f} MB")


def verdict_table(args, capacity: float, rate: float, tally: load.Tally, found: int, first: dict,
                  last: dict, peak: dict, requests: int) -> tuple[Table, bool]:
    table = Table("check", "figure", "target", "result",
                  title=f"Soak: {args.minutes:g} min of chats and votes at {rate:.2f} chats/s "
                        f"({args.load:.0%} of the probed {capacity:.2f} chats/s), max_tokens={args.max_tokens}",
                  caption="RSS: start after the warm-up (the capacity probe), end after the last request")
    lost = len(tally.votes) - found
    checks = [("errors", f"{errors(tally)} of {requests} requests", "0", errors(tally) == 0),
              ("lost votes", f"{lost} ({len(tally.votes)} acknowledged, {found} in the store)", "0", lost == 0)]
    for name in ("gateway", "engine"):
        growth = last[name] / first[name] - 1
        checks.append((f"{name} RSS", f"{first[name]:.0f} -> {last[name]:.0f} MB ({growth:+.1%}, "
                                      f"peak {peak[name]:.0f})", f"< +{MAX_GROWTH:.0%}", growth < MAX_GROWTH))
    for name, figure, target, ok in checks:
        table.add_row(name, figure, target, "[green]pass[/]" if ok else "[red]FAIL[/]")
    return table, all(ok for *_, ok in checks)


def main(args: argparse.Namespace) -> int:
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    from bench import ready
    from feedback import settings
    from feedback.errors import UserError

    if args.minutes <= 0 or not 0 < args.load <= 1 or args.probe_seconds <= 0 or args.probe_users < 1:
        raise UserError("--minutes and --probe-seconds must be above 0, --load between 0 and 1, "
                        "--probe-users at least 1")
    ready.adapters()
    with load.own_servers() as (engine, gateway):
        console.print(f"probing capacity: {args.probe_users} users for {args.probe_seconds:g} s (also the warm-up)")
        capacity, probed, models = asyncio.run(probe(gateway.url, args))
        if not probed.chats_ok:
            raise UserError(f"the probe got no answer in {args.probe_seconds:g} s ({errors(probed)} errors: "
                            f"{probed.timeouts} timed out, {probed.incomplete} cut off, {probed.server_5xx} 5xx, "
                            f"{probed.connection_errors} dropped; logs: {gateway.supervisor.log})")
        rate = args.load * capacity
        tally = load.Tally()
        columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
        with Progress(*columns, console=console) as progress:
            task = progress.add_task("steady traffic", total=args.minutes * 60)
            watch = Watch(engine.pid, gateway.pid, progress, task, tally)
            first = watch.read(0)
            seconds = asyncio.run(steady(gateway.url, models, rate, args, tally, watch))
            last = watch.read(seconds)
        requests = tally.chats_ok + len(tally.votes) + errors(tally)  # the steady traffic's
        tally.votes.update(probed.votes)  # the probe's acknowledged votes must be in the store too
        tally.comparisons += probed.comparisons
        found, _, _ = load.check_store(gateway.url, tally, own=True)
    peak = {name: max(s[name] for s in watch.samples) for name in ("gateway", "engine")}
    table, passed = verdict_table(args, capacity, rate, tally, found, first, last, peak, requests)
    console.print(table)
    console.print("[green]PASS[/]" if passed else "[red]FAIL[/]: a target was missed")
    out = settings.runs_dir() / "bench" / f"soak-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({
        "minutes": args.minutes, "load": args.load, "capacity_chats_per_s": capacity, "rate_chats_per_s": rate,
        "seconds": seconds, "chats_ok": tally.chats_ok, "errors": errors(tally), "requests": requests,
        "votes_acknowledged": len(tally.votes), "votes_found": found, "rss_mb": watch.samples,
        "passed": passed, "cores": len(os.sched_getaffinity(0))}, indent=2) + "\n", encoding="utf-8")
    console.print(f"figures and RSS readings saved to {out}")
    return 0 if passed else 1
