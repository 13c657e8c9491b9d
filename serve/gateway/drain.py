"""Graceful shutdown: on SIGTERM (or the first Ctrl-C) the gateway drains.

Requests already running finish (up to a bound), new ones get 503 with
``Retry-After``, /health says ``draining`` (so a load balancer moves on), and
only then does the server stop; the store is checkpointed as it closes. A
second signal stops at once.
"""

from __future__ import annotations

import logging
import signal
import threading
import time

import uvicorn
from fastapi.responses import JSONResponse

from feedback.errors import APIError
from serve.protocol import error_response

log = logging.getLogger(__name__)


class Draining:
    """ASGI middleware: while the gateway drains, every new HTTP request gets a 503."""

    def __init__(self, app, gateway):
        self.app, self.gateway = app, gateway

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http" and self.gateway.draining:
            retry = {"Retry-After": "5"}
            if scope["path"] == "/health":
                response = JSONResponse({"status": "draining"}, status_code=503, headers=retry)
            else:
                response = error_response(APIError(503, "The server is shutting down; retry on another instance "
                                                        "or shortly.", headers=retry))
            return await response(scope, receive, send)
        return await self.app(scope, receive, send)


class DrainingServer(uvicorn.Server):
    """uvicorn, with the first SIGTERM/SIGINT starting a drain instead of an exit."""

    def __init__(self, config: uvicorn.Config, gateway):
        super().__init__(config)
        self.gateway = gateway

    def handle_exit(self, sig: int, frame) -> None:
        if self.gateway.draining or sig not in (signal.SIGTERM, signal.SIGINT):
            return super().handle_exit(sig, frame)
        self._captured_signals.append(sig)  # re-raised once the server has stopped, like uvicorn does
        self.gateway.draining = True
        log.warning("draining: %d request(s) running, new ones get 503 (at most %.0f s)",
                    self.gateway.in_flight, self.gateway.config.shutdown_timeout)
        threading.Thread(target=self._stop_when_drained, daemon=True).start()

    def _stop_when_drained(self) -> None:
        deadline = time.monotonic() + self.gateway.config.shutdown_timeout
        while self.gateway.in_flight and time.monotonic() < deadline:
            time.sleep(0.1)
        if self.gateway.in_flight:
            log.warning("drain bound reached with %d request(s) still running", self.gateway.in_flight)
        self.should_exit = True
