"""The gateway's HTTP edge: what a request must get past before any route or the UI sees it,
and the server options that bound what a connection may hold.

    app.add_middleware(BodyDeadline, gateway=gateway)     # 408 for a body that trickles in
    app.add_middleware(BrowserGuard, gateway=gateway)     # 403 for a foreign Host or Origin
    uvicorn.Config(app, host=..., port=..., **server_options(gateway.config))

* **Host.** The ``Host`` header must name an allowed host (``GatewayConfig.allowed_hosts``:
  loopback names by default, plus the address ``persona up --host`` binds to; ``*``
  allows any). A page that rebinds its own name to 127.0.0.1 (DNS rebinding) sends its
  name as the Host, so it cannot reach, nor read, a loopback gateway without keys.
  ``/health`` is exempt: load balancers ask for it by address.
* **Origin.** A request with an ``Origin`` header (a browser's, on every cross-origin
  request that is not a plain GET) must come from the gateway's own origin (the scheme
  and the Host it was asked for) or a configured one (``allowed_origins``). A page on
  another site cannot POST to ``/admin/retrain`` from the operator's browser. Programs
  send no Origin and are not affected.
* **Body deadline.** A request's body must arrive within ``body_timeout`` seconds of
  waiting for it: a caller that trickles a body gets 408 and its connection is closed.
* **Server options.** Idle keep-alive connections close after ``keep_alive_timeout``; a
  request's head (its line and headers) must arrive within ``body_timeout`` seconds too,
  or the connection is closed (``head_deadline.py``: a caller that connects and sends
  nothing, or trickles its headers, holds no connection);
  proxy headers (``X-Forwarded-For``, ``-Proto``) are believed only from the addresses in
  ``forwarded_allow_ips`` (none by default: uvicorn's own default believes loopback, so a
  same-host proxy that passes the header through would make every caller "loopback").

Plain ASGI middleware, so the API pays a few header lookups per request.
"""

from __future__ import annotations

import asyncio
import logging
import time

from feedback.errors import APIError
from serve.protocol import error_response

log = logging.getLogger(__name__)

EXEMPT_PATHS = ("/health",)
WILDCARD_BINDS = ("0.0.0.0", "::", "")


def _header(scope, name: bytes) -> str | None:
    for key, value in scope.get("headers", ()):
        if key == name:
            return value.decode("latin-1")
    return None


def host_name(host: str) -> str:
    """The name in a Host header, without its port, lower case (``[::1]:7860`` -> ``::1``)."""
    host = host.strip().lower()
    if host.startswith("["):
        return host[1:].split("]", 1)[0]
    name, sep, port = host.rpartition(":")
    return name if sep and port.isdigit() and ":" not in name else host


def with_bind_host(hosts: tuple[str, ...], bind: str) -> tuple[str, ...]:
    """``hosts`` and the address the server binds to, unless that is a wildcard (any name)."""
    bind = bind.strip().lower().strip("[]")
    return hosts if bind in WILDCARD_BINDS or bind in hosts else (*hosts, bind)


async def _refuse(scope, receive, send, message: str, code: str) -> None:
    await error_response(APIError(403, message, code=code))(scope, receive, send)


class BrowserGuard:
    """403 for a request whose Host is not an allowed name, or whose Origin is foreign."""

    def __init__(self, app, gateway):
        self.app, self.config = app, gateway.config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or scope["path"] in EXEMPT_PATHS:
            return await self.app(scope, receive, send)
        host = _header(scope, b"host") or ""
        allowed = self.config.allowed_hosts
        if "*" not in allowed and host_name(host) not in allowed:
            return await _refuse(scope, receive, send, f"Host {host!r} is not a name this server answers to; "
                                 "the operator lists them in PERSONA_ALLOWED_HOSTS.", "host_not_allowed")
        origin = _header(scope, b"origin")
        if origin is not None:
            origin = origin.strip().rstrip("/").lower()
            own = f"{scope.get('scheme', 'http')}://{host.strip().lower()}"
            if origin != own and origin not in self.config.allowed_origins:
                return await _refuse(scope, receive, send, f"Requests from pages on {origin} are refused (only "
                                     f"this server's own pages, {own}, and PERSONA_ALLOWED_ORIGINS may call it).",
                                     "origin_not_allowed")
        return await self.app(scope, receive, send)


class BodyDeadline:
    """408, and the connection closed, for a request whose body takes longer than
    ``body_timeout`` seconds of waiting to arrive.

    The time counted is the time the app spends waiting for the client's next body part,
    so a slow route is not the caller's fault. Once the body is complete the channel only
    carries the disconnect (``hangup.py`` waits on it), which is not bounded here. On
    timeout the 408 is sent from here, the app's own reading fails with that 408 (the
    gateway's routes count it like any error), and whatever the app sends after it is
    dropped: the caller hears one answer.
    """

    def __init__(self, app, gateway):
        self.app, self.config = app, gateway.config

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        budget = [float(self.config.body_timeout)]
        state = {"body_done": False, "started": False, "timed_out": False}

        async def timed_receive():
            if state["body_done"] or state["timed_out"]:
                return await receive()
            began = time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(budget[0], 0.001))
            except TimeoutError:
                state["timed_out"] = True
                error = self._timeout_error()
                if not state["started"]:
                    state["started"] = True
                    await error_response(error)(scope, _no_body, send)
                raise error from None
            budget[0] -= time.monotonic() - began
            if message["type"] != "http.request" or not message.get("more_body", False):
                state["body_done"] = True
            return message

        async def guarded_send(message):
            if state["timed_out"]:
                return  # the 408 went out already
            if message["type"] == "http.response.start":
                state["started"] = True
            await send(message)

        try:
            await self.app(scope, timed_receive, guarded_send)
        except Exception:
            if not state["timed_out"]:
                raise  # the app's own failure, handled as before

    def _timeout_error(self) -> APIError:
        seconds = self.config.body_timeout
        return APIError(408, f"The request body did not arrive within {seconds:g} s.", code="request_timeout",
                        headers={"Connection": "close"})


async def _no_body():
    return {"type": "http.request", "body": b"", "more_body": False}


def server_options(config) -> dict:
    """uvicorn's options for the gateway (``persona up``, and the tests' servers): the
    keep-alive bound, a request head's deadline (``body_timeout`` too), and proxy headers
    believed only from ``forwarded_allow_ips``."""
    from serve.gateway.head_deadline import head_deadline_protocol

    proxies = list(config.forwarded_allow_ips)
    return {"timeout_keep_alive": config.keep_alive_timeout, "http": head_deadline_protocol(config.body_timeout),
            "proxy_headers": bool(proxies),
            "forwarded_allow_ips": proxies or None}
