"""The public contract, through the official openai client, against the gateway.

One suite, two engines behind the gateway: the embedded engine (always) and a
real vLLM server (``make test-vllm``; skipped when vLLM's environment is not
installed). Every served turn must be in the DuckDB store with its adapter
version.
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from conftest import assert_stop_sequence_cuts
from contract_stack import ADMIN_KEY, API_KEY, EGEN_PROMPT, TETO_PROMPT, catalog, stack, vllm_python


@pytest.fixture(scope="module", params=["embedded", pytest.param("vllm", marks=pytest.mark.vllm)])
def s(request, tiny_model_dir, smollm2_dir, tmp_path_factory):
    if request.param == "vllm" and vllm_python() is None:
        pytest.skip("vLLM's environment is not installed (make vllm-env)")
    base = tiny_model_dir if request.param == "embedded" else smollm2_dir
    with stack(request.param, base, tmp_path_factory.mktemp(request.param)) as running:
        yield running


@pytest.fixture
def client(s):
    return openai.OpenAI(base_url=s.url + "/v1", api_key=API_KEY, max_retries=0)


def ask(client, model="teto", content="I keep putting off my essay.", **kw):
    kw.setdefault("max_tokens", 12)
    kw.setdefault("temperature", 0)
    messages = kw.pop("messages", None) or [{"role": "user", "content": content}]
    return client.chat.completions.create(model=model, messages=messages, **kw)


def admin(s, route, body, key=ADMIN_KEY):
    return httpx.post(s.url + route, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def test_models_lists_personas_and_pinned_versions(client):
    ids = [m.id for m in client.models.list().data]
    assert ids[:2] == ["teto", "egen"]
    assert {"teto@v1", "teto@v2", "egen@v1"} <= set(ids)


def test_chat_is_logged_with_its_adapter_version(client, s):
    reply = ask(client)
    assert reply.id.startswith("chatcmpl-") and reply.model == "teto@v1"
    assert reply.usage.completion_tokens >= 1 and reply.choices[0].finish_reason in ("stop", "length")
    turn = s.store.turn(reply.id)
    assert turn is not None, "the response id is the turn id"
    assert (turn.persona, turn.adapter, turn.adapter_version, turn.status) == ("teto", "teto-v1", 1, "ok")
    assert turn.messages[0] == {"role": "system", "content": TETO_PROMPT}, "the persona's prompt is added"
    assert turn.answers == [reply.choices[0].message.content]
    assert (turn.prompt_tokens, turn.completion_tokens) == (reply.usage.prompt_tokens, reply.usage.completion_tokens)
    assert turn.sampling["temperature"] == 0 and turn.sampling["max_tokens"] == 12
    assert turn.client.startswith("key:") and turn.latency_ms > 0


def test_repetition_penalty_reaches_the_engine_and_the_store(client, s):
    """vLLM's repetition_penalty, on either engine: it changes the greedy answer of a persona
    and is logged with the turn's sampling."""
    plain = ask(client, max_tokens=16)
    penalised = ask(client, max_tokens=16, extra_body={"repetition_penalty": 2.0})
    assert s.store.turn(penalised.id).sampling["repetition_penalty"] == 2.0
    assert "repetition_penalty" not in s.store.turn(plain.id).sampling or \
        s.store.turn(plain.id).sampling["repetition_penalty"] is None
    assert penalised.choices[0].message.content != plain.choices[0].message.content


def test_callers_system_prompt_is_kept(client, s):
    reply = ask(client, model="egen", messages=[{"role": "system", "content": "Answer in one word."},
                                                {"role": "user", "content": "hi"}])
    turn = s.store.turn(reply.id)
    assert turn.messages == [{"role": "system", "content": "Answer in one word."}, {"role": "user", "content": "hi"}]
    assert turn.persona == "egen" and EGEN_PROMPT not in str(turn.messages)


