"""Many users at once: chats and votes through the gateway, overload refused at once,
no vote lost.

    persona bench load [--users 50] [--seconds 60] [--max-tokens 32] [--gateway URL]

Each simulated user loops until ``--seconds`` are up: a streaming chat with a
persona (time to first token: the first content delta), then by chance a thumbs
vote on the turn (``POST /v1/feedback``, half the turns) or a second answer to
the same messages and a side-by-side verdict on the two (``POST
/v1/comparisons``, a fifth). A 429 or 503 is waited out as its ``Retry-After``
says. All users share one HTTP client.

Without ``--gateway`` the bench starts its own stack as ``persona up`` runs it:
the embedded engine and the gateway, each its own process, on a scratch
database, without the retrain scheduler (the bench's comparisons would
otherwise start a training run). With ``--gateway`` it talks to that gateway
(keys from PERSONA_API_KEY and PERSONA_ADMIN_KEY) and leaves its turns and
votes in that gateway's store.

Afterwards the store is read through ``POST /admin/snapshot``: every
acknowledged vote and comparison must be in it. The bench prints figures and
saves them as JSON under PERSONA_HOME/runs/bench/; it asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from rich.console import Console
from rich.table import Table

console = Console(width=200)  # one row of many figures: do not wrap it
VOTE, COMPARE = 0.5, 0.2  # shares of turns followed by a thumbs vote, by a second answer and a verdict
TEMPERATURE = 0.8  # sampled, as users chat: two answers to one message differ, so comparisons mean something


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--users", type=int, default=50, help="concurrent simulated users")
    parser.add_argument("--seconds", type=float, default=60, help="how long the users keep chatting")
    parser.add_argument("--max-tokens", type=int, default=32, help="completion tokens per answer")
    parser.add_argument("--timeout", type=float, default=120,
                        help="seconds a request may take before it counts as timed out")
    parser.add_argument("--gateway", help="a running gateway (default: start engine and gateway here)")


@dataclass
class Tally:
    chats_ok: int = 0
    refused: dict = field(default_factory=lambda: {429: 0, 503: 0})
    refused_with_retry_after: int = 0
    other_4xx: int = 0
    server_5xx: int = 0              # 5xx other than 503, and errors inside a 200 stream
    incomplete: int = 0              # 200 streams that ended without [DONE]
    timeouts: int = 0
    connection_errors: int = 0
    completion_tokens: int = 0
    ttft: list = field(default_factory=list)         # seconds to the first content delta, chats ok
    answer: list = field(default_factory=list)       # seconds to [DONE], chats ok
    feedback_seconds: list = field(default_factory=list)  # votes and comparisons, acknowledged
    votes: dict = field(default_factory=dict)          # acknowledged: turn id -> vote
    comparisons: list = field(default_factory=list)    # acknowledged comparison ids
    feedback_refused: int = 0


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def chat(http, model: str, messages: list, max_tokens: int, tally: Tally) -> str | None:
    """One streaming chat; the turn id, or None when it was refused or failed (after waiting
    as the gateway asked, so a refused user does not hammer it)."""
    import httpx

    body = {"model": model, "messages": messages, "stream": True, "max_tokens": max_tokens, "temperature": TEMPERATURE,
            "stream_options": {"include_usage": True}}
    start, wait = time.perf_counter(), 1.0
    try:
        async with http.stream("POST", "/v1/chat/completions", json=body) as response:
            if response.status_code != 200:
                await response.aread()
                wait = _count_refusal(response, tally)
            else:
                turn = await _read_stream(response, start, tally)
                if turn:
                    return turn
    except httpx.TimeoutException:
        tally.timeouts += 1
    except (httpx.HTTPError, ValueError):  # a dropped connection, a broken event
        tally.connection_errors += 1
    await asyncio.sleep(wait)
    return None


def _count_refusal(response, tally: Tally) -> float:
    """Count a non-200 answer; return how long to wait before the next request."""
    status, retry = response.status_code, response.headers.get("retry-after", "")
    if status in tally.refused:
        tally.refused[status] += 1
        if retry.isdigit():
            tally.refused_with_retry_after += 1
            return int(retry) + random.random() / 2  # jitter: refused users do not come back in step
    elif status >= 500:
        tally.server_5xx += 1
    else:
        tally.other_4xx += 1
    return 1.0


async def _read_stream(response, start: float, tally: Tally) -> str | None:
    turn, first, done = None, None, False
    async for line in response.aiter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            break
        chunk = json.loads(line[6:])
        if "error" in chunk:
            tally.server_5xx += 1
            return None
        turn = chunk.get("id", turn)
        if first is None and any((c.get("delta") or {}).get("content") for c in chunk.get("choices", [])):
            first = time.perf_counter() - start
        if chunk.get("usage"):
            tally.completion_tokens += chunk["usage"]["completion_tokens"]
    if not done:
        tally.incomplete += 1
        return None
    tally.chats_ok += 1
    tally.ttft.append(first if first is not None else time.perf_counter() - start)
    tally.answer.append(time.perf_counter() - start)
    return turn


async def feedback(http, route: str, body: dict, tally: Tally) -> dict | None:
    """Post a vote or a comparison; its answer when acknowledged."""
    import httpx

    start = time.perf_counter()
    try:
        response = await http.post(route, json=body)
    except httpx.TimeoutException:
        tally.timeouts += 1
        return None
    except httpx.HTTPError:
        tally.connection_errors += 1
        return None
    if response.status_code == 200:
        tally.feedback_seconds.append(time.perf_counter() - start)
        return response.json()
    tally.feedback_refused += 1
    return None


async def user(n: int, http, models: list[str], deadline: float, max_tokens: int, tally: Tally) -> None:
    from bench.serve_speed import PROMPTS

    rng = random.Random(n)
    while time.monotonic() < deadline:
        model = models[(n + rng.randrange(2)) % len(models)]
        messages = [{"role": "user", "content": rng.choice(PROMPTS)}]
        turn = await chat(http, model, messages, max_tokens, tally)
        roll = rng.random()
        if turn is None or roll >= VOTE + COMPARE:
            continue
        if roll < VOTE:
            vote = rng.choice(["up", "up", "down"])
            if await feedback(http, "/v1/feedback", {"turn_id": turn, "vote": vote, "reason": "bench-load"}, tally):
                tally.votes[turn] = vote
            continue
        second = await chat(http, model, messages, max_tokens, tally)
        if second:
            body = {"turn_a": turn, "turn_b": second, "choice": rng.choice(["a", "b", "tie"])}
            if acked := await feedback(http, "/v1/comparisons", body, tally):
                tally.comparisons.append(acked["id"])


async def run_load(url: str, args: argparse.Namespace, headers: dict) -> tuple[Tally, float, list[str]]:
    import httpx

    limits = httpx.Limits(max_connections=args.users + 16, max_keepalive_connections=args.users + 16)
    timeout = httpx.Timeout(args.timeout, connect=10.0)
    async with httpx.AsyncClient(base_url=url, headers=headers, timeout=timeout, limits=limits) as http:
        models = [m["id"] for m in (await http.get("/v1/models")).json()["data"] if "@" not in m["id"]]
        if not models:
            raise RuntimeError(f"{url} serves no persona")
        for model in models:  # warm-up, not counted: adapters loaded, first batch shapes seen
            await chat(http, model, [{"role": "user", "content": "hi"}], 4, Tally())
        tally, started = Tally(), time.monotonic()
        await asyncio.gather(*(user(n, http, models, started + args.seconds, args.max_tokens, tally)
                               for n in range(args.users)))
        return tally, time.monotonic() - started, models


def check_store(url: str, tally: Tally, own: bool) -> tuple[int, int, str]:
    """(votes found, comparisons found, snapshot folder) from a fresh snapshot of the store."""
    from feedback.snapshot import Snapshot
    from train.loop import GatewayClient

    folder = GatewayClient(url).snapshot()
    snap = Snapshot.open(folder)
    try:
        votes = comparisons = 0
        if tally.votes:
            votes = snap.query("SELECT count(*) FROM (SELECT unnest(?) AS turn_id, unnest(?) AS vote) a "
                               "WHERE EXISTS (SELECT 1 FROM votes v WHERE v.turn_id = a.turn_id "
                               "AND v.vote = a.vote)", [list(tally.votes), list(tally.votes.values())])[0][0]
        if tally.comparisons:
            comparisons = snap.query("SELECT count(*) FROM comparisons WHERE id IN (SELECT unnest(?))",
                                     [tally.comparisons])[0][0]
    finally:
        snap.close()
    if own:  # a scratch store's snapshot must not become the `latest` that stats and exports read
        shutil.rmtree(folder, ignore_errors=True)
    return votes, comparisons, folder


@contextlib.contextmanager
def own_stack():
    """Engine and gateway as ``persona up`` runs them, each its own process, on a scratch store;
    yields the gateway's URL."""
    with own_servers() as (_, gateway):
        yield gateway.url


