"""Bad input on every public route: a 4xx in OpenAI's error shape that names the problem,
never a 500 or a traceback, and nothing written to the store.

One table of hand-picked cases, run against the contract stack (a real gateway on
loopback in front of the embedded engine, with a real DuckDB store). ``{turn}`` in a
body stands for a turn served to the API key before the cases run.
"""

from __future__ import annotations

import httpx
import pytest

from contract_stack import ADMIN_KEY, API_KEY, stack

CHAT, FEEDBACK, COMPARE = "/v1/chat/completions", "/v1/feedback", "/v1/comparisons"
LOAD, UNLOAD = "/v1/load_lora_adapter", "/v1/unload_lora_adapter"
KEYS = {"api": API_KEY, "admin": ADMIN_KEY, "second": "second-key"}
TABLES = ("turns", "votes", "comparisons", "training_runs")


def chat(content: str = '"hi"', extra: str = "") -> bytes:
    return ('{"model": "teto", "messages": [{"role": "user", "content": %s}]%s}' % (content, extra)).encode()


# (case id, method, route, body, key, status, what the message must contain)
CASES = [
    # ---- chat ----------------------------------------------------------------------------
    ("chat-malformed-json", "POST", CHAT, b"{not json", "api", 400, "not valid JSON"),
    ("chat-empty-body", "POST", CHAT, b"", "api", 400, "not valid JSON"),
    ("chat-json-array", "POST", CHAT, b"[]", "api", 400, "object"),
    ("chat-missing-model", "POST", CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}', "api", 400,
     "model: Field required"),
    ("chat-missing-messages", "POST", CHAT, b'{"model": "teto"}', "api", 400, "messages: Field required"),
    ("chat-messages-not-a-list", "POST", CHAT, b'{"model": "teto", "messages": "hi"}', "api", 400, "messages"),
    ("chat-empty-messages", "POST", CHAT, b'{"model": "teto", "messages": []}', "api", 400,
     "messages: List should have at least 1 item"),
    ("chat-content-wrong-type", "POST", CHAT, chat("5"), "api", 400, "messages.0.content"),
    ("chat-bad-role", "POST", CHAT, b'{"model": "teto", "messages": [{"role": "robot", "content": "x"}]}', "api",
     400, "messages.0.role"),
    ("chat-unknown-persona", "POST", CHAT, b'{"model": "nobody", "messages": [{"role": "user", "content": "x"}]}',
     "api", 404, "nobody"),
    ("chat-unknown-version", "POST", CHAT, b'{"model": "teto@v9", "messages": [{"role": "user", "content": "x"}]}',
     "api", 404, "versions v1, v2"),
    ("chat-model-too-long", "POST", CHAT, ('{"model": "%s", "messages": []}' % ("m" * 200)).encode(), "api", 400,
     "model"),
    ("chat-huge-message", "POST", CHAT, chat('"%s"' % ("a" * 32_001)), "api", 400, "at most 32000 characters"),
    ("chat-huge-body", "POST", CHAT, chat('"%s"' % ("a" * (1 << 20))), "api", 413, "limit"),
    ("chat-huge-max-tokens", "POST", CHAT, chat(extra=', "max_tokens": 100000'), "api", 400,
     "max_tokens: Input should be less than or equal to 4096"),
    ("chat-n-over-limit", "POST", CHAT, chat(extra=', "n": 9'), "api", 400,
     "n: Input should be less than or equal to 8"),
    ("chat-temperature-wrong-type", "POST", CHAT, chat(extra=', "temperature": "hot"'), "api", 400, "temperature"),
    ("chat-repetition-penalty-zero", "POST", CHAT, chat(extra=', "repetition_penalty": 0'), "api", 400,
     "repetition_penalty: Input should be greater than or equal to 0.01"),
    ("chat-repetition-penalty-denormal", "POST", CHAT, chat(extra=', "repetition_penalty": 5e-324'), "api", 400,
     "repetition_penalty"),
    ("chat-repetition-penalty-huge", "POST", CHAT, chat(extra=', "repetition_penalty": 50'), "api", 400,
     "repetition_penalty: Input should be less than or equal to 2"),
    ("chat-too-many-stops", "POST", CHAT, chat(extra=', "stop": ["a", "b", "c", "d", "e"]'), "api", 400,
     "at most 4 stop sequences; 5 given"),
    ("chat-long-stop", "POST", CHAT, chat(extra=', "stop": ["ok", "%s"]' % ("s" * 129)), "api", 400,
     "stop: a stop sequence may have at most 128 characters; stop[1] has 129"),
    ("chat-invalid-utf8", "POST", CHAT, chat('"caf"').replace(b"caf", b"caf\xe9"), "api", 400, "not valid UTF-8"),
    ("chat-nul-escaped", "POST", CHAT, chat('"a\\u0000b"'), "api", 400, "messages.0.content: contains the control "
     "character U+0000"),
    ("chat-escape-char", "POST", CHAT, chat('"\\u001b[31mred"'), "api", 400, "U+001B"),
    ("chat-raw-control-char", "POST", CHAT, chat('"a\x01b"'), "api", 400, "not valid JSON"),
    ("chat-lone-surrogate", "POST", CHAT, chat('"\\ud800"'), "api", 400, "not valid JSON"),
    ("chat-nul-in-stop", "POST", CHAT, chat(extra=', "stop": ["\\u0000"]'), "api", 400, "stop"),
    ("chat-nul-in-user", "POST", CHAT, chat(extra=', "user": "x\\u0000"'), "api", 400, "user: contains"),
    ("chat-wrong-method", "GET", CHAT, None, "api", 404, "Invalid URL (GET /v1/chat/completions)"),
    # ---- models --------------------------------------------------------------------------
    ("models-wrong-method", "POST", "/v1/models", b"{}", "api", 404, "Invalid URL (POST /v1/models)"),
    ("models-unknown-subpath", "GET", "/v1/models/teto/../../admin/engines", None, "api", 404, "Invalid URL"),
    # ---- feedback ------------------------------------------------------------------------
    ("feedback-malformed-json", "POST", FEEDBACK, b'{"turn_id": ', "api", 400, "not valid JSON"),
    ("feedback-missing-turn", "POST", FEEDBACK, b'{"vote": "up"}', "api", 400, "turn_id: Field required"),
    ("feedback-unknown-turn", "POST", FEEDBACK, b'{"turn_id": "chatcmpl-nope", "vote": "up"}', "api", 404,
     "No turn with id 'chatcmpl-nope'"),
    ("feedback-bad-vote", "POST", FEEDBACK, b'{"turn_id": "{turn}", "vote": "sideways"}', "api", 400,
     "vote must be one of up, down, retract"),
    ("feedback-index-wrong-type", "POST", FEEDBACK, b'{"turn_id": "{turn}", "vote": "up", "choice_index": "x"}',
     "api", 400, "choice_index"),
    ("feedback-index-over-n", "POST", FEEDBACK, b'{"turn_id": "{turn}", "vote": "up", "choice_index": 3}', "api",
     400, "choice_index 3 does not exist"),
    ("feedback-others-turn", "POST", FEEDBACK, b'{"turn_id": "{turn}", "vote": "up"}', "second", 403,
     "not served to this key"),
    ("feedback-long-reason", "POST", FEEDBACK, ('{"turn_id": "{turn}", "vote": "down", "reason": "%s"}'
                                                % ("r" * 201)).encode(), "api", 400, "the limit is 200"),
    ("feedback-nul-comment", "POST", FEEDBACK, b'{"turn_id": "{turn}", "vote": "down", "comment": "\\u0000"}',
     "api", 400, "comment: contains the control character"),
    ("feedback-long-turn-id", "POST", FEEDBACK, ('{"turn_id": "%s", "vote": "up"}' % ("t" * 65)).encode(), "api",
     400, "turn_id"),
    # ---- comparisons ---------------------------------------------------------------------
    ("compare-missing-turn-b", "POST", COMPARE, b'{"turn_a": "{turn}", "choice": "a"}', "api", 400,
     "turn_b: Field required"),
    ("compare-bad-choice", "POST", COMPARE, b'{"turn_a": "{turn}", "turn_b": "x", "choice": "maybe"}', "api", 400,
     "choice must be one of a, b, tie, both_bad"),
    ("compare-bad-left", "POST", COMPARE, b'{"turn_a": "{turn}", "turn_b": "x", "choice": "a", "left": "c"}', "api",
     400, "left must be 'a' or 'b'"),
    ("compare-same-turn", "POST", COMPARE, b'{"turn_a": "{turn}", "turn_b": "{turn}", "choice": "a"}', "api", 400,
     "the same turn"),
    ("compare-unknown-turn", "POST", COMPARE, b'{"turn_a": "{turn}", "turn_b": "chatcmpl-nope", "choice": "a"}',
     "api", 404, "No turn with id 'chatcmpl-nope'"),
    ("compare-invalid-utf8", "POST", COMPARE, b'{"turn_a": "\xff", "turn_b": "x", "choice": "a"}', "api", 400,
     "not valid UTF-8"),
    # ---- LoRA admin ----------------------------------------------------------------------
    ("load-missing-path", "POST", LOAD, b'{"lora_name": "x-v1"}', "admin", 400, "lora_path: Field required"),
    ("load-empty-name", "POST", LOAD, b'{"lora_name": "", "lora_path": "teto1"}', "admin", 400, "lora_name"),
    ("load-path-outside-home", "POST", LOAD, b'{"lora_name": "x-v1", "lora_path": "/etc"}', "admin", 400,
     "lora_path must lie inside"),
    ("load-path-traversal", "POST", LOAD, b'{"lora_name": "x-v1", "lora_path": "teto1/../../../etc"}', "admin",
     400, "lora_path must lie inside"),
    ("load-nul-in-path", "POST", LOAD, b'{"lora_name": "x-v1", "lora_path": "teto1\\u0000"}', "admin", 400,
     "lora_path: contains the control character"),
    ("load-with-api-key", "POST", LOAD, b'{"lora_name": "x-v1", "lora_path": "teto1"}', "api", 403,
     "needs an admin key"),
    ("unload-id-wrong-type", "POST", UNLOAD, b'{"lora_name": "x", "lora_int_id": "one"}', "admin", 400,
     "lora_int_id"),
    ("unload-unknown-adapter", "POST", UNLOAD, b'{"lora_name": "ghost-v1"}', "admin", 404, "ghost-v1"),
    # ---- /admin ----------------------------------------------------------------------------
    ("runs-limit-not-int", "GET", "/admin/runs?limit=abc", None, "admin", 400, "limit: Input should be a valid "
     "integer"),
    ("runs-missing-started", "POST", "/admin/runs", b'{"id": "r1", "persona": "teto", "status": "running"}',
     "admin", 400, "started_at: Field required"),
    ("runs-bad-timestamp", "POST", "/admin/runs", b'{"id": "r1", "persona": "teto", "status": "running", '
     b'"started_at": "yesterday"}', "admin", 400, "started_at: expected an ISO 8601 time"),
    ("runs-nan-metrics", "POST", "/admin/runs", b'{"id": "r1", "persona": "teto", "status": "ok", '
     b'"started_at": "2025-01-01 00:00:00", "metrics": {"loss": NaN}}', "admin", 400, "metrics: must not contain NaN"),
    ("runs-version-over-int32", "POST", "/admin/runs", b'{"id": "r1", "persona": "teto", "status": "ok", '
     b'"started_at": "2025-01-01 00:00:00", "adapter_version": -565429159017}', "admin", 400, "adapter_version"),
    ("runs-wrong-type", "POST", "/admin/runs", b'{"id": "r1", "persona": "teto", "status": "ok", '
     b'"started_at": "2025-01-01 00:00:00", "train_examples": "many"}', "admin", 400, "train_examples"),
    ("retrain-missing-persona", "POST", "/admin/retrain", b"{}", "admin", 400, "persona: Field required"),
    ("retrain-unknown-persona", "POST", "/admin/retrain", b'{"persona": "nobody"}', "admin", 404,
     "No persona 'nobody'"),
    ("retrain-force-wrong-type", "POST", "/admin/retrain", b'{"persona": "teto", "force": "maybe"}', "admin", 400,
     "force"),
    ("reload-unknown-field", "POST", "/admin/reload", b'{"everything": true}', "admin", 400,
     "everything: Extra inputs are not permitted"),
    ("reload-not-an-object", "POST", "/admin/reload", b"[1]", "admin", 400, "object"),
    ("snapshot-malformed-json", "POST", "/admin/snapshot", b"{", "admin", 400, "not valid JSON"),
    ("admin-unknown-route", "POST", "/admin/promote-everything", b"{}", "admin", 404, "Invalid URL"),
]


