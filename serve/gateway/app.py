"""HTTP routes of the gateway: OpenAI API under /v1, admin routes, /health, /metrics.

    POST /v1/chat/completions     persona chat (streaming too); the response id is the turn id
    GET  /v1/models               personas (teto) and pinned versions (teto@v3)
    POST /v1/feedback             thumbs up/down (or retract) on a turn served to the caller
    POST /v1/comparisons          which of two answers to the same context is better
    POST /v1/load_lora_adapter    admin: vLLM's payload, sent to every engine replica
    POST /v1/unload_lora_adapter  admin
    POST /admin/reload            admin: re-read the adapter registry and hot-swap active versions
    GET  /admin/engines           admin: replicas, health, requests in flight
    GET  /health                  200 when at least one engine is up
    GET  /metrics                 admin: Prometheus text format

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from contextlib import asynccontextmanager

import httpx
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from feedback.store import Turn
from feedback.votes import FeedbackError, record_comparison, record_vote
from serve.engine.embedded import sse
from serve.gateway import auth
from serve.gateway.catalog import Target, UnknownModel
from serve.gateway.core import Gateway
from serve.gateway.engines import UpstreamError, parse_error
from serve.protocol import (
    ChatCompletionRequest, ComparisonRequest, ErrorInfo, ErrorResponse, FeedbackRequest, LoadLoRAAdapterRequest, ModelCard, ModelList,
    UnloadLoRAAdapterRequest, completion_id,
)

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 413: "invalid_request_error", 429: "rate_limit_error",
               503: "server_error"}


class GatewayError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code


def error_body(status: int, message: str, param=None, code=None) -> dict:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param,
                     code=code if code is not None else status)
    return ErrorResponse(error=info).model_dump()


def create_gateway_app(gateway: Gateway) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="persona-chat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    cfg = gateway.config

    @app.exception_handler(GatewayError)
    async def _gateway_error(request: Request, exc: GatewayError):
        gateway.metrics.errors.labels(request.url.path, str(exc.status)).inc()
        return JSONResponse(error_body(exc.status, exc.message, exc.param, exc.code), status_code=exc.status)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        gateway.metrics.errors.labels(request.url.path, "500").inc()
        return JSONResponse(error_body(500, "The server had an error while processing your request."),
                            status_code=500)

    def client_of(request: Request, admin: bool = False) -> str:
        keys = cfg.admin_keys if admin else cfg.api_keys
        host = request.client.host if request.client else None
        try:
            return auth.check(request.headers.get("authorization"), host, keys, "admin" if admin else "API")
        except auth.AuthError as exc:
            raise GatewayError(exc.status, exc.message, code=exc.code) from None

    async def read_json(request: Request, model: type[BaseModel]):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise GatewayError(413, f"Request body is {declared} bytes; the limit is {cfg.max_body_bytes}.")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > cfg.max_body_bytes:
                raise GatewayError(413, f"Request body is over the limit of {cfg.max_body_bytes} bytes.")
        try:
            return model.model_validate_json(bytes(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            message = first["msg"] if first["type"] != "json_invalid" else "The body is not valid JSON."
            raise GatewayError(400, f"{param or 'body'}: {message}", param=param) from None

    def resolve(model: str) -> Target:
        try:
            return gateway.catalog.resolve(model)
        except UnknownModel as exc:
            raise GatewayError(404, exc.message, param="model", code="model_not_found") from None

    # ---- public --------------------------------------------------------------------------
    @app.get("/health")
    async def health():
        up = [r.url for r in gateway.pool.replicas if r.healthy]
        status = 200 if up else 503
        return JSONResponse({"status": "ok" if up else "unavailable", "engines_up": len(up),
                             "engines": len(gateway.pool.replicas)}, status_code=status)

    @app.get("/v1/models")
    async def models(request: Request):
        client_of(request)
        return ModelList(data=[ModelCard(id=i, root=i, parent=p) for i, p in gateway.catalog.model_ids()])

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        client = client_of(request)
        body: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
        target = resolve(body.model)
        if gateway.in_flight >= cfg.max_in_flight:
            raise GatewayError(429, f"Too many requests in flight (limit {cfg.max_in_flight}); retry shortly.")
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
        turn = Turn(id=completion_id(), requested_model=body.model, messages=messages, answers=[""] * body.n,
                    finish_reasons=[None] * body.n, sampling=sampling, stream=body.stream, latency_ms=0.0,
                    client=client, persona=target.persona, adapter=target.adapter,
                    adapter_version=target.version, user_tag=body.user)
        started = time.perf_counter()
        gateway.in_flight += 1
        gateway.adapter_in_flight[target.adapter] += 1
        gateway.metrics.in_flight.inc()

        def done() -> None:
            gateway.in_flight -= 1
            gateway.adapter_in_flight[target.adapter] -= 1
            gateway.metrics.in_flight.dec()

        try:
            replica, response = await gateway.open_chat(target, upstream)
        except UpstreamError as exc:
            done()
            raise GatewayError(exc.status, exc.message, exc.param) from None
        except httpx.HTTPError as exc:
            done()
            raise GatewayError(503, f"The engine failed: {type(exc).__name__}") from None
        except BaseException:
            done()
            raise
        turn.engine = replica.url
        if body.stream:
            want_usage = bool(body.stream_options and body.stream_options.include_usage)
            return StreamingResponse(_relay(gateway, target, turn, replica, response, started, want_usage, done),
                                     media_type="text/event-stream")
        try:
            data = json.loads(await response.aread())
        finally:
            await gateway.pool.finish(replica, response)
            done()
        data["id"], data["model"] = turn.id, target.model_id
        for choice in data.get("choices", []):
            turn.answers[choice["index"]] = choice["message"].get("content") or ""
            turn.finish_reasons[choice["index"]] = choice.get("finish_reason")
        usage = data.get("usage") or {}
        turn.prompt_tokens, turn.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
        turn.latency_ms = (time.perf_counter() - started) * 1000
        await asyncio.to_thread(gateway.record, turn, target)  # logged before the answer is sent
        return JSONResponse(data)

    # ---- feedback ------------------------------------------------------------------------
    @app.post("/v1/feedback")
    async def feedback(request: Request):
        client = client_of(request)
        body: FeedbackRequest = await read_json(request, FeedbackRequest)
        try:
            status = await asyncio.to_thread(record_vote, gateway.store, body.turn_id, body.vote, client,
                                             body.choice_index, body.reason, body.comment)
        except FeedbackError as exc:
            raise GatewayError(exc.status, exc.message, exc.param) from None
        return {"object": "feedback", "turn_id": body.turn_id, "choice_index": body.choice_index,
                "vote": body.vote, "status": status}

    @app.post("/v1/comparisons")
    async def comparisons(request: Request):
        client = client_of(request)
        body: ComparisonRequest = await read_json(request, ComparisonRequest)
        try:
            comparison_id = await asyncio.to_thread(record_comparison, gateway.store, body.turn_a, body.turn_b,
                                                    body.choice, body.left, client)
        except FeedbackError as exc:
            raise GatewayError(exc.status, exc.message, exc.param) from None
        return {"object": "comparison", "id": comparison_id, "choice": body.choice}

    # ---- admin ---------------------------------------------------------------------------
    async def forward_admin(request: Request, route: str, model: type[BaseModel]):
        client_of(request, admin=True)
        body = await read_json(request, model)
        resp = await gateway.pool.broadcast(route, body.model_dump(exclude_none=True))
        if resp.status_code == 200:
            return PlainTextResponse(resp.text)
        err = parse_error(resp.status_code, resp.content)
        raise GatewayError(err.status, err.message, err.param)

    @app.post("/v1/load_lora_adapter")
    async def load_lora(request: Request):
        return await forward_admin(request, "/v1/load_lora_adapter", LoadLoRAAdapterRequest)

    @app.post("/v1/unload_lora_adapter")
    async def unload_lora(request: Request):
        return await forward_admin(request, "/v1/unload_lora_adapter", UnloadLoRAAdapterRequest)

    @app.post("/admin/reload")
    async def reload(request: Request):
        client_of(request, admin=True)
        try:
            active = await gateway.reload()
        except UpstreamError as exc:
            raise GatewayError(exc.status, exc.message, exc.param) from None
        return {"active": active}

    @app.get("/admin/engines")
    async def engines(request: Request):
        client_of(request, admin=True)
        return {"engines": [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight, "served": r.served,
                             "adapters": sorted(r.loaded)} for r in gateway.pool.replicas]}

    @app.get("/metrics")
    async def metrics(request: Request):
        client_of(request, admin=True)
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    return app


async def _relay(gateway: Gateway, target: Target, turn: Turn, replica, response, started: float,
                 want_usage: bool, done):
    """Pass the engine's SSE stream on with our turn id; log the turn before the last event."""
    turn.status = "aborted"
    usage_chunk = None
    recorded = False
    try:
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            payload = line[6:]
            if payload == "[DONE]":
                turn.status = "ok"
                break
            chunk = json.loads(payload)
            if "error" in chunk or chunk.get("object") == "error":
                turn.status = "error"
                yield sse(chunk)
                continue
            chunk["id"], chunk["model"] = turn.id, target.model_id
            usage = chunk.pop("usage", None)
            if usage:
                turn.prompt_tokens, turn.completion_tokens = usage.get("prompt_tokens"), usage.get("completion_tokens")
            for choice in chunk.get("choices", []):
                delta, index = choice.get("delta") or {}, choice["index"]
                if delta.get("content"):
                    if turn.ttft_ms is None:
                        turn.ttft_ms = (time.perf_counter() - started) * 1000
                    turn.answers[index] += delta["content"]
                if choice.get("finish_reason"):
                    turn.finish_reasons[index] = choice["finish_reason"]
            if not chunk.get("choices"):
                if usage:
                    usage_chunk = {**chunk, "usage": usage}
                continue
            yield sse(chunk)
        turn.latency_ms = (time.perf_counter() - started) * 1000
        await asyncio.to_thread(gateway.record, turn, target)  # before the response completes
        recorded = True
        if want_usage and usage_chunk is not None:
            yield sse(usage_chunk)
        yield sse("[DONE]")
    except httpx.HTTPError as exc:
        turn.status = "error"
        yield sse(error_body(503, f"The engine stopped answering: {type(exc).__name__}"))
    finally:
        await gateway.pool.finish(replica, response)
        done()
        if not recorded:  # client gone or engine failed: keep what was sent, marked as such
            turn.latency_ms = (time.perf_counter() - started) * 1000
            gateway.record(turn, target)
