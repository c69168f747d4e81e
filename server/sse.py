"""Server-Sent Events: `GET /v1/collections/{name}/subscribe` and `GET /v1/collections/{name}/changes`.

Every parameter is checked, the caller authenticated and the subscriber registered *before* the
response starts, so a bad request gets a 400 (or 401/403/404/503) JSON error body
`{"error": {"code", "message"}}` rather than a broken stream. Then the stream:

    retry: 2000                  (first, at once: the stream is live from here)
    id: <seq>                    one block per event; `id` is the resume point
    event: match | upsert | delete | lagged
    data: <one line of JSON>
    : ping                       a comment whenever `heartbeat_s` has passed since the last one

Resume: `Last-Event-ID` (or `last_event_id`, the header winning when both are given) replays
every event with a larger seq from the durable log, then goes live (see `actors.subscriptions`).
A stream whose reader falls `sub_buffer` events behind is closed after a final
`event: lagged` block (`data: {"dropped": n}`, no `id`), so that the client reconnects from its
last id. A stream that ends for another reason (collection dropped, server stopping) ends with
`event: error`, `data: {"error": {"code", "message"}}`.

Why a small response class here rather than `sse-starlette`: an SSE stream is a handful of bytes
per event, and what matters is around it — replay before live, a per-subscriber buffer that
closes the stream on overflow, a grace deadline on a send that a stalled reader blocks, the
heartbeat counted from the last comment. Those all live in the loop below; a library would add
its own ping task and shutdown handling on top of them and a dependency for ~60 lines. The body
races the client's disconnect in one task group, as Starlette's `StreamingResponse` does, so a
disconnect ends the stream's task at once.
"""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Iterator, Mapping
from typing import Any

import anyio
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector
from starlette.datastructures import QueryParams
from starlette.requests import Request
from starlette.responses import Response
from starlette.types import Receive, Scope, Send

from actors.subscriber import ChangeEvent, EndReason, Item, Lagged, LeaveEvent, MatchEvent, Subscriber, TopkEvent
from actors.supervisor import Engine
from models import requests as rq
from models.errors import BadRequest, ShoalError, as_shoal_error
from models.records import Hit
from server.auth import bearer
from server.edge import RAW_SEND
from server.ops import match_hit
from server.state import AppState

log = logging.getLogger("shoal.sse")

RETRY_MS = 2000
TAKE = 256  # events written per send at most
PING_AT = 0.75  # a ping is due this fraction of the heartbeat after the last one
HEADERS = [
    (b"content-type", b"text/event-stream"),
    (b"cache-control", b"no-cache"),
    (b"x-accel-buffering", b"no"),  # tell proxies not to buffer the stream
]
SUBSCRIBE_PARAMS = frozenset(
    {"text", "vector", "like", "threshold", "k", "where", "where_text", "include", "last_event_id", "key"}
)
CHANGES_PARAMS = frozenset({"last_event_id", "key"})


class SSEState:
    """The open streams of this server, and the one task that keeps their heartbeats."""

    def __init__(self, heartbeat_s: float) -> None:
        self.heartbeat = max(0.05, heartbeat_s)
        self.streams: set[EventStream] = set()

    @property
    def open_streams(self) -> int:
        return len(self.streams)

    async def heartbeats(self) -> None:
        """Every quarter heartbeat, wake the streams whose ping is due (due at 3/4 of the
        interval, so each one pings at least every `heartbeat_s`)."""
        while True:
            await anyio.sleep(self.heartbeat * (1 - PING_AT))
            now = time.monotonic()
            for stream in list(self.streams):
                if stream.next_ping <= now:
                    stream.sub.nudge()


# --- parameters ----------------------------------------------------------------------------------


def _single(params: QueryParams, allowed: frozenset[str]) -> dict[str, str]:
    out: dict[str, str] = {}
    for key in params:
        if key not in allowed:
            raise BadRequest(f"unknown query parameter {key!r}")
        values = params.getlist(key)
        if len(values) != 1:
            raise BadRequest(f"query parameter {key!r} given {len(values)} times")
        out[key] = values[0]
    return out


def _json(raw: str, name: str) -> Any:
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise BadRequest(f"'{name}' must be JSON") from exc


def _number(raw: str, name: str, *, finite: bool = True) -> float:
    try:
        value = float(raw)
    except ValueError as exc:
        raise BadRequest(f"'{name}' must be a number") from exc
    if finite and not math.isfinite(value):
        raise BadRequest(f"'{name}' must be a finite number")
    return value