def test_streaming_usage_in_last_chunk_and_logged(client, s):
    whole = ask(client, max_tokens=10).choices[0].message.content
    chunks = list(ask(client, max_tokens=10, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == whole, "streamed and whole answers agree (greedy)"
    assert len({c.id for c in chunks}) == 1
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens >= 1
    turn = s.store.turn(chunks[0].id)
    assert turn.stream and turn.answers == [text] and turn.ttft_ms is not None
    assert turn.completion_tokens == chunks[-1].usage.completion_tokens
    plain = list(ask(client, max_tokens=4, stream=True))
    assert all(c.usage is None for c in plain), "no usage unless asked for"


def test_n_choices(client, s):
    reply = ask(client, n=2, temperature=1.0, seed=3, max_tokens=8)
    assert [c.index for c in reply.choices] == [0, 1]
    assert s.store.turn(reply.id).answers == [c.message.content for c in reply.choices]


def test_stop_sequence(client):
    assert_stop_sequence_cuts(lambda **kw: ask(client, **kw))


def test_pinned_version(client, s):
    reply = ask(client, model="teto@v2")
    assert reply.model == "teto@v2" and s.store.turn(reply.id).adapter_version == 2


def test_unknown_persona_is_404_in_openai_shape(client):
    with pytest.raises(openai.NotFoundError) as err:
        ask(client, model="nobody")
    body = err.value.response.json()
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert "nobody" in body["error"]["message"] and body["error"]["param"] == "model"
    with pytest.raises(openai.NotFoundError, match="versions v1, v2"):
        ask(client, model="teto@v9")


def test_missing_or_wrong_key_is_401(s):
    for key in (None, "wrong-key"):
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        r = httpx.post(s.url + "/v1/chat/completions", headers=headers,
                       json={"model": "teto", "messages": [{"role": "user", "content": "hi"}]})
        assert r.status_code == 401 and r.json()["error"]["type"] == "authentication_error"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=s.url + "/v1", api_key="wrong", max_retries=0).models.list()
    second = openai.OpenAI(base_url=s.url + "/v1", api_key="second-key", max_retries=0)
    assert ask(second).choices, "every configured key works"


def test_limits_are_400_or_413(client, s):
    with pytest.raises(openai.BadRequestError, match="maximum context length"):
        ask(client, content="word " * (s.max_model_len + 50))
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        ask(client, max_tokens=100_000)
    with pytest.raises(openai.BadRequestError, match="messages"):
        ask(client, messages=[{"role": "user", "content": "x"}] * 300)
    json_headers = {"Authorization": f"Bearer {API_KEY}", "Content-Type": "application/json"}
    big = httpx.post(s.url + "/v1/chat/completions", headers=json_headers,
                     content=b"{" + b" " * (2 << 20) + b"}")
    assert big.status_code == 413 and "limit" in big.json()["error"]["message"]
    bad = httpx.post(s.url + "/v1/chat/completions", headers=json_headers, content=b"{not json")
    assert bad.status_code == 400 and bad.json()["error"]["message"]


def test_adapter_admin_load_unload_duplicate(client, s):
    spare = {"lora_name": "spare-v1", "lora_path": s.adapters["spare"]}
    assert admin(s, "/v1/load_lora_adapter", spare, key=API_KEY).status_code == 403, "admin key needed"
    assert admin(s, "/v1/load_lora_adapter", spare).status_code == 200
    dup = admin(s, "/v1/load_lora_adapter", spare)
    assert dup.status_code == 400 and "already" in dup.json()["error"]["message"]
    assert admin(s, "/v1/load_lora_adapter", {**spare, "load_inplace": True}).status_code == 200
    missing = admin(s, "/v1/load_lora_adapter", {"lora_name": "ghost-v1", "lora_path": "/no/such/adapter"})
    assert missing.status_code in (400, 404) and missing.json()["error"]["message"]
    engine_models = httpx.get(s.engine_url + "/v1/models", headers={"Authorization": f"Bearer {s.engine_key}"})
    assert "spare-v1" in [m["id"] for m in engine_models.json()["data"]]
    assert admin(s, "/v1/unload_lora_adapter", {"lora_name": "spare-v1"}).status_code == 200
    assert admin(s, "/v1/unload_lora_adapter", {"lora_name": "spare-v1"}).status_code in (400, 404)


def test_health_and_metrics(client, s):
    ask(client, max_tokens=3)
    assert httpx.get(s.url + "/health").json()["status"] == "ok"
    assert httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {API_KEY}"}).status_code == 403
    text = httpx.get(s.url + "/metrics", headers={"Authorization": f"Bearer {ADMIN_KEY}"}).text
    assert 'persona_requests_total{adapter="teto-v1",persona="teto",status="ok"}' in text
    assert "persona_time_to_first_token_seconds_bucket" in text and 'kind="completion"' in text
    assert 'persona_errors_total{code="404"' in text


def test_disconnected_stream_is_logged_as_aborted(s):
    body = {"model": "teto", "messages": [{"role": "user", "content": "go"}], "max_tokens": 200, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", s.url + "/v1/chat/completions", json=body,
                      headers={"Authorization": f"Bearer {API_KEY}"}) as response:
        first = next(line for line in response.iter_lines() if line.startswith("data: "))
    turn_id = first.split('"id":"')[1].split('"')[0]
    for _ in range(100):
        turn = s.store.turn(turn_id)
        if turn is not None:
            break
        time.sleep(0.05)
    assert turn is not None and turn.status == "aborted"


def test_feedback_and_comparisons_through_the_api(client, s):
    post = lambda route, body, key=API_KEY: httpx.post(  # noqa: E731
        s.url + route, json=body, headers={"Authorization": f"Bearer {key}"})
    first, second = ask(client, content="Same question?"), ask(client, content="Same question?", temperature=1.0)
    voted = post("/v1/feedback", {"turn_id": first.id, "vote": "up", "reason": "helpful"})
    assert voted.status_code == 200 and voted.json()["status"] == "recorded"
    assert post("/v1/feedback", {"turn_id": first.id, "vote": "down"}).status_code == 200
    rows = s.store.query("SELECT vote, reason FROM current_votes WHERE turn_id = ?", [first.id])
    assert rows == [("down", None)], "posting again changes the vote"
    assert post("/v1/feedback", {"turn_id": first.id, "vote": "retract"}).json()["status"] == "retracted"
    unknown = post("/v1/feedback", {"turn_id": "chatcmpl-nope", "vote": "up"})
    assert unknown.status_code == 404 and unknown.json()["error"]["param"] == "turn_id"
    assert post("/v1/feedback", {"turn_id": first.id, "vote": "up"}, key="second-key").status_code == 403
    compared = post("/v1/comparisons", {"turn_a": first.id, "turn_b": second.id, "choice": "b", "left": "b"})
    assert compared.status_code == 200
    assert s.store.query("SELECT choice, left_turn FROM comparisons WHERE id = ?", [compared.json()["id"]]) == [
        ("b", second.id)]
    other = ask(client, content="A different question")
    mixed = post("/v1/comparisons", {"turn_a": first.id, "turn_b": other.id, "choice": "a"})
    assert mixed.status_code == 400 and "different prompt contexts" in mixed.json()["error"]["message"]


def test_adapter_lost_by_the_engine_is_loaded_again(client, s):
    """An engine restarted (or unloaded by hand) between health checks: the gateway recovers."""
    ask(client, model="egen")
    gone = httpx.post(s.engine_url + "/v1/unload_lora_adapter", json={"lora_name": "egen-v1"},
                      headers={"Authorization": f"Bearer {s.engine_key}"})
    assert gone.status_code == 200
    assert ask(client, model="egen").model == "egen@v1"


def test_pinned_requests_for_the_swapped_out_version_are_served_across_the_swap(client, s):
    """Requests pinned to the old version keep coming while a promotion swaps it out (an A/B
    experiment's side-by-side rounds do that): each is served, none hears 404 because the
    engine was unloading its adapter when the request reached it."""
    from concurrent.futures import ThreadPoolExecutor

    stop, statuses = time.monotonic() + 60, []

    def pinned_traffic():
        while time.monotonic() < stop and len(statuses) < 400:
            try:
                statuses.append(ask(client, model="teto@v1", max_tokens=48).model)
            except openai.APIStatusError as exc:
                statuses.append(exc.status_code)

    with ThreadPoolExecutor(16) as pool:
        futures = [pool.submit(pinned_traffic) for _ in range(16)]
        try:
            for active in (2, 1, 2, 1):  # swap v1 out and in again, under load
                time.sleep(0.3)
                s.state["catalog"] = catalog(s.adapters, teto_active=active)
                assert admin(s, "/admin/reload", {}).status_code == 200
        finally:
            stop = time.monotonic()
            s.state["catalog"] = catalog(s.adapters, teto_active=1)
            admin(s, "/admin/reload", {})
        for future in futures:
            future.result()
    assert statuses and all(status == "teto@v1" for status in statuses), [x for x in statuses if x != "teto@v1"]


def test_reload_swaps_the_active_version(client, s):
    """Hot swap: the new version serves under its own name, the old one is unloaded."""
    s.state["catalog"] = catalog(s.adapters, teto_active=2)
    try:
        swapped = admin(s, "/admin/reload", {})
        assert swapped.status_code == 200 and swapped.json()["active"]["teto"] == "teto-v2"
        reply = ask(client)
        assert reply.model == "teto@v2" and s.store.turn(reply.id).adapter_version == 2
        engine_models = httpx.get(s.engine_url + "/v1/models", headers={"Authorization": f"Bearer {s.engine_key}"})
        assert "teto-v1" not in [m["id"] for m in engine_models.json()["data"]]
    finally:
        s.state["catalog"] = catalog(s.adapters, teto_active=1)
        admin(s, "/admin/reload", {})
