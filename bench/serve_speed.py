"""Serving throughput: the embedded engine against a naive one-at-a-time server, in one run.

    persona bench serve [--clients 1,4,16] [--requests 2] [--max-tokens 64]

Both servers run in this process on loopback and speak the same streaming
chat API; the same load generator (concurrent streaming HTTP clients, each
sending ``--requests`` requests one after another) measures time to first
token (p50/p95) and aggregate completion tokens per second. The naive
baseline serves one request at a time with ``model.generate``. When personas
have active adapters, requests alternate between them (mixed-adapter batches).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import statistics
import threading
import time
from dataclasses import dataclass

from rich.console import Console
from rich.table import Table

console = Console()
PROMPTS = [
    "I have a presentation tomorrow and I'm nervous.",
    "What should I cook for dinner with rice, eggs and spinach?",
    "My friend forgot my birthday. Should I say something?",
    "How do I start running when I'm totally out of shape?",
]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--clients", default="1,4,16", help="comma-separated concurrency levels")
    parser.add_argument("--requests", type=int, default=2, help="requests per client at each level")
    parser.add_argument("--max-tokens", type=int, default=64)


@dataclass
class Result:
    ttft: list[float]
    tokens: int
    seconds: float

    def row(self) -> tuple[str, str, str]:
        q = sorted(self.ttft)
        p95 = q[min(len(q) - 1, int(round(0.95 * (len(q) - 1))))]
        return f"{statistics.median(q):.2f}", f"{p95:.2f}", f"{self.tokens / self.seconds:.1f}"


async def load(url: str, models: list[str], clients: int, requests: int, max_tokens: int) -> Result:
    import httpx

    ttft: list[float] = []
    tokens = 0

    async def client(cid: int, http: httpx.AsyncClient):
        nonlocal tokens
        for r in range(requests):
            body = {"model": models[(cid + r) % len(models)], "stream": True, "max_tokens": max_tokens,
                    "temperature": 0, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": PROMPTS[(cid + r) % len(PROMPTS)]}]}
            start, first = time.perf_counter(), None
            async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
                if response.status_code != 200:
                    raise RuntimeError(f"{url}: HTTP {response.status_code}: {(await response.aread())[:300]!r}")
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        continue
                    chunk = json.loads(line[6:])
                    if first is None and any(c["delta"].get("content") for c in chunk["choices"]):
                        first = time.perf_counter() - start
                    if chunk.get("usage"):
                        tokens += chunk["usage"]["completion_tokens"]
            ttft.append(first if first is not None else time.perf_counter() - start)

    started = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return Result(ttft, tokens, time.perf_counter() - started)


def free_port() -> int:
    """A free TCP port on loopback."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_in_thread(app) -> tuple[str, object]:
    """Serve an ASGI app on a free loopback port from a daemon thread; returns (url, server)."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 120
    while not server.started:
        if not thread.is_alive() or time.monotonic() > deadline:
            raise RuntimeError(f"the server on port {port} did not start")
        time.sleep(0.05)
    return f"http://127.0.0.1:{port}", server


def main(args: argparse.Namespace) -> None:
    from bench.naive_server import create_naive_app
    from serve.engine.embedded import EmbeddedEngine
    from serve.engine.routes import create_app
    from train import base_model, registry

    base = base_model.resolve()
    adapters = registry.active_adapters()
    levels = [int(c) for c in args.clients.split(",")]
    engine = EmbeddedEngine(base, served_name="base")

    async def load_adapters():
        for a in adapters:
            await engine.load_adapter(a.name, str(a.path))

    targets = [
        ("embedded engine", create_app(engine, on_start=load_adapters)),
        ("naive", create_naive_app(base, {a.name: str(a.path) for a in adapters})),
    ]
    models = [a.name for a in adapters] or ["base"]
    results: dict[tuple[str, int], Result] = {}
    for label, app in targets:
        url, server = serve_in_thread(app)
        asyncio.run(load(url, models, 1, 1, 8))  # warm-up
        for clients in levels:
            console.print(f"{label}: {clients} clients x {args.requests} requests ...")
            results[(label, clients)] = asyncio.run(load(url, models, clients, args.requests, args.max_tokens))
        server.should_exit = True

    table = Table("server", "clients", "TTFT p50 s", "TTFT p95 s", "tokens/s", "vs naive",
                  title=f"Streaming chat on {base.split('/')[-1]} ({', '.join(models)}), "
                        f"max_tokens={args.max_tokens}, greedy",
                  caption="naive: one request at a time with model.generate and a token streamer")
    naive = targets[1][0]
    for label, _ in targets:
        for clients in levels:
            r = results[(label, clients)]
            ratio = (r.tokens / r.seconds) / (results[(naive, clients)].tokens / results[(naive, clients)].seconds)
            table.add_row(label, str(clients), *r.row(), f"{ratio:.2f}x")
    console.print(table)
