"""The subscriptions actor: standing queries and change feeds, matched as changes are applied.

    committer --publish(Applied)--> mailbox --> [actor: one vectorised match per batch] -->
        Subscriber buffers (bounded, one per subscription) --> consumers (a WebSocket connection's
        push pump, or an SSE stream) --> sockets

Registration (`register`) is a plain call on the event loop, not a mailbox message: it must read
the collection's last applied seq S in the same step as it adds the subscriber, and the
committer sets `last_seq` and publishes with no await in between. So every change with seq > S
reaches the mailbox after the subscriber exists (it is delivered live), and every change with
seq <= S is committed and in the durable log (a resuming subscriber replays it from there).
Live events with seq <= S that were still queued are dropped by the subscriber (`live_from`).
The consumer replays `after_seq < seq <= S` page by page from the log while live events collect
in the subscriber's buffer, then drains the buffer: nothing is lost or doubled at the switch.

Queue policies:
- The mailbox holds `mailbox` batches. `publish` never waits (the committer must not be slowed by
  subscribers): when the mailbox is full the batch is not queued and its collection is marked
  behind. The actor notices the gap (the next batch's first seq, or an empty mailbox) and reads
  the missing changes back from the durable log. Overload costs PostgreSQL reads, not matches.
- Each subscriber buffers at most `buffer` events. When a match does not fit, a WebSocket
  subscriber counts it and later gets one `lagged` event with the number dropped, where the gap
  is; an SSE subscriber is closed (`EndReason.LAGGED`) and its client resumes from its last id.
  Nothing waits for a consumer, so one slow reader slows nobody else.
"""

from __future__ import annotations

import itertools
import logging
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal

import anyio
import anyio.lowlevel
from anyio.abc import TaskStatus

from actors.catalog import Collection
from actors.ingest import Applied
from actors.matching import Matches, QuerySet, StandingQuery, compile_queries, doc_batch, match
from actors.persistence import Persistence
from actors.subscriber import ChangeEvent, EndReason, Event, Kind, MatchEvent, Subscriber, Upserted
from models.errors import NotFound, Overloaded, ShoalError, Unavailable
from models.records import Change, DocId, Include, Seq, StoredDoc

log = logging.getLogger("shoal.subscriptions")

# Matching runs in a worker thread when queries x documents x dim reaches this (about 1 ms of
# numpy); below it the thread hop costs more than it saves.
THREAD_MIN_WORK = 2_000_000
# A change-feed event lists at most this many ids.
CHANGE_EVENT_IDS = 500


@dataclass(frozen=True, slots=True)
class SubscriptionConfig:
    """Bounds of the subscription machinery (each `SHOAL_<FIELD>` in the environment)."""

    # Events buffered per subscriber. One applied batch that matches more documents than this for
    # one subscription lags it however fast it reads: keep it >= the ingest batch size.
    sub_buffer: int = 2_000
    max_subscriptions: int = 100_000  # per node: WebSocket subscriptions + SSE streams
    max_subscriptions_per_connection: int = 1_000  # per WebSocket connection
    sub_mailbox: int = 256  # applied batches waiting for the actor
    replay_page: int = 1_000  # log entries read per page when replaying or catching up
    sse_send_grace_s: float = 5.0  # a closing SSE stream waits this long for a stalled socket


# --- the actor -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class SubscriptionStats:
    subscriptions: int
    feeds: int
    batches: int
    pairs_scored: int
    matches: int
    dropped: int
    lagged_closes: int
    mailbox_overflows: int
    catch_ups: int
    queued: int


