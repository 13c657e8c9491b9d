"""One chat turn through the gateway, whoever asks: the OpenAI route or the browser UI.

    turn = await start_turn(gateway, body, client="key:ab12...")   # 404, 429 or 503 here
    turn = await start_turn(gateway, body, client="ui:<session>", voter="ui")   # the UI's
    data = await turn.complete()                 # the whole response, or:
    async with turn:                             # (ends the turn if the reader stops early)
        async for chunk in turn.chunks(): ...    # streaming: chunk dicts with the turn id

``start_turn`` resolves the persona, adds its system prompt when the caller sent
none, takes its slots among the turns in flight (``Gateway.admit``: ``n`` of them,
within the client's share) and sends the
request to an engine (``Gateway.send``). The ``ChatTurn`` it returns owns the
turn from there: it writes the turn to the store (off the event loop) before the
last chunk (or the response) goes out, and ``end()`` gives back the slot and the
engine's response once, on every path. A turn that does not reach its end is
logged as it stands, without waiting for the write: ``aborted`` when its reader
went away, ``error`` when the engine failed.

The client is whom the turn was served to (only it may rate the turn); the voter
is whose votes on it count (``feedback.votes`` records the turn's voter): an API
key is both, while every browser session of one UI login (or, without logins,
of the loopback-only UI) is its own client but the same voter.
"""

from __future__ import annotations

import json
import time

import httpx

from feedback.errors import APIError
from feedback.store import StoreUnavailable, Turn
from serve.gateway.catalog import Target, UnknownModel
from serve.gateway.core import Gateway
from serve.gateway.slots import TurnSlot
from serve.protocol import ChatCompletionRequest, completion_id, error_body


def _upstream(body: ChatCompletionRequest, target: Target) -> tuple[list[dict], dict, dict]:
    messages = [m.model_dump() for m in body.messages]
    if not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": target.system_prompt})
    sampling = {"n": body.n, "temperature": body.temperature, "top_p": body.top_p,
                "max_tokens": body.max_completion_tokens or body.max_tokens, "stop": body.stop or None,
                "seed": body.seed, "repetition_penalty": body.repetition_penalty}
    upstream = {"model": target.adapter, "messages": messages, "stream": body.stream,
                **{k: v for k, v in sampling.items() if v is not None}}
    if body.stream:
        upstream["stream_options"] = {"include_usage": True}  # token counts for the store
    return messages, sampling, upstream


async def start_turn(gateway: Gateway, body: ChatCompletionRequest, client: str,
                     voter: str | None = None) -> ChatTurn:
    """Admit a chat turn and send it to an engine; raises ``APIError`` (404 unknown model or a
    version not served, 400 an ``n`` over a limit, 429 too many in flight or over the client's
    share, 503 no engine) with nothing held and nothing recorded; 503 too, before anything is
    generated, while the store cannot write (the turn could not be recorded, nor rated).
    ``voter`` defaults to the client. A persona under an A/B experiment may be answered by its
    challenger (sticky per voter; ``Gateway.experiments``), and the turn and the response's
    ``model`` then name the challenger's version."""
    try:
        target = (gateway.experiments.challenger_target(body.model, voter or client)
                  or gateway.catalog.resolve(body.model))
    except UnknownModel as exc:
        raise APIError(404, exc.message, param="model", code="model_not_found") from None
    messages, sampling, upstream = _upstream(body, target)
    row = Turn(id=completion_id(), requested_model=body.model, messages=messages, answers=[""] * body.n,
               finish_reasons=[None] * body.n, sampling=sampling, stream=body.stream, latency_ms=0.0,
               client=client, persona=target.persona, adapter=target.adapter, adapter_version=target.version,
               user_tag=body.user, status="aborted",  # until the engine's answer is read to its end
               voter=voter or client,
               # The caller's own system prompt replaced the persona's: the pair builder keeps
               # only turns spoken with the persona's own.
               own_system_prompt=any(m.role == "system" for m in body.messages))
    gateway.writer.check()  # a store that cannot write: 503 before anything is generated
    turn = ChatTurn(gateway, target, row, gateway.admit(target, client, weight=body.n))
    await turn.send(upstream)
    return turn


