"""The gateway's HTTP app: the routers of ``routes/`` (their docstrings list the routes),
one error handler, the browser UI at ``/``, the edge's guards (``edge.py``: Host, Origin,
body deadline) and the drain middleware.

    app = create_gateway_app(gateway)            # served by uvicorn (persona up)

Besides the routers' routes, ``GET /openapi.json`` describes them with their
request bodies (``openapi.py``). Any other path under /v1 or /admin is a 404: nothing is passed through to an engine.
Every error is OpenAI's ``{"error": {"message", "type", "param", "code"}}``
(``serve.protocol.error_body``), whichever layer raised it.
"""

from __future__ import annotations

import logging
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError

from feedback.errors import APIError
from serve.gateway.core import Gateway
from serve.gateway.drain import Draining
from serve.gateway.edge import BodyDeadline, BrowserGuard
from serve.gateway.routes.admin import router as admin_routes
from serve.gateway.routes.feedback import router as feedback_routes
from serve.gateway.routes.openai import router as openai_routes
from serve.protocol import error_response, invalid_request

log = logging.getLogger(__name__)

ALL_METHODS = ["GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"]


def create_gateway_app(gateway: Gateway, ui: bool = True, ui_users: tuple[tuple[str, str], ...] = ()) -> FastAPI:
    """The gateway's HTTP app; ``ui`` mounts the browser UI at ``/`` (with logins
    ``ui_users``; without any, the UI serves loopback clients only, like the API)."""
    @asynccontextmanager
    async def lifespan(app: FastAPI):
        await gateway.start()
        try:
            yield
        finally:
            await gateway.stop()

    app = FastAPI(title="persona-chat", lifespan=lifespan, docs_url=None, redoc_url=None)
    app.state.gateway = gateway
    for error_type in (APIError, RequestValidationError, Exception):
        app.add_exception_handler(error_type, caller_error)
    for router in (openai_routes, feedback_routes, admin_routes):
        # The routes themselves, not app.include_router: that nests a router (lazily, since
        # FastAPI 0.165), and app.routes, where a test pins the routes served, would hide them.
        app.router.routes.extend(router.routes)
    for prefix in ("/v1", "/admin"):  # after the routers: only what they do not serve
        app.add_api_route(prefix + "/{path:path}", unknown_route, methods=ALL_METHODS, include_in_schema=False)
    if ui:
        from serve.ui.mount import mount_ui

        mount_ui(app, gateway, ui_users)
    app.add_middleware(BodyDeadline, gateway=gateway)
    app.add_middleware(BrowserGuard, gateway=gateway)  # before anything reads the body
    app.add_middleware(Draining, gateway=gateway)  # outermost: refuses new requests while draining
    return app


async def caller_error(request: Request, exc: Exception):
    """Every error in OpenAI's shape, counted by route template and status: an ``APIError`` as it is, a
    query parameter FastAPI could not parse (``?limit=abc``) as a 400, anything else a 500."""
    if isinstance(exc, RequestValidationError):
        exc = invalid_request(exc.errors(), skip=1)
    elif not isinstance(exc, APIError):
        log.error("unexpected error on %s", request.url.path, exc_info=exc)
        exc = APIError(500, "The server had an error while processing your request.")
    request.app.state.gateway.metrics.errors.labels(route_label(request), str(exc.status)).inc()
    return error_response(exc)


def route_label(request: Request) -> str:
    """The matched route's template (``/v1/{path:path}`` for any unknown path under /v1), or
    ``unknown``: never the raw path, which a caller without a key could vary without bound,
    making a new metrics series each time."""
    route = request.scope.get("route")
    return getattr(route, "path", None) or "unknown"


async def unknown_route(request: Request, path: str):
    """No other path under /v1 or /admin is served (nothing is passed on to an engine);
    a wrong method on a known route reads the same, as OpenAI's API answers."""
    raise APIError(404, f"Invalid URL ({request.method} {request.url.path}).", code="unknown_url")
