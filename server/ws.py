"""The WebSocket endpoint `/v1/ws`: one connection, many requests in flight.

Per connection, worker tasks read frames and serve them: each worker takes the next frame from
the socket, starts one more worker if nobody else is left listening, serves the request and
sends the reply itself through the connection's `Outbox`, then listens again. So a request costs
no hand-off between tasks, and a connection has as many workers as it has requests in flight.
Bounds: at most `max_in_flight_per_connection` workers (once all are busy nobody reads, so a
flooding client is slowed by TCP back-pressure), and at most `OUTGOING_FRAMES` frames wait to be
sent. Frames larger than the frame limit are closed with 1009 by the server before they reach us.

A client that does not read its replies: a worker reads the next request only while the
connection's pending reply bytes (`server.reply_budget`: queued in the outbox, or reserved by
requests being served) leave room under `max_pending_reply_bytes`, so past it nobody reads and
TCP holds the client back; a socket that takes nothing for `stuck_close_s` while frames wait is
closed with 1013 (`server.ws_transport`). No reply larger than `max_frame_bytes` is sent: it is
answered `too_large` instead, with a hint to ask for less.

This is a plain ASGI app (`server.app` routes `/v1/ws` here ahead of Starlette): the request
path is the hot one, and Starlette's WebSocket wrappers and middleware around every receive and
send, a task per request and the hand-offs to a writer task cost more than the query's own
parsing and encoding did (py-spy of `load/query.py`).

Subscriptions: `subscribe` registers a subscriber (see `actors.subscriptions`), answers
`{"sub": id}`, replays `after_seq` from the log in the request's own task, then hands the
subscriber to the connection's push pump. The pump is one task per connection: it takes events
from every subscriber that has some (at most `PUMP_TAKE` at a time, round robin) and puts push
frames in the outbox. At most `PUSH_WINDOW` push frames wait there (a credit is taken per push
and given back once the frame is on the socket), so replies are never stuck behind a
wall of pushes, and when the socket is slow the subscribers' own bounded buffers are what fill up;
what overflows is reported as one `lagged` push per gap. A slow socket never blocks the
subscriptions actor. A subscription ends with
`unsubscribe`, with the connection, or (pushed as `{"event": "ended", "sub", "code", "reason"}`)
when the server ends it: the `EndReason`'s error gives `code` and `reason` (its collection was
dropped: `not_found`; the server stops: `unavailable`; ...).

The handshake must offer the `shoal.v1` subprotocol; one that does not is refused before it is
accepted: 400 with the JSON error body where the server can send an HTTP response to a
WebSocket handshake, else 403.
"""

from __future__ import annotations

import contextlib
import json
import logging
import time

import anyio
from anyio.abc import TaskGroup
from starlette.datastructures import Headers
from starlette.types import Message, Receive, Scope, Send

from actors.subscriber import ChangeEvent, EndReason, Item, Lagged, LeaveEvent, Subscriber, TopkEvent
from models.codec import Frame, FrameError, encode_error, encode_push, encode_reply
from models.config import Limits
from models.errors import (
    BadFrame,
    BadRequest,
    NotFound,
    RateLimited,
    ShoalError,
    TooLarge,
    Unauthorized,
    Unavailable,
    as_shoal_error,
)
from models.records import Hit
from models.reply_size import reply_too_large
from models.requests import Auth, Subscribe, Unsubscribe
from server.auth import Access, ApiKey, bearer
from server.deadlines import DeadlinePassed, SharedDeadlines
from server.ops import decode, execute, match_hit, parse
from server.outbox import Outbox
from server.reply_budget import ReplyBudget, vector_bytes_floor
from server.state import AppState
from server.ws_transport import close_now, unsent_bytes

SUBPROTOCOL = "shoal.v1"
OUTGOING_FRAMES = 1024
# Close codes: the client's replies stopped going out (it does not read them); try again later.
CLOSE_STUCK = 1013
PUMP_TAKE = 64
PUSH_WINDOW = 64


log = logging.getLogger("shoal.ws")


