"""Builds what the contract suite talks to: a gateway (with a real DuckDB store)
in front of an engine, both on loopback. The engine is the embedded one
(tiny random model) or a real vLLM server (the real base model), started the
way ``persona up --engine vllm`` starts it."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path

import pytest

from serve.processes import free_port, serve_in_thread
from conftest import make_lora

API_KEY, ADMIN_KEY = "test-api-key", "test-admin-key"
TETO_PROMPT = "You are Teto: bold, direct, action-first."
EGEN_PROMPT = "You are Egen: gentle and warm."


@dataclass
class Stack:
    url: str                 # gateway
    engine_url: str
    engine_key: str | None
    store: object
    state: dict              # {"catalog": Catalog}, what the gateway's loader returns
    adapters: dict[str, str]
    max_model_len: int
    kind: str
    gateway: object = None   # the Gateway itself: a test may change its config


def catalog(adapters: dict[str, str], teto_active: int = 1):
    from serve.gateway.catalog import Catalog, PersonaInfo

    return Catalog({
        "teto": PersonaInfo("teto", TETO_PROMPT, active=teto_active, description="Bold coach.",
                            descriptions={"ko": "대담한 코치."},
                            versions={1: adapters["teto1"], 2: adapters["teto2"]}),
        "egen": PersonaInfo("egen", EGEN_PROMPT, active=1, versions={1: adapters["egen1"]}),
    })


def vllm_python() -> str | None:
    from feedback import settings

    path = Path(settings.get("PERSONA_VLLM_PYTHON"))
    return str(path) if path.is_file() else None


@contextlib.contextmanager
def engine(kind: str, base_dir: Path, adapter_paths: list[str], logs: Path):
    """Yield (url, key, max_model_len) of a running engine."""
    if kind == "embedded":
        from serve.engine.embedded import EmbeddedEngine
        from serve.engine.routes import create_app

        eng = EmbeddedEngine(str(base_dir), served_name="base", max_model_len=256)
        url, server = serve_in_thread(create_app(eng, api_key="engine-key"))
        try:
            yield url, "engine-key", 256
        finally:
            server.should_exit = True
        return
    from serve.engine.vllm_launcher import VLLMConfig, VLLMServer

    config = VLLMConfig(python=vllm_python(), model=str(base_dir), adapters=adapter_paths, port=free_port(),
                        max_model_len=512, log_file=str(logs / "vllm.log"))
    with VLLMServer(config) as server:
        yield server.url, server.api_key, 512


@contextlib.contextmanager
def stack(kind: str, base_dir: Path, root: Path, **config):
    """A running stack; ``config``: GatewayConfig fields besides the keys (a small vote quota)."""
    from feedback import settings
    from feedback.store import Store
    from serve.gateway.app import create_gateway_app
    from serve.gateway.core import Gateway, GatewayConfig
    from serve.gateway.edge import server_options
    from serve.gateway.engines import EnginePool

    # The stack has its own PERSONA_HOME (root/home) while it runs: its adapters and database
    # live there, as in an installation, and the gateway loads adapters from there only. A test
    # inside a module-scoped stack still gets its own PERSONA_HOME (conftest), set and undone
    # within the stack's.
    with pytest.MonkeyPatch.context() as env:
        env.setenv("PERSONA_HOME", str(root / "home"))
        adapters = {name: make_lora(base_dir, settings.adapters_dir() / name, seed, rank=8)
                    for seed, name in enumerate(["teto1", "teto2", "egen1", "spare"], start=10)}
        state = {"catalog": catalog(adapters)}
        store = Store.open(settings.home() / "feedback.duckdb")
        with engine(kind, base_dir, list(adapters.values()), root) as (engine_url, key, max_len):
            gateway = Gateway(lambda: state["catalog"], EnginePool([engine_url], api_key=key), store,
                              GatewayConfig(api_keys=(API_KEY, "second-key"), admin_keys=(ADMIN_KEY,), **config))
            url, server = serve_in_thread(create_gateway_app(gateway), **server_options(gateway.config))
            try:
                yield Stack(url, engine_url, key, store, state, adapters, max_len, kind, gateway)
            finally:
                server.should_exit = True
                store.close()
