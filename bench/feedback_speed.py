"""Votes through the API: throughput, latency, and that none is lost.

    persona bench feedback [--clients 32] [--votes 4000]

A scratch database is filled with synthetic served turns, then a gateway
(its own process, as ``persona up`` runs it, in front of an embedded engine)
opens it, and ``--clients`` concurrent clients post ``--votes`` votes through
``POST /v1/feedback``, each on its own turn. After the gateway has exited, the
votes found in the database are counted: every acknowledged vote must be
there.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=120)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", type=int, default=32, help="concurrent API clients")
    parser.add_argument("--votes", type=int, default=4000, help="votes to post in all")


def seed_turns(path: Path, count: int, client: str) -> list[str]:
    """Write ``count`` synthetic served turns (before the gateway opens the file)."""
    from feedback.store import Store

    store = Store.open(path)
    ids = [f"chatcmpl-bench{i:08d}" for i in range(count)]
    rows = [(i, f'[{{"role": "user", "content": "question {n % 500}"}}]') for n, i in enumerate(ids)]
    store.execute(
        "INSERT INTO turns (id, created_at, persona, adapter, adapter_version, requested_model, messages, answers, "
        "finish_reasons, sampling, stream, latency_ms, client, status) "
        "SELECT id, now(), 'teto', 'teto-v1', 1, 'teto', messages, ?, ?, '{}', false, 1.0, ?, 'ok' "
        "FROM (SELECT unnest(?) AS id, unnest(?) AS messages)",
        ['["ok"]', '["stop"]', client, [r[0] for r in rows], [r[1] for r in rows]])
    store.close()
    return ids


async def post_votes(url: str, turn_ids: list[str], clients: int) -> tuple[list[float], int, float]:
    import httpx

    latencies: list[float] = []
    acknowledged = 0
    queue = list(reversed(turn_ids))

    async def client(http: httpx.AsyncClient):
        nonlocal acknowledged
        while queue:
            turn_id = queue.pop()
            vote = "up" if hash(turn_id) % 3 else "down"
            start = time.perf_counter()
            r = await http.post(url + "/v1/feedback", json={"turn_id": turn_id, "vote": vote, "reason": "bench"})
            latencies.append(time.perf_counter() - start)
            if r.status_code == 200:
                acknowledged += 1

    started = time.perf_counter()
    limits = httpx.Limits(max_connections=clients)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:
        await asyncio.gather(*(client(http) for _ in range(clients)))
    return latencies, acknowledged, time.perf_counter() - started


def main(args: argparse.Namespace) -> None:
    import secrets

    from feedback.store import Store
    from serve.cli_up import engine_args, log_file
    from serve.processes import free_port, persona_process

    scratch = Path(tempfile.mkdtemp(prefix="bench-feedback-"))
    db = scratch / "feedback.duckdb"
    ids = seed_turns(db, args.votes, client="ip:127.0.0.1")  # loopback clients, no keys
    console.print(f"{len(ids)} synthetic turns in {db}")
    key, port, gport = secrets.token_hex(16), free_port(), free_port()
    no_keys = {"PERSONA_API_KEY": "", "PERSONA_ADMIN_KEY": ""}
    with persona_process(engine_args(port, 2048), port, log_file("bench-engine"),
                         env={"PERSONA_ENGINE_API_KEY": key}) as engine_url, \
            persona_process(["up", "--engine-url", engine_url, "--port", str(gport),
                             "--database", str(db)], gport, log_file("bench-gateway"),
                            env={**no_keys, "PERSONA_ENGINE_API_KEY": key}) as url:
        console.print(f"posting {len(ids)} votes from {args.clients} concurrent clients ...")
        latencies, acknowledged, seconds = asyncio.run(post_votes(url, ids, args.clients))
    store = Store.open(db)  # the gateway has exited: the file is free
    found = store.query("SELECT count(*) FROM votes WHERE reason = 'bench'")[0][0]
    store.close()
    q = sorted(latencies)
    table = Table("clients", "votes sent", "acknowledged", "found in store", "votes/s", "p50 ms", "p99 ms",
                  title="POST /v1/feedback through the gateway (its own process), DuckDB store",
                  caption="found in store must equal acknowledged")
    table.add_row(str(args.clients), str(len(ids)), str(acknowledged), str(found), f"{acknowledged / seconds:.0f}",
                  f"{statistics.median(q) * 1000:.1f}", f"{q[min(len(q) - 1, int(0.99 * len(q)))] * 1000:.1f}")
    console.print(table)
    if found != acknowledged:
        console.print(f"[red]LOST VOTES: {acknowledged - found} acknowledged votes are not in the store[/red]")
