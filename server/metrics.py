"""Prometheus metrics of one server instance (own registry, so several apps can share a process)."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from models.requests import PARSERS

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        self.requests = Counter(
            "shoal_requests",
            "Requests served, by transport, op and result code",
            ["transport", "op", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shoal_request_seconds",
            "Time to serve a request, by op",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ws_connections = Gauge(
            "shoal_ws_connections", "Open WebSocket connections", registry=self.registry
        )
        self.documents = Gauge(
            "shoal_documents", "Documents per collection", ["collection"], registry=self.registry
        )
        self.ingest_queue = Gauge(
            "shoal_ingest_queue", "Write jobs waiting in the ingest mailbox", registry=self.registry
        )
        self.ready = Gauge("shoal_ready", "1 when the engine serves requests", registry=self.registry)

        # Labelled children looked up once: `labels()` per request showed in the query profile.
        self._served: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def served(self, transport: str, op: str, code: str, seconds: float) -> None:
        """Count one request and observe its latency; an unknown op counts as "-", so a client
        cannot create labels."""
        if op not in PARSERS:
            op = "-"
        key = (transport, op, code)
        children = self._served.get(key)
        if children is None:
            children = self._served[key] = (self.requests.labels(transport, op, code), self.latency.labels(op))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)