@contextlib.contextmanager
def own_servers():
    """``own_stack``'s two child servers, (engine, gateway), for callers that watch the processes."""
    import secrets
    import tempfile

    from serve.cli_up import engine_args, log_file
    from serve.processes import child_server, free_port

    key, port = secrets.token_hex(16), free_port()
    database = Path(tempfile.mkdtemp(prefix="bench-load-")) / "feedback.duckdb"
    # Loopback clients only, so every user is one client and every vote one voter's: the vote
    # quota and the per-client share are off here (only --max-in-flight bounds the users).
    no_keys = {"PERSONA_API_KEY": "", "PERSONA_ADMIN_KEY": "", "PERSONA_VOTE_QUOTA_MINUTE": "0",
               "PERSONA_VOTE_QUOTA_DAY": "0", "PERSONA_KEY_MAX_IN_FLIGHT": "0", "PERSONA_KEY_REQUESTS_MINUTE": "0"}
    console.print("starting the embedded engine and the gateway ...")
    try:
        with child_server(engine_args(port, 2048), port, log_file("bench-engine"),
                          env={"PERSONA_ENGINE_API_KEY": key}) as engine:
            gport = free_port()
            with child_server(["up", "--engine-url", engine.url, "--port", str(gport), "--database",
                               str(database), "--no-scheduler"], gport, log_file("bench-gateway"),
                              env={**no_keys, "PERSONA_ENGINE_API_KEY": key}) as gateway:
                yield engine, gateway
    finally:
        shutil.rmtree(database.parent, ignore_errors=True)  # the gateway has exited: nothing holds it


