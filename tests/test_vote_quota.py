"""Votes the loop can trust: who voted (an API key, a UI login, or the loopback UI's one
voter ``ui``), whether the turn was spoken with the persona's own system prompt, and a
per-voter vote quota (429 with Retry-After past it, nothing written).

Runs against the contract stack (a real gateway on loopback in front of the embedded
engine on the tiny model, with a real DuckDB store), with a quota of 3 votes a minute.
"""

from __future__ import annotations

import asyncio
from types import SimpleNamespace

import httpx
import openai
import pytest

from contract_stack import API_KEY, stack
from feedback.errors import APIError
from serve.gateway import auth
from serve.gateway.quota import DAY, MINUTE, VoteQuota

QUOTA = 3


@pytest.fixture(scope="module")
def s(tiny_model_dir, tmp_path_factory):
    with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("quota"), vote_quota_minute=QUOTA) as running:
        yield running


def ask(s, key=API_KEY, content="Should I start now?", **kw):
    client = openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0)
    messages = kw.pop("messages", None) or [{"role": "user", "content": content}]
    kw.setdefault("temperature", 0)
    return client.chat.completions.create(model="teto", messages=messages, max_tokens=4, **kw)


def post(s, route: str, body: dict, key: str = API_KEY) -> httpx.Response:
    return httpx.post(s.url + route, json=body, headers={"Authorization": f"Bearer {key}"}, timeout=60)


def on_gateway_loop(s, coro):
    """Run a coroutine on the gateway's own event loop (its engine client lives there), as the
    UI's handlers run: the browser-free path of a UI turn."""
    loop = s.gateway._health_task.get_loop()
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=120)


def test_an_api_turn_and_its_votes_carry_the_key_as_voter(s):
    reply = ask(s, key="second-key")
    voter = auth.fingerprint("second-key")
    assert s.store.turn(reply.id).voter == voter
    assert post(s, "/v1/feedback", {"turn_id": reply.id, "vote": "up"}, key="second-key").status_code == 200
    assert s.store.query("SELECT client, voter FROM votes WHERE turn_id = ?", [reply.id]) == [(voter, voter)]


def test_own_system_prompt_is_recorded(s):
    plain = ask(s)
    own = ask(s, messages=[{"role": "system", "content": "Be brief."}, {"role": "user", "content": "hi"}])
    assert s.store.turn(plain.id).own_system_prompt is False
    assert s.store.turn(own.id).own_system_prompt is True


def test_ui_sessions_without_logins_are_one_voter_and_a_login_is_its_own(s):
    from serve.ui.chat import Session, stream_answer

    async def answer(session):
        async for _, turn_id, _ in stream_answer(s.gateway, "teto", [{"role": "user", "content": "hey"}], session):
            pass
        return turn_id

    turns = [on_gateway_loop(s, answer(session)) for session in
             (Session("tab-1"), Session("tab-2"), Session("tab-3", user="alice"))]
    rows = [(s.store.turn(t).client, s.store.turn(t).voter) for t in turns]
    assert rows == [("ui:tab-1", "ui"), ("ui:tab-2", "ui"), ("ui:tab-3", "user:alice")]


def test_the_ui_takes_the_login_gradio_gives(s):
    from serve.ui.app import _session

    assert _session(SimpleNamespace(session_hash="h1", username="bob")).voter == "user:bob"
    assert _session(SimpleNamespace(session_hash="h2", username=None)).voter == "ui"
    assert _session(SimpleNamespace(session_hash="h2", username=None)).client == "ui:h2"


def test_past_the_quota_a_vote_is_429_with_retry_after_and_not_stored(s):
    key = "quota-key"
    s.gateway.api_keys.fixed += (key,)  # a key of its own: the other tests' votes do not count
    first, second = ask(s, key=key, content="Same?"), ask(s, key=key, content="Same?", temperature=1.0)
    for vote in ("up", "down"):
        assert post(s, "/v1/feedback", {"turn_id": first.id, "vote": vote}, key=key).status_code == 200
    compared = post(s, "/v1/comparisons", {"turn_a": first.id, "turn_b": second.id, "choice": "a"}, key=key)
    assert compared.status_code == 200, "comparisons count against the same quota"

    refused = post(s, "/v1/feedback", {"turn_id": second.id, "vote": "up"}, key=key)
    assert refused.status_code == 429, refused.text
    assert 1 <= int(refused.headers["retry-after"]) <= 60
    error = refused.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["type"] == "rate_limit_error"
    assert "quota" in error["message"]
    assert s.store.query("SELECT count(*) FROM votes WHERE turn_id = ?", [second.id]) == [(0,)]
    again = post(s, "/v1/comparisons", {"turn_a": first.id, "turn_b": second.id, "choice": "b"}, key=key)
    assert again.status_code == 429 and "retry-after" in again.headers
    assert s.store.query("SELECT choice FROM current_comparisons WHERE turn_a = ?", [first.id]) == [("a",)]

    other = ask(s)  # another key still votes
    assert post(s, "/v1/feedback", {"turn_id": other.id, "vote": "up"}).status_code == 200
    with pytest.raises(openai.RateLimitError):  # what the official client makes of it
        openai.OpenAI(base_url=s.url + "/v1", api_key=key, max_retries=0).post(
            "/feedback", body={"turn_id": second.id, "vote": "up"}, cast_to=object)


def test_the_quota_window_slides():
    now = [1000.0]
    quota = VoteQuota({MINUTE: 2, DAY: 3}, clock=lambda: now[0])
    quota.take("a")
    now[0] += 20
    quota.take("a")
    with pytest.raises(APIError) as err:
        quota.take("a")
    assert err.value.status == 429 and err.value.headers == {"Retry-After": "40"}, "the first vote leaves at 60 s"
    quota.take("b")  # per voter
    now[0] += 41
    quota.take("a")  # the minute freed a slot; the day is now full
    now[0] += 3600
    with pytest.raises(APIError) as err:
        quota.take("a")
    assert int(err.value.headers["Retry-After"]) == 86400 - 3661
    assert VoteQuota({MINUTE: 0, DAY: 0}).limits == {}, "0 turns a limit off"
