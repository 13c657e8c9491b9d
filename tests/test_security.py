"""Keys and exposure: key files (revocation without a restart), API keys on admin routes,
adapter paths confined to PERSONA_HOME/adapters, the UI login on every UI route, Gradio's
file route, no path through to an engine, constant-time key checks, and no secret in the
logs or the store.

Runs against the contract stack (a real gateway on loopback in front of the embedded
engine); UI logins and key files get a second gateway over the same engine, with its
own store.
"""

from __future__ import annotations

import contextlib
import http.client
import logging
import shutil
from pathlib import Path
from urllib.parse import quote, urlsplit

import httpx
import pytest

from contract_stack import ADMIN_KEY, API_KEY, stack
from feedback.errors import APIError
from serve.gateway import auth
from serve.processes import serve_in_thread

UI_USER, UI_PASSWORD = "alice", "pw-alice-secret"
DENIED = (401, 403, 404)


@pytest.fixture(scope="module")
def s(tiny_model_dir, tmp_path_factory):
    with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("security")) as running:
        yield running


@contextlib.contextmanager
def second_gateway(s, folder: Path, **app_options):
    """Another gateway over the stack's engine (its own store), built now: PERSONA_*_KEY_FILE
    and PERSONA_HOME are read when its config is made."""
    from feedback.store import Store
    from serve.gateway.app import create_gateway_app
    from serve.gateway.core import Gateway, GatewayConfig
    from serve.gateway.engines import EnginePool

    folder.mkdir(parents=True, exist_ok=True)
    store = Store.open(folder / "feedback.duckdb")
    gateway = Gateway(lambda: s.state["catalog"], EnginePool([s.engine_url], api_key=s.engine_key), store,
                      GatewayConfig(api_keys=(API_KEY,), admin_keys=(ADMIN_KEY,)))
    url, server = serve_in_thread(create_gateway_app(gateway, **app_options))
    try:
        yield url
    finally:
        server.should_exit = True
        store.close()


@pytest.fixture(scope="module")
def ui_url(s, tmp_path_factory):
    """A gateway whose UI asks for a login."""
    with second_gateway(s, tmp_path_factory.mktemp("ui-login"), ui_users=((UI_USER, UI_PASSWORD),)) as url:
        yield url


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def raw_get(url: str, target: str, headers: dict | None = None) -> tuple[int, bytes]:
    """GET with the request target sent exactly as given (httpx would normalize ``..``)."""
    parts = urlsplit(url)
    conn = http.client.HTTPConnection(parts.hostname, parts.port, timeout=30)
    try:
        conn.request("GET", target, headers=headers or {})
        response = conn.getresponse()
        return response.status, response.read()
    finally:
        conn.close()


def home_of(s) -> Path:
    return Path(s.adapters["teto1"]).parents[1]  # <home>/adapters/teto1


# ---- keys ------------------------------------------------------------------------------------
def test_key_files_add_keys_and_a_deleted_line_revokes_at_once(s, tmp_path, monkeypatch):
    api_file, admin_file = tmp_path / "api-keys", tmp_path / "admin-keys"
    api_file.write_text("# team keys\nfile-key-1\n\n  file-key-2  # bob\n")
    admin_file.write_text("file-admin-1\n")
    monkeypatch.setenv("PERSONA_API_KEY_FILE", str(api_file))
    monkeypatch.setenv("PERSONA_ADMIN_KEY_FILE", str(admin_file))
    with second_gateway(s, tmp_path / "gw") as url:
        models = lambda key: httpx.get(url + "/v1/models", headers=bearer(key)).status_code  # noqa: E731
        engines = lambda key: httpx.get(url + "/admin/engines", headers=bearer(key)).status_code  # noqa: E731
        assert [models(k) for k in (API_KEY, "file-key-1", "file-key-2")] == [200, 200, 200]
        assert models("# team keys") == 401 and models("bob") == 401, "comments are not keys"
        assert engines("file-admin-1") == 200 and engines(ADMIN_KEY) == 200

        api_file.write_text("file-key-2\n")  # file-key-1 revoked
        assert models("file-key-1") == 401 and models("file-key-2") == 200 and models(API_KEY) == 200
        admin_file.unlink()  # a missing file holds no keys
        assert engines("file-admin-1") == 401 and engines(ADMIN_KEY) == 200
        admin_file.write_text("file-admin-2\n")
        assert engines("file-admin-2") == 200