@pytest.fixture(scope="module")
def s(tiny_model_dir, tmp_path_factory):
    with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("bad-input")) as running:
        yield running


@pytest.fixture(scope="module")
def turn(s) -> str:
    """A turn served to the API key (one answer)."""
    r = httpx.post(s.url + CHAT, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   json={"model": "teto", "max_tokens": 2, "messages": [{"role": "user", "content": "hello"}]})
    r.raise_for_status()
    return r.json()["id"]


def counts(s) -> dict[str, int]:
    return {t: s.store.query(f"SELECT count(*) FROM {t}")[0][0] for t in TABLES}


@pytest.mark.parametrize("method, route, body, key, status, says", [c[1:] for c in CASES], ids=[c[0] for c in CASES])
def test_bad_input_is_a_named_4xx_and_stores_nothing(s, turn, method, route, body, key, status, says):
    before = counts(s)
    if body is not None:
        body = body.replace(b"{turn}", turn.encode())
    r = httpx.request(method, s.url + route, content=body, timeout=60,
                      headers={"Authorization": f"Bearer {KEYS[key]}", "Content-Type": "application/json"})
    assert r.status_code == status, r.text[:500]
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert says in error["message"], error
    assert error["type"] == {401: "authentication_error", 403: "permission_error"}.get(status, "invalid_request_error")
    assert "Traceback" not in r.text
    assert counts(s) == before, "a refused request wrote to the store"


