"""The applier: one per collection, the only writer of its shards and of its applied seq.

A node's shards are a replica of the collection's durable change log (seq 1, 2, 3, ... with no
holes: every seq handed out is logged in the same transaction). The applier applies that log
strictly in seq order and idempotently, from two inputs:

- the local committer (`apply_upserts` / `apply_deletes` with the changes it just committed), the
  fast path that lets the node which acked a write see it on its next query;
- the log follower (`catch_up(until)`, `apply_changes`), for changes committed by any node.

A change at or below the applied seq is skipped (the same change may come by both inputs). A change
beyond `applied + 1` means the ones between have not been seen yet (another node committed them):
they are read from the log first, so nothing is ever applied out of order or twice.

Calls are serialised by a lock: its waiters are the committer and the follower, at most one each,
so the queue in front of the applier is bounded by construction. After each contiguous run is
applied, `collection.last_seq` is set and the run is published to the listeners with no await in
between (subscriptions rely on that; see `actors/subscriptions.py`).

`applied_seq` is what a snapshot records; start-up loads a snapshot of the live documents
(`load`) and then follows the log from there.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterable, AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import anyio

from models.errors import ShoalError
from models.records import Change, DocId, StoredDoc

if TYPE_CHECKING:
    from actors.catalog import Collection

log = logging.getLogger("shoal.applier")


@dataclass(frozen=True, slots=True)
class Applied:
    """One contiguous run of changes the applier applied, handed to the listeners (subscriptions,
    change feeds). Upserts and deletes are never mixed in one `Applied`."""

    collection: str
    upserted: tuple[StoredDoc, ...]
    deleted: tuple[tuple[DocId, int], ...]  # (id, seq)
    # The version each change replaced, aligned with `upserted` (or `deleted`): None where the id
    # did not exist. Read from the shards before the run was applied, when some listener wants
    # it (`Applier.wants_previous`); None (the field) when not read.
    previous: tuple[StoredDoc | None, ...] | None = None


Publisher = Callable[[Applied], Awaitable[None]]


class LogReader(Protocol):
    """Where the applier reads changes it has not seen (`Persistence` in the engine)."""

    async def changes_after(self, name: str, after_seq: int, limit: int) -> list[Change]: ...


@dataclass(frozen=True, slots=True)
class _Upserts:
    docs: tuple[StoredDoc, ...]  # consecutive seqs


@dataclass(frozen=True, slots=True)
class _Deletes:
    pairs: tuple[tuple[DocId, int], ...]  # consecutive seqs


_Run = _Upserts | _Deletes


def _first(run: _Run) -> int:
    return int(run.docs[0].seq) if isinstance(run, _Upserts) else run.pairs[0][1]


def _last(run: _Run) -> int:
    return int(run.docs[-1].seq) if isinstance(run, _Upserts) else run.pairs[-1][1]


def _after(run: _Run, seq: int) -> _Run | None:
    """The part of `run` with seqs > seq (None if nothing is left)."""
    if isinstance(run, _Upserts):
        docs = tuple(d for d in run.docs if d.seq > seq)
        return _Upserts(docs) if docs else None
    pairs = tuple(p for p in run.pairs if p[1] > seq)
    return _Deletes(pairs) if pairs else None


def runs_of(changes: Sequence[Change]) -> list[_Run]:
    """Log entries (in seq order) as runs of one op each; upserts carry their vectors."""
    runs: list[_Run] = []
    docs: list[StoredDoc] = []
    pairs: list[tuple[DocId, int]] = []
    for change in changes:
        if change.op == "upsert":
            if pairs:
                runs.append(_Deletes(tuple(pairs)))
                pairs = []
            assert change.vector is not None, "a logged upsert has its vector"
            docs.append(StoredDoc(change.doc_id, change.text, change.vector, change.metadata or {}, change.seq))
        else:
            if docs:
                runs.append(_Upserts(tuple(docs)))
                docs = []
            pairs.append((change.doc_id, int(change.seq)))
    if docs:
        runs.append(_Upserts(tuple(docs)))
    if pairs:
        runs.append(_Deletes(tuple(pairs)))
    return runs


class Applier:
    """Applies a collection's change log to its shards in seq order (see the module docstring)."""

    def __init__(
        self, collection: Collection, log_reader: LogReader | None, publish: Publisher | None, page: int = 1_000
    ) -> None:
        self._collection = collection
        self._log = log_reader
        self._publish = publish
        self._page = max(1, page)
        self._lock = anyio.Lock()
        self._advanced = anyio.Event()
        # Asked before each run: whether a listener needs the versions the run replaces (read
        # from the shards, so it costs one `get` per run). None: never.
        self.wants_previous: Callable[[str], bool] | None = None
        self.from_log = 0  # changes applied from the log rather than from the local committer

    @property
    def applied_seq(self) -> int:
        """The seq through which every change is applied to the shards (0 before the first)."""
        return self._collection.last_seq

    # -- inputs -----------------------------------------------------------------------------

    async def load(self, batches: AsyncIterable[list[StoredDoc]], through: Callable[[], int | None]) -> int:
        """Fill the empty shards from a snapshot of the live documents, then set the applied seq to
        `through()` (read after the batches: the snapshot's seq). Returns the documents loaded."""
        loaded = 0
        async with self._lock:
            async for batch in batches:
                await self._upsert_shards(batch)
                loaded += len(batch)
            self._set(through() or 0)
        return loaded

    async def apply_upserts(self, docs: Sequence[StoredDoc]) -> None:
        """Apply committed upserts (consecutive seqs). Raises NotFound/Unavailable only when a gap
        before them has to be read from the log and cannot be."""
        if docs:
            await self._apply([_Upserts(tuple(docs))])

    async def apply_deletes(self, pairs: Sequence[tuple[DocId, int]]) -> None:
        """Apply committed deletes, (id, seq) with consecutive seqs (see `apply_upserts`)."""
        if pairs:
            await self._apply([_Deletes(tuple(pairs))])

    async def apply_changes(self, changes: Sequence[Change]) -> None:
        """Apply log entries (in seq order, as `changes_after` returns them)."""
        if changes:
            await self._apply(runs_of(changes))

    async def catch_up(self, until: int) -> None:
        """Apply the log through seq `until` (what is applied already is not read again).
        Raises NotFound (the collection was dropped) and Unavailable."""
        if self.applied_seq >= until:
            return
        async with self._lock:
            await self._fill(until)

    @asynccontextmanager
    async def consistent(self) -> AsyncIterator[int]:
        """Hold the applier still: inside, the shards are exactly at the yielded applied seq and
        no change is applied until the block ends (a read there sees the state as of that seq).
        Keep the block short: writes wait for it."""
        async with self._lock:
            yield self.applied_seq

    async def wait_applied(self, seq: int, timeout: float) -> bool:
        """True once the applied seq is >= `seq`; False if `timeout` seconds pass first."""
        with anyio.move_on_after(timeout):
            while self.applied_seq < seq:
                await self._advanced.wait()
            return True
        return False

    # -- the one writer ---------------------------------------------------------------------

    async def _apply(self, runs: list[_Run]) -> None:
        async with self._lock:
            for run in runs:
                fresh = _after(run, self.applied_seq)
                if fresh is None:
                    continue  # seen already (by the other input)
                if _first(fresh) > self.applied_seq + 1:
                    await self._fill(_first(fresh) - 1)
                    fresh = _after(fresh, self.applied_seq)
                    if fresh is None:
                        continue
                if _first(fresh) != self.applied_seq + 1:
                    raise RuntimeError(
                        f"collection {self._collection.name!r}: the log has no seq {self.applied_seq + 1}"
                    )
                await self._apply_run(fresh)

    async def _fill(self, until: int) -> None:
        """Apply the log from applied + 1 through `until`, page by page (lock held)."""
        if self._log is None:
            raise RuntimeError("this applier has no log to fill a gap from")
        while self.applied_seq < until:
            changes = await self._log.changes_after(self._collection.name, self.applied_seq, self._page)
            changes = [c for c in changes if c.seq <= until]
            if not changes:
                # The log ends before `until`: the caller's seq is not committed (yet).
                return
            if changes[0].seq != self.applied_seq + 1:
                raise RuntimeError(f"collection {self._collection.name!r}: the log has no seq {self.applied_seq + 1}")
            for run in runs_of(changes):
                await self._apply_run(run)
            self.from_log += len(changes)

    async def _apply_run(self, run: _Run) -> None:
        wants = self.wants_previous
        previous: tuple[StoredDoc | None, ...] | None = None
        if self._publish is not None and wants is not None and wants(self._collection.name):
            try:
                previous = self._previous(run)
            except ShoalError as exc:  # a shard is busy: the listeners read the log instead
                log.debug("versions before seq %d not read from the shards: %s", _first(run), exc)
        if isinstance(run, _Upserts):
            await self._upsert_shards(run.docs)
            self._set(_last(run))
            applied = Applied(self._collection.name, run.docs, (), previous)
        else:
            await self._delete_shards([doc_id for doc_id, _ in run.pairs])
            self._set(_last(run))
            applied = Applied(self._collection.name, (), run.pairs, previous)
        if self._publish is not None:
            # No await before this call since `_set`: listeners read last_seq in step with it.
            await self._publish(applied)

    def _previous(self, run: _Run) -> tuple[StoredDoc | None, ...]:
        """The version each change of `run` replaces (lock held, before the run is applied): the
        shards' current one, or the run's own earlier change of the same id."""
        ids = [d.id for d in run.docs] if isinstance(run, _Upserts) else [i for i, _ in run.pairs]
        collection = self._collection
        by_shard: dict[int, list[DocId]] = {}
        for doc_id in dict.fromkeys(ids):
            by_shard.setdefault(collection.shard_index(doc_id), []).append(doc_id)
        current: dict[DocId, StoredDoc | None] = {}
        for index, part in by_shard.items():
            # No message: the shards are between this applier's writes (the lock is held).
            for doc in collection.shards[index].peek(part):
                current[doc.id] = doc
        out: list[StoredDoc | None] = []
        if isinstance(run, _Upserts):
            for doc in run.docs:
                out.append(current.get(doc.id))
                current[doc.id] = doc
        else:
            for doc_id, _ in run.pairs:
                out.append(current.get(doc_id))
                current[doc_id] = None
        return tuple(out)

    def _set(self, seq: int) -> None:
        self._collection.last_seq = seq
        advanced, self._advanced = self._advanced, anyio.Event()
        advanced.set()

    async def _upsert_shards(self, docs: Sequence[StoredDoc]) -> None:
        collection = self._collection
        if len(collection.shards) == 1:
            await collection.shards[0].apply_upserts(docs)
            return
        by_shard: dict[int, list[StoredDoc]] = {}
        for doc in docs:
            by_shard.setdefault(collection.shard_index(doc.id), []).append(doc)
        async with anyio.create_task_group() as tg:
            for index, part in by_shard.items():
                tg.start_soon(collection.shards[index].apply_upserts, part)

    async def _delete_shards(self, ids: Sequence[DocId]) -> None:
        collection = self._collection
        by_shard: dict[int, list[DocId]] = {}
        for doc_id in ids:
            by_shard.setdefault(collection.shard_index(doc_id), []).append(doc_id)
        for index, part in by_shard.items():
            await collection.shards[index].apply_deletes(part)