def test_an_empty_key_file_still_requires_a_key(tmp_path):
    """A key file that lists no key (all revoked) does not fall back to 'loopback without a key'."""
    path = tmp_path / "keys"
    path.write_text("# nobody\n")
    ring = auth.KeyRing((), path)
    with pytest.raises(APIError) as err:
        auth.check(None, "127.0.0.1", ring.keys(), required=ring.required)
    assert err.value.status == 401
    assert auth.check(None, "127.0.0.1", auth.KeyRing().keys(), required=auth.KeyRing().required) == "ip:127.0.0.1"


ADMIN_ROUTES = [("POST", "/v1/load_lora_adapter"), ("POST", "/v1/unload_lora_adapter"), ("POST", "/admin/reload"),
                ("POST", "/admin/snapshot"), ("POST", "/admin/runs"), ("GET", "/admin/runs"),
                ("POST", "/admin/retrain"), ("GET", "/admin/engines"), ("GET", "/metrics"),
                ("GET", "/admin/experiments"), ("POST", "/admin/experiments"), ("POST", "/admin/experiments/x/stop")]


@pytest.mark.parametrize("method, route", ADMIN_ROUTES)
def test_an_api_key_on_an_admin_route_is_403_and_no_key_401(s, method, route):
    body = {"lora_name": "spare-v9", "lora_path": s.adapters["spare"]}
    r = httpx.request(method, s.url + route, json=body, headers=bearer(API_KEY))
    assert r.status_code == 403 and r.json()["error"]["type"] == "permission_error", r.text
    assert "admin key" in r.json()["error"]["message"]
    for headers in ({}, bearer("not-a-key")):
        r = httpx.request(method, s.url + route, json=body, headers=headers)
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    engine = httpx.get(s.engine_url + "/v1/models", headers=bearer(s.engine_key)).json()
    assert "spare-v9" not in [m["id"] for m in engine["data"]], "nothing reached the engine"


def test_every_configured_key_is_compared_in_constant_time(monkeypatch):
    calls = []
    real = auth.hmac.compare_digest

    def counting(a, b):
        calls.append(b)
        return real(a, b)

    monkeypatch.setattr(auth.hmac, "compare_digest", counting)
    keys = ("k1", "k2", "k3")
    for header in ("Bearer k1", "Bearer k3", "Bearer nope"):
        calls.clear()
        with contextlib.suppress(APIError):
            auth.check(header, "192.0.2.1", keys)
        assert calls == [k.encode() for k in keys], "every key is compared, the matching one or not"


# ---- adapter paths ---------------------------------------------------------------------------
def test_adapter_paths_must_lie_in_the_adapters_folder(s, tmp_path):
    adapters = home_of(s) / "adapters"
    outside = tmp_path / "outside-adapter"
    shutil.copytree(s.adapters["spare"], outside)  # a real adapter, but not under PERSONA_HOME
    link = adapters / "sneaky-link"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for path in (str(outside), str(link), str(adapters / ".." / ".." / outside.name), "sneaky-link",
                     "../adapters/../../" + outside.name):
            r = httpx.post(s.url + "/v1/load_lora_adapter", headers=bearer(ADMIN_KEY),
                           json={"lora_name": "outside-v1", "lora_path": path}, timeout=60)
            assert r.status_code == 400, (path, r.text)
            error = r.json()["error"]
            assert error["param"] == "lora_path" and str(adapters.resolve()) in error["message"]
        engine = httpx.get(s.engine_url + "/v1/models", headers=bearer(s.engine_key)).json()
        assert "outside-v1" not in [m["id"] for m in engine["data"]]
        inside = httpx.post(s.url + "/v1/load_lora_adapter", headers=bearer(ADMIN_KEY), timeout=60,
                            json={"lora_name": "relative-v1", "lora_path": "spare"})
        assert inside.status_code == 200, "a path relative to the adapters folder is inside it"
    finally:
        link.unlink()
        httpx.post(s.url + "/v1/unload_lora_adapter", headers=bearer(ADMIN_KEY), json={"lora_name": "relative-v1"})


