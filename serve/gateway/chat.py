"""One chat turn through the gateway, whoever asks: the OpenAI route or the browser UI.

    chat = await open_chat(gateway, body, client="key:ab12...")
    async for chunk in chat.chunks(): ...        # streaming: chunk dicts with the turn id
    data = await chat.complete()                 # or the whole response

Resolves the persona, adds its system prompt when the caller sent none, sends
the request to an engine, and writes the turn to the store before the last
chunk (or the response) goes out. A stream abandoned by its reader is logged
as ``aborted``.
"""

from __future__ import annotations

import asyncio
import json
import time

import httpx

from feedback.store import Turn
from serve.gateway.catalog import Target, UnknownModel
from serve.gateway.core import Gateway, GatewayError
from serve.gateway.engines import UpstreamError
from serve.protocol import ChatCompletionRequest, completion_id


def _upstream(body: ChatCompletionRequest, target: Target) -> tuple[list[dict], dict, dict]:
    messages = [m.model_dump() for m in body.messages]
    if not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": target.system_prompt})
    sampling = {"n": body.n, "temperature": body.temperature, "top_p": body.top_p,
                "max_tokens": body.max_completion_tokens or body.max_tokens, "stop": body.stop or None,
                "seed": body.seed}
    upstream = {"model": target.adapter, "messages": messages, "stream": body.stream,
                **{k: v for k, v in sampling.items() if v is not None}}
    if body.stream:
        upstream["stream_options"] = {"include_usage": True}  # token counts for the store
    return messages, sampling, upstream


def retry_after(gateway: Gateway) -> dict[str, str]:
    """The header that tells a refused caller when to come back. A constant, not an estimate:
    with N requests in flight a slot frees every (request latency / N) seconds, under a second
    at any useful N, and Retry-After counts whole seconds."""
    return {"Retry-After": str(gateway.config.retry_after)}


async def open_chat(gateway: Gateway, body: ChatCompletionRequest, client: str) -> "Chat":
    try:
        target = gateway.catalog.resolve(body.model)
    except UnknownModel as exc:
        raise GatewayError(404, exc.message, param="model", code="model_not_found") from None
    limit = gateway.config.max_in_flight
    if gateway.in_flight >= limit:  # at once: waiting in the engine's queue would only grow the TTFT
        raise GatewayError(429, f"Too many requests in flight (limit {limit}); retry shortly.",
                           headers=retry_after(gateway))
    messages, sampling, upstream = _upstream(body, target)
    turn = Turn(id=completion_id(), requested_model=body.model, messages=messages, answers=[""] * body.n,
                finish_reasons=[None] * body.n, sampling=sampling, stream=body.stream, latency_ms=0.0,
                client=client, persona=target.persona, adapter=target.adapter, adapter_version=target.version,
                user_tag=body.user)
    chat = Chat(gateway, target, turn)
    gateway.begin(target)
    try:
        chat.replica, chat.response = await gateway.open_chat(target, upstream)
    except httpx.HTTPError as exc:
        gateway.end(target)
        raise GatewayError(503, f"The engine failed: {type(exc).__name__}", headers=retry_after(gateway)) from None
    except UpstreamError as exc:
        gateway.end(target)
        if exc.status in (429, 503):  # no engine up, or an engine that is full: the caller may retry
            raise GatewayError(exc.status, exc.message, exc.param, headers=retry_after(gateway)) from None
        raise
    except BaseException:
        gateway.end(target)
        raise
    turn.engine = chat.replica.url
    return chat


class Chat:
    def __init__(self, gateway: Gateway, target: Target, turn: Turn):
        self.gateway, self.target, self.turn = gateway, target, turn
        self.started = time.perf_counter()
        self.replica = self.response = None

    async def _release(self) -> None:
        await self.gateway.pool.finish(self.replica, self.response)
        self.gateway.end(self.target)

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    async def complete(self) -> dict:
        """The whole response (non-streaming), with the turn id as its id."""
        try:
            data = json.loads(await self.response.aread())
        finally:
            await self._release()
        turn = self.turn
        data["id"], data["model"] = turn.id, self.target.model_id
        for choice in data.get("choices", []):
            turn.answers[choice["index"]] = choice["message"].get("content") or ""
            turn.finish_reasons[choice["index"]] = choice.get("finish_reason")
        usage = data.get("usage") or {}
        turn.prompt_tokens, turn.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        turn.latency_ms = self._elapsed_ms()
        await asyncio.to_thread(self.gateway.record, turn, self.target)  # logged before the answer is sent
        return data

    async def chunks(self, include_usage: bool = False):
        """The engine's stream as chunk dicts with our turn id; the turn is logged before the
        last chunk (the usage chunk when ``include_usage``). Ends without ``[DONE]``."""
        turn, target = self.turn, self.target
        turn.status = "aborted"
        usage_chunk, recorded = None, False
        try:
            async for line in self.response.aiter_lines():
                if not line.startswith("data: "):
                    continue
                payload = line[6:]
                if payload == "[DONE]":
                    turn.status = "ok"
                    break
                chunk = json.loads(payload)
                if "error" in chunk or chunk.get("object") == "error":
                    turn.status = "error"
                    yield chunk
                    continue
                chunk["id"], chunk["model"] = turn.id, target.model_id
                usage = chunk.pop("usage", None)
                if usage:
                    turn.prompt_tokens = usage.get("prompt_tokens")
                    turn.completion_tokens = usage.get("completion_tokens")
                for choice in chunk.get("choices", []):
                    delta, index = choice.get("delta") or {}, choice["index"]
                    if delta.get("content"):
                        if turn.ttft_ms is None:
                            turn.ttft_ms = self._elapsed_ms()
                        turn.answers[index] += delta["content"]
                    if choice.get("finish_reason"):
                        turn.finish_reasons[index] = choice["finish_reason"]
                if not chunk.get("choices"):
                    if usage:
                        usage_chunk = {**chunk, "usage": usage}
                    continue
                yield chunk
            turn.latency_ms = self._elapsed_ms()
            await asyncio.to_thread(self.gateway.record, turn, target)  # before the response completes
            recorded = True
            if include_usage and usage_chunk is not None:
                yield usage_chunk
        except httpx.HTTPError as exc:
            turn.status = "error"
            self.gateway.engine_failed(self.replica)
            yield {"error": {"message": f"The engine stopped answering: {type(exc).__name__}",
                             "type": "server_error", "param": None, "code": 503}}
        finally:
            await self._release()
            if not recorded:  # reader gone or engine failed: keep what was sent, marked as such
                turn.latency_ms = self._elapsed_ms()
                self.gateway.record(turn, target)