async def serve_websocket(state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
    """The ASGI app of `/v1/ws`: accept with the `shoal.v1` subprotocol, serve; a handshake that
    does not offer it is refused."""
    message = await receive()
    if message["type"] != "websocket.connect":
        return
    if SUBPROTOCOL not in (scope.get("subprotocols") or []):
        await refuse_handshake(scope, send, BadRequest(f"offer the WebSocket subprotocol {SUBPROTOCOL!r}"))
        return
    await send({"type": "websocket.accept", "subprotocol": SUBPROTOCOL})
    state.metrics.ws_connections.inc()
    try:
        await Connection(state, scope, receive, send).serve()
    finally:
        state.metrics.ws_connections.dec()


async def refuse_handshake(scope: Scope, send: Send, error: ShoalError) -> None:
    """Refuse a WebSocket handshake before accepting it: an HTTP response with the JSON error body
    where the server supports that extension, else a close (which the server answers with 403)."""
    if "websocket.http.response" in (scope.get("extensions") or {}):
        body = json.dumps({"error": error.to_wire()}, separators=(",", ":")).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        await send({"type": "websocket.http.response.start", "status": error.http_status, "headers": headers})
        await send({"type": "websocket.http.response.body", "body": body})
    else:
        await send({"type": "websocket.close", "code": 1008, "reason": error.message[:120]})


class _Late(BaseException):
    """A request's deadline passed: what its worker answers once it has left the cancelled
    deadline scope (see `Connection._worker`)."""

    def __init__(self, error: Unavailable, request_id: int | None, reserved: int, op: str, started: float) -> None:
        super().__init__(error.message)
        self.error, self.request_id, self.reserved, self.op, self.started = error, request_id, reserved, op, started


class Connection:
    def __init__(self, state: AppState, scope: Scope, receive: Receive, send: Send) -> None:
        self.state = state
        self._receive = receive
        limits = state.settings.limits
        self._send = send
        self._max_frame = limits.max_frame_bytes
        self._stuck_s = limits.stuck_close_s
        self._budget = ReplyBudget(limits.max_pending_reply_bytes)
        self._outbox = Outbox(
            send,
            OUTGOING_FRAMES,
            self._sent,
            stuck_after_s=limits.stuck_close_s,
            on_stuck=self._stuck,
            buffered=unsent_bytes(send),
        )
        self._max_workers = max(1, state.settings.limits.max_in_flight_per_connection)
        self._workers = 0
        self._listening = 0  # workers waiting for the next frame
        self._tasks: TaskGroup | None = None
        client = scope.get("client")
        self.caller = client[0] if client else "-"
        self.grant: ApiKey | None = None
        self.authenticated = not state.auth.enabled
        self.auth_failures = 0  # failed `auth` ops; at `ws_failures_close` the connection closes
        key = bearer(Headers(scope=scope).get("authorization"))
        if key is not None and state.auth.enabled:
            try:
                self.grant = state.auth.lookup(key, self.caller)
                self.authenticated = True
            except (Unauthorized, RateLimited):
                pass  # every op but `auth` answers unauthorized until a good key arrives
        self.subs: dict[str, Subscriber] = {}
        self._reserved = 0  # subscribes registering right now (counted against the limit)
        self._ready: dict[Subscriber, None] = {}  # live subscribers with events, in arrival order
        self._wake = anyio.Event()
        self._push_credits = anyio.Semaphore(PUSH_WINDOW)

    async def serve(self) -> None:
        try:
            async with anyio.create_task_group() as tg:
                self._tasks = tg
                tg.start_soon(self._pump)
                self._workers = 1
                await self._worker()
        finally:
            self._outbox.close()
            for sub in list(self.subs.values()):
                sub.close(EndReason.CONNECTION_CLOSED)
            self.subs.clear()

    async def _worker(self) -> None:
        """Read a frame, serve it, repeat; the first to see the client leave ends the connection.
        Requests are served under one deadline scope until a deadline cancels it (see
        `SharedDeadlines`); the late request's error is answered outside it, then a new one."""
        while True:
            late: _Late | None = None
            with SharedDeadlines(self.state) as deadlines:
                try:
                    await self._serve_frames(deadlines)
                    return  # the client left
                except _Late as caught:
                    late = caught  # leaves the cancelled scope before anything awaits again
            if late is not None:
                await self._reply(late.reserved, encode_error(late.request_id, late.error))
                self.state.metrics.served("ws", late.op, late.error.code, time.perf_counter() - late.started)

    async def _serve_frames(self, deadlines: SharedDeadlines) -> None:
        """Serve frames until the client leaves. Raises _Late when a request's deadline passed."""
        assert self._tasks is not None
        receive = self._receive
        budget = self._budget
        while True:
            self._listening += 1
            try:
                if not budget.has_room():  # the client is not reading its replies: neither do we
                    await budget.wait_for_room()
                message = await receive()
            finally:
                self._listening -= 1
            if message["type"] != "websocket.receive":  # websocket.disconnect
                self._tasks.cancel_scope.cancel()
                return
            if not self._listening and self._workers < self._max_workers:
                # Nobody else reads while this request is served: one more worker will.
                self._workers += 1
                self._tasks.start_soon(self._worker)
            await self._on_frame(message, deadlines)

    async def _on_frame(self, message: Message, deadlines: SharedDeadlines) -> None:
        # Room for the reply is reserved before anything awaits (a large frame is decoded in a
        # thread), so the worker started meanwhile sees it when it decides whether to read on.
        budget = self._budget
        reserved = budget.reserve(0)
        data = message.get("bytes")
        if data is None:
            self._count("-", "bad_frame")
            await self._reply(reserved, encode_error(None, BadFrame("send binary frames holding one msgpack map")))
            return
        try:
            frame = await decode(data, self.state.settings.limits)
        except FrameError as exc:
            self._count("-", exc.error.code)
            await self._reply(reserved, encode_error(exc.request_id, exc.error))
            return
        op = frame.op if isinstance(frame.op, str) else "-"
        started = time.perf_counter()
        floor = vector_bytes_floor(frame.op, frame.args, self.state.engine.collection_dim)
        if floor > reserved:  # its shape promises more than a typical reply
            budget.add(floor - reserved)
            reserved = floor
        try:
            reply, code, sub = await self._serve(frame, deadlines)
        except DeadlinePassed as passed:
            raise _Late(passed.error, frame.request_id, reserved, op, started) from None
        if len(reply) > self._max_frame:
            code = TooLarge.code
            reply = encode_error(frame.request_id, reply_too_large(len(reply), self._max_frame))
        await self._reply(reserved, reply)
        self.state.metrics.served("ws", op, code, time.perf_counter() - started)
        if sub is not None:
            await self._replay(sub)

    async def _reply(self, reserved: int, reply: bytes) -> None:
        """Queue a reply in place of the room reserved for it."""
        self._budget.replace(reserved, len(reply))
        await self._outbox.put(reply)

    async def _queue(self, data: bytes) -> None:
        """Put a frame in the outbox, counted against the pending reply bytes until sent."""
        self._budget.add(len(data))
        await self._outbox.put(data)

    def _sent(self, data: bytes) -> None:
        self._budget.release(len(data))
        if isinstance(data, _Push):
            self._push_credits.release()

    def _stuck(self) -> None:
        """The socket took nothing for `stuck_close_s` while frames waited: close with 1013
        (written past the paused transport) and end the connection's tasks."""
        log.warning(
            "closing WebSocket of %s: no reply went out for %.1f s (%d reply bytes pending)",
            self.caller,
            self._stuck_s,
            self._budget.pending,
        )
        close_now(self._send, CLOSE_STUCK, "replies are not being read", self._stuck_s)
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()

    def _count(self, op: str, code: str) -> None:
        self.state.metrics.requests.labels("ws", op, code).inc()

    async def _serve(self, frame: Frame, deadlines: SharedDeadlines) -> tuple[bytes, str, Subscriber | None]:
        try:
            if not self.authenticated and frame.op != "auth":
                raise Unauthorized("authenticate first: send {op: auth, key} or an Authorization header")
            request = await parse(frame.op, frame.args, self.state.settings.limits, frame.size)
            auth = self.state.auth
            if isinstance(request, Auth):
                try:
                    self.grant = auth.lookup(request.key, self.caller)
                except (Unauthorized, RateLimited) as failed:
                    self.auth_failures += 1
                    if self.auth_failures == auth.ws_failures_close:  # 0: never
                        await self._close_policy_violation(encode_error(frame.request_id, failed))
                    raise
                self.authenticated = True
                self._end_unreadable_subs()
            auth.check(self.grant, self.caller, request)
            if isinstance(request, Subscribe):
                sub = await self._subscribe(request)
                return encode_reply(frame.request_id, {"sub": sub.id}), "ok", sub
            if isinstance(request, Unsubscribe):
                self._unsubscribe(request.sub)
                return encode_reply(frame.request_id, {}), "ok", None
            visible = None if self.grant is None else self.grant.collections
            deadlines.arm(frame.op, request)
            try:
                result = await execute(self.state.engine, request, compact=True, visible=visible)
            finally:
                deadlines.disarm()  # raises DeadlinePassed, which is no Exception
            return encode_reply(frame.request_id, result), "ok", None
        except Exception as exc:
            error = as_shoal_error(exc)
            if not isinstance(exc, ShoalError):
                log.exception("request %r failed", frame.op)
            return encode_error(frame.request_id, error), error.code, None

    # -- subscriptions ------------------------------------------------------------------------

    async def _subscribe(self, request: Subscribe) -> Subscriber:
        config = self.state.engine.subscription_config
        limit = config.max_subscriptions_per_connection
        if len(self.subs) + self._reserved >= limit:
            raise TooLarge(f"at most {limit} subscriptions per connection")
        if request.k is not None:
            lists = sum(1 for s in self.subs.values() if s.kind == "topk")
            if lists + self._reserved >= config.max_topk_per_connection:
                raise TooLarge(f"at most {config.max_topk_per_connection} top-k subscriptions per connection")
        self._reserved += 1
        try:
            sub = await self.state.engine.subscribe(request, close_on_overflow=False)
        finally:
            self._reserved -= 1
        self.subs[sub.id] = sub
        sub.waker = self._on_ready
        return sub

    def _end_unreadable_subs(self) -> None:
        """The connection's key changed: end (with an `ended` push, code `forbidden`) every
        subscription the new key may not read; none of its buffered matches is sent."""
        for sub in list(self.subs.values()):
            if not _may_read(self.grant, sub.collection):
                sub.close(EndReason.FORBIDDEN)

    def _unsubscribe(self, sub_id: str) -> None:
        sub = self.subs.pop(sub_id, None)
        if sub is None:
            raise NotFound(f"no subscription {sub_id!r} on this connection")
        sub.close(EndReason.UNSUBSCRIBED)
        self._ready.pop(sub, None)

    async def _replay(self, sub: Subscriber) -> None:
        """Send the matches of `after_seq < seq <= S` from the log, then let the pump go live."""
        try:
            while sub.replaying and not sub.closed:
                for event in await self.state.engine.replay_page(sub):
                    if sub.closed:
                        break
                    await self._send_push(sub, event)
        except ShoalError as exc:  # the collection is gone, or the log cannot be read
            sub.close(EndReason.REPLAY_FAILED, exc)
        if sub.closed and sub.replaying:
            # Ended before reaching the live point: what is buffered lies past a gap.
            if self.subs.pop(sub.id, None) is not None and sub.error is not None:
                await self._queue(_ended(sub, sub.error))
            return
        sub.go_live()

    def _on_ready(self, sub: Subscriber) -> None:
        self._ready[sub] = None
        self._wake.set()

    async def _pump(self) -> None:
        while True:
            await self._wake.wait()
            self._wake = anyio.Event()
            while self._ready:
                sub = next(iter(self._ready))
                del self._ready[sub]
                for item in sub.take(PUMP_TAKE):
                    await self._send_push(sub, item)
                if sub.pending and not _silenced(sub):
                    self._ready[sub] = None
                elif sub.closed and self.subs.pop(sub.id, None) is not None and sub.error is not None:
                    await self._queue(_ended(sub, sub.error))

    async def _send_push(self, sub: Subscriber, item: Item) -> None:
        """Queue a push within the connection's push window (waits while it is full); nothing once
        the subscription was unsubscribed (its reply may already be queued)."""
        if not self._push_credits.statistics().tasks_waiting and self._push_credits.value:
            self._push_credits.acquire_nowait()  # no checkpoint per frame while there is room
        else:
            await self._push_credits.acquire()
        if self._push_unwanted(sub):
            self._push_credits.release()
            return
        push = self._push(sub, item)
        if len(push) > self._max_frame:  # a match too large to push whole is reported dropped
            push = _Push(encode_push("lagged", {"sub": sub.id, "dropped": 1}))
        if not self._budget.fits(len(push)):  # the socket is slow: the subscriber buffers fill
            await self._budget.wait_for_room(len(push))
            if self._push_unwanted(sub):
                self._push_credits.release()
                return
        await self._queue(push)

    @staticmethod
    def _push_unwanted(sub: Subscriber) -> bool:
        """Unsubscribed or closed with the connection, or no longer readable by its key."""
        return _silenced(sub) or sub.reason is EndReason.FORBIDDEN

    @staticmethod
    def _push(sub: Subscriber, item: Item) -> _Push:
        if isinstance(item, Lagged):
            return _Push(encode_push("lagged", {"sub": sub.id, "dropped": item.dropped}))
        assert not isinstance(item, ChangeEvent), "WebSocket subscriptions carry matches only"
        if isinstance(item, LeaveEvent):
            return _Push(encode_push("leave", {"sub": sub.id, "seq": item.seq, "id": item.id}))
        if isinstance(item, TopkEvent):
            hits = Hit.many_to_wire(list(item.hits), sub.include, True)
            return _Push(encode_push("topk", {"sub": sub.id, "seq": item.seq, "hits": hits}))
        body = {"sub": sub.id, "seq": item.seq, "op": "upsert", "hit": match_hit(item, sub.include, compact=True)}
        return _Push(encode_push("match", body))

    async def _close_policy_violation(self, reply: bytes) -> None:
        """Send `reply`, then close with 1008 and end the connection (too many failed `auth`s)."""
        await self._outbox.put(reply)
        self._outbox.closed = True  # the reply to this frame, and anything later, is dropped
        with contextlib.suppress(RuntimeError, OSError):  # the client is gone already
            await self._send({"type": "websocket.close", "code": 1008, "reason": "too many failed authentications"})
        if self._tasks is not None:
            self._tasks.cancel_scope.cancel()


def _silenced(sub: Subscriber) -> bool:
    """True once the consumer itself ended `sub` (unsubscribe, the connection closing): nothing
    of it is sent any more."""
    return sub.reason is not None and sub.reason.silent


def _ended(sub: Subscriber, error: ShoalError) -> bytes:
    """The `ended` push of a subscription the server ended, telling the client why."""
    return encode_push("ended", {"sub": sub.id, "code": error.code, "reason": error.message})


def _may_read(grant: ApiKey | None, collection: str) -> bool:
    """Whether `grant` (None: auth is off) may read `collection` (what `subscribe` needs)."""
    return grant is None or (grant.access >= Access.READ and grant.allows(collection))


class _Push(bytes):
    """A push frame: the writer gives its credit back once it is sent."""

    __slots__ = ()


def connection_caps(limits: Limits) -> dict[str, tuple[str, int]]:
    """The fixed per-connection bounds, as constant gauges for the metrics (name -> help, value)."""
    return {
        "shoal_ws_in_flight_limit": (
            "Requests served at once per WebSocket connection at most",
            limits.max_in_flight_per_connection,
        ),
        "shoal_ws_outgoing_frames_limit": ("Frames waiting to be sent per WebSocket connection", OUTGOING_FRAMES),
        "shoal_ws_push_window_limit": ("Push frames waiting to be sent per WebSocket connection", PUSH_WINDOW),
        "shoal_ws_pending_reply_bytes_limit": (
            "Reply bytes pending per WebSocket connection before its requests are no longer read",
            limits.max_pending_reply_bytes,
        ),
    }