# ---- no way through to an engine ---------------------------------------------------------------
def test_the_gateway_has_no_route_to_arbitrary_engine_paths(s):
    from serve.gateway.app import create_gateway_app

    app = create_gateway_app(s.gateway, ui=False)
    paths = {getattr(r, "path", None) for r in app.routes}
    assert paths == {"/openapi.json", "/health", "/v1/models", "/v1/chat/completions", "/v1/feedback",
                     "/v1/comparisons", "/v1/load_lora_adapter", "/v1/unload_lora_adapter", "/admin/reload",
                     "/admin/snapshot", "/admin/runs", "/admin/retrain", "/admin/engines", "/metrics",
                     "/admin/experiments", "/admin/experiments/{experiment_id}/stop",
                     "/v1/{path:path}", "/admin/{path:path}"}, "a new route must be checked here"
    engine_port = str(urlsplit(s.engine_url).port)
    for target in ("/v1/../health", "/v1/%2e%2e/v1/models", "/v1/./load_lora_adapter", "/engine/v1/models",
                   "/v1/engine/v1/models", "/admin/../v1/load_lora_adapter", "//v1/models",
                   f"/gradio_api/file=http://127.0.0.1:{engine_port}/v1/models",
                   f"/gradio_api/proxy=http://127.0.0.1:{engine_port}/v1/models"):
        status, body = raw_get(s.url, target, bearer(API_KEY))
        assert status in (400, *DENIED), (target, status, body[:200])
        assert b"teto-v1" not in body and b'"object":"list"' not in body, target


# ---- the browser UI ----------------------------------------------------------------------------
def ui_requests(url: str, home: Path) -> list[tuple[str, str, dict]]:
    return [("GET", url + "/config", {}), ("GET", url + "/gradio_api/info", {}),
            ("GET", url + "/gradio_api/openapi.json", {}),
            ("POST", url + "/gradio_api/queue/join", {"json": {"data": [], "fn_index": 0, "session_hash": "x"}}),
            ("POST", url + "/gradio_api/upload", {"files": {"files": ("a.txt", b"hello")}}),
            ("GET", url + "/gradio_api/file=" + str(home / "feedback.duckdb"), {}),
            ("GET", url + "/gradio_api/queue/data?session_hash=x", {}),
            ("GET", url + "/gradio_api/deep_link?session_hash=x", {})]


def test_ui_login_guards_every_ui_route(s, ui_url):
    home = home_of(s)
    for page in (httpx.get(ui_url + "/"), httpx.get(ui_url + "/?all_endpoints=true")):
        assert page.status_code == 200 and "auth_required" in page.text, "/ is the login page"
        assert "teto" not in page.text.lower(), "nothing of the app before login (not even its API description)"
    for method, url, options in ui_requests(ui_url, home):
        r = httpx.request(method, url, **options)
        assert r.status_code in DENIED, (url, r.status_code, r.text[:200])
        assert "teto" not in r.text.lower(), url
    wrong = httpx.post(ui_url + "/login", data={"username": UI_USER, "password": "wrong"})
    assert wrong.status_code == 400 and not wrong.cookies
    with httpx.Client(base_url=ui_url) as browser:
        assert browser.post("/login", data={"username": UI_USER, "password": UI_PASSWORD}).json() == {"success": True}
        after = browser.get("/")
        assert after.status_code == 200 and "teto" in after.text.lower(), "logged in: the app"
        assert browser.get("/config").status_code == 200


