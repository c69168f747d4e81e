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

Leaves and top-k. Each change carries the version it replaced (`actors.history.LiveChange`): live
from the applier (`Applied.previous`, read from the shards before the run), from the log when
a gap is filled or a resume replayed. A threshold subscription's `leave` is a change whose old
version matched and whose new one does not (or is a delete): old and new versions are matched
with the same vectorised step. Top-k lists move with `actors.topk.step` once per batch; a list
that needs a query is refilled while the applier holds still (`Applier.consistent`), so the list
is exact as of the seq it is pushed with.

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
from dataclasses import dataclass, field
from typing import Literal

import anyio
import anyio.lowlevel
import numpy as np
from anyio.abc import TaskStatus

from actors import topk as topk_lists
from actors.catalog import Collection
from actors.history import LiveChange, as_doc, compacted_history, pair_up, with_previous
from actors.ingest import Applied
from actors.matching import Matches, QuerySet, StandingQuery, compile_queries, doc_batch, match
from actors.persistence import Persistence
from actors.subscriber import (
    ChangeEvent,
    EndReason,
    Event,
    Kind,
    LeaveEvent,
    MatchEvent,
    Subscriber,
    TopkEvent,
    Upserted,
)
from actors.topk import TopkList, TopkQuery
from models.config import bounds
from models.errors import NotFound, Overloaded, ShoalError, Unavailable
from models.records import Change, DocId, Hit, Include, StoredDoc

log = logging.getLogger("shoal.subscriptions")

# Matching runs in a worker thread when queries x documents x dim reaches this; below it the
# thread hop costs more than the numpy work it moves off the loop.
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
    # live result sets: top-k subscriptions per node and per WebSocket connection (each also
    # counts as a subscription above).
    max_topk_subscriptions: int = field(default=10_000, metadata=bounds(0, 10_000_000))
    max_topk_per_connection: int = field(default=100, metadata=bounds(0, 100_000))


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
    topk: int = 0
    leaves: int = 0
    topk_pushes: int = 0
    topk_refills: int = 0


class _Room:
    """The subscribers of one collection and how far the actor has handled its changes."""

    __slots__ = (
        "_compiled",
        "_compiled_topk",
        "_positions",
        "behind",
        "collection",
        "done_seq",
        "feeds",
        "members",
        "subs",
        "topks",
    )

    def __init__(self, collection: Collection) -> None:
        self.collection = collection
        self.done_seq = collection.last_seq
        self.behind = False
        self.subs: dict[str, Subscriber] = {}
        self.topks: dict[str, Subscriber] = {}
        self.feeds: dict[str, Subscriber] = {}
        # Which top-k subscribers hold each document: a change to one is a change to their list.
        self.members: dict[DocId, set[Subscriber]] = {}
        self._compiled: tuple[QuerySet, tuple[Subscriber, ...]] | None = None
        self._compiled_topk: tuple[QuerySet, tuple[Subscriber, ...]] | None = None
        self._positions: dict[Subscriber, int] | None = None

    @property
    def name(self) -> str:
        return self.collection.name

    @property
    def empty(self) -> bool:
        return not self.subs and not self.feeds and not self.topks

    @property
    def wants_previous(self) -> bool:
        return bool(self.subs or self.topks)

    def add(self, sub: Subscriber) -> None:
        if sub.kind == "match":
            self.subs[sub.id] = sub
            self._compiled = None
        elif sub.kind == "topk":
            self.topks[sub.id] = sub
            self._compiled_topk = None
        else:
            self.feeds[sub.id] = sub

    def remove(self, sub: Subscriber) -> None:
        if self.subs.pop(sub.id, None) is not None:
            self._compiled = None
        if self.topks.pop(sub.id, None) is not None:
            self._compiled_topk = None
            if sub.topk is not None:
                self._unindex(sub, sub.topk.hits)
        self.feeds.pop(sub.id, None)

    def set_list(self, sub: Subscriber, hits: list[Hit], as_of: int) -> None:
        """Replace `sub`'s list (exact as of `as_of`), keeping the member index in step."""
        lst = sub.topk
        assert lst is not None
        if sub.id in self.topks:
            self._unindex(sub, lst.hits)
            for hit in hits:
                self.members.setdefault(hit.id, set()).add(sub)
        lst.hits = hits
        lst.as_of = as_of

    def _unindex(self, sub: Subscriber, hits: list[Hit]) -> None:
        for hit in hits:
            holders = self.members.get(hit.id)
            if holders is not None:
                holders.discard(sub)
                if not holders:
                    del self.members[hit.id]

    def compiled(self) -> tuple[QuerySet, tuple[Subscriber, ...]]:
        """The standing queries as matrices; rebuilt only after the set changed."""
        if self._compiled is None:
            subs = tuple(self.subs.values())
            queries = [s.query for s in subs if s.query is not None]
            self._compiled = (compile_queries(queries, self.collection.metric, self.collection.dim), subs)
        return self._compiled

    def topk_positions(self) -> dict[Subscriber, int]:
        """Each top-k subscriber's row in `compiled_topk`."""
        if self._positions is None or self._compiled_topk is None:
            _, subs = self.compiled_topk()
            self._positions = {sub: i for i, sub in enumerate(subs)}
        return self._positions

    def compiled_topk(self) -> tuple[QuerySet, tuple[Subscriber, ...]]:
        """The top-k queries as matrices (thresholds -inf where none); rebuilt after a change."""
        if self._compiled_topk is None:
            self._positions = None
            subs = tuple(self.topks.values())
            queries = [s.topk.query.standing() for s in subs if s.topk is not None]
            self._compiled_topk = (compile_queries(queries, self.collection.metric, self.collection.dim), subs)
        return self._compiled_topk


