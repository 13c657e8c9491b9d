"""What the routes share, as FastAPI dependencies: the caller's key check and its JSON body.

    @router.post("/v1/feedback", openapi_extra=documented(FeedbackRequest))
    async def feedback(request: Request, client: ApiClient,
                       body: Annotated[FeedbackRequest, json_body(FeedbackRequest)]): ...

A key check comes before the body in a route's parameters, so a caller without a
valid key learns nothing about the body. Bodies are read by hand, not by FastAPI:
a size limit while reading, and every mistake a 400 in OpenAI's shape that names
the field (the schema comes from ``openapi.py``).
"""

from __future__ import annotations

from typing import Annotated, TypeVar

from fastapi import Depends, Request
from pydantic import BaseModel, ValidationError

from feedback.errors import APIError
from serve.gateway import auth
from serve.gateway.core import Gateway
from serve.protocol import invalid_request

M = TypeVar("M", bound=BaseModel)


def gateway_of(request: Request) -> Gateway:
    return request.app.state.gateway


def _host(request: Request) -> str | None:
    return request.client.host if request.client else None


async def api_client(request: Request) -> str:
    """The caller's client id for the store, when it holds an API key (or is on loopback
    while none is configured); else a 401/403."""
    ring = gateway_of(request).api_keys
    return auth.check(request.headers.get("authorization"), _host(request), ring.keys(), "API", ring.required)


async def admin_client(request: Request) -> str:
    """``api_client`` for admin routes: an admin key is needed, an API key is a 403."""
    gateway = gateway_of(request)
    return auth.check_admin(request.headers.get("authorization"), _host(request), gateway.admin_keys,
                            gateway.api_keys)


ApiClient = Annotated[str, Depends(api_client)]


def json_content_type(request: Request, optional: bool) -> None:
    """A JSON route takes ``Content-Type: application/json`` (a charset may follow), or a 415.
    A browser page on another site can send a ``text/plain`` or form body to any address
    without asking first (CORS lets "simple" requests through); a JSON body it cannot.
    ``optional``: an action without arguments may also come with no body and no type."""
    given = request.headers.get("content-type")
    if given is None and optional and request.headers.get("content-length") in (None, "0") \
            and "transfer-encoding" not in request.headers:
        return
    if (given or "").split(";", 1)[0].strip().lower() != "application/json":
        shown = f"'{given}'" if given else "none"
        raise APIError(415, f"This route takes a JSON body sent with 'Content-Type: application/json'; "
                            f"the request's content type is {shown}.", param="Content-Type",
                       code="unsupported_media_type")


async def read_json(request: Request, model: type[M], limit: int, optional: bool = False) -> M:
    """The request's body as ``model``: sent as JSON (415 otherwise, ``json_content_type``),
    at most ``limit`` bytes (413 past it, counted while reading), UTF-8 and JSON that
    validates (400 naming the field). ``optional``: an empty body is ``model()``."""
    json_content_type(request, optional)
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit:
        raise APIError(413, f"Request body is {declared} bytes; the limit is {limit}.")
    raw = bytearray()
    async for part in request.stream():
        raw += part
        if len(raw) > limit:
            raise APIError(413, f"Request body is over the limit of {limit} bytes.")
    if optional and not raw.strip():
        return model()
    try:
        raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise APIError(400, f"The body is not valid UTF-8 (byte {exc.start}).") from None
    try:
        return model.model_validate_json(bytes(raw))
    except ValidationError as exc:
        first = exc.errors()[0]
        if first["type"] == "json_invalid":  # "Invalid JSON: EOF while parsing ... at line 1 column 9"
            reason = first["msg"].removeprefix("Invalid JSON: ")
            raise APIError(400, f"The body is not valid JSON: {reason}.") from None
        raise invalid_request(exc.errors()) from None


def json_body(model: type[BaseModel], optional: bool = False):
    """A route parameter's dependency: the body read as ``model`` (``read_json``)."""
    async def read(request: Request):
        return await read_json(request, model, gateway_of(request).config.max_body_bytes, optional)

    return Depends(read)