def file_targets(home: Path) -> list[str]:
    db = str(home / "feedback.duckdb")
    adapter = str(next((home / "adapters" / "teto1").glob("*.safetensors")))
    return ["/gradio_api/file=" + db, "/gradio_api/file=" + adapter,
            "/gradio_api/file=" + quote(db, safe=""),
            "/gradio_api/file=/tmp/../" + db.lstrip("/"),
            "/gradio_api/file=/tmp/%2e%2e/" + db.lstrip("/"),
            "/gradio_api/file=" + db.replace("/", "%2F"),
            "/gradio_api/file=../../../../../.." + db,
            "/gradio_api/file/" + db,
            "/file=" + db]


def test_gradio_serves_no_file_from_persona_home(s, ui_url):
    home = home_of(s)
    secret_bytes = [(home / "feedback.duckdb").read_bytes()[:64],
                    next((home / "adapters" / "teto1").glob("*.safetensors")).read_bytes()[:64]]
    with httpx.Client(base_url=ui_url) as logged_in:
        logged_in.post("/login", data={"username": UI_USER, "password": UI_PASSWORD}).raise_for_status()
        cookies = "; ".join(f"{k}={v}" for k, v in logged_in.cookies.items())
    for url, headers in ((s.url, {}), (ui_url, {}), (ui_url, {"Cookie": cookies})):
        for target in file_targets(home):
            status, body = raw_get(url, target, headers)
            assert status in DENIED, (url, target, status)
            assert not any(part in body for part in secret_bytes), (url, target)


# ---- secrets stay out of logs and the store ----------------------------------------------------------
def test_no_secret_in_logs_or_store(s, ui_url, caplog):
    secrets = [API_KEY, ADMIN_KEY, "wrong-key-Zx81", UI_PASSWORD, "wrong-pw-Q19", s.engine_key]
    loggers = [logging.getLogger(name) for name in ("uvicorn", "uvicorn.error", "uvicorn.access", "gradio", "httpx")]
    levels = [lg.level for lg in loggers]
    caplog.set_level(logging.DEBUG)
    for lg in loggers:  # uvicorn's loggers do not propagate to the root logger
        lg.setLevel(logging.DEBUG)
        lg.addHandler(caplog.handler)
    try:
        chat = httpx.post(s.url + "/v1/chat/completions", headers=bearer(API_KEY), timeout=60,
                          json={"model": "teto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}]})
        wrong = httpx.get(s.url + "/v1/models", headers=bearer("wrong-key-Zx81"))
        assert httpx.get(s.url + "/admin/engines", headers=bearer(ADMIN_KEY)).status_code == 200
        assert httpx.post(s.url + "/admin/reload", headers=bearer("wrong-key-Zx81")).status_code == 401
        httpx.post(ui_url + "/login", data={"username": UI_USER, "password": UI_PASSWORD}).raise_for_status()
        httpx.post(ui_url + "/login", data={"username": UI_USER, "password": "wrong-pw-Q19"})
    finally:
        for lg, level in zip(loggers, levels):
            lg.removeHandler(caplog.handler)
            lg.setLevel(level)
    assert chat.status_code == 200 and wrong.status_code == 401
    assert "wrong-key-Zx81" not in wrong.text, "the error does not echo the key"
    assert any(r.name == "uvicorn.access" and "/v1/chat/completions" in r.getMessage() for r in caplog.records), \
        "the server's access log was captured"
    for record in caplog.records:
        text = record.getMessage() + str(record.__dict__)
        assert not any(secret in text for secret in secrets), record.getMessage()
    turn = s.store.turn(chat.json()["id"])
    assert turn.client == auth.fingerprint(API_KEY) and API_KEY not in str(s.store.query("SELECT * FROM turns"))