class Subscriptions:
    """Owns every standing query and change feed of this node. Start `run()` in a task group,
    register `publish` as an engine listener, `close()` to stop."""

    def __init__(self, persistence: Persistence, config: SubscriptionConfig | None = None) -> None:
        self.config = config or SubscriptionConfig()
        self._persistence = persistence
        self._send, self._receive = anyio.create_memory_object_stream[Applied](max(1, self.config.sub_mailbox))
        self._rooms: dict[str, _Room] = {}
        self._count = 0
        self._topk_count = 0
        self._ids = itertools.count(1)
        self._behind = False
        self._closing = False
        self._limiter = anyio.CapacityLimiter(1)
        self._stats = dict.fromkeys(
            (
                "batches",
                "pairs_scored",
                "matches",
                "dropped",
                "lagged_closes",
                "mailbox_overflows",
                "catch_ups",
                "leaves",
                "topk_pushes",
                "topk_refills",
            ),
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
        topk = sum(len(r.topks) for r in self._rooms.values())
        queued = self._receive.statistics().current_buffer_used
        return SubscriptionStats(subs, feeds, queued=queued, topk=topk, **self._stats)

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

    def wants_previous(self, name: str) -> bool:
        """Whether the applier of collection `name` should read the versions each run replaces
        (some threshold or top-k subscription listens)."""
        room = self._rooms.get(name)
        return room is not None and room.wants_previous

    def collection_dropped(self, name: str) -> None:
        room = self._rooms.pop(name, None)
        if room is not None:
            self._close_room(room, EndReason.COLLECTION_DROPPED)

    # -- registration (edge side, synchronous) ------------------------------------------------

    def register(
        self,
        collection: Collection,
        query: StandingQuery | TopkQuery | None,
        *,
        include: frozenset[Include] = frozenset(),
        after_seq: int | None = None,
        close_on_overflow: bool = False,
        capacity: int | None = None,
    ) -> Subscriber:
        """A live subscriber (match for a StandingQuery, a top-k list for a TopkQuery, else a
        change feed), registered now.

        With `after_seq` below the collection's last applied seq S, a match or change consumer
        must first replay `after_seq < seq <= S` (`replaying` is True); a top-k consumer first
        gets the current list (`replaying` until it is made; `after_seq` does not matter).
        Raises Unavailable while shutting down, Overloaded over `max_subscriptions` or
        `max_topk_subscriptions`.
        """
        if self._closing:
            raise Unavailable("the server is shutting down")
        if self._count >= self.config.max_subscriptions:
            raise Overloaded(f"this server holds its maximum of {self.config.max_subscriptions} subscriptions")
        is_topk = isinstance(query, TopkQuery)
        if is_topk and self._topk_count >= self.config.max_topk_subscriptions:
            raise Overloaded(
                f"this server holds its maximum of {self.config.max_topk_subscriptions} top-k subscriptions"
            )
        room = self._rooms.get(collection.name)
        if room is not None and room.collection is not collection:  # dropped and created again
            self._close_room(room, EndReason.COLLECTION_DROPPED)
            room = None
        if room is None:
            room = self._rooms[collection.name] = _Room(collection)
        kind: Kind = "topk" if is_topk else "match" if query is not None else "changes"
        sub = Subscriber(
            f"s{next(self._ids)}",
            collection,
            kind,
            query if isinstance(query, StandingQuery) else None,
            include,
            capacity or self.config.sub_buffer,
            close_on_overflow and not is_topk,  # lists coalesce: a top-k subscriber never overflows
            TopkList(query, include) if isinstance(query, TopkQuery) else None,
        )
        last = collection.last_seq
        sub.live_from = last if after_seq is None else max(last, after_seq)
        if after_seq is not None and after_seq < last and not is_topk:
            sub.replay_after, sub.replay_until = after_seq, last
        sub._detach = lambda gone: self._detach(gone, room)
        sub.counters = self._stats
        room.add(sub)
        self._count += 1
        if is_topk:
            self._topk_count += 1
        collection.applier.wants_previous = self.wants_previous
        return sub

    def _detach(self, sub: Subscriber, room: _Room) -> None:
        self._count -= 1
        if sub.kind == "topk":
            self._topk_count -= 1
        if sub.reason is EndReason.LAGGED:
            self._stats["lagged_closes"] += 1
        room.remove(sub)
        if room.empty and self._rooms.get(room.name) is room:
            del self._rooms[room.name]

    def _close_room(self, room: _Room, reason: EndReason) -> None:
        for sub in [*room.subs.values(), *room.topks.values(), *room.feeds.values()]:
            sub.close(reason)

    # -- replay (runs in the consumer's task) ---------------------------------------------------

    async def replay_page(self, sub: Subscriber) -> list[Event]:
        """The next page of `sub`'s replay from the durable log; advances `sub.replay_after`.
        For a top-k subscriber: its first list, as of the seq it is made at.

        Call while `sub.replaying`. Raises NotFound if the collection is gone, Unavailable if the
        database (or a shard) cannot be reached, Gone if history a leave needs was compacted.
        """
        if sub.topk is not None:
            return [await self._first_list(sub)]
        after = sub.replay_after
        assert after is not None, "replay_page called on a live subscriber"
        changes = await self._persistence.changes_after(sub.collection, after, self.config.replay_page)
        changes = [c for c in changes if c.seq <= sub.replay_until]
        if sub.kind == "changes":
            sub.replay_after = changes[-1].seq if changes else sub.replay_until
            return list(_change_events(changes))
        assert sub.query is not None
        live = await with_previous(self._persistence, sub.collection, changes, after)
        sub.replay_after = changes[-1].seq if changes else sub.replay_until
        if not live:
            return []
        queries = compile_queries([sub.query], sub.metric, int(np.asarray(sub.query.vector).shape[0]))
        found, unknowable = await self._threshold_events(queries, live)
        if unknowable:
            raise compacted_history(sub.collection, live[unknowable[0][1]])
        return [event for _, event in found]

    async def _first_list(self, sub: Subscriber) -> TopkEvent:
        """Make a top-k subscriber's first list with the applier held still, so the list is the
        state as of the seq it carries; later batches at or below that seq pass it by."""
        lst = sub.topk
        assert lst is not None
        room = self._rooms.get(sub.collection)
        if room is None or sub.closed:
            raise NotFound(f"no collection {sub.collection!r}")
        collection = room.collection
        async with collection.applier.consistent() as seq:
            [hits] = await topk_lists.refill_many(collection, [lst])
            if isinstance(hits, ShoalError):
                raise hits
            room.set_list(sub, hits, seq)
        self._stats["topk_refills"] += 1
        return TopkEvent(seq, tuple(hits))

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
            live = await self._live_changes(room, applied, floor)
            await self._deliver(room, live)
            room.done_seq = max(seqs)
        except Exception:
            log.exception("matching a batch of %r failed; closing its subscribers", applied.collection)
            self._rooms.pop(room.name, None)
            self._close_room(room, EndReason.INTERNAL)

    async def _live_changes(self, room: _Room, applied: Applied, floor: int) -> list[LiveChange]:
        """The changes of `applied` past `floor`, with the versions they replaced: from the
        applier, or (a subscriber came while the run was being applied) from the log."""
        if applied.upserted:
            rows: list[tuple[int, DocId, StoredDoc | None]] = [(int(d.seq), d.id, d) for d in applied.upserted]
        else:
            rows = [(s, i, None) for i, s in applied.deleted]
        previous = applied.previous
        if previous is not None:
            out = [LiveChange(seq, doc_id, new, old) for (seq, doc_id, new), old in zip(rows, previous, strict=True)]
            return [c for c in out if c.seq > floor]
        rows = [r for r in rows if r[0] > floor]
        if not rows:
            return []
        if not room.subs:  # change feeds and top-k lists need no old versions
            return pair_up(rows, {})
        ids = list(dict.fromkeys(r[1] for r in rows))
        try:
            found, _ = await self._persistence.versions_at(room.name, ids, rows[0][0] - 1)
        except ShoalError:
            log.warning("cannot read the versions before seq %d of %r; its leaves are lost", rows[0][0], room.name)
            for sub in room.subs.values():
                sub.lag(1)
            return pair_up(rows, {})
        return pair_up(rows, {DocId(i): as_doc(c) for i, c in found.items()})

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
                changes = [c for c in changes if c.seq <= until]
                live = await with_previous(self._persistence, room.name, changes, room.done_seq)
            except NotFound:
                self.collection_dropped(room.name)
                return
            except ShoalError:  # the database is unreachable (or history is compacted): a gap
                log.warning(
                    "cannot read the log of %r; subscribers lose seqs %d..%d", room.name, room.done_seq + 1, until
                )
                for sub in [*room.subs.values(), *room.feeds.values()]:
                    sub.lag(until - room.done_seq)
                await self._refill_lists(room, list(room.topks.values()), set())
                room.done_seq = until
                return
            if not changes:
                room.done_seq = until
                return
            await self._deliver(room, live, list(_change_events(changes)))
            room.done_seq = changes[-1].seq

    async def _deliver(
        self, room: _Room, live: Sequence[LiveChange], feed_events: Sequence[ChangeEvent] | None = None
    ) -> None:
        if not live:
            return
        if room.feeds:
            events = feed_events if feed_events is not None else _feed_events(live)
            for feed in list(room.feeds.values()):
                for change_event in events:
                    feed.offer(change_event)
        if room.subs:
            queries, subs = room.compiled()
            found, unknowable = await self._threshold_events(queries, live)
            for q in {q for q, _ in unknowable}:  # a leave may be missing: told as one gap
                subs[q].lag(1)
            self._stats["batches"] += 1
            self._stats["pairs_scored"] += len(queries) * len(live)
            for q, event in found:
                subs[q].offer(event)
        if room.topks:
            await self._step_lists(room, live)

    async def _threshold_events(
        self, queries: QuerySet, live: Sequence[LiveChange]
    ) -> tuple[list[tuple[int, Event]], list[tuple[int, int]]]:
        """(query index, event) of every match and leave of `live`, ordered by query and then seq;
        and the (query index, change index) pairs whose leave cannot be known (the replaced
        version was compacted away and the new one does not match).

        A match: the new version passes the query. A leave: the old version passed and the new
        one does not (or the change is a delete). Both sides are matched in one vectorised step."""
        news = [i for i, c in enumerate(live) if c.new is not None]
        olds = [i for i, c in enumerate(live) if c.old is not None]
        n = len(live)
        new_docs = [c.new for c in live if c.new is not None]
        old_docs = [c.old for c in live if c.old is not None]
        new_found = await self._match(queries, new_docs) if new_docs else []
        old_found = await self._match(queries, old_docs) if old_docs else []
        new_idx = np.asarray(news, dtype=np.intp)
        old_idx = np.asarray(olds, dtype=np.intp)
        mq = np.concatenate([m.queries for m in new_found]) if new_found else np.zeros(0, np.intp)
        md = new_idx[np.concatenate([m.docs for m in new_found])] if new_found else np.zeros(0, np.intp)
        ms_ = np.concatenate([m.scores for m in new_found]) if new_found else np.zeros(0, np.float32)
        mdist = np.concatenate([m.distances for m in new_found]) if new_found else np.zeros(0, np.float32)
        if old_found:
            oq = np.concatenate([m.queries for m in old_found])
            od = old_idx[np.concatenate([m.docs for m in old_found])]
            leave = ~np.isin(oq * n + od, mq * n + md)
            lq, ld = oq[leave], od[leave]
        else:
            lq = ld = np.zeros(0, np.intp)
        shared = {i: Upserted(c.new) for i, c in enumerate(live) if c.new is not None}
        pairs: list[tuple[int, int, Event]] = []
        for q, d, score, dist in zip(mq.tolist(), md.tolist(), ms_.tolist(), mdist.tolist(), strict=True):
            pairs.append((q, d, MatchEvent(shared[d], score, dist)))
        for q, d in zip(lq.tolist(), ld.tolist(), strict=True):
            change = live[d]
            pairs.append((q, d, LeaveEvent(change.seq, change.id)))
        self._stats["matches"] += int(mq.shape[0])
        self._stats["leaves"] += int(lq.shape[0])
        if lq.shape[0]:
            pairs.sort(key=lambda p: (p[0], p[1]))
        unknowable: list[tuple[int, int]] = []
        blind = [i for i, c in enumerate(live) if not c.old_known]
        if blind:
            matched = set(zip(mq.tolist(), md.tolist(), strict=True))
            unknowable = [(q, i) for i in blind for q in range(len(queries)) if (q, i) not in matched]
        return [(q, event) for q, _, event in pairs], unknowable

    async def _step_lists(self, room: _Room, live: Sequence[LiveChange]) -> None:
        """Move every top-k list of the room past one batch (see `actors.topk`)."""
        first, last = live[0].seq, live[-1].seq
        queries, subs = room.compiled_topk()
        ready: list[int] = []
        behind: list[Subscriber] = []
        for i, sub in enumerate(subs):
            lst = sub.topk
            if lst is None or lst.as_of is None or lst.as_of >= last or sub.closed:
                continue  # not made yet, or made at a later seq: this batch is in it
            if lst.as_of < first - 1:
                behind.append(sub)  # missed changes (made mid-page): only a query is exact
            else:
                ready.append(i)
        if not ready and not behind:
            return
        final: dict[DocId, StoredDoc | None] = {}
        for change in live:
            final[change.id] = change.new
        changed_ids = frozenset(final)
        alive = [d for d in final.values() if d is not None]
        # The common case: every list moves with this batch, and the rows are the positions.
        every = len(ready) == len(subs)
        position = room.topk_positions() if every else {subs[i]: j for j, i in enumerate(ready)}
        touched: set[int] = set()
        for doc_id in changed_ids:
            for holder in room.members.get(doc_id, ()):
                j = position.get(holder)
                if j is not None:
                    touched.add(j)
        lists = [_list_of(subs[i]) for i in ready]
        result = topk_lists.step(lists, _pick(queries, ready), alive, changed_ids, touched)
        for j, hits in result.changed:
            sub = subs[ready[j]]
            room.set_list(sub, hits, last)
            sub.offer(TopkEvent(last, tuple(hits)))
            self._stats["topk_pushes"] += 1
        for lst in lists:
            if lst.as_of is not None and lst.as_of < last:
                lst.as_of = last  # unchanged by this batch, so exact as of its last seq too
        refill = [subs[ready[j]] for j in result.refill] + behind
        touched_subs = {subs[ready[j]] for j in touched}
        await self._refill_lists(room, refill, touched_subs)

    async def _refill_lists(self, room: _Room, subs: Sequence[Subscriber], touched: set[Subscriber]) -> None:
        """Query these lists afresh with the applier held still; push those that changed."""
        if not subs:
            return
        collection = room.collection
        lists = [s.topk for s in subs if s.topk is not None]
        async with collection.applier.consistent() as seq:
            results = await topk_lists.refill_many(collection, lists)
            for sub, result in zip(subs, results, strict=True):
                if sub.closed or sub.topk is None:
                    continue
                if isinstance(result, ShoalError):
                    sub.close(EndReason.REPLAY_FAILED, result)
                    continue
                before = sub.topk.ids()
                room.set_list(sub, result, seq)
                if sub in touched or tuple(h.id for h in result) != before:
                    sub.offer(TopkEvent(seq, tuple(result)))
                    self._stats["topk_pushes"] += 1
        self._stats["topk_refills"] += len(lists)

    async def _match(self, queries: QuerySet, docs: Sequence[StoredDoc]) -> list[Matches]:
        batch = doc_batch([d.vector for d in docs], [d.text for d in docs], [d.metadata for d in docs])
        work = len(queries) * len(batch) * batch.vectors.shape[1]
        if work >= THREAD_MIN_WORK:
            return await anyio.to_thread.run_sync(match, queries, batch, limiter=self._limiter)
        return match(queries, batch)


# --- helpers -------------------------------------------------------------------------------------


def _pick(queries: QuerySet, rows: Sequence[int]) -> QuerySet:
    """The rows `rows` of a compiled query set (all of it when they are every row, in order)."""
    if len(rows) == len(queries):
        return queries
    index = np.asarray(rows, dtype=np.intp)
    return QuerySet(
        queries.metric,
        queries.vectors[index],
        queries.sq_norms[index],
        queries.thresholds[index],
        queries.groups[index],
        queries.filters,
    )


def _list_of(sub: Subscriber) -> TopkList:
    assert sub.topk is not None, "a top-k subscriber has a list"
    return sub.topk


def _feed_events(live: Sequence[LiveChange]) -> list[ChangeEvent]:
    ups = [(c.id, c.seq) for c in live if c.new is not None]
    dels = [(c.id, c.seq) for c in live if c.new is None]
    return _chunks("upsert", ups) + _chunks("delete", dels)


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