class _Room:
    """The subscribers of one collection and how far the actor has handled its changes."""

    __slots__ = ("_compiled", "behind", "collection", "done_seq", "feeds", "subs")

    def __init__(self, collection: Collection) -> None:
        self.collection = collection
        self.done_seq = collection.last_seq
        self.behind = False
        self.subs: dict[str, Subscriber] = {}
        self.feeds: dict[str, Subscriber] = {}
        self._compiled: tuple[QuerySet, tuple[Subscriber, ...]] | None = None

    @property
    def name(self) -> str:
        return self.collection.name

    @property
    def empty(self) -> bool:
        return not self.subs and not self.feeds

    def add(self, sub: Subscriber) -> None:
        if sub.kind == "match":
            self.subs[sub.id] = sub
            self._compiled = None
        else:
            self.feeds[sub.id] = sub

    def remove(self, sub: Subscriber) -> None:
        if self.subs.pop(sub.id, None) is not None:
            self._compiled = None
        self.feeds.pop(sub.id, None)

    def compiled(self) -> tuple[QuerySet, tuple[Subscriber, ...]]:
        """The standing queries as matrices; rebuilt only after the set changed."""
        if self._compiled is None:
            subs = tuple(self.subs.values())
            queries = [s.query for s in subs if s.query is not None]
            self._compiled = (compile_queries(queries, self.collection.metric, self.collection.dim), subs)
        return self._compiled


