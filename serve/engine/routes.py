"""HTTP routes of the embedded engine (vLLM's protocol). Thin: each route takes
the engine from ``app.state`` and calls it."""

from __future__ import annotations

import asyncio
import time
from contextlib import asynccontextmanager
from typing import Awaitable, Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse

from serve.engine.embedded import EmbeddedEngine, EngineError, sse
from serve.protocol import (
    ChatCompletion, ChatCompletionChunk, ChatCompletionRequest, Choice, ChoiceMessage, ChunkChoice,
    DeltaMessage, ErrorInfo, ErrorResponse, LoadLoRAAdapterRequest, ModelCard, ModelList,
    UnloadLoRAAdapterRequest, Usage, completion_id,
)


def error(status: int, message: str, type_: str = "BadRequestError", param: str | None = None) -> JSONResponse:
    body = ErrorResponse(error=ErrorInfo(message=message, type=type_, param=param, code=status))
    return JSONResponse(body.model_dump(), status_code=status)


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
        import hmac

        @app.middleware("http")
        async def _key(request: Request, call_next):
            given = request.headers.get("authorization", "")
            if request.url.path != "/health" and not hmac.compare_digest(given.encode(), f"Bearer {api_key}".encode()):
                return error(401, "Unauthorized", "AuthenticationError")
            return await call_next(request)

    @app.exception_handler(EngineError)
    async def _engine_error(request: Request, exc: EngineError):
        return error(exc.status, exc.message, exc.type, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {"loc": [], "msg": "invalid request"}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        return error(400, f"{param or 'body'}: {first['msg']}", param=param)

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": engine.batcher.running, "peak_batch": engine.batcher.peak_rows}

    @app.get("/v1/models")
    async def models():
        return ModelList(data=[ModelCard(id=n, root=n, parent=p) for n, p in engine.model_names()])

    @app.post("/v1/load_lora_adapter")
    async def load_lora(body: LoadLoRAAdapterRequest):
        return await engine.load_adapter(body.lora_name, body.lora_path, body.load_inplace)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(body: UnloadLoRAAdapterRequest):
        return await engine.unload_adapter(body.lora_name)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatCompletionRequest, raw: Request):
        ids, adapter, sampling = engine.prepare(body)
        job = engine.submit(ids, adapter, sampling, body.n)
        rid = completion_id()
        if body.stream:
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_stream(engine, job, rid, body.model, len(ids), include_usage),
                                     media_type="text/event-stream")
        return await _complete(engine, job, rid, body.model, len(ids), raw)

    return app


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