def _resume_point(params: Mapping[str, str], request: Request) -> int | None:
    """The seq to resume after: the Last-Event-ID header (a browser's reconnect) wins over the
    `last_event_id` parameter (the first connect)."""
    header = request.headers.get("last-event-id", "").strip()
    raw = header or params.get("last_event_id", "").strip()
    if not raw:
        return None
    # ASCII digits only, and few enough for a 64-bit seq (int() refuses very long digit strings).
    if not (raw.isascii() and raw.isdigit()) or len(raw) > 19 or int(raw) >= 2**63:
        raise BadRequest("Last-Event-ID / last_event_id must be a non-negative 64-bit integer seq")
    return int(raw)


def parse_subscribe(name: str, request: Request, state: AppState) -> rq.Subscribe:
    """The query string as a subscribe request, validated like the WebSocket op. Raises BadRequest,
    TooLarge, InvalidVector."""
    params = _single(request.query_params, SUBSCRIBE_PARAMS)
    args: dict[str, Any] = {"collection": name}
    for key in ("text", "like"):
        if key in params:
            args[key] = params[key]
    if "vector" in params:
        # NaN / inf are left to the vector check, which answers invalid_vector on every transport.
        args["vector"] = [_number(x, "vector", finite=False) for x in params["vector"].split(",") if x.strip()]
    if "threshold" in params:
        args["threshold"] = _number(params["threshold"], "threshold")
    if "k" in params:
        raw = params["k"].strip()
        if not (raw.isascii() and raw.isdigit()) or len(raw) > 6:
            raise BadRequest("'k' must be an integer 1..100")
        args["k"] = int(raw)
    for key in ("where", "where_text"):
        if key in params:
            args[key] = _json(params[key], key)
    if "include" in params:
        args["include"] = [x.strip() for x in params["include"].split(",") if x.strip()]
    after = _resume_point(params, request)
    if after is not None:
        args["after_seq"] = after
    parsed = rq.parse_request("subscribe", args, state.settings.limits)
    assert isinstance(parsed, rq.Subscribe)
    return parsed


def _authorize(request: Request, state: AppState, params: QueryParams, access: rq.Request) -> None:
    # EventSource cannot set headers, so a browser may pass its key as `key=` instead.
    key = bearer(request.headers.get("authorization")) or params.get("key")
    caller = request.client.host if request.client else "-"
    grant = state.auth.lookup(key, caller)
    state.auth.check(grant, caller, access)


def _head(sub: Subscriber) -> Response:
    """HEAD: what a GET would start with (every check passed), without the stream."""
    sub.close(EndReason.DISCONNECTED)
    return Response(headers={k.decode(): v.decode() for k, v in HEADERS})


# --- endpoints -----------------------------------------------------------------------------------


def _error(exc: BaseException) -> Response:
    error = as_shoal_error(exc)
    if not isinstance(exc, ShoalError):
        log.exception("SSE request failed")
    body = json.dumps({"error": error.to_wire()}, separators=(",", ":"))
    return Response(body, status_code=error.http_status, media_type="application/json")


async def subscribe(request: Request) -> Response | EventStream:
    state: AppState = request.app.state.shoal
    name = request.path_params["name"]
    try:
        # Authenticate before looking at parameters: a caller without a key learns nothing.
        # A subscribe needs what a count of the collection needs (read access).
        _authorize(request, state, request.query_params, rq.Count(name))
        req = parse_subscribe(name, request, state)
        sub = await state.engine.subscribe(req, close_on_overflow=True)
    except Exception as exc:
        state.metrics.requests.labels("sse", "subscribe", as_shoal_error(exc).code).inc()
        return _error(exc)
    state.metrics.requests.labels("sse", "subscribe", "ok").inc()
    return _head(sub) if request.method == "HEAD" else EventStream(sub, state, request.app.state.sse)