class Subscriptions:
    """Owns every standing query and change feed of this node. Start `run()` in a task group,
    register `publish` as an engine listener, `close()` to stop."""

    def __init__(self, persistence: Persistence, config: SubscriptionConfig | None = None) -> None:
        self.config = config or SubscriptionConfig()
        self._persistence = persistence
        self._send, self._receive = anyio.create_memory_object_stream[Applied](max(1, self.config.sub_mailbox))
        self._rooms: dict[str, _Room] = {}
        self._count = 0
        self._ids = itertools.count(1)
        self._behind = False
        self._closing = False
        self._limiter = anyio.CapacityLimiter(1)
        self._stats = dict.fromkeys(
            ("batches", "pairs_scored", "matches", "dropped", "lagged_closes", "mailbox_overflows", "catch_ups"),
            0,
        )

    # -- life cycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._receive:
            while True:
                try:
                    applied = self._receive.receive_nowait()
                except anyio.WouldBlock:
                    if self._behind:
                        await self._catch_up_behind()
                        continue
                    try:
                        applied = await self._receive.receive()
                    except anyio.EndOfStream:
                        break
                except anyio.EndOfStream:
                    break
                if not isinstance(applied, Applied):
                    raise TypeError(f"the subscriptions actor got an unknown message {type(applied).__name__}")
                await self._handle(applied)
                # Let consumers drain what this batch queued before the next batch adds more.
                await anyio.lowlevel.checkpoint()
        self.close_all()

    def close(self) -> None:
        """Stop: queued batches are still matched, then every subscriber is closed."""
        self._closing = True
        self._send.close()

    def close_all(self) -> None:
        """Close every subscriber (told `unavailable`) and refuse new ones: the server is stopping."""
        self._closing = True
        for room in list(self._rooms.values()):
            self._close_room(room, EndReason.SERVER_STOPPING)

    def stats(self) -> SubscriptionStats:
        subs = sum(len(r.subs) for r in self._rooms.values())
        feeds = sum(len(r.feeds) for r in self._rooms.values())
        queued = self._receive.statistics().current_buffer_used
        return SubscriptionStats(subs, feeds, queued=queued, **self._stats)

    # -- the engine's listener ------------------------------------------------------------------

    async def publish(self, applied: Applied) -> None:
        """Called by the committer after each ack. Never waits (see the module's queue policy)."""
        room = self._rooms.get(applied.collection)
        if room is None:
            return  # nobody listens; a later subscriber starts after this batch's seqs
        try:
            self._send.send_nowait(applied)
        except anyio.WouldBlock:
            room.behind = True
            self._behind = True
            self._stats["mailbox_overflows"] += 1
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            pass

    def collection_dropped(self, name: str) -> None:
        room = self._rooms.pop(name, None)
        if room is not None:
            self._close_room(room, EndReason.COLLECTION_DROPPED)

    # -- registration (edge side, synchronous) ------------------------------------------------

    def register(
        self,
        collection: Collection,
        query: StandingQuery | None,
        *,
        include: frozenset[Include] = frozenset(),
        after_seq: int | None = None,
        close_on_overflow: bool = False,
        capacity: int | None = None,
    ) -> Subscriber:
        """A live subscriber (match when `query` is given, else a change feed), registered now.

        With `after_seq` below the collection's last applied seq S, the consumer must first replay
        `after_seq < seq <= S` (`replaying` is True). Raises Unavailable while shutting down,
        Overloaded over `max_subscriptions`.
        """
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._count >= self.config.max_subscriptions:
            raise Overloaded(f"this server holds its maximum of {self.config.max_subscriptions} subscriptions")
        room = self._rooms.get(collection.name)
        if room is not None and room.collection is not collection:  # dropped and created again
            self._close_room(room, EndReason.COLLECTION_DROPPED)
            room = None
        if room is None:
            room = self._rooms[collection.name] = _Room(collection)
        kind: Kind = "match" if query is not None else "changes"
        sub = Subscriber(
            f"s{next(self._ids)}",
            collection,
            kind,
            query,
            include,
            capacity or self.config.sub_buffer,
            close_on_overflow,
        )
        last = collection.last_seq
        sub.live_from = last if after_seq is None else max(last, after_seq)
        if after_seq is not None and after_seq < last:
            sub.replay_after, sub.replay_until = after_seq, last
        sub._detach = lambda gone: self._detach(gone, room)
        sub.counters = self._stats
        room.add(sub)
        self._count += 1
        return sub

    def _detach(self, sub: Subscriber, room: _Room) -> None:
        self._count -= 1
        if sub.reason is EndReason.LAGGED:
            self._stats["lagged_closes"] += 1
        room.remove(sub)
        if room.empty and self._rooms.get(room.name) is room:
            del self._rooms[room.name]

    def _close_room(self, room: _Room, reason: EndReason) -> None:
        for sub in [*room.subs.values(), *room.feeds.values()]:
            sub.close(reason)

    # -- replay (runs in the consumer's task) ---------------------------------------------------

    async def replay_page(self, sub: Subscriber) -> list[Event]:
        """The next page of `sub`'s replay from the durable log; advances `sub.replay_after`.

        Call while `sub.replaying`. Raises NotFound if the collection is gone, Unavailable if the
        database cannot be reached.
        """
        after = sub.replay_after
        assert after is not None, "replay_page called on a live subscriber"
        changes = await self._persistence.changes_after(sub.collection, after, self.config.replay_page)
        changes = [c for c in changes if c.seq <= sub.replay_until]
        sub.replay_after = changes[-1].seq if changes else sub.replay_until
        if sub.kind == "changes":
            return list(_change_events(changes))
        assert sub.query is not None
        docs = _stored(changes)
        if not docs:
            return []
        queries = compile_queries([sub.query], sub.metric, docs[0].vector.shape[0])
        found = await self._match(queries, docs)
        shared = [Upserted(doc) for doc in docs]
        return [
            MatchEvent(shared[d], s, dist)
            for chunk in found
            for d, s, dist in zip(chunk.docs.tolist(), chunk.scores.tolist(), chunk.distances.tolist(), strict=True)
        ]

    # -- the actor's loop -----------------------------------------------------------------------

    async def _handle(self, applied: Applied) -> None:
        room = self._rooms.get(applied.collection)
        if room is None:
            return
        seqs = [int(d.seq) for d in applied.upserted] + [s for _, s in applied.deleted]
        if not seqs or max(seqs) <= room.done_seq:
            return  # applied before every current subscriber's start
        try:
            if min(seqs) > room.done_seq + 1:
                await self._catch_up(room, min(seqs) - 1)
                if self._rooms.get(room.name) is not room:
                    return
            floor = room.done_seq
            docs = [d for d in applied.upserted if d.seq > floor]
            deleted = [(i, s) for i, s in applied.deleted if s > floor]
            runs = _runs(docs, deleted)
            await self._deliver(room, docs, runs)
            room.done_seq = max(seqs)
        except Exception:
            log.exception("matching a batch of %r failed; closing its subscribers", applied.collection)
            self._rooms.pop(room.name, None)
            self._close_room(room, EndReason.INTERNAL)

    async def _catch_up_behind(self) -> None:
        self._behind = False
        for room in list(self._rooms.values()):
            if room.behind:
                room.behind = False
                try:
                    await self._catch_up(room, room.collection.last_seq)
                except Exception:
                    log.exception("catching up %r failed; closing its subscribers", room.name)
                    self._rooms.pop(room.name, None)
                    self._close_room(room, EndReason.INTERNAL)

    async def _catch_up(self, room: _Room, until: int) -> None:
        """Match the changes (done_seq, until] that never reached the mailbox, read from the log."""
        self._stats["catch_ups"] += 1
        while room.done_seq < until and self._rooms.get(room.name) is room:
            try:
                changes = await self._persistence.changes_after(room.name, room.done_seq, self.config.replay_page)
            except NotFound:
                self.collection_dropped(room.name)
                return
            except ShoalError:  # the database is unreachable: the gap cannot be filled
                log.warning(
                    "cannot read the log of %r; subscribers lose seqs %d..%d", room.name, room.done_seq + 1, until
                )
                for sub in [*room.subs.values(), *room.feeds.values()]:
                    sub.lag(until - room.done_seq)
                room.done_seq = until
                return
            changes = [c for c in changes if c.seq <= until]
            if not changes:
                room.done_seq = until
                return
            docs = _stored(changes)
            await self._deliver(room, docs, list(_change_events(changes)))
            room.done_seq = changes[-1].seq

    async def _deliver(self, room: _Room, docs: Sequence[StoredDoc], runs: Sequence[ChangeEvent]) -> None:
        if runs and room.feeds:
            for feed in list(room.feeds.values()):
                for event in runs:
                    feed.offer(event)
        if not docs or not room.subs:
            return
        queries, subs = room.compiled()
        found = await self._match(queries, docs)
        self._stats["batches"] += 1
        self._stats["pairs_scored"] += len(queries) * len(docs)
        shared = [Upserted(doc) for doc in docs]
        delivered = 0
        for chunk in found:
            rows = zip(
                chunk.queries.tolist(),
                chunk.docs.tolist(),
                chunk.scores.tolist(),
                chunk.distances.tolist(),
                strict=True,
            )
            for q, d, score, dist in rows:
                subs[q].offer(MatchEvent(shared[d], score, dist))
                delivered += 1
        self._stats["matches"] += delivered

    async def _match(self, queries: QuerySet, docs: Sequence[StoredDoc]) -> list[Matches]:
        batch = doc_batch([d.vector for d in docs], [d.text for d in docs], [d.metadata for d in docs])
        work = len(queries) * len(batch) * batch.vectors.shape[1]
        if work >= THREAD_MIN_WORK:
            return await anyio.to_thread.run_sync(match, queries, batch, limiter=self._limiter)
        return match(queries, batch)


