"""Prometheus metrics of the gateway, per persona and adapter version.

Each gateway app has its own registry, so several apps (tests, benchmarks)
can live in one process.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

LATENCY_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1, 2, 4, 8, 16, 32, 64, 128)


class Metrics:
    def __init__(self):
        self.registry = CollectorRegistry()
        labels = ["persona", "adapter"]
        self.requests = Counter("persona_requests", "Chat requests answered", labels + ["status"],
                                registry=self.registry)
        self.errors = Counter("persona_errors", "Requests answered with an error", ["route", "code"],
                              registry=self.registry)
        self.ttft = Histogram("persona_time_to_first_token_seconds", "Time to the first answer token", labels,
                              buckets=LATENCY_BUCKETS, registry=self.registry)
        self.latency = Histogram("persona_request_seconds", "Whole request time", labels,
                                 buckets=LATENCY_BUCKETS, registry=self.registry)
        self.tokens = Counter("persona_tokens", "Tokens processed", labels + ["kind"], registry=self.registry)
        # Read from the gateway's turn slots when scraped (Gateway sets its function), not kept here.
        self.in_flight = Gauge("persona_in_flight_requests", "Chat answers being decoded (a request with n counts n)",
                               registry=self.registry)

    def render(self) -> bytes:
        return generate_latest(self.registry)
