"""One subscriber's delivery state, and the events it carries.

A `Subscriber` is filled by the subscriptions actor (`offer`, synchronous, never waits) and
drained by exactly one consumer: a WebSocket connection's push pump or an SSE stream. Its buffer
holds at most `capacity` events; what does not fit is either counted and reported as one
`Lagged` item where the gap is (WebSocket), or ends the subscriber with `EndReason.LAGGED` (SSE,
whose client resumes from its last id).

Every end has an `EndReason`. The consumer's own ends (unsubscribe, its connection or stream
going away) are told to nobody; every other end carries the `ShoalError` the client is told
(the WebSocket `ended` push, the SSE `event: error` block).
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Literal

from actors.matching import StandingQuery
from actors.topk import TopkList
from models.errors import Forbidden, Internal, NotFound, Overloaded, ShoalError, Unavailable
from models.records import DocId, Hit, Include, Metric, StoredDoc

if TYPE_CHECKING:
    from actors.catalog import Collection

Kind = Literal["match", "changes", "topk"]


# --- why a subscription ended ----------------------------------------------------------------


class EndReason(StrEnum):
    """Why a subscriber was closed. The value is the message the client is told."""

    # The consumer's own doing: nobody is told.
    UNSUBSCRIBED = "unsubscribed"
    CONNECTION_CLOSED = "connection closed"  # the WebSocket connection ended
    DISCONNECTED = "disconnected"  # the SSE reader went away
    # Told to the client, with the error of `error_class`.
    # SSE only: the stream ends with `event: lagged` (the code is for completeness); a WebSocket
    # subscription is never ended for lag, it gets `lagged` pushes.
    LAGGED = "lagged"
    COLLECTION_DROPPED = "collection dropped"
    SERVER_STOPPING = "server shutting down"
    REPLAY_FAILED = "replay failed"  # the error is the one the replay raised
    FORBIDDEN = "the key no longer allows this subscription"  # re-authenticated with less access
    INTERNAL = "internal error"  # matching failed; details are in the log

    @property
    def silent(self) -> bool:
        """True when the end is the consumer's own doing, so there is nobody to tell."""
        return self in _SILENT

    @property
    def error_class(self) -> type[ShoalError] | None:
        """The error this end is told as; None for the silent ends and for REPLAY_FAILED, whose
        error is the one the replay raised."""
        return _ERROR_OF.get(self)


_SILENT = frozenset({EndReason.UNSUBSCRIBED, EndReason.CONNECTION_CLOSED, EndReason.DISCONNECTED})
_ERROR_OF: dict[EndReason, type[ShoalError]] = {
    EndReason.LAGGED: Overloaded,
    EndReason.COLLECTION_DROPPED: NotFound,
    EndReason.SERVER_STOPPING: Unavailable,
    EndReason.FORBIDDEN: Forbidden,
    EndReason.INTERNAL: Internal,
}


# --- events ----------------------------------------------------------------------------------


@dataclass(slots=True, eq=False)
class Upserted:
    """A matched document, shared by every subscriber it matched. `wire_cache` lets the edge encode
    identical payloads once (e.g. 10,000 SSE streams with the same query)."""

    doc: StoredDoc
    wire_cache: dict[object, bytes] = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class MatchEvent:
    upserted: Upserted
    score: float
    distance: float

    @property
    def seq(self) -> int:
        return int(self.upserted.doc.seq)


@dataclass(frozen=True, slots=True)
class LeaveEvent:
    """A document that matched before change `seq` no longer does after it (deleted, or
    re-upserted out of the score or the filters)."""

    seq: int
    id: DocId


@dataclass(frozen=True, slots=True)
class TopkEvent:
    """A top-k subscription's whole list, best first, as a query would answer it at `seq`."""

    seq: int
    hits: tuple[Hit, ...]


@dataclass(frozen=True, slots=True)
class ChangeEvent:
    """Consecutive changes of one kind: `ids[i]` took seq `first_seq + i`."""

    op: Literal["upsert", "delete"]
    first_seq: int
    ids: tuple[DocId, ...]

    @property
    def seq(self) -> int:
        return self.first_seq + len(self.ids) - 1