# --- helpers -------------------------------------------------------------------------------------


def _stored(changes: Sequence[Change]) -> list[StoredDoc]:
    """The upserts of a log page as documents (a logged upsert always has its vector)."""
    return [
        StoredDoc(c.doc_id, c.text, c.vector, c.metadata or {}, Seq(c.seq))
        for c in changes
        if c.op == "upsert" and c.vector is not None
    ]


def _chunks(op: Literal["upsert", "delete"], pairs: Sequence[tuple[DocId, int]]) -> list[ChangeEvent]:
    """Consecutive runs of (id, seq), cut at seq gaps and at CHANGE_EVENT_IDS ids."""
    out: list[ChangeEvent] = []
    ids: list[DocId] = []
    first = prev = 0
    for doc_id, seq in pairs:
        if ids and (seq != prev + 1 or len(ids) >= CHANGE_EVENT_IDS):
            out.append(ChangeEvent(op, first, tuple(ids)))
            ids = []
        if not ids:
            first = seq
        ids.append(doc_id)
        prev = seq
    if ids:
        out.append(ChangeEvent(op, first, tuple(ids)))
    return out


def _runs(docs: Sequence[StoredDoc], deleted: Sequence[tuple[DocId, int]]) -> list[ChangeEvent]:
    return _chunks("upsert", [(d.id, int(d.seq)) for d in docs]) + _chunks("delete", list(deleted))


def _change_events(changes: Sequence[Change]) -> list[ChangeEvent]:
    """Change-feed events of a log page, in seq order: one per run of the same op."""
    out: list[ChangeEvent] = []
    run: list[tuple[DocId, int]] = []
    op: Literal["upsert", "delete"] = "upsert"
    for change in changes:
        if run and change.op != op:
            out.extend(_chunks(op, run))
            run = []
        op = change.op
        run.append((change.doc_id, int(change.seq)))
    if run:
        out.extend(_chunks(op, run))
    return out