class ChatTurn:
    """One admitted chat turn: the one owner of its slot, its engine response and its row."""

    def __init__(self, gateway: Gateway, target: Target, row: Turn, slot: TurnSlot):
        self.gateway, self.target, self.row, self.slot = gateway, target, row, slot
        self.started = time.perf_counter()
        self.replica = self.response = None
        self.ended = self.saved = False

    async def __aenter__(self) -> ChatTurn:
        return self

    async def __aexit__(self, *exc) -> None:
        await self.end()

    async def send(self, upstream: dict) -> None:
        """Open the engine's response; on any failure the turn ends unrecorded (the engine
        never answered), and the caller hears 503 with Retry-After where it may retry."""
        try:
            self.replica, self.response = await self.gateway.send(self.target, upstream)
        except BaseException as exc:
            await self.end(save=False)
            if isinstance(exc, httpx.HTTPError):
                raise APIError(503, f"The engine failed: {type(exc).__name__}",
                               headers=self.gateway.retry_after()) from None
            if isinstance(exc, APIError) and exc.status in (429, 503):  # none up, or one that is full
                exc.headers = self.gateway.retry_after()
            raise
        self.row.engine = self.replica.url

    async def end(self, save: bool = True) -> None:
        """Close the engine's response, write the turn as it stands unless it is written,
        and give back the slot: once, whichever path gets here first."""
        if self.ended:
            return
        self.ended = True  # first, so that a second caller meanwhile does not close anything twice
        try:
            if self.response is not None:
                await self.gateway.pool.finish(self.replica, self.response)
            if save and not self.saved:  # written as it stands, without waiting (nobody waits for it)
                self.saved = True
                self.row.latency_ms = self._elapsed_ms()
                self.gateway.record_later(self.row, self.target)
        finally:
            self.slot.release()

    async def _save(self) -> None:
        """Write the turn (off the event loop) before its answer goes out; a 503 when the
        store cannot write (the answer could not be rated, so it is not given)."""
        if not self.saved:
            self.saved = True
            self.row.latency_ms = self._elapsed_ms()
            await self.gateway.record(self.row, self.target)

    def _elapsed_ms(self) -> float:
        return (time.perf_counter() - self.started) * 1000

    def _engine_failed(self, exc: httpx.HTTPError) -> APIError:
        self.row.status = "error"
        self.gateway.engine_failed(self.replica)
        return APIError(503, f"The engine stopped answering: {type(exc).__name__}",
                        headers=self.gateway.retry_after())

    async def complete(self) -> dict:
        """The whole response (non-streaming), with the turn id as its id; the turn is in
        the store before it is returned."""
        async with self:
            try:
                data = json.loads(await self.response.aread())
            except httpx.HTTPError as exc:
                raise self._engine_failed(exc) from None
            row = self.row
            data["id"], data["model"] = row.id, self.target.model_id
            for choice in data.get("choices", []):
                row.answers[choice["index"]] = choice["message"].get("content") or ""
                row.finish_reasons[choice["index"]] = choice.get("finish_reason")
            usage = data.get("usage") or {}
            row.prompt_tokens, row.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
            row.status = "ok"
            await self._save()  # in the store before the answer is sent
        return data

    async def chunks(self, include_usage: bool = False):
        """The engine's stream as chunk dicts with our turn id; the turn is in the store before
        the last chunk (the usage chunk when ``include_usage``). An engine that fails mid-stream
        gives one error event. Ends without ``[DONE]``, which is the route's to send."""
        usage_chunk = None
        async with self:
            try:
                async for chunk in self._engine_chunks():
                    if "error" in chunk or chunk.get("object") == "error":
                        self.row.status = "error"
                        yield chunk
                        continue
                    usage = self._take(chunk)
                    if chunk.get("choices"):
                        yield chunk
                    elif usage:
                        usage_chunk = {**chunk, "usage": usage}
                await self._save()  # before the response completes
                if include_usage and usage_chunk is not None:
                    yield usage_chunk
            except httpx.HTTPError as exc:
                yield error_body(self._engine_failed(exc))
            except StoreUnavailable as exc:  # the turn is not in the store: the stream ends with why
                yield error_body(exc)

    async def _engine_chunks(self):
        """The engine's SSE events as dicts, up to its ``[DONE]`` (which makes the turn ``ok``)."""
        async for line in self.response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line[6:] == "[DONE]":
                self.row.status = "ok"
                return
            yield json.loads(line[6:])

    def _take(self, chunk: dict) -> dict | None:
        """Put our id on a chunk and its text, finish reasons and usage into the row; the usage
        is taken off the chunk and returned (the caller asked for it or not)."""
        row = self.row
        chunk["id"], chunk["model"] = row.id, self.target.model_id
        usage = chunk.pop("usage", None)
        if usage:
            row.prompt_tokens, row.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        for choice in chunk.get("choices", []):
            delta, index = choice.get("delta") or {}, choice["index"]
            if delta.get("content"):
                if row.ttft_ms is None:
                    row.ttft_ms = self._elapsed_ms()
                row.answers[index] += delta["content"]
            if choice.get("finish_reason"):
                row.finish_reasons[index] = choice["finish_reason"]
        return usage
