"""The sans-I/O core of the WebSocket client: bytes in, typed happenings out. No sockets, no asyncio.

`ClientProtocol` numbers requests, remembers which are in flight, turns each received frame into
`Reply` / `Failure` / `Pushed` / `Unrouted` values, and routes subscription pushes into one bounded
`SubscriptionBuffer` per subscription. The I/O layer (`client.ws`) only moves bytes, resolves futures
and wakes consumers; everything that can be decided without a socket is decided here, so it is
tested with bytes alone.

Memory bound of a connection's push routing: each subscription buffer holds at most `queue_size`
events plus one lagged marker; pushes that arrive for a sub id before its subscribe reply are
kept (same bound per id) only while a subscribe request is in flight, and discarded once none is.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from shoal_client.codec import decode_frame, encode_request
from shoal_client.errors import ConnectionClosed, ProtocolError, error_from_wire
from shoal_client.types import LaggedEvent, SubscriptionEvent, TopkEvent, parse_push

DEFAULT_QUEUE_SIZE = 10_000


# --- what `receive` reports -----------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Reply:
    """Request `id` succeeded; `result` is the reply map without `id` and `ok`.

    For a subscribe, `buffer` is the new subscription's buffer, already routing pushes."""

    id: int
    op: str
    result: dict[str, Any]
    buffer: SubscriptionBuffer | None = None


@dataclass(frozen=True, slots=True)
class Failure:
    """Request `id` failed: `error` is the server's `ShoalError`, or a `ProtocolError` for a
    malformed reply."""

    id: int
    op: str
    error: Exception


@dataclass(frozen=True, slots=True)
class Pushed:
    """A push was queued in the buffer of subscription `sub` (wake its consumer)."""

    sub: str


@dataclass(frozen=True, slots=True)
class Unrouted:
    """A frame that belongs to no request: an error with `id: null`, a stray reply, a bad frame.

    Nothing waits for it; the I/O layer logs it. `error` is a `ShoalError` or a `ProtocolError`.
    """

    error: Exception


Happening = Reply | Failure | Pushed | Unrouted


# --- one subscription's bounded buffer ----------------------------------------------------------


class SubscriptionBuffer:
    """The bounded queue between the connection's reader and one subscription's consumer.

    The reader never waits for a consumer: when `maxsize` events are queued, a new match is dropped
    and counted, and the consumer later sees one `LaggedEvent(sub, dropped)` where the gap is (a
    server `lagged` push that cannot be queued adds its own count to that gap). Holds at most
    `maxsize` events plus one lagged marker.
    """

    __slots__ = ("_dropped_pending", "_events", "closed", "dropped_total", "error", "maxsize", "sub", "waker")

    def __init__(self, sub: str, maxsize: int = DEFAULT_QUEUE_SIZE) -> None:
        if maxsize < 1:
            raise ValueError("queue size must be at least 1")
        self.sub = sub
        self.maxsize = maxsize
        self._events: deque[SubscriptionEvent] = deque()
        self._dropped_pending = 0
        self.dropped_total = 0
        self.closed = False
        # Why the stream ended, when it did not end by the consumer's own close().
        self.error: Exception | None = None
        # Called whenever there is something new for the consumer (an event, or the end).
        self.waker: Callable[[], None] | None = None

    def __len__(self) -> int:
        return len(self._events)

    def push(self, event: SubscriptionEvent) -> bool:
        """Queue `event`; False if it was dropped (buffer full or closed)."""
        if self.closed:
            return False
        if len(self._events) >= self.maxsize and isinstance(event, TopkEvent):
            # A top-k list is whole: the queued lists it supersedes go, and it is kept.
            lost = self._dropped_pending + sum(
                e.dropped if isinstance(e, LaggedEvent) else 1
                for e in self._events
                if isinstance(e, TopkEvent | LaggedEvent)
            )
            kept = [e for e in self._events if not isinstance(e, TopkEvent | LaggedEvent)]
            self._events = deque([*kept, LaggedEvent(self.sub, lost), event])
            self._dropped_pending = 0
            self.dropped_total += lost
            self._wake()
            return True
        if len(self._events) >= self.maxsize:
            lost = event.dropped if isinstance(event, LaggedEvent) else 1
            self._dropped_pending += lost
            self.dropped_total += lost
            return False
        if self._dropped_pending:
            if isinstance(event, LaggedEvent):
                # Two gaps in a row are one gap.
                event = LaggedEvent(self.sub, self._dropped_pending + event.dropped)
            else:
                # The gap goes before the event that follows it.
                self._events.append(LaggedEvent(self.sub, self._dropped_pending))
            self._dropped_pending = 0
        self._events.append(event)
        self._wake()
        return True

    def pop(self) -> SubscriptionEvent | None:
        """The next event, or None when nothing is queued (then check `closed`)."""
        if self._events:
            return self._events.popleft()
        if self._dropped_pending:
            lagged = LaggedEvent(self.sub, self._dropped_pending)
            self._dropped_pending = 0
            return lagged
        return None

    def close(self, error: Exception | None = None) -> None:
        """End the stream: queued events stay readable, then the consumer sees the end (or `error`)."""
        if not self.closed:
            self.closed = True
            self.error = error
            self._wake()

    def adopt(self, early: SubscriptionBuffer) -> None:
        """Take over the events of a buffer that collected pushes before the sub id was known."""
        while (event := early.pop()) is not None:
            self.push(event)

    def _wake(self) -> None:
        if self.waker is not None:
            self.waker()


