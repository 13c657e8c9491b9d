"""Gateway pieces beyond the contract: keys, persona resolution, replicas, the store's file lock."""

from __future__ import annotations

import asyncio
import subprocess
import sys

import httpx
import openai
import pytest

from feedback.errors import APIError
from serve.processes import free_port, serve_in_thread
from conftest import make_lora
from serve.gateway import auth
from serve.gateway.catalog import Catalog, PersonaInfo, UnknownModel


def test_keys_and_loopback_rule():
    assert auth.check(None, "127.0.0.1", ()) == "ip:127.0.0.1"
    assert auth.check(None, "::1", ()) == "ip:::1"
    with pytest.raises(APIError) as err:
        auth.check("Bearer anything", "192.0.2.7", ())
    assert err.value.status == 403 and "loopback" in err.value.message
    keys = ("k1", "k2")
    assert auth.check("Bearer k2", "192.0.2.7", keys) == auth.fingerprint("k2")
    assert auth.fingerprint("k2") != auth.fingerprint("k1") and "k2" not in auth.fingerprint("k2")
    for header in (None, "Bearer nope", "Basic k1", "Bearer "):
        with pytest.raises(APIError) as err:
            auth.check(header, "127.0.0.1", keys)
        assert err.value.status == 401


def test_catalog_resolution():
    cat = Catalog({"teto": PersonaInfo("teto", "sys", active=3, versions={2: "/a/v2", 3: "/a/v3"}),
                   "new": PersonaInfo("new", "sys")})
    assert cat.resolve("teto").adapter == "teto-v3"
    pinned = cat.resolve("teto@v2")
    assert (pinned.model_id, pinned.adapter, pinned.path) == ("teto@v2", "teto-v2", "/a/v2")
    assert [m for m, _ in cat.model_ids()] == ["teto", "teto@v2", "teto@v3"]
    for model, says in [("teto@v7", "versions v2, v3"), ("new", "no trained adapter"), ("x", "Known personas")]:
        with pytest.raises(UnknownModel, match=says):
            cat.resolve(model)


def test_store_file_is_held_by_one_process(tmp_path):
    from feedback.store import Store

    path = tmp_path / "feedback.duckdb"
    store = Store.open(path)
    try:
        code = f"from feedback.store import Store; Store.open({str(path)!r})"
        other = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert other.returncode != 0 and "is a gateway already running?" in other.stderr
    finally:
        store.close()
    again = Store.open(path)
    from feedback.migrations import MIGRATIONS

    assert again.migrations() == [name for name, _ in MIGRATIONS] and again.migrate() == []
    again.close()


def test_replicas_share_load_skip_a_dead_one_and_all_get_a_promotion(tiny_model_dir, tmp_path):
    from feedback.store import Store
    from serve.engine.embedded import EmbeddedEngine
    from serve.engine.routes import create_app
    from serve.gateway.app import create_gateway_app
    from serve.gateway.core import Gateway
    from serve.gateway.engines import EnginePool

    adapter = make_lora(tiny_model_dir, tmp_path / "teto1", 5)
    newer = make_lora(tiny_model_dir, tmp_path / "teto2", 6)
    servers, urls = [], []
    for _ in range(2):
        url, server = serve_in_thread(create_app(EmbeddedEngine(str(tiny_model_dir), served_name="base")))
        servers.append(server)
        urls.append(url)
    dead = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(TimeoutError, match="no engine became healthy"):
        asyncio.run(EnginePool([dead]).wait_healthy(0.5))
    state = {"catalog": Catalog({"teto": PersonaInfo("teto", "sys", active=1, versions={1: adapter, 2: newer})})}
    store = Store.open(tmp_path / "f.duckdb")
    gateway = Gateway(lambda: state["catalog"], EnginePool(urls + [dead]), store)
    gw_url, gw_server = serve_in_thread(create_gateway_app(gateway))
    try:
        async def burst():
            client = openai.AsyncOpenAI(base_url=gw_url + "/v1", api_key="unused", max_retries=0)
            calls = [client.chat.completions.create(model="teto", max_tokens=6, temperature=0,
                                                    messages=[{"role": "user", "content": f"hi {i}"}])
                     for i in range(8)]
            return await asyncio.gather(*calls)

        replies = asyncio.run(burst())
        assert len({r.id for r in replies}) == 8
        engines = httpx.get(gw_url + "/admin/engines").json()["engines"]
        assert [e["healthy"] for e in engines] == [True, True, False]
        assert all(e["served"] > 0 for e in engines[:2]), engines
        assert all("teto-v1" in e["adapters"] for e in engines[:2])

        # A promotion reaches every replica: v2 is loaded on both, v1 unloaded from both.
        state["catalog"] = Catalog({"teto": PersonaInfo("teto", "sys", active=2, versions={1: adapter, 2: newer})})
        assert httpx.post(gw_url + "/admin/reload", timeout=60).json()["active"] == {"teto": "teto-v2"}
        for url in urls:
            served = {m["id"] for m in httpx.get(url + "/v1/models").json()["data"]}
            assert "teto-v2" in served and "teto-v1" not in served, (url, served)
        replies = asyncio.run(burst())
        assert {r.model for r in replies} == {"teto@v2"}
    finally:
        gw_server.should_exit = True
        store.close()
        for server in servers:
            server.should_exit = True