def test_tab_newline_and_return_are_text(s):
    """The control-character rule leaves the three that text uses: such a turn is served and stored."""
    before = counts(s)["turns"]
    r = httpx.post(s.url + CHAT, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                   json={"model": "teto", "max_tokens": 2, "messages": [{"role": "user", "content": "a\tb\r\nc"}]})
    assert r.status_code == 200, r.text
    assert counts(s)["turns"] == before + 1
    assert s.store.turn(r.json()["id"]).messages[-1]["content"] == "a\tb\r\nc"


def test_run_times_are_stored_in_utc(s):
    """A run reported with a zone is stored as UTC (the column has no zone)."""
    r = httpx.post(s.url + "/admin/runs", headers={"Authorization": f"Bearer {ADMIN_KEY}"}, timeout=60,
                   json={"id": "utc-run", "persona": "teto", "status": "running",
                         "started_at": "2025-01-01T05:00:00+05:00"})
    assert r.status_code == 200, r.text
    stored = s.store.query("SELECT started_at::VARCHAR FROM training_runs WHERE id = 'utc-run'")
    assert stored == [("2025-01-01 00:00:00",)]


def test_denormal_sampling_values_are_served(s):
    """Found by the fuzzer: temperature or top_p 5e-324 made the engine's sampling distribution
    NaN or empty, and the request hung. Below 1e-5 both now mean greedy (as in vLLM)."""
    for sampling in ({"temperature": 5e-324}, {"top_p": 5e-324}, {"temperature": 1e-30, "top_p": 1e-40},
                     {"temperature": 1.0, "repetition_penalty": 0.01}, {"repetition_penalty": 2.0, "top_p": 1e-40}):
        r = httpx.post(s.url + CHAT, headers={"Authorization": f"Bearer {API_KEY}"}, timeout=30,
                       json={"model": "teto", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}],
                             **sampling})
        assert r.status_code == 200, (sampling, r.text)


def test_the_engine_refuses_long_stops_too(s):
    """The stop caps live in the protocol models, which the engine validates with as well: a
    client that reaches an engine directly cannot slow every row of its batch either."""
    body = {"model": "base", "max_tokens": 2, "messages": [{"role": "user", "content": "hi"}], "stop": ["x" * 4096]}
    r = httpx.post(s.engine_url + CHAT, json=body, headers={"Authorization": f"Bearer {s.engine_key}"}, timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "stop" and "at most 128 characters" in r.json()["error"]["message"]