# --- the connection's protocol state --------------------------------------------------------------


@dataclass(slots=True)
class _InFlight:
    op: str
    sub: str | None = None  # for unsubscribe: which sub it ends


class ClientProtocol:
    """Request numbering, in-flight bookkeeping and push routing of one connection.

    Usage: `request_id, data = proto.request(op, args)` then send `data`; feed each received frame
    to `proto.receive(frame)` and act on what it returns; call `proto.connection_lost(exc)` once the
    connection is gone, then fail every future the I/O layer still holds.
    """

    def __init__(self, queue_size: int = DEFAULT_QUEUE_SIZE) -> None:
        if queue_size < 1:
            raise ValueError("queue size must be at least 1")
        self.queue_size = queue_size
        self._next_id = 1
        self._in_flight: dict[int, _InFlight] = {}
        self._pending_subscribes = 0
        self.subscriptions: dict[str, SubscriptionBuffer] = {}
        # Pushes for sub ids whose subscribe reply has not been read yet.
        self._early: dict[str, SubscriptionBuffer] = {}
        # Subs closed locally whose unsubscribe reply has not come back: late pushes are dropped.
        self._closing: set[str] = set()
        self.orphan_pushes = 0
        self.closed: ConnectionClosed | None = None

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def request(self, op: str, args: Mapping[str, Any] | None = None) -> tuple[int, bytes]:
        """Number a request and encode it. Raises `ConnectionClosed` after `connection_lost`,
        `ClientError` if the args cannot be encoded (nothing is then recorded)."""
        if self.closed is not None:
            raise self.closed.again()
        request_id = self._next_id
        args = dict(args or {})
        data = encode_request(request_id, op, args)
        self._next_id += 1
        sub = args.get("sub") if op == "unsubscribe" else None
        self._in_flight[request_id] = _InFlight(op, sub if isinstance(sub, str) else None)
        if op == "subscribe":
            self._pending_subscribes += 1
        if op == "unsubscribe" and isinstance(sub, str):
            self.release(sub)
        return request_id, data

    def forget(self, request_id: int) -> None:
        """The request could not be sent: stop waiting for its reply."""
        entry = self._in_flight.pop(request_id, None)
        if entry is not None:
            self._finished(entry)

    def release(self, sub: str) -> None:
        """Stop routing pushes of `sub` (the consumer closed it); its buffer ends cleanly."""
        buffer = self.subscriptions.pop(sub, None)
        if buffer is not None:
            buffer.close()
        self._closing.add(sub)

    def receive(self, data: bytes | str) -> list[Happening]:
        """Interpret one received frame. Never raises: a broken frame becomes `Unrouted`."""
        try:
            message = decode_frame(data)
        except ProtocolError as exc:
            return [Unrouted(exc)]
        # A push has `event` and no `ok` (a `leave` push carries the document's `id`).
        if "event" in message and "ok" not in message:
            return self._push(message)
        return self._reply(message)

    def connection_lost(self, exc: ConnectionClosed) -> list[int]:
        """The connection is gone: end every subscription with `exc`; return the ids still in flight."""
        if self.closed is None:
            self.closed = exc
        for buffer in self.subscriptions.values():
            buffer.close(exc)
        self.subscriptions.clear()
        self._early.clear()
        ids = list(self._in_flight)
        self._in_flight.clear()
        self._pending_subscribes = 0
        return ids

    # --- internals --------------------------------------------------------------------------

    def _reply(self, message: dict[str, Any]) -> list[Happening]:
        request_id = message.get("id")
        ok = message.get("ok")
        entry = self._in_flight.pop(request_id, None) if isinstance(request_id, int) else None
        if entry is None or not isinstance(request_id, int):
            if ok is False:
                return [Unrouted(error_from_wire(message.get("error")))]
            return [Unrouted(ProtocolError(f"reply for no request in flight: id={request_id!r}"))]
        happenings: list[Happening]
        if ok is True:
            result = {k: v for k, v in message.items() if k not in ("id", "ok")}
            buffer = self._subscribed(result) if entry.op == "subscribe" else None
            happenings = [Reply(request_id, entry.op, result, buffer)]
        elif ok is False:
            happenings = [Failure(request_id, entry.op, error_from_wire(message.get("error")))]
        else:
            error = ProtocolError(f"reply without a boolean 'ok': {message!r}")
            happenings = [Failure(request_id, entry.op, error)]
        self._finished(entry)
        return happenings

    def _subscribed(self, result: dict[str, Any]) -> SubscriptionBuffer | None:
        """Register the buffer the moment the reply is read, before any later push is routed."""
        sub = result.get("sub")
        if not isinstance(sub, str):
            return None
        buffer = SubscriptionBuffer(sub, self.queue_size)
        self._closing.discard(sub)
        early = self._early.pop(sub, None)
        if early is not None:
            buffer.adopt(early)
        self.subscriptions[sub] = buffer
        return buffer

    def _finished(self, entry: _InFlight) -> None:
        if entry.op == "subscribe":
            self._pending_subscribes -= 1
            if self._pending_subscribes == 0:
                # No subscribe reply can come any more to claim early pushes: they are orphans.
                self.orphan_pushes += sum(len(b) for b in self._early.values())
                self._early.clear()
        elif entry.op == "unsubscribe" and entry.sub is not None:
            # The server sends no push for a sub after answering its unsubscribe.
            self._closing.discard(entry.sub)

    def _push(self, message: dict[str, Any]) -> list[Happening]:
        if message.get("event") == "ended":
            return self._ended(message)
        try:
            event = parse_push(message)
        except ProtocolError as exc:
            return [Unrouted(exc)]
        if event is None:
            return []  # an event kind this client does not know: ignored, for forward compatibility
        buffer = self.subscriptions.get(event.sub)
        if buffer is not None:
            return [Pushed(event.sub)] if buffer.push(event) else []
        if event.sub in self._closing or self._pending_subscribes == 0:
            self.orphan_pushes += 1
            return []
        early = self._early.get(event.sub)
        if early is None:
            early = self._early[event.sub] = SubscriptionBuffer(event.sub, self.queue_size)
        early.push(event)
        return []

    def _ended(self, message: dict[str, Any]) -> list[Happening]:
        """The server ended a subscription (its collection was dropped, the server is stopping):
        the consumer reads what is buffered, then gets the error."""
        sub = message.get("sub")
        if not isinstance(sub, str):
            return [Unrouted(ProtocolError(f"ended push without a sub: {message!r}"))]
        code = message.get("code")
        reason = message.get("reason")
        error = error_from_wire({"code": code if isinstance(code, str) else "internal", "message": str(reason or "")})
        buffer = self.subscriptions.pop(sub, None)
        if buffer is None:
            return []
        buffer.close(error)
        return [Pushed(sub)]
