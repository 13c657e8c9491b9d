"""HTTP routes of the gateway: OpenAI API under /v1, admin routes, /health, /metrics.

    POST /v1/chat/completions     persona chat (streaming too); the response id is the turn id
    GET  /v1/models               personas (teto) and pinned versions (teto@v3)
    POST /v1/feedback             thumbs up/down (or retract) on a turn served to the caller
    POST /v1/comparisons          which of two answers to the same context is better
    POST /v1/load_lora_adapter    admin: vLLM's payload, sent to every engine replica
    POST /v1/unload_lora_adapter  admin
    POST /admin/reload            admin: re-read the adapter registry and hot-swap active versions
    POST /admin/snapshot          admin: export the store as Parquet; answers {"path": folder}
    POST /admin/runs              admin: record a training run (the loop's runs report here)
    GET  /admin/runs              admin: recent training runs (?persona=)
    POST /admin/retrain           admin: start a retrain of a persona now ({"persona", "force"})
    GET  /admin/engines           admin: replicas, health, requests in flight
    GET  /health                  200 when at least one engine is up
    GET  /metrics                 admin: Prometheus text format
    GET  /openapi.json            the routes and their request bodies (OpenAPI)

Any other path under /v1 or /admin is a 404: nothing is passed through to an engine.

Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import asyncio
import logging
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError

from feedback import settings
from feedback.votes import FeedbackError, Vote, record_comparison
from serve.engine.embedded import sse
from serve.gateway import auth
from serve.gateway.chat import open_chat
from serve.gateway.core import Gateway, GatewayError
from serve.gateway.engines import UpstreamError, parse_error
from serve.gateway.openapi import body as documented
from serve.protocol import (
    ChatCompletionRequest, ComparisonRequest, EmptyRequest, ErrorInfo, ErrorResponse, FeedbackRequest,
    LoadLoRAAdapterRequest, ModelCard, ModelList, RetrainRequest, RunRecord, UnloadLoRAAdapterRequest,
)

log = logging.getLogger(__name__)

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 403: "permission_error",
               404: "invalid_request_error", 409: "invalid_request_error", 413: "invalid_request_error",
               429: "rate_limit_error",
               503: "server_error"}


def error_body(status: int, message: str, param=None, code=None) -> dict:
    info = ErrorInfo(message=message, type=ERROR_TYPES.get(status, "server_error"), param=param,
                     code=code if code is not None else status)
    return ErrorResponse(error=info).model_dump()


def create_gateway_app(gateway: Gateway, ui: bool = True, ui_users: tuple[tuple[str, str], ...] = ()) -> FastAPI:
    """The gateway's HTTP app; ``ui`` mounts the browser UI at ``/`` (with logins
    ``ui_users``; without any, the UI serves loopback clients only, like the API).
    Keys are the config's plus those in PERSONA_API_KEY_FILE / PERSONA_ADMIN_KEY_FILE;
    ``/v1/load_lora_adapter`` loads only from PERSONA_HOME's adapters folder (both read now)."""
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
    api_keys = auth.KeyRing(cfg.api_keys, settings.get("PERSONA_API_KEY_FILE"))
    admin_keys = auth.KeyRing(cfg.admin_keys, settings.get("PERSONA_ADMIN_KEY_FILE"))
    if not api_keys.required:
        log.warning("PERSONA_API_KEY is not set: the API serves loopback clients only")
    if not admin_keys.required:
        log.warning("PERSONA_ADMIN_KEY is not set: admin routes serve loopback clients only")
    adapters_root = settings.adapters_dir().resolve()

    async def _caller_error(request: Request, exc):
        """Every error the caller must hear about carries ``status`` and ``message``
        (``param`` and ``code`` when it has them), whichever layer raised it."""
        gateway.metrics.errors.labels(request.url.path, str(exc.status)).inc()
        body = error_body(exc.status, exc.message, getattr(exc, "param", None), getattr(exc, "code", None))
        return JSONResponse(body, status_code=exc.status, headers=getattr(exc, "headers", None))

    for error_type in (GatewayError, UpstreamError, FeedbackError, auth.AuthError):
        app.add_exception_handler(error_type, _caller_error)

    @app.exception_handler(RequestValidationError)
    async def _bad_parameter(request: Request, exc: RequestValidationError):
        """A query parameter FastAPI parsed (``?limit=abc``): 400 in OpenAI's shape, not a 422 ``detail``."""
        first = exc.errors()[0]
        param = ".".join(str(p) for p in first.get("loc", ())[1:]) or None
        return await _caller_error(request, GatewayError(400, f"{param or 'request'}: {first['msg']}", param=param))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception):
        log.exception("unexpected error on %s", request.url.path)
        gateway.metrics.errors.labels(request.url.path, "500").inc()
        return JSONResponse(error_body(500, "The server had an error while processing your request."),
                            status_code=500)

    def client_of(request: Request, admin: bool = False) -> str:
        header = request.headers.get("authorization")
        host = request.client.host if request.client else None
        if admin:
            return auth.check_admin(header, host, admin_keys, api_keys)
        return auth.check(header, host, api_keys.keys(), "API", api_keys.required)

    async def read_json(request: Request, model: type[BaseModel], optional: bool = False):
        declared = request.headers.get("content-length")
        if declared and declared.isdigit() and int(declared) > cfg.max_body_bytes:
            raise GatewayError(413, f"Request body is {declared} bytes; the limit is {cfg.max_body_bytes}.")
        raw = bytearray()
        async for part in request.stream():
            raw += part
            if len(raw) > cfg.max_body_bytes:
                raise GatewayError(413, f"Request body is over the limit of {cfg.max_body_bytes} bytes.")
        if optional and not raw.strip():
            return model()
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as exc:
            raise GatewayError(400, f"The body is not valid UTF-8 (byte {exc.start}).") from None
        try:
            return model.model_validate_json(bytes(raw))
        except ValidationError as exc:
            first = exc.errors()[0]
            if first["type"] == "json_invalid":  # "Invalid JSON: EOF while parsing ... at line 1 column 9"
                reason = first["msg"].removeprefix("Invalid JSON: ")
                raise GatewayError(400, f"The body is not valid JSON: {reason}.") from None
            param = ".".join(str(p) for p in first.get("loc", ())) or None
            message = first["msg"].removeprefix("Value error, ")  # our validators' ValueErrors
            raise GatewayError(400, f"{param or 'body'}: {message}", param=param) from None

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

    @app.post("/v1/chat/completions", openapi_extra=documented(ChatCompletionRequest))
    async def chat(request: Request):
        client = client_of(request)
        body: ChatCompletionRequest = await read_json(request, ChatCompletionRequest)
        session = await open_chat(gateway, body, client)
        if not body.stream:
            return JSONResponse(await session.complete())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            async for chunk in session.chunks(include_usage):
                yield sse(chunk)
            yield sse("[DONE]")

        return StreamingResponse(events(), media_type="text/event-stream")

    # ---- feedback ------------------------------------------------------------------------
    @app.post("/v1/feedback", openapi_extra=documented(FeedbackRequest))
    async def feedback(request: Request):
        client = client_of(request)
        body: FeedbackRequest = await read_json(request, FeedbackRequest)
        status = await gateway.votes.submit(Vote(body.turn_id, body.vote, client, body.choice_index, body.reason,
                                                 body.comment))
        return {"object": "feedback", "turn_id": body.turn_id, "choice_index": body.choice_index,
                "vote": body.vote, "status": status}

    @app.post("/v1/comparisons", openapi_extra=documented(ComparisonRequest))
    async def comparisons(request: Request):
        client = client_of(request)
        body: ComparisonRequest = await read_json(request, ComparisonRequest)
        comparison_id = await asyncio.to_thread(record_comparison, gateway.store, body.turn_a, body.turn_b,
                                                body.choice, body.left, client)
        return {"object": "comparison", "id": comparison_id, "choice": body.choice}

    # ---- admin ---------------------------------------------------------------------------
    async def forward_admin(request: Request, route: str, model: type[BaseModel]):
        client_of(request, admin=True)
        body = await read_json(request, model)
        if isinstance(body, LoadLoRAAdapterRequest):
            body.lora_path = inside_root(body.lora_path, adapters_root)
        resp = await gateway.pool.broadcast(route, body.model_dump(exclude_none=True))
        if resp.status_code == 200:
            return PlainTextResponse(resp.text)
        raise parse_error(resp.status_code, resp.content)

    @app.post("/v1/load_lora_adapter", openapi_extra=documented(LoadLoRAAdapterRequest))
    async def load_lora(request: Request):
        return await forward_admin(request, "/v1/load_lora_adapter", LoadLoRAAdapterRequest)

    @app.post("/v1/unload_lora_adapter", openapi_extra=documented(UnloadLoRAAdapterRequest))
    async def unload_lora(request: Request):
        return await forward_admin(request, "/v1/unload_lora_adapter", UnloadLoRAAdapterRequest)

    @app.post("/admin/reload", openapi_extra=documented(EmptyRequest, required=False))
    async def reload(request: Request):
        client_of(request, admin=True)
        await read_json(request, EmptyRequest, optional=True)
        return {"active": await gateway.reload()}

    @app.post("/admin/snapshot", openapi_extra=documented(EmptyRequest, required=False))
    async def snapshot(request: Request):
        client_of(request, admin=True)
        await read_json(request, EmptyRequest, optional=True)
        return {"path": await asyncio.to_thread(gateway.snapshot)}

    @app.post("/admin/runs", openapi_extra=documented(RunRecord))
    async def record_run(request: Request):
        client_of(request, admin=True)
        body = await read_json(request, RunRecord)
        await asyncio.to_thread(gateway.store.record_run, body.model_dump(exclude_none=True))
        return {"id": body.id, "status": body.status}

    @app.get("/admin/runs")
    async def runs(request: Request, persona: str | None = None, limit: int = 20):
        client_of(request, admin=True)
        rows = await asyncio.to_thread(
            gateway.store.query_dicts,
            "SELECT * EXCLUDE (metrics) FROM training_runs WHERE ? IS NULL OR persona = ? "
            "ORDER BY started_at DESC LIMIT ?", [persona, persona, max(1, min(limit, 500))])
        return {"runs": rows}

    @app.post("/admin/retrain", openapi_extra=documented(RetrainRequest))
    async def retrain(request: Request):
        client_of(request, admin=True)
        body = await read_json(request, RetrainRequest)
        if body.persona not in gateway.catalog.personas:
            raise GatewayError(404, f"No persona {body.persona!r}.", param="persona")
        if gateway.scheduler is None:
            raise GatewayError(503, "This gateway has no retrain scheduler.")
        return gateway.scheduler.launch(body.persona, body.force)

    @app.get("/admin/engines")
    async def engines(request: Request):
        client_of(request, admin=True)
        return {"engines": [{"url": r.url, "healthy": r.healthy, "in_flight": r.in_flight, "served": r.served,
                             "adapters": sorted(r.loaded)} for r in gateway.pool.replicas]}

    @app.get("/metrics")
    async def metrics(request: Request):
        client_of(request, admin=True)
        return Response(gateway.metrics.render(), media_type="text/plain; version=0.0.4")

    @app.api_route("/v1/{path:path}", methods=ALL_METHODS, include_in_schema=False)
    @app.api_route("/admin/{path:path}", methods=ALL_METHODS, include_in_schema=False)
    async def unknown_route(request: Request, path: str):
        """No other path under /v1 or /admin is served (nothing is passed on to an engine);
        a wrong method on a known route reads the same, as OpenAI's API answers."""
        raise GatewayError(404, f"Invalid URL ({request.method} {request.url.path}).", code="unknown_url")

    if ui:
        mount_ui(app, gateway, ui_users)
    from serve.gateway.drain import Draining

    app.add_middleware(Draining, gateway=gateway)  # outermost: refuses new requests while draining
    return app


