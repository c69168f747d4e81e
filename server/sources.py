"""`GET /v1/sources` and the sources' metrics: what each broker source is doing, read without
waiting on it (`SourceActor.status()`).

A source is not the server's health: a broker that is down leaves `/readyz` at 200 (the server
still serves reads and writes); it shows here, in `/metrics` (`shoal_source_up`) and in the log.
With auth on, reading this needs the key that may read `/metrics` (it names streams and errors).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.requests import Request
from starlette.responses import JSONResponse, Response

from actors.sources.status import SourceState, SourceStatus
from actors.supervisor import Engine
from models.errors import ShoalError
from server.auth import bearer
from server.state import AppState

_INT = {"type": "integer", "minimum": 0}
_TEXT = {"type": "string"}
SOURCE_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {
        "url": {"type": "string", "description": "the source URL without credentials"},
        "stream": _TEXT,
        "group": _TEXT,
        "consumer": _TEXT,
        "notify": {"type": "string", "description": "the stream completion events go to"},
        "state": {"enum": [state.value for state in SourceState]},
        "processed": {**_INT, "description": "entries committed and indexed since start"},
        "rejected": {**_INT, "description": "entries rejected with an error code since start"},
        "skipped": {**_INT, "description": "entries delivered again after their commit, skipped"},
        "retries": {**_INT, "description": "sessions that failed (broker or database outage)"},
        "lag": {"type": ["integer", "null"], "description": "entries the group has not read yet"},
        "in_flight": _INT,
        "max_in_flight": _INT,
        "position": {"type": "string", "description": "the last entry committed (or rejected)"},
        "last_error": {"type": ["string", "null"]},
        "last_error_at": {"type": ["number", "null"], "description": "Unix time"},
    },
}
OPENAPI_PATH: dict[str, Any] = {
    "get": {
        "operationId": "list_sources",
        "summary": "broker sources: state, entries processed / rejected, lag, last error",
        "responses": {
            "200": {
                "description": "one object per --source, in the order given",
                "content": {
                    "application/json": {
                        "schema": {
                            "type": "object",
                            "properties": {"sources": {"type": "array", "items": SOURCE_SCHEMA}},
                        }
                    }
                },
            },
            "default": {
                "description": "error",
                "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
            },
        },
    }
}


def status_to_wire(status: SourceStatus) -> dict[str, Any]:
    return {
        "url": status.url,
        "stream": status.stream,
        "group": status.group,
        "consumer": status.consumer,
        "notify": status.notify,
        "state": status.state.value,
        "processed": status.processed,
        "rejected": status.rejected,
        "skipped": status.skipped,
        "retries": status.retries,
        "lag": status.lag,
        "in_flight": status.in_flight,
        "max_in_flight": status.max_in_flight,
        "position": status.position,
        "last_error": status.last_error,
        "last_error_at": status.last_error_at,
    }


async def list_sources(request: Request) -> Response:
    """`{"sources": [...]}`, one object per `--source`, in the order given."""
    state: AppState = request.app.state.shoal
    if state.auth.enabled:
        try:
            caller = request.client.host if request.client else "-"
            state.auth.check_metrics(state.auth.lookup(bearer(request.headers.get("authorization")), caller))
        except ShoalError as exc:
            return JSONResponse({"error": exc.to_wire()}, status_code=exc.http_status)
    return JSONResponse({"sources": [status_to_wire(source.status()) for source in state.engine.sources]})


class SourcesCollector(Collector):
    """Per source (labels `stream`, `group`): entries processed / rejected / skipped, retries,
    lag, entries in flight and their bound, and whether it is consuming."""

    def __init__(self, engine: Engine) -> None:
        self.engine = engine

    def collect(self) -> Iterator[Metric]:
        labels = ["stream", "group"]
        counters = {
            "processed": CounterMetricFamily("shoal_source_processed", "Entries committed and indexed", labels=labels),
            "rejected": CounterMetricFamily("shoal_source_rejected", "Entries rejected with an error", labels=labels),
            "skipped": CounterMetricFamily(
                "shoal_source_skipped", "Entries delivered again after their commit, skipped", labels=labels
            ),
            "retries": CounterMetricFamily(
                "shoal_source_retries", "Sessions that failed (broker or database outage)", labels=labels
            ),
        }
        up = GaugeMetricFamily("shoal_source_up", "1 while the source consumes its stream", labels=labels)
        state = GaugeMetricFamily(
            "shoal_source_state", "1 for the state the source is in, 0 for the others", labels=[*labels, "state"]
        )
        lag = GaugeMetricFamily("shoal_source_lag", "Entries of the stream not read by the group yet", labels=labels)
        in_flight = GaugeMetricFamily("shoal_source_in_flight", "Entries read and not acknowledged yet", labels=labels)
        limit = GaugeMetricFamily("shoal_source_in_flight_limit", "Bound of shoal_source_in_flight", labels=labels)
        for source in self.engine.sources:
            status = source.status()
            values = [status.stream, status.group]
            for field, family in counters.items():
                family.add_metric(values, getattr(status, field))
            up.add_metric(values, 1 if status.state is SourceState.RUNNING else 0)
            for each in SourceState:
                state.add_metric([*values, each.value], 1 if status.state is each else 0)
            if status.lag is not None:
                lag.add_metric(values, status.lag)
            in_flight.add_metric(values, status.in_flight)
            limit.add_metric(values, status.max_in_flight)
        yield from counters.values()
        yield from (up, state, lag, in_flight, limit)
