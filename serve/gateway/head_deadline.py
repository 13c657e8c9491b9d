"""A deadline on a request's head (its request line and headers), for uvicorn's h11 protocol.

uvicorn bounds an idle keep-alive connection only after a response, and stops that clock
at the first byte that arrives. A caller that opens a connection and sends nothing, or
trickles its headers a byte at a time (slowloris), holds a connection and its buffers
for as long as it likes. With this protocol the head must be complete within
``head_timeout`` seconds of the connection opening, or of the previous response ending;
otherwise the connection is closed (as nginx's ``client_header_timeout`` does).

    uvicorn.Config(app, http=head_deadline_protocol(10.0), ...)

The body has its own deadline (``edge.BodyDeadline``, 408). A connection handed over to
another protocol (a WebSocket upgrade) is left alone.
"""

from __future__ import annotations

import asyncio

from uvicorn.protocols.http.h11_impl import H11Protocol


class HeadDeadlineH11(H11Protocol):
    head_timeout = 10.0

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._head_timer: asyncio.TimerHandle | None = None
        self._waiting_cycle = self.cycle
        self._arm()

    def handle_events(self) -> None:
        super().handle_events()
        if self._head_timer is not None and self.cycle is not self._waiting_cycle:  # a new request's head arrived
            self._disarm()

    def on_response_complete(self) -> None:
        super().on_response_complete()
        if not self.transport.is_closing() and self.cycle.response_complete:  # no pipelined request began
            self._arm()

    def connection_lost(self, exc: Exception | None) -> None:
        self._disarm()
        super().connection_lost(exc)

    def _arm(self) -> None:
        self._disarm()
        self._waiting_cycle = self.cycle
        self._head_timer = self.loop.call_later(self.head_timeout, self._expired)

    def _disarm(self) -> None:
        if self._head_timer is not None:
            self._head_timer.cancel()
            self._head_timer = None

    def _expired(self) -> None:
        self._head_timer = None
        if self.cycle is self._waiting_cycle and self.transport.get_protocol() is self:
            self.transport.close()  # no new request began, and the connection is still HTTP's


def head_deadline_protocol(seconds: float) -> type[HeadDeadlineH11]:
    """The protocol class with its deadline set (uvicorn's ``http=`` takes a class)."""
    return type("HeadDeadlineH11", (HeadDeadlineH11,), {"head_timeout": float(seconds)})
