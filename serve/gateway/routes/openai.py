"""The OpenAI API of the gateway, and its health.

    POST /v1/chat/completions     persona chat (streaming too); the response id is the turn id
    GET  /v1/models               personas (teto) and pinned versions (teto@v3)
    GET  /health                  200 when at least one engine is up and the store can write (no key needed)
"""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serve.engine.embedded import sse
from serve.gateway.chat import ChatTurn, start_turn
from serve.gateway.hangup import unless_hung_up
from serve.gateway.openapi import body as documented
from serve.gateway.routes.deps import ApiClient, gateway_of, json_body
from serve.protocol import ChatCompletionRequest, ModelCard, ModelList

router = APIRouter()


@router.get("/health")
async def health(request: Request):
    gateway = gateway_of(request)
    status = {**gateway.pool.health(), "store": gateway.writer.health()}
    ok = status["engines_up"] > 0 and status["store"]["writable"]
    return JSONResponse({**status, "status": "ok" if ok else "unavailable"}, status_code=200 if ok else 503)


@router.get("/v1/models")
async def models(request: Request, client: ApiClient):
    ids = gateway_of(request).catalog.model_ids()
    return ModelList(data=[ModelCard(id=i, root=i, parent=p) for i, p in ids])


@router.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
async def chat(request: Request, client: ApiClient,
               body: Annotated[ChatCompletionRequest, json_body(ChatCompletionRequest)]):
    if not body.stream:
        data = await unless_hung_up(request, _complete(request, body, client))
        # 499 (nginx's "client closed request"): nobody reads it, but the access log says what happened.
        return JSONResponse(data) if data is not None else Response(status_code=499)
    turn = await start_turn(gateway_of(request), body, client)
    return TurnStream(turn, include_usage=bool(body.stream_options and body.stream_options.include_usage))


async def _complete(request: Request, body: ChatCompletionRequest, client: str) -> dict:
    """A whole (non-streaming) answer. The engine sends nothing before the answer is done,
    so a caller's hang-up is watched from the start (``unless_hung_up``), not from the first byte."""
    turn = await start_turn(gateway_of(request), body, client)
    return await turn.complete()


class TurnStream(StreamingResponse):
    """A chat turn as server-sent events, ending with ``[DONE]``. However the response ends
    (a reader gone before the first event included), the turn is ended when it does, not
    when the garbage collector gets to an abandoned generator."""

    def __init__(self, turn: ChatTurn, include_usage: bool):
        super().__init__(_events(turn, include_usage), media_type="text/event-stream")
        self.turn = turn

    async def __call__(self, scope, receive, send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.turn.end()


async def _events(turn: ChatTurn, include_usage: bool):
    async for chunk in turn.chunks(include_usage):
        yield sse(chunk)
    yield sse("[DONE]")