API_PREFIXES = ("/v1/", "/admin/", "/health", "/metrics")
ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def inside_root(path: str, root: Path) -> str:
    """``path`` resolved (symlinks and ``..``; relative to ``root``) when it lies inside
    ``root``; otherwise a 400 naming both. An admin key loads adapters, not any file."""
    try:
        resolved = (root / path).resolve()
    except (OSError, RuntimeError):  # RuntimeError: a symlink loop
        resolved = None
    if resolved is None or not resolved.is_relative_to(root):
        raise GatewayError(400, f"lora_path must lie inside {root} (the adapters folder); {path!r} does not.",
                           param="lora_path")
    return str(resolved)


class LoopbackUI:
    """Plain ASGI middleware: without UI logins, only loopback clients reach the UI (the API
    routes check keys themselves). Plain ASGI, so API requests pay one string check."""

    def __init__(self, app):
        self.app = app

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and not scope["path"].startswith(API_PREFIXES):
            client = scope.get("client")
            if not auth.is_loopback(client[0] if client else None):
                response = PlainTextResponse("The browser UI serves loopback clients only; set PERSONA_UI_USERS "
                                             "to log in from elsewhere.", status_code=403)
                return await response(scope, receive, send)
        return await self.app(scope, receive, send)


def mount_ui(app: FastAPI, gateway: Gateway, users: tuple[tuple[str, str], ...]) -> None:
    import gradio as gr

    from serve.ui.app import build_ui

    if not users:
        log.warning("PERSONA_UI_USERS is not set: the browser UI serves loopback clients only, without login")
        app.add_middleware(LoopbackUI)

    blocks = build_ui(gateway).queue(default_concurrency_limit=gateway.config.max_in_flight)
    # The UI's events are not an API (the OpenAI API is): private keeps them out of Gradio's API
    # description, which its login page embeds for anyone (persona names, defaults, even with
    # ?all_endpoints=true), and out of its run history.
    for fn in blocks.fns.values():
        fn.api_visibility = "private"
    # blocked_paths: Gradio's file route must never serve the database, adapters or keys, whatever
    # a component points at (it serves only its own upload and cache folders already).
    gr.mount_gradio_app(app, blocks, path="/", auth=list(users) or None, footer_links=[], show_error=True,
                        blocked_paths=[str(settings.home())],
                        auth_message="persona-chat: log in to chat and vote.")
