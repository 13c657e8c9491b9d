"""Hostile browsers and proxies against a gateway in the README's quick-start mode (no keys:
loopback callers only), on loopback: a page on another site must not drive it from the
operator's browser (a text/plain POST, a foreign Origin), a rebound DNS name must not reach
it (a foreign Host), and a proxy header from loopback must not say who the caller is
unless the operator listed that proxy.

The gateway runs over a fake engine (``/health`` and the LoRA admin routes, recording what
reached it): what is checked here is what gets past the gateway's edge.
"""

from __future__ import annotations

import contextlib
from urllib.parse import urlsplit

import httpx
import pytest
from fastapi import FastAPI, Request

from serve.gateway import auth
from serve.processes import serve_in_thread

EVIL = "http://evil.example"
ADMIN_POSTS = [("/admin/retrain", '{"persona": "teto"}'), ("/v1/unload_lora_adapter", '{"lora_name": "teto-v1"}')]


def fake_engine(seen: list) -> FastAPI:
    app = FastAPI()

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.post("/v1/{route}")
    async def admin(route: str, request: Request):
        seen.append((route, await request.json()))
        return "Success"

    return app


@contextlib.contextmanager
def no_key_gateway(engine_url: str, folder, **config):
    from feedback.store import Store
    from serve.gateway.app import create_gateway_app
    from serve.gateway.catalog import Catalog, PersonaInfo
    from serve.gateway.core import Gateway, GatewayConfig
    from serve.gateway.edge import server_options
    from serve.gateway.engines import EnginePool

    folder.mkdir(parents=True, exist_ok=True)
    store = Store.open(folder / "feedback.duckdb")
    catalog = Catalog({"teto": PersonaInfo("teto", "You are Teto.", active=1, versions={1: str(folder / "teto1")})})
    gateway = Gateway(lambda: catalog, EnginePool([engine_url]), store,
                      GatewayConfig(api_keys=(), admin_keys=(), api_key_file=None, admin_key_file=None, **config))
    url, server = serve_in_thread(create_gateway_app(gateway, ui=False), **server_options(gateway.config))
    try:
        yield url
    finally:
        server.should_exit = True
        store.close()


@pytest.fixture(scope="module")
def engine():
    seen: list = []
    url, server = serve_in_thread(fake_engine(seen))
    yield url, seen
    server.should_exit = True


@pytest.fixture(scope="module")
def gw(engine, tmp_path_factory):
    with no_key_gateway(engine[0], tmp_path_factory.mktemp("browsers")) as url:
        yield url


def port(url: str) -> int:
    return urlsplit(url).port


@pytest.mark.parametrize("route, body", ADMIN_POSTS)
def test_a_cross_origin_text_plain_post_to_an_admin_route_is_refused(gw, engine, route, body):
    """What a page on another site can send from the operator's browser without asking first
    (a "simple" CORS request): refused by its Origin, and by its content type alone too."""
    _, seen = engine
    before = len(seen)
    forged = httpx.post(gw + route, content=body, headers={"Origin": EVIL, "Content-Type": "text/plain"})
    assert forged.status_code == 403, forged.text
    assert forged.json()["error"]["code"] == "origin_not_allowed" and EVIL in forged.json()["error"]["message"]
    as_json = httpx.post(gw + route, content=body, headers={"Origin": EVIL, "Content-Type": "application/json"})
    assert as_json.status_code == 403, "a foreign page's JSON (after a CORS preflight) is refused too"
    no_origin = httpx.post(gw + route, content=body, headers={"Content-Type": "text/plain"})
    assert no_origin.status_code == 415, no_origin.text
    error = no_origin.json()["error"]
    assert error["param"] == "Content-Type" and "application/json" in error["message"] and "text/plain" in error["message"]
    null_origin = httpx.post(gw + route, content=body, headers={"Origin": "null", "Content-Type": "application/json"})
    assert null_origin.status_code == 403, "a sandboxed page or a file:// one (Origin: null) is foreign"
    assert len(seen) == before, "nothing reached the engine"