@dataclass(frozen=True, slots=True)
class Lagged:
    """`dropped` events were not buffered for this subscriber; the gap is where this stands."""

    dropped: int


Event = MatchEvent | LeaveEvent | ChangeEvent | TopkEvent
Item = MatchEvent | LeaveEvent | ChangeEvent | TopkEvent | Lagged


# --- one subscriber ----------------------------------------------------------------------------


class Subscriber:
    """The delivery state of one subscription: filled by the actor, drained by one consumer.

    Consumer protocol: replay with `Subscriptions.replay_page` while `replaying`, call
    `go_live()`, then loop on `wait()` / `take()` until `finished`. A subscriber ends with
    `close(reason)`, from either side; buffered events stay readable after it.
    """

    __slots__ = (
        "_detach",
        "_events",
        "_gap",
        "_live",
        "_waiter",
        "capacity",
        "close_hooks",
        "close_on_overflow",
        "closed",
        "collection",
        "counters",
        "dropped_total",
        "error",
        "id",
        "include",
        "kind",
        "live_from",
        "metric",
        "query",
        "reason",
        "replay_after",
        "replay_until",
        "topk",
        "waker",
    )

    def __init__(
        self,
        sub_id: str,
        collection: Collection,
        kind: Kind,
        query: StandingQuery | None,
        include: frozenset[Include],
        capacity: int,
        close_on_overflow: bool,
        topk: TopkList | None = None,
    ) -> None:
        self.id = sub_id
        self.collection = collection.name
        self.metric: Metric = collection.metric
        self.kind = kind
        self.query = query
        # A top-k subscription's list (kind "topk"); its first list is the consumer's "replay".
        self.topk = topk
        self.include = include
        self.capacity = max(1, capacity)
        self.close_on_overflow = close_on_overflow
        self.live_from = 0
        self.replay_after: int | None = None
        self.replay_until = 0
        self._events: deque[Item] = deque()
        self._gap = 0
        self._live = False
        self._waiter: asyncio.Future[None] | None = None
        self.waker: Callable[[Subscriber], None] | None = None
        self.close_hooks: list[Callable[[Subscriber], None]] = []
        self._detach: Callable[[Subscriber], None] | None = None
        self.dropped_total = 0
        # The actor's counters ("dropped" is added to), for the server's metrics.
        self.counters: dict[str, int] | None = None
        self.closed = False
        self.reason: EndReason | None = None
        # What the client is told of the end; None while open and for the silent ends.
        self.error: ShoalError | None = None

    def __repr__(self) -> str:
        return f"<Subscriber {self.id} {self.kind} on {self.collection!r}>"

    @property
    def replaying(self) -> bool:
        """True until the consumer has sent what precedes the live events: the log replay of a
        resume, or a top-k subscription's first list."""
        if self.topk is not None:
            return self.topk.as_of is None and not self._live
        return self.replay_after is not None and self.replay_after < self.replay_until

    @property
    def pending(self) -> bool:
        return bool(self._events) or self._gap > 0

    @property
    def finished(self) -> bool:
        """Closed and nothing left to read."""
        return self.closed and not self.pending

    # -- the actor's side (synchronous, on the event loop) ----------------------------------

    def excludes(self, event: Event) -> bool:
        """True for a match or leave of the document a query by example was made from."""
        exclude = None if self.query is None else self.query.exclude
        if exclude is None:
            return False
        if isinstance(event, MatchEvent):
            return event.upserted.doc.id == exclude
        return isinstance(event, LeaveEvent) and event.id == exclude

    def offer(self, event: Event) -> None:
        """Queue a live event; never waits. Events at or before `live_from` were replayed (or
        precede the subscription) and are skipped."""
        if isinstance(event, TopkEvent):
            self._offer_list(event)
            return
        if self.closed or event.seq <= self.live_from:
            return
        if self.excludes(event):
            return  # a query by example never matches (nor leaves) the document it was made from
        if isinstance(event, ChangeEvent) and event.first_seq <= self.live_from:
            skip = self.live_from - event.first_seq + 1
            event = ChangeEvent(event.op, self.live_from + 1, event.ids[skip:])
        if len(self._events) >= self.capacity:
            self.dropped_total += 1
            if self.counters is not None:
                self.counters["dropped"] += 1
            if self.close_on_overflow:
                self.close(EndReason.LAGGED)
            else:
                self._gap += 1
            return
        if self._gap:
            self._events.append(Lagged(self._gap))
            self._gap = 0
        self._events.append(event)
        self._notify()

    def _offer_list(self, event: TopkEvent) -> None:
        """Lists coalesce: only the newest matters. One still unread is replaced, and the reader
        is told `lagged` (with the lists it missed) before the newest."""
        if self.closed:
            return
        if self._events:
            missed = sum(1 for e in self._events if isinstance(e, TopkEvent))
            missed += sum(e.dropped for e in self._events if isinstance(e, Lagged))
            self._events.clear()
            if self._live:  # before the first list went out, nobody was slow
                self.dropped_total += 1
                if self.counters is not None:
                    self.counters["dropped"] += 1
                self._events.append(Lagged(missed))
        self._events.append(event)
        self._notify()

    def lag(self, dropped: int) -> None:
        """Changes were lost before they could be matched (the log could not be read)."""
        if self.closed:
            return
        self.dropped_total += dropped
        if self.counters is not None:
            self.counters["dropped"] += dropped
        if self.close_on_overflow:
            self.close(EndReason.LAGGED)
        else:
            self._gap += dropped
            self._notify()

    # -- the consumer's side ------------------------------------------------------------------

    def go_live(self) -> None:
        """Replay is done: buffered and future live events are for the consumer now."""
        self.replay_after = None
        self._live = True
        if self.pending or self.closed:
            self._notify()

    def take(self, limit: int) -> list[Item]:
        """Up to `limit` buffered items, oldest first (a `Lagged` marks a gap)."""
        out: list[Item] = []
        while self._events and len(out) < limit:
            out.append(self._events.popleft())
        if not self._events and self._gap and len(out) < limit:
            out.append(Lagged(self._gap))
            self._gap = 0
        return out

    async def wait(self) -> None:
        """Return once something is buffered or the subscriber is closed."""
        if self.pending or self.closed:
            return
        # An asyncio future, not an anyio.Event: 10,000 streams wait here for one document, and
        # creating the Event cost more than the wake (py-spy of load/fanout_latency.py).
        waiter = self._waiter = asyncio.get_running_loop().create_future()
        try:
            await waiter
        finally:
            self._waiter = None

    def nudge(self) -> None:
        """Wake the consumer with nothing new (e.g. to write a heartbeat)."""
        self._wake_waiter()

    def _wake_waiter(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    @property
    def code(self) -> str | None:
        """The error code the client is told of the end (None while open or for a silent end)."""
        return None if self.error is None else self.error.code

    def close(self, reason: EndReason, cause: ShoalError | None = None) -> None:
        """End the subscription (idempotent): no more events are queued; consumers are woken.

        `cause` is the error behind a REPLAY_FAILED end (its code is told, its message follows
        the reason's); the other ends are told with their reason's own error class.
        """
        if self.closed:
            return
        self.closed = True
        self.reason = reason
        self.error = _end_error(reason, cause)
        if self._detach is not None:
            self._detach(self)
            self._detach = None
        for hook in self.close_hooks:
            hook(self)
        self._notify()

    def _notify(self) -> None:
        self._wake_waiter()
        if self._live and self.waker is not None:
            self.waker(self)


def _end_error(reason: EndReason, cause: ShoalError | None) -> ShoalError | None:
    if reason.silent:
        return None
    if reason is EndReason.REPLAY_FAILED:
        if cause is None:
            return Internal(reason.value)
        return type(cause)(f"{reason.value}: {cause.message}")
    error_class = reason.error_class
    assert error_class is not None, f"{reason!r} has no error class"
    return error_class(reason.value)
