"""Votes through the API: throughput, latency, and that none is lost; and the
time to build preference data from a million votes.

    persona bench feedback [--clients 32] [--votes 4000] [--build-votes 1000000]

A scratch database is filled with synthetic served turns, then a gateway
(its own process, as ``persona up`` runs it, in front of an embedded engine)
opens it, and ``--clients`` concurrent clients post ``--votes`` votes through
``POST /v1/feedback``, each on its own turn. After the gateway has exited, the
votes found in the database are counted: every acknowledged vote must be
there.

Then the pair builder runs on a scratch store filled with synthetic votes
(``--build-votes`` of them, 90% thumbs and 10% side-by-side comparisons, from
10,000 voters on 4 answers to each of ``votes / 20`` contexts), at a tenth of
that size and at full size, so the two times can be compared.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
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
    parser.add_argument("--build-votes", type=int, default=1_000_000,
                        help="synthetic votes for the preference-data build (0: skip)")


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
    """``clients`` keep-alive connections posting votes one after another.

    A minimal HTTP/1.1 client on asyncio streams: httpx spends about 2 ms of CPU
    per request, which on 2 cores made the load generator, not the gateway, the
    bottleneck."""
    from urllib.parse import urlsplit

    from serve.cli_up import freeze_startup_objects

    host, port = urlsplit(url).hostname, urlsplit(url).port
    latencies: list[float] = []
    acknowledged = 0
    queue = list(reversed(turn_ids))

    async def client():
        nonlocal acknowledged
        reader, writer = await asyncio.open_connection(host, port)
        try:
            while queue:
                turn_id = queue.pop()
                vote = "up" if hash(turn_id) % 3 else "down"
                body = json.dumps({"turn_id": turn_id, "vote": vote, "reason": "bench"}).encode()
                start = time.perf_counter()
                writer.write(b"POST /v1/feedback HTTP/1.1\r\nHost: %s\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\n\r\n%s" % (host.encode(), len(body), body))
                head = await reader.readuntil(b"\r\n\r\n")
                length = int(re.search(rb"(?i)content-length: *(\d+)", head).group(1))
                await reader.readexactly(length)
                latencies.append(time.perf_counter() - start)
                if head.startswith(b"HTTP/1.1 200"):
                    acknowledged += 1
        finally:
            writer.close()

    # The client's own full garbage collections (it imported the gateway's modules) would stall
    # every connection it times; the gateway does the same at start-up.
    freeze_startup_objects()
    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return latencies, acknowledged, time.perf_counter() - started


def seed_votes(path: Path, votes: int) -> None:
    """A store with ``votes`` synthetic votes: thumbs on regenerated answers and comparisons."""
    from feedback.store import Store

    contexts = max(1, votes // 20)
    store = Store.open(path)
    store.execute("SELECT setseed(0.42)")
    store.execute(
        "INSERT INTO turns (id, created_at, persona, adapter, adapter_version, requested_model, messages, answers, "
        "finish_reasons, sampling, stream, latency_ms, client, status) "
        "SELECT 'turn-' || i, now(), CASE WHEN i % 2 = 0 THEN 'teto' ELSE 'egen' END, 'teto-v1', 1, 'teto', "
        "'[{\"role\": \"user\", \"content\": \"question ' || (i // 4) || '\"}]', "
        "'[\"answer ' || (i // 4) || '-' || (i % 4 % 3) || '\"]', '[\"stop\"]', '{}', true, 1.0, 'ui:x', 'ok' "
        "FROM range(?) t(i)", [contexts * 4])
    thumbs = votes - votes // 10
    store.execute(
        "INSERT INTO votes (turn_id, choice_index, client, vote, reason, comment, user_name, created_at, voter) "
        "SELECT turn_id, 0, voter, vote, NULL, NULL, NULL, now() - to_seconds(CAST(i AS BIGINT)), voter FROM ("
        "SELECT i, 'turn-' || CAST(floor(random() * ?) AS BIGINT) AS turn_id, "
        "'voter-' || CAST(floor(random() * 10000) AS BIGINT) AS voter, "
        "CASE WHEN random() < 0.6 THEN 'up' WHEN random() < 0.95 THEN 'down' ELSE 'retract' END AS vote "
        "FROM range(?) t(i))", [contexts * 4, thumbs])
    store.execute(
        "INSERT INTO comparisons (id, turn_a, turn_b, choice, left_turn, client, user_name, created_at, voter) "
        "SELECT 'cmp-' || i, 'turn-' || (4 * c), 'turn-' || (4 * c + 1 + i % 3), "
        "CASE WHEN r < 0.45 THEN 'a' WHEN r < 0.9 THEN 'b' WHEN r < 0.95 THEN 'tie' ELSE 'both_bad' END, "
        "'turn-' || (4 * c), 'voter-' || (i % 10000), NULL, now(), 'voter-' || (i % 10000) "
        "FROM (SELECT i, CAST(floor(random() * ?) AS BIGINT) AS c, random() AS r FROM range(?) t(i))",
        [contexts, votes - thumbs])
    store.close()


def build_speed(votes: int) -> None:
    from feedback import pairs
    from feedback.store import Store

    table = Table("votes", "thumbs", "comparisons", "turns", "DPO pairs", "KTO examples", "SFT examples",
                  "build s", "votes/s", "time vs 1/10 size",
                  title="Preference data from synthetic votes (pair builder, all personas)",
                  caption="target: 1,000,000 votes in under 10 s")
    first = None
    for size in (votes // 10, votes):
        scratch = Path(tempfile.mkdtemp(prefix="bench-pairs-")) / "feedback.duckdb"
        console.print(f"seeding {size:,} synthetic votes into {scratch} ...")
        seed_votes(scratch, size)
        store = Store.open(scratch)
        thumbs, cmps, turns = store.query("SELECT (SELECT count(*) FROM votes), (SELECT count(*) FROM comparisons), "
                                          "(SELECT count(*) FROM turns)")[0]
        started = time.perf_counter()
        counts = pairs.build(store)
        seconds = time.perf_counter() - started
        store.close()
        first = first or seconds
        table.add_row(f"{size:,}", f"{thumbs:,}", f"{cmps:,}", f"{turns:,}", f"{counts['dpo']:,}",
                      f"{counts['kto']:,}", f"{counts['sft']:,}", f"{seconds:.2f}", f"{size / seconds:,.0f}",
                      f"{seconds / first:.1f}x")
    console.print(table)


def main(args: argparse.Namespace) -> None:
    import secrets

    from bench import ready
    from feedback.store import Store
    from serve.cli_up import engine_args, log_file
    from serve.gateway.core import GatewayConfig
    from serve.processes import free_port, persona_process

    ready.adapters()  # the bench's gateway serves the personas' adapters
    key, port = secrets.token_hex(16), free_port()
    # Loopback clients, no keys: every vote is one voter's, so the vote quota is off here.
    no_keys = {"PERSONA_API_KEY": "", "PERSONA_ADMIN_KEY": "", "PERSONA_VOTE_QUOTA_MINUTE": "0",
               "PERSONA_VOTE_QUOTA_DAY": "0"}
    table = Table("votes per commit", "clients", "votes sent", "acknowledged", "found in store", "votes/s",
                  "p50 ms", "p99 ms", "vs one per commit",
                  title="POST /v1/feedback through the gateway (its own process), DuckDB store",
                  caption="found in store must equal acknowledged")
    lost, first = False, None
    with persona_process(engine_args(port, 2048), port, log_file("bench-engine"),
                         env={"PERSONA_ENGINE_API_KEY": key}) as engine_url:
        for batch, label in ((1, "1"), (GatewayConfig.vote_batch, f"<={GatewayConfig.vote_batch} (group)")):
            db = Path(tempfile.mkdtemp(prefix="bench-feedback-")) / "feedback.duckdb"
            ids = seed_turns(db, args.votes, client="ip:127.0.0.1")  # loopback clients, no keys
            gport = free_port()
            with persona_process(["up", "--engine-url", engine_url, "--port", str(gport), "--database", str(db),
                                  "--vote-batch", str(batch)], gport, log_file("bench-gateway"),
                                 env={**no_keys, "PERSONA_ENGINE_API_KEY": key}) as url:
                console.print(f"posting {len(ids)} votes from {args.clients} concurrent clients, {label} ...")
                latencies, acknowledged, seconds = asyncio.run(post_votes(url, ids, args.clients))
            store = Store.open(db)  # the gateway has exited: the file is free
            found = store.query("SELECT count(*) FROM votes WHERE reason = 'bench'")[0][0]
            store.close()
            q = sorted(latencies)
            rate = acknowledged / seconds
            first = first or rate
            lost |= found != acknowledged
            table.add_row(label, str(args.clients), str(len(ids)), str(acknowledged), str(found), f"{rate:.0f}",
                          f"{statistics.median(q) * 1000:.1f}",
                          f"{q[min(len(q) - 1, int(0.99 * len(q)))] * 1000:.1f}", f"{rate / first:.2f}x")
    console.print(table)
    if lost:
        console.print("[red]LOST VOTES: some acknowledged votes are not in the store[/red]")
    if args.build_votes:
        build_speed(args.build_votes)
