"""HTTP routes of the embedded engine (vLLM's protocol). Thin: each route takes
the engine from ``app.state`` and calls it.

    GET  /health                  decode loop status (no key needed)
    GET  /v1/models               the base model and the loaded adapters
    POST /v1/chat/completions     chat (SSE streaming too)
    POST /v1/load_lora_adapter    load an adapter at runtime
    POST /v1/unload_lora_adapter

Errors are OpenAI's shape with vLLM's types (``BadRequestError``, ``NotFoundError``).
"""

from __future__ import annotations

import asyncio
import hmac
import time
from contextlib import asynccontextmanager
from typing import Awaitable, Callable

from fastapi import APIRouter, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import StreamingResponse

from feedback.errors import APIError
from serve.engine.embedded import EmbeddedEngine, engine_error, sse
from serve.protocol import (
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceMessage, ChunkChoice,
    DeltaMessage, LoadLoRAAdapterRequest, ModelCard, ModelList, UnloadLoRAAdapterRequest, Usage, completion_id,
    error_response, invalid_request,
)

router = APIRouter()


def create_app(engine: EmbeddedEngine, on_start: Callable[[], Awaitable[None]] | None = None,
               api_key: str | None = None) -> FastAPI:
    """The engine's app; ``on_start`` runs once the decode loop is up (e.g. to load adapters).

    With ``api_key`` every route but ``/health`` needs ``Authorization: Bearer KEY``, as
    vLLM's ``--api-key`` does.
    """

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        if on_start is not None:
            await on_start()
        try:
            yield
        finally:
            engine.stop()

    app = FastAPI(title="persona-chat embedded engine", lifespan=lifespan)
    app.state.engine = engine
    if api_key:
        app.add_middleware(BearerKey, api_key=api_key)
    for error_type in (APIError, RequestValidationError):
        app.add_exception_handler(error_type, caller_error)
    app.include_router(router)
    return app


class BearerKey:
    """Every route but ``/health`` needs ``Authorization: Bearer KEY``. Plain ASGI, not
    ``@app.middleware("http")``: Starlette's BaseHTTPMiddleware hides the client's disconnect
    from the route, and a request whose caller hung up must stop decoding (``_watch_disconnect``)."""

    def __init__(self, app, api_key: str):
        self.app, self.expected = app, f"Bearer {api_key}".encode()

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and scope["path"] != "/health":
            given = dict(scope.get("headers", ())).get(b"authorization", b"")
            if not hmac.compare_digest(given, self.expected):
                return await error_response(engine_error(401, "Unauthorized"))(scope, receive, send)
        return await self.app(scope, receive, send)


async def caller_error(request: Request, exc: Exception):
    """An ``APIError`` as it is; a body FastAPI could not validate as a 400 naming the field."""
    if isinstance(exc, RequestValidationError):
        exc = invalid_request(exc.errors(), skip=1, type="BadRequestError")
    return error_response(exc)


def engine_of(request: Request) -> EmbeddedEngine:
    return request.app.state.engine


@router.get("/health")
async def health(request: Request):
    batcher = engine_of(request).batcher
    return {"status": "ok", "running": batcher.running, "peak_batch": batcher.peak_rows}


@router.get("/v1/models")
async def models(request: Request):
    return ModelList(data=[ModelCard(id=n, root=n, parent=p) for n, p in engine_of(request).model_names()])


@router.post("/v1/load_lora_adapter")
async def load_lora(body: LoadLoRAAdapterRequest, request: Request):
    return await engine_of(request).load_adapter(body.lora_name, body.lora_path, body.load_inplace)


@router.post("/v1/unload_lora_adapter")
async def unload_lora(body: UnloadLoRAAdapterRequest, request: Request):
    return await engine_of(request).unload_adapter(body.lora_name)


@router.post("/v1/chat/completions")
async def chat(body: ChatCompletionRequest, request: Request):
    engine = engine_of(request)
    ids, adapter, sampling = engine.prepare(body)
    job = engine.submit(ids, adapter, sampling, body.n)
    rid = completion_id()
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        return StreamingResponse(_stream(engine, job, rid, body.model, len(ids), include_usage),
                                 media_type="text/event-stream")
    return await _complete(engine, job, rid, body.model, len(ids), request)


async def _complete(engine, job, rid, model, prompt_tokens, raw: Request) -> ChatCompletion:
    texts = [""] * job.n
    finish: list = [None] * job.n
    tokens = [0] * job.n
    watcher = asyncio.create_task(_watch_disconnect(raw, job))
    try:
        async for event in engine.events(job):
            texts[event.index] += event.text
            if event.finish_reason:
                finish[event.index], tokens[event.index] = event.finish_reason, event.completion_tokens
    finally:
        watcher.cancel()
        job.cancel()
    completion = sum(tokens)
    return ChatCompletion(
        id=rid, model=model,
        choices=[Choice(index=i, message=ChoiceMessage(content=t), finish_reason=f)
                 for i, (t, f) in enumerate(zip(texts, finish))],
        usage=Usage(prompt_tokens=prompt_tokens, completion_tokens=completion, total_tokens=prompt_tokens + completion),
    )


async def _watch_disconnect(raw: Request, job) -> None:
    while not job.cancelled.is_set():
        if await raw.is_disconnected():
            job.cancel()
            return
        await asyncio.sleep(0.2)


async def _stream(engine, job, rid, model, prompt_tokens, include_usage):
    created = int(time.time())

    def chunk(choices, usage=None) -> str:
        return sse(ChatCompletionChunk(id=rid, created=created, model=model, choices=choices,
                                       usage=usage).model_dump(exclude_none=True))

    completion = 0
    try:
        for i in range(job.n):
            yield chunk([ChunkChoice(index=i, delta=DeltaMessage(role="assistant", content=""))])
        async for event in engine.events(job):
            if event.text:
                yield chunk([ChunkChoice(index=event.index, delta=DeltaMessage(content=event.text))])
            if event.finish_reason:
                completion += event.completion_tokens
                yield chunk([ChunkChoice(index=event.index, delta=DeltaMessage(),
                                         finish_reason=event.finish_reason)])
        if include_usage:
            usage = Usage(prompt_tokens=prompt_tokens, completion_tokens=completion,
                          total_tokens=prompt_tokens + completion)
            yield chunk([], usage)
        yield sse("[DONE]")
    finally:
        job.cancel()  # a client that disconnects stops its generation