def _figure(value: float | None, scale: float = 1, digits: int = 2) -> str:
    return "-" if value is None else f"{value * scale:.{digits}f}"


def report(args: argparse.Namespace, tally: Tally, seconds: float, found: tuple[int, int], cpu: float) -> dict:
    refused = sum(tally.refused.values())
    ttft = {q: percentile(tally.ttft, q) for q in (0.5, 0.95, 0.99)}
    answer, vote = percentile(tally.answer, 0.5), percentile(tally.feedback_seconds, 0.5)
    table = Table("users", "seconds", "chats ok", "429", "503", "with Retry-After", "4xx", "5xx", "cut off", "timeouts",
                  "conn. errors", "votes ok / found", "cmp ok / found", "TTFT p50 s", "p95 s", "p99 s",
                  "answer p50 s", "vote p50 ms", "tokens/s",
                  title=f"{args.users} users chatting and voting through the gateway, max_tokens={args.max_tokens}",
                  caption="Retry-After: refusals (429, 503) that carried it; found must equal ok (acknowledged); "
                          f"the load generator used {cpu:.0%} of one core")
    table.add_row(str(args.users), f"{seconds:.0f}", str(tally.chats_ok), str(tally.refused[429]),
                  str(tally.refused[503]),
                  f"{tally.refused_with_retry_after}" + (" (all)" if refused and tally.refused_with_retry_after
                                                         == refused else ""),
                  str(tally.other_4xx), str(tally.server_5xx), str(tally.incomplete), str(tally.timeouts),
                  str(tally.connection_errors), f"{len(tally.votes)} / {found[0]}",
                  f"{len(tally.comparisons)} / {found[1]}", *(_figure(v) for v in ttft.values()),
                  _figure(answer), _figure(vote, 1000, 0), f"{tally.completion_tokens / seconds:.1f}")
    console.print(table)
    figures = {k: v for k, v in asdict(tally).items() if not isinstance(v, (list, dict)) or k == "refused"}
    return {**figures, "users": args.users, "seconds": seconds, "max_tokens": args.max_tokens,
            "ttft_p50": ttft[0.5], "ttft_p95": ttft[0.95], "ttft_p99": ttft[0.99], "answer_p50": answer,
            "feedback_p50": vote, "tokens_per_second": tally.completion_tokens / seconds,
            "votes_acknowledged": len(tally.votes), "votes_found": found[0],
            "comparisons_acknowledged": len(tally.comparisons), "comparisons_found": found[1],
            "client_cpu_share": cpu}


def main(args: argparse.Namespace) -> None:
    from bench import ready
    from feedback import settings
    from train.loop import bearer

    if not args.gateway:
        ready.adapters()  # its own gateway serves the personas' adapters
    with contextlib.ExitStack() as stack:
        url = args.gateway.rstrip("/") if args.gateway else stack.enter_context(own_stack())
        console.print(f"{args.users} users for {args.seconds:.0f} s against {url} ...")
        cpu_before = time.process_time()
        tally, seconds, models = asyncio.run(run_load(url, args, bearer("PERSONA_API_KEY")))
        cpu = (time.process_time() - cpu_before) / seconds
        votes, comparisons, folder = check_store(url, tally, own=not args.gateway)
    result = report(args, tally, seconds, (votes, comparisons), cpu)
    if votes != len(tally.votes) or comparisons != len(tally.comparisons):
        console.print(f"[red]LOST FEEDBACK: acknowledged votes or comparisons are not in the store ({folder})[/red]")
    out = settings.runs_dir() / "bench" / f"load-{time.strftime('%Y%m%d-%H%M%S')}.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**result, "gateway": args.gateway or "own", "models": models,
                               "cores": len(os.sched_getaffinity(0))}, indent=2) + "\n", encoding="utf-8")
    console.print(f"figures saved to {out}")
