"""Fair sharing of the gateway's chat slots: who may start a chat turn now.

    slots = Slots(config)                                  # reads the limits from a GatewayConfig
    slot = slots.admit("teto-v1", "key:ab12...", weight=n)  # or a 400 / 429 with Retry-After
    slot.release()                                         # once; later calls do nothing

A turn holds ``weight`` slots, its ``n``: eight answers decode as eight rows in the
engine's batch, so ``n=8`` counts as 8 against ``max_in_flight`` and against the
client's own share. The limits:

* ``max_in_flight``: every client's turns together (the engine's batch and queue);
* ``key_max_in_flight``: one client's (an API key, the loopback address when no key is
  set, a browser session), so one caller, or one caller that stops reading its streams,
  cannot take every slot;
* ``key_requests_minute``: one client's chat requests in a sliding minute (``quota.py``).

Past a limit the caller gets a 429 at once, with Retry-After: waiting in the engine's
queue would only make the time to first token grow. A turn wider than a limit can
never be admitted, so it is a 400 naming ``n``. The limits are read from the config at
each admission (a test or an operator may change them on a running gateway).
"""

from __future__ import annotations

from collections import Counter

from feedback.errors import APIError
from serve.gateway.quota import MINUTE, Quota


class TurnSlot:
    """A chat turn's place among the requests in flight, handed out by ``Slots.admit``.

    The slots held are the gateway's one count of turns in flight: the total (what a
    drain waits for), per adapter (what a hot swap waits for), per client (its fair share)
    and the Prometheus gauge are all read from it. ``release`` gives the slots back once;
    later calls do nothing, so whichever path ends a turn may call it.
    """

    def __init__(self, slots: Slots, adapter: str, client: str, weight: int):
        self._slots, self.adapter, self.client, self.weight = slots, adapter, client, weight
        self.released = False
        slots.adapters[adapter] += weight
        slots.clients[client] += weight

    def release(self) -> None:
        if self.released:
            return
        self.released = True
        self._slots.adapters[self.adapter] -= self.weight
        self._slots.clients[self.client] -= self.weight
        if self._slots.clients[self.client] <= 0:
            del self._slots.clients[self.client]  # idle clients (browser sessions) cost nothing


class Slots:
    def __init__(self, config):
        self.config = config
        self.adapters: Counter[str] = Counter()  # adapter -> slots held by its turns
        self.clients: Counter[str] = Counter()   # client -> slots held by its turns
        self.rate = Quota({}, "Request rate limit", "client", "rate_limit_exceeded")

    @property
    def total(self) -> int:
        return sum(self.adapters.values())

    def admit(self, adapter: str, client: str, weight: int = 1) -> TurnSlot:
        """Slots for one chat turn of ``client`` on ``adapter``, or an ``APIError``: 400 when
        ``weight`` is over a limit outright, 429 (with Retry-After) when there is no room now
        or the client's request rate is spent. Nothing is held or counted when refused."""
        config = self.config
        limit, per_client = config.max_in_flight, config.key_max_in_flight
        widest = min(limit, per_client) if per_client > 0 else limit
        if weight > widest:
            raise APIError(400, f"n={weight} is more answers than this server decodes at once for one client "
                                f"(limit {widest}); ask for fewer.", param="n")
        if self.total + weight > limit:
            raise APIError(429, f"Too many requests in flight (limit {limit}); retry shortly.",
                           headers=self.retry_after())
        held = self.clients.get(client, 0)
        if per_client > 0 and held + weight > per_client:
            raise APIError(429, f"This client has {held} answers in flight and may have {per_client} at once "
                                f"(n counts as n); retry shortly.", code="concurrency_limit_exceeded",
                           headers=self.retry_after())
        per_minute = config.key_requests_minute
        self.rate.limits = {MINUTE: per_minute} if per_minute > 0 else {}
        self.rate.take(client)  # counted last: a request refused above does not use up the client's rate
        return TurnSlot(self, adapter, client, weight)

    def retry_after(self) -> dict[str, str]:
        """The header that tells a refused caller when to come back. A constant, not an estimate:
        with N requests in flight a slot frees every (request latency / N) seconds, under a second
        at any useful N, and Retry-After counts whole seconds."""
        return {"Retry-After": str(self.config.retry_after)}