def test_the_gateways_own_pages_and_programs_still_get_through(gw, engine):
    _, seen = engine
    own = httpx.post(gw + "/v1/unload_lora_adapter", json={"lora_name": "teto-v1"}, headers={"Origin": gw})
    assert own.status_code == 200 and seen[-1] == ("unload_lora_adapter", {"lora_name": "teto-v1"}), own.text
    program = httpx.post(gw + "/v1/unload_lora_adapter", json={"lora_name": "teto-v2"})
    assert program.status_code == 200, "no Origin: not a browser page"
    charset = httpx.post(gw + "/admin/retrain", content=b'{"persona": "nobody"}',
                         headers={"Content-Type": "application/json; charset=utf-8"})
    assert charset.status_code == 404 and "nobody" in charset.text, "a charset after the type is fine"
    assert httpx.post(gw + "/admin/reload").status_code != 415, "an action without arguments needs no body"


def test_a_foreign_host_is_refused(gw):
    """DNS rebinding: a page whose name now resolves to 127.0.0.1 sends its own name as the Host."""
    for host in (f"evil.example:{port(gw)}", "evil.example", f"localhost.evil.example:{port(gw)}", ""):
        r = httpx.get(gw + "/v1/models", headers={"Host": host})
        assert r.status_code == 403 and r.json()["error"]["code"] == "host_not_allowed", (host, r.text)
    for host in (f"localhost:{port(gw)}", f"127.0.0.1:{port(gw)}", f"[::1]:{port(gw)}", "LOCALHOST"):
        assert httpx.get(gw + "/v1/models", headers={"Host": host}).status_code == 200, host
    assert httpx.get(gw + "/health", headers={"Host": "10.0.0.7:7860"}).status_code == 200, \
        "health checks ask by address"


def test_configured_hosts_and_origins_are_served(engine, tmp_path):
    with no_key_gateway(engine[0], tmp_path, allowed_hosts=("chat.example.com",),
                        allowed_origins=("https://app.example.com",)) as url:
        assert httpx.get(url + "/v1/models", headers={"Host": "chat.example.com"}).status_code == 200
        assert httpx.get(url + "/v1/models").status_code == 403, "the list replaces the loopback names"
        r = httpx.post(url + "/admin/retrain", json={"persona": "x"},
                       headers={"Host": "chat.example.com", "Origin": "https://app.example.com"})
        assert r.status_code == 404, r.text


def test_x_forwarded_for_from_loopback_is_ignored_unless_configured(engine, tmp_path):
    """Without keys only loopback callers are served. A proxy on this host that passes on the
    caller's X-Forwarded-For would otherwise decide who is "loopback"."""
    spoof = {"X-Forwarded-For": "203.0.113.9"}
    with no_key_gateway(engine[0], tmp_path / "default") as url:
        r = httpx.get(url + "/v1/models", headers=spoof)
        assert r.status_code == 200, "the header is ignored: the caller is the loopback peer it is"
    with no_key_gateway(engine[0], tmp_path / "proxied", forwarded_allow_ips=("127.0.0.1",)) as url:
        r = httpx.get(url + "/v1/models", headers=spoof)
        assert r.status_code == 403 and r.json()["error"]["code"] == "loopback_only", r.text
        assert httpx.get(url + "/v1/models").status_code == 200


def test_only_loopback_addresses_count_as_loopback():
    assert auth.is_loopback("127.0.0.1") and auth.is_loopback("::1") and auth.is_loopback("127.8.9.10")
    for host in ("localhost", "LOCALHOST", "localhost.", "0.0.0.0", "192.0.2.1", "", None):
        assert not auth.is_loopback(host), host


def test_the_edge_settings_are_read_and_checked(monkeypatch):
    from feedback import settings
    from feedback.errors import UserError

    monkeypatch.setenv("PERSONA_ALLOWED_HOSTS", "Chat.Example.com, [::1]")
    monkeypatch.setenv("PERSONA_ALLOWED_ORIGINS", "https://App.example.com/")
    assert settings.get("PERSONA_ALLOWED_HOSTS") == ("chat.example.com", "::1")
    assert settings.get("PERSONA_ALLOWED_ORIGINS") == ("https://app.example.com",)
    for name, value in (("PERSONA_ALLOWED_ORIGINS", "app.example.com"), ("PERSONA_BODY_TIMEOUT", "0"),
                        ("PERSONA_KEY_MAX_IN_FLIGHT", "-1")):
        monkeypatch.setenv(name, value)
        with pytest.raises(UserError, match=name):
            settings.get(name)
