"""Quotas: at most so many events a minute (or a day) per caller, in sliding windows.
Votes per voter (an API key's fingerprint, ``user:<login>`` in the UI, or the UI's one
voter ``ui`` without logins), and chat requests per client (``slots.py``).

    quota = VoteQuota({60: 120, 86400: 2000})
    quota.take("key:ab12...")          # counts one vote, or raises a 429 with Retry-After
    rate = Quota({60: 600}, "Request rate limit", "client", "rate_limit_exceeded")

The loop trains on votes, so one runaway script or one stuck button must not fill
the store with them. A sliding window per voter and limit (the times of its recent
votes), kept in memory: it resets when the gateway restarts, which is enough for
that purpose, and a single gateway owns the store anyway.

What counts is every vote that gets past the key and body checks, before the store
looks at it: a refused one (an unknown turn) and a repeat answered ``unchanged``
too. The quota bounds what a voter makes the store do, and a repeat costs the same
lookup as a new vote; a client retrying a vote it is unsure of stays far below it.
Counting before the outcome is known also means a slot is never given back.
"""

from __future__ import annotations

import math
import time
from collections import deque
from typing import Callable

from feedback.errors import APIError

MINUTE, DAY = 60.0, 86400.0


class Quota:
    """Sliding windows per caller; ``what``, ``whose`` and ``code`` word the 429
    ("Vote quota reached for this voter ...")."""

    def __init__(self, limits: dict[float, int], what: str, whose: str, code: str,
                 clock: Callable[[], float] = time.monotonic):
        self.limits = {window: n for window, n in limits.items() if n > 0}  # 0 = no limit
        self.what, self.whose, self.code = what, whose, code
        self.clock = clock
        self._times: dict[tuple[str, float], deque[float]] = {}  # (caller, window) -> event times, oldest first

    def take(self, voter: str) -> None:
        """Count one event for ``voter``; past a limit, a 429 saying when a slot frees
        (nothing counted then, so a refused caller does not push its own wait further)."""
        now = self.clock()
        wait = max((self._wait(voter, window, limit, now) for window, limit in self.limits.items()), default=0.0)
        if wait > 0:
            raise APIError(429, f"{self.what} reached for this {self.whose} ({self._describe()}); retry in "
                                f"{math.ceil(wait)} s.", code=self.code,
                           headers={"Retry-After": str(max(1, math.ceil(wait)))})
        for window in self.limits:
            self._times.setdefault((voter, window), deque()).append(now)

    def _wait(self, voter: str, window: float, limit: int, now: float) -> float:
        """Seconds until ``voter`` may vote again within ``window`` (0: now)."""
        times = self._times.get((voter, window))
        if times is None:
            return 0.0
        while times and times[0] <= now - window:
            times.popleft()
        if not times:
            del self._times[(voter, window)]  # idle voters cost nothing
            return 0.0
        if len(times) < limit:
            return 0.0
        return times[len(times) - limit] + window - now  # when the vote that fills the window leaves it

    def _describe(self) -> str:
        names = {MINUTE: "a minute", DAY: "a day"}
        return ", ".join(f"{n} {names.get(w, f'per {w:g} s')}" for w, n in sorted(self.limits.items()))


class VoteQuota(Quota):
    """Votes (thumbs and side by side) per voter."""

    def __init__(self, limits: dict[float, int], clock: Callable[[], float] = time.monotonic):
        super().__init__(limits, "Vote quota", "voter", "vote_quota_exceeded", clock)
