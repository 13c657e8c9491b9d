"""Fuzz the gateway from its own OpenAPI schema (schemathesis): whatever the fuzzer
sends, no route answers a 5xx, and every 4xx is in OpenAI's error shape.

Runs against the contract stack (embedded engine, tiny model, real store) with a
bounded number of examples per operation, so it stays well under a minute. The
API and admin keys are sent, so the fuzzer gets past the key check to the bodies.
"""

from __future__ import annotations

import httpx
import pytest
import schemathesis
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st
from hypothesis.errors import Unsatisfiable
from schemathesis.checks import not_a_server_error

from contract_stack import ADMIN_KEY, API_KEY, stack

EXAMPLES = 25  # per operation and mode: enough to find a 500, few enough for CI
# No shrinking: the failing case is reported as found. Shrinking a hang (a 30 s timeout a try)
# took minutes when the fuzzer found one.
PHASES = [Phase.explicit, Phase.generate]
ADMIN_PATHS = ("/admin/", "/metrics", "/v1/load_lora_adapter", "/v1/unload_lora_adapter")


class Scheduler:
    """Stands in for the retrain scheduler: /admin/retrain answers without starting a training."""

    def launch(self, persona: str, force: bool = False, promotion: str | None = None) -> dict:
        return {"persona": persona, "status": "started", "log": None}

    async def stop(self) -> None:
        pass


@pytest.fixture(scope="module")
def s(tiny_model_dir, tmp_path_factory):
    from serve.gateway.experiments import RegistryActions

    with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("fuzz")) as running:
        running.gateway.scheduler = Scheduler()
        # A registry that changes nothing: a valid experiment starts (and must not be a 5xx either).
        running.gateway.experiments.actions = RegistryActions(lambda *a: None, lambda *a: None, lambda *a: None)
        yield running


@pytest.fixture(scope="module")
def api_schema(s):
    return schemathesis.openapi.from_url(s.url + "/openapi.json")


def test_schema_documents_every_request_body(api_schema):
    """The routes read bodies by hand; the schema must still say what they take."""
    raw = api_schema.raw_schema
    posts = {path: item["post"]["requestBody"]["content"]["application/json"]["schema"]
             for path, item in raw["paths"].items() if "post" in item}
    assert len(posts) == 11
    for path, body in posts.items():
        assert body["type"] == "object" and "$ref" not in str(body), path
    assert set(posts["/v1/feedback"]["required"]) == {"turn_id", "vote"}
    chat = raw["paths"]["/v1/chat/completions"]["post"]["requestBody"]["content"]["application/json"]["schema"]
    assert chat["properties"]["messages"]["items"]["properties"]["role"]["enum"] == ["system", "user", "assistant"]
    assert chat["properties"]["n"]["maximum"] == 8


def known_values(s) -> dict[str, list]:
    """Values that get past the lookups (a served persona, the caller's own turns, an adapter
    inside the home) and the context length: random values alone would stop at a 404 or 400
    before the engine or the store."""
    turns = []
    for content in ("same", "same"):
        r = httpx.post(s.url + "/v1/chat/completions", headers={"Authorization": f"Bearer {API_KEY}"}, timeout=60,
                       json={"model": "teto", "max_tokens": 2, "messages": [{"role": "user", "content": content}]})
        turns.append(r.raise_for_status().json()["id"])
    return {"model": ["teto", "egen", "teto@v2"], "turn_id": turns, "turn_a": turns[:1], "turn_b": turns[1:],
            "persona": ["teto", "egen"], "lora_path": ["spare", s.adapters["spare"]], "max_tokens": [1, 4],
            "messages": [[{"role": "user", "content": "hi"}]]}


@pytest.mark.parametrize("mode", [schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE])
def test_no_server_errors(s, api_schema, mode):
    """Positive cases fit the schema, negative ones break it; neither may get a 5xx.

    The operations are looped over here rather than through ``schema.parametrize()``:
    the schema exists only once the stack runs, and schemathesis' lazy (fixture) loader
    does not work with pytest 9. Streaming chat requests are fuzzed too: the event stream
    is read to its end like any body."""
    known = known_values(s)
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert len(operations) >= 14
    for operation in operations:
        @given(case=operation.as_strategy(generation_mode=mode), data=st.data())
        @settings(max_examples=EXAMPLES, deadline=None, database=None, suppress_health_check=list(HealthCheck),
                  phases=PHASES)
        def fuzz(case, data):
            if isinstance(case.body, dict):  # most of the time, a value that exists
                for name in sorted(set(case.body) & set(known)):
                    if data.draw(st.integers(0, 3)) < 3:  # Hypothesis leans to 0: "replace" is the lean
                        case.body[name] = data.draw(st.sampled_from(known[name]))
            key = ADMIN_KEY if case.path.startswith(ADMIN_PATHS) else API_KEY
            response = case.call(headers={"Authorization": f"Bearer {key}"}, timeout=30)
            case.validate_response(response, checks=[not_a_server_error])
            if 400 <= response.status_code < 500:
                error = response.json()["error"]
                assert set(error) == {"message", "type", "param", "code"} and error["message"], response.text

        try:
            fuzz()
        except Unsatisfiable:  # no parameters to break (GET /health): nothing negative to send
            assert mode == schemathesis.GenerationMode.NEGATIVE and not operation.body, operation.label
        except Exception as exc:
            exc.add_note(f"while fuzzing {operation.label} ({mode} cases)")
            raise
