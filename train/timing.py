"""Seconds spent in named parts of a long job (a run's phases, a simulated round's parts).

    phases = Phases()
    with phases("train"):
        ...
    phases.seconds  # {"train": 162.7}
"""

from __future__ import annotations

import time
from contextlib import contextmanager


class Phases:
    """Seconds spent in each named phase: ``with phases("train"): ...`` (a phase entered
    twice adds up)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}

    @contextmanager
    def __call__(self, name: str):
        started = time.monotonic()
        try:
            yield
        finally:
            self.seconds[name] = round(self.seconds.get(name, 0.0) + time.monotonic() - started, 1)