async def changes(request: Request) -> Response | EventStream:
    state: AppState = request.app.state.shoal
    name = request.path_params["name"]
    try:
        # Reading the change feed needs the access a count of the collection needs; checked
        # before the parameters, so a caller without a key learns nothing.
        _authorize(request, state, request.query_params, rq.Count(name))
        params = _single(request.query_params, CHANGES_PARAMS)
        if not rq.COLLECTION_NAME.fullmatch(name):
            raise BadRequest("the collection name must match [A-Za-z0-9_-]{1,64}")
        sub = await state.engine.changes(name, _resume_point(params, request))
    except Exception as exc:
        state.metrics.requests.labels("sse", "changes", as_shoal_error(exc).code).inc()
        return _error(exc)
    state.metrics.requests.labels("sse", "changes", "ok").inc()
    return _head(sub) if request.method == "HEAD" else EventStream(sub, state, request.app.state.sse)


# --- encoding --------------------------------------------------------------------------------------


def _dumps(obj: object) -> str:
    # One line: json.dumps escapes newlines inside strings, and adds none without `indent`.
    return json.dumps(obj, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


def encode_item(item: Item, include: frozenset[Any]) -> bytes:
    """One event block. Identical match payloads (same document, include and score) are encoded
    once and shared by every stream that sends them."""
    if isinstance(item, MatchEvent):
        key = ("sse", include, item.score, item.distance)
        cached = item.upserted.wire_cache.get(key)
        if cached is None:
            data = _dumps({"seq": item.seq, "op": "upsert", "hit": match_hit(item, include, compact=False)})
            cached = item.upserted.wire_cache[key] = f"id: {item.seq}\nevent: match\ndata: {data}\n\n".encode()
        return cached
    if isinstance(item, LeaveEvent):
        data = _dumps({"seq": item.seq, "id": item.id})
        return f"id: {item.seq}\nevent: leave\ndata: {data}\n\n".encode()
    if isinstance(item, TopkEvent):
        data = _dumps({"seq": item.seq, "hits": Hit.many_to_wire(list(item.hits), include, False)})
        return f"id: {item.seq}\nevent: topk\ndata: {data}\n\n".encode()
    if isinstance(item, ChangeEvent):
        data = _dumps({"op": item.op, "seq": item.seq, "first_seq": item.first_seq, "ids": list(item.ids)})
        return f"id: {item.seq}\nevent: {item.op}\ndata: {data}\n\n".encode()
    return f"event: lagged\ndata: {_dumps({'dropped': item.dropped})}\n\n".encode()


# --- the stream ----------------------------------------------------------------------------------


class EventStream:
    """The ASGI response of one SSE stream; owns its subscriber and closes it when done.

    Per stream: this task and one that waits for the disconnect. Waking is cheap on purpose —
    10,000 streams wake for one document — so the body waits on its subscriber alone (no timer
    per wait): heartbeats come from `SSEState.heartbeats`, one task that wakes the streams due a
    ping. One cancel scope spans the stream; closing the subscriber gives it `sse_send_grace_s`
    to finish (a reader that stalled cannot block its stream's task for longer).
    """

    def __init__(self, sub: Subscriber, state: AppState, sse: SSEState) -> None:
        self.sub = sub
        self.engine: Engine = state.engine
        self.heartbeat = sse.heartbeat
        self.grace = self.engine.subscription_config.sse_send_grace_s
        self.sse = sse
        self.scope: anyio.CancelScope | None = None
        self.next_ping = 0.0
        sub.close_hooks.append(self._on_close)

    def _on_close(self, sub: Subscriber) -> None:
        if self.scope is not None:
            self.scope.deadline = min(self.scope.deadline, anyio.current_time() + self.grace)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        self.sse.streams.add(self)
        try:
            with anyio.CancelScope() as self.scope:
                if self.sub.closed:
                    self._on_close(self.sub)
                await send({"type": "http.response.start", "status": 200, "headers": HEADERS})
                # The start went through the middleware (CORS headers, error handling); the
                # events go straight to the server (see `server.edge.Edge`).
                send = scope.get(RAW_SEND, send)
                async with anyio.create_task_group() as tg:
                    tg.start_soon(self._watch_disconnect, receive, tg.cancel_scope)
                    try:
                        await self._body(send)
                    finally:
                        tg.cancel_scope.cancel()
            if self.scope.cancelled_caught:
                log.info("SSE stream %s: the reader stalled after it closed (%s)", self.sub.id, self.sub.reason)
        finally:
            self.sub.close(EndReason.DISCONNECTED)
            self.sse.streams.discard(self)

    @staticmethod
    async def _watch_disconnect(receive: Receive, scope: anyio.CancelScope) -> None:
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                scope.cancel()
                return

    async def _write(self, send: Send, chunk: bytes) -> None:
        now = time.monotonic()
        if now >= self.next_ping:
            chunk = b": ping\n\n" + chunk
            self.next_ping = now + self.heartbeat * PING_AT
        if chunk:
            await send({"type": "http.response.body", "body": chunk, "more_body": True})

    async def _body(self, send: Send) -> None:
        sub = self.sub
        self.next_ping = time.monotonic() + self.heartbeat * PING_AT
        await self._write(send, f"retry: {RETRY_MS}\n\n".encode())
        try:
            while sub.replaying and not sub.closed:
                page = await self.engine.replay_page(sub)
                await self._write(send, b"".join(encode_item(e, sub.include) for e in page))
        except ShoalError as exc:  # the collection is gone, or the log cannot be read
            sub.close(EndReason.REPLAY_FAILED, exc)
        if sub.replaying:
            # Closed before the replay reached the live point: what is buffered lies past a gap.
            return await self._finish(send)
        sub.go_live()
        include = sub.include
        while True:
            items = sub.take(TAKE)
            if items:
                lagged = False
                chunks = []
                for item in items:
                    chunks.append(encode_item(item, include))
                    lagged = lagged or isinstance(item, Lagged)
                await self._write(send, chunks[0] if len(chunks) == 1 else b"".join(chunks))
                if lagged and sub.kind != "topk":  # a list is whole: after lagged, the newest follows
                    sub.close(EndReason.LAGGED)
                    break
                continue
            if sub.closed:
                break
            if time.monotonic() >= self.next_ping:
                await self._write(send, b"")
            await sub.wait()  # an event, the close, or the heartbeat task's nudge
        await self._finish(send)

    async def _finish(self, send: Send) -> None:
        sub = self.sub
        if sub.reason is EndReason.LAGGED:
            await self._write(send, encode_item(Lagged(sub.dropped_total), frozenset()))
        elif sub.error is not None:  # the collection was dropped, the server is stopping, ...
            error = {"error": {"code": sub.error.code, "message": sub.error.message}}
            await self._write(send, f"event: error\ndata: {_dumps(error)}\n\n".encode())
        await send({"type": "http.response.body", "body": b"", "more_body": False})


# --- metrics ---------------------------------------------------------------------------------------


class SubscriptionCollector(Collector):
    """Subscription gauges and counters, read from the actor when /metrics is scraped."""

    def __init__(self, engine: Engine, sse: SSEState) -> None:
        self.engine = engine
        self.sse = sse

    def collect(self) -> Iterator[Metric]:
        stats = self.engine.subscription_stats()
        subs = GaugeMetricFamily("shoal_subscriptions", "Registered subscribers, by kind", labels=["kind"])
        subs.add_metric(["match"], stats.subscriptions)
        subs.add_metric(["changes"], stats.feeds)
        subs.add_metric(["topk"], stats.topk)
        yield subs
        yield GaugeMetricFamily("shoal_sse_streams", "Open Server-Sent Events streams", value=self.sse.open_streams)
        yield GaugeMetricFamily(
            "shoal_subscription_queue", "Applied batches waiting for the subscriptions actor", value=stats.queued
        )
        counters = {
            "shoal_subscription_batches": ("Vectorised matching steps (one per batch and collection)", stats.batches),
            "shoal_subscription_pairs_scored": ("Document x standing query pairs scored", stats.pairs_scored),
            "shoal_subscription_matches": ("Matches handed to subscriber buffers", stats.matches),
            "shoal_subscription_dropped": ("Events dropped for subscribers whose buffer was full", stats.dropped),
            "shoal_subscription_lagged_closes": ("Subscribers closed for falling behind", stats.lagged_closes),
            "shoal_subscription_mailbox_overflows": (
                "Applied batches not queued (mailbox full); recovered from the log",
                stats.mailbox_overflows,
            ),
            "shoal_subscription_catch_ups": ("Reads of the durable log to fill a gap", stats.catch_ups),
            "shoal_subscription_leaves": ("Leave events handed to subscriber buffers", stats.leaves),
            "shoal_subscription_topk_pushes": ("Top-k lists handed to subscriber buffers", stats.topk_pushes),
            "shoal_subscription_topk_refills": ("Top-k lists made or refilled by a query", stats.topk_refills),
        }
        for name, (doc, value) in counters.items():
            yield CounterMetricFamily(name, doc, value=value)
