"""Overload is answered at once: more concurrent chats than the gateway admits get a 429
(503 when no engine is up) with ``Retry-After`` and OpenAI's error shape, never a
timeout; every admitted stream completes with ``[DONE]``.

Runs against the contract stack (gateway + embedded engine on the tiny model) with
``max_in_flight`` lowered so a burst of a dozen streams goes over it.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest
from contract_stack import API_KEY, stack

LIMIT, CALLERS = 2, 12


@pytest.fixture(scope="module")
def s(tiny_model_dir, tmp_path_factory):
    with stack("embedded", tiny_model_dir, tmp_path_factory.mktemp("overload")) as running:
        running.gateway.config.max_in_flight = LIMIT
        yield running


async def one_stream(http: httpx.AsyncClient, url: str, n: int) -> tuple[int, httpx.Headers, object]:
    """(status, headers, the error body or the stream's data lines) of one streaming chat."""
    body = {"model": "teto", "stream": True, "max_tokens": 96, "temperature": 0,
            "messages": [{"role": "user", "content": f"Tell me a long story about the number {n}."}]}
    async with http.stream("POST", url + "/v1/chat/completions", json=body) as response:
        if response.status_code != 200:
            return response.status_code, response.headers, json.loads(await response.aread())
        return 200, response.headers, [line async for line in response.aiter_lines() if line.startswith("data: ")]


async def burst(url: str, callers: int) -> list:
    headers = {"Authorization": f"Bearer {API_KEY}"}
    # A generous timeout: admitted streams take well under a second on the tiny model, so
    # hitting it means a request was left waiting, which is what must never happen.
    async with httpx.AsyncClient(headers=headers, timeout=httpx.Timeout(60.0)) as http:
        return await asyncio.gather(*(one_stream(http, url, n) for n in range(callers)), return_exceptions=True)


def assert_retry_error(status: int, headers: httpx.Headers, body: dict, type_: str) -> None:
    assert headers.get("retry-after", "").isdigit() and int(headers["retry-after"]) >= 1, dict(headers)
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["type"] == type_ and body["error"]["code"] == status and body["error"]["message"]


def test_burst_over_the_limit_is_refused_at_once_and_the_rest_complete(s):
    results = asyncio.run(burst(s.url, CALLERS))
    failures = [r for r in results if isinstance(r, BaseException)]
    assert not failures, f"requests failed or timed out instead of a 200 or a 429: {failures!r}"
    statuses = sorted(status for status, _, _ in results)
    assert set(statuses) <= {200, 429}, statuses
    assert 200 in statuses and 429 in statuses, f"the burst should go over the limit of {LIMIT}: {statuses}"
    for status, headers, payload in results:
        if status == 429:
            assert_retry_error(status, headers, payload, "rate_limit_error")
            continue
        assert payload[-1] == "data: [DONE]", payload[-3:]
        chunks = [json.loads(line[6:]) for line in payload[:-1]]
        assert not any("error" in c for c in chunks), chunks
        assert any(c["choices"] and c["choices"][0]["delta"].get("content") for c in chunks)
    assert s.gateway.in_flight == 0, "every admitted request released its slot"
    again = asyncio.run(burst(s.url, 1))[0]
    assert again[0] == 200 and again[2][-1] == "data: [DONE]", "the gateway serves again after the burst"


def test_no_engine_up_is_503_with_retry_after(s):
    replica = s.gateway.pool.replicas[0]
    replica.healthy = False  # as the health check marks it; the next check (10 s) restores it
    try:
        status, headers, body = asyncio.run(burst(s.url, 1))[0]
    finally:
        replica.healthy = True
    assert status == 503
    assert_retry_error(status, headers, body, "server_error")
    assert s.gateway.in_flight == 0
