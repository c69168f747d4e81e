"""The shard actor: one index (of the collection's kind) and an exact replica of its documents,
owned by one task.

One `Shard` per (collection, shard number). It is a replica of the durable change log: writes
arrive already committed, in seq order, and are applied in mailbox order.

Concurrency. No index library is safe for concurrent add and query on one index (hnswlib #562),
but their queries release the GIL. The actor therefore keeps a read/write discipline:
- reads (searches, `get`, `ids_matching`) are handed to the catalog's `ReadPool` threads, at most
  twice `search_threads` at a time from this shard (running or queued in the pool), and their
  outcome comes back to the event loop as a callback that answers the caller;
- a write is applied by the actor loop itself: it first waits until every in-flight read has
  finished, and since the loop is busy with the write, no read starts until it is done;
- index-global query parameters (hnswlib's `ef`: `ShardState.serves` says when a query's
  parameters need it) are changed only while no read is in flight.
So a read sees the state after every write queued before it and none queued after it.

Throughput. A search that finds the loop idle (nothing in its mailbox), a free read slot and
the index serving its parameters goes straight to the pool from the caller's task: no hop through the loop.
Otherwise it queues in the mailbox; while all read slots are taken, queries queue there. When a
slot frees, the loop drains the queued queries and answers the unfiltered ones with the same
(k, parameters, include) together: one index search over a 2-D array per free slot (up to `search_batch`
queries per drain), so one thread hop serves many queries and every core searches.
"""

from __future__ import annotations

import itertools
import logging
import os
import tempfile
import threading
import uuid
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import anyio
import numpy as np
from anyio.abc import TaskStatus

from actors.indexes import needs_mapped_vectors
from actors.indexes.base import QueryParams
from actors.mailbox import Mailbox, Reply, unknown_message
from actors.read_pool import ReadPool
from actors.shard_state import ExactRerun, ShardState
from actors.status import ShardSizes
from models.config import EngineConfig
from models.errors import DimensionMismatch, Unavailable
from models.filters import Filter, TextFilter
from models.index_spec import IndexSpec
from models.records import DocId, Hit, Include, Metric, StoredDoc, Vector

T = TypeVar("T")
log = logging.getLogger(__name__)


# -- messages -----------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Upsert:
    docs: tuple[StoredDoc, ...]
    reply: Reply[None]
    fresh_labels: bool = False
    defer_index: bool = False


@dataclass(frozen=True, slots=True)
class _Delete:
    ids: tuple[DocId, ...]
    reply: Reply[list[DocId]]


@dataclass(frozen=True, slots=True)
class _Search:
    query: Vector
    k: int
    params: QueryParams
    where: Filter | None
    where_text: TextFilter | None
    include: frozenset[Include]
    reply: Reply[list[Hit]]


@dataclass(frozen=True, slots=True)
class _Direct:
    """An unfiltered search the index serves as it is, skipping the mailbox."""

    query: Vector
    k: int
    params: QueryParams
    include: frozenset[Include]
    reply: Reply[list[Hit]]


@dataclass(frozen=True, slots=True)
class _ExactSearch:
    queries: tuple[Vector, ...]
    k: int
    where: Filter | None
    where_text: TextFilter | None
    reply: Reply[ExactRerun]


@dataclass(frozen=True, slots=True)
class _Get:
    ids: tuple[DocId, ...]
    reply: Reply[list[StoredDoc]]


@dataclass(frozen=True, slots=True)
class _Count:
    reply: Reply[int]


@dataclass(frozen=True, slots=True)
class _IdsMatching:
    where: Filter | None
    where_text: TextFilter | None
    reply: Reply[list[DocId]]


@dataclass(frozen=True, slots=True)
class _Scan:
    after: DocId | None
    limit: int
    where: Filter | None
    where_text: TextFilter | None
    reply: Reply[list[StoredDoc]]


@dataclass(frozen=True, slots=True)
class _KeywordSearch:
    terms: tuple[str, ...]
    k: int
    where: Filter | None
    where_text: TextFilter | None
    include: frozenset[Include]
    reply: Reply[list[Hit]]


@dataclass(frozen=True, slots=True)
class _SaveFiles:
    directory: Path
    reply: Reply[int]


@dataclass(frozen=True, slots=True)
class _LoadFiles:
    directory: Path
    reply: Reply[int]


_Message = (
    _Upsert
    | _Delete
    | _Search
    | _Get
    | _Count
    | _IdsMatching
    | _KeywordSearch
    | _SaveFiles
    | _LoadFiles
    | _Scan
    | _ExactSearch
)
# Each shard object's number, unique in the process: part of a results-cache version, so a
# collection dropped and made again never matches the results of its former self.
_shard_numbers = itertools.count()
# Smallest part a group of queued queries is split into to run on several threads at once.
_MIN_PART = 4
# Unindexed documents (see `ShardState.unindexed`) added to the index per catch-up write: small
# enough that the reads queued behind one wait little, and one is made at least every
# `_CATCH_UP_EVERY` messages, so a steady stream of queries cannot starve the catch-up.
_CATCH_UP_CHUNK = 256
_CATCH_UP_EVERY = 16


# -- the actor ------------------------------------------------------------------------------------


class Shard:
    """The actor owning one shard. Start `run()` in a task group; stop it with `close()`."""

    def __init__(
        self,
        dim: int,
        metric: Metric,
        config: EngineConfig,
        pool: ReadPool,
        name: str = "shard",
        spec: IndexSpec | None = None,
        vectors_dir: Path | None = None,
    ) -> None:
        self.dim = dim
        self.metric = metric
        self._config = config
        self._pool = pool
        self._vectors_dir = vectors_dir
        self._state = ShardState(dim, metric, config, spec, self._vectors_path(spec))
        self.spec = self._state.spec
        self._mailbox: Mailbox[_Message] = Mailbox(max(1, config.shard_mailbox), name)
        # The mailbox is a memory stream; its non-blocking receive is what batching needs.
        self._receive = self._mailbox.receive
        self._pending: deque[_Message] = deque()
        self._max_readers = max(1, min(config.search_threads, pool.threads))
        self._batch = max(1, config.search_batch)
        # Reads handed to the pool at once: twice its threads, so a thread that finishes finds
        # the next read already queued instead of sleeping until the loop hands it one (that
        # round trip was most of a query's time under load: load/query.py, timed per stage).
        self._max_reads = 2 * self._max_readers
        self._readers = 0  # reads handed to the pool and not finished yet
        self._waiter: anyio.Event | None = None  # set when a read finishes, if the loop waits
        # True while the loop waits on an empty mailbox: a search may then skip the mailbox.
        self._idle = False
        # Searches on that direct path, taken by drain jobs in pool threads; at most one drain
        # job per search thread is queued and not yet running (both guarded by the lock).
        self._direct: deque[_Direct] = deque()
        self._drains_queued = 0
        self.direct_searches = 0  # how many took the direct path (tests and diagnostics)
        self._direct_lock = threading.Lock()
        # Messages taken from the mailbox and not yet answered or handed to a reader.
        self._in_hand: list[_Message] = []
        self.number = next(_shard_numbers)
        # Writes sent to this shard and writes finished (applied or failed): the results cache
        # keeps an answer only if neither moved while it was computed and none was in flight.
        self.writes_sent = 0
        self.writes_done = 0
        self._since_catch_up = 0  # messages handled since the last catch-up write
        self._catch_up_failed = False
        self._closing = False  # `close()` was called: no more catching up, just drain

    # -- public API ---------------------------------------------------------------------------

    async def apply_upserts(
        self, docs: Sequence[StoredDoc], fresh_labels: bool = False, defer_index: bool = False
    ) -> None:
        """Insert or replace documents by id; visible to every read sent after this returns.
        `fresh_labels`, `defer_index`: see `ShardState.upsert` (faster replacement, no label
        reuse; an index that catches up with the documents in the background)."""
        reply: Reply[None] = Reply()
        self.writes_sent += 1
        try:
            await self._mailbox.send(_Upsert(tuple(docs), reply, fresh_labels, defer_index))
            await reply.wait()
        finally:
            self.writes_done += 1

    async def apply_deletes(self, ids: Sequence[DocId]) -> list[DocId]:
        """Delete documents by id; returns the ids that existed (each once)."""
        reply: Reply[list[DocId]] = Reply()
        self.writes_sent += 1
        try:
            await self._mailbox.send(_Delete(tuple(ids), reply))
            return await reply.wait()
        finally:
            self.writes_done += 1

    def _vectors_path(self, spec: IndexSpec | None) -> Path | None:
        """A fresh file for a state's mapped vectors (quantised kinds), else None (in RAM)."""
        if spec is None or not needs_mapped_vectors(spec):
            return None
        root = self._vectors_dir if self._vectors_dir is not None else Path(tempfile.gettempdir()) / "shoal-vectors"
        return root / f"shard-{os.getpid()}-{uuid.uuid4().hex[:12]}.f32"

    async def search(
        self,
        query: Vector,
        k: int,
        params: QueryParams,
        where: Filter | None,
        where_text: TextFilter | None,
        include: frozenset[Include],
    ) -> list[Hit]:
        """The k nearest live documents passing the filters, best first.

        Returns min(k, number of matching documents) hits. `params`: the query's index
        parameters (`actors/indexes/base.query_params`; absent ones take the index's defaults).
        Raises `DimensionMismatch` for a query of the wrong width, `Overloaded` when the mailbox
        is full and `Unavailable` once the shard is shutting down.
        """
        vec = np.ascontiguousarray(query, dtype=np.float32).reshape(-1)
        if vec.shape[0] != self.dim:
            raise DimensionMismatch(f"query has {vec.shape[0]} dimensions, the collection {self.dim}")
        reply: Reply[list[Hit]] = Reply()
        if (
            self._idle
            and self._readers < self._max_reads
            and where is None
            and where_text is None
            and self._state.serves(params)
        ):
            # The loop waits on an empty mailbox, so no write is in hand and none can start
            # before this read is counted: go to the pool without waking the loop.
            self._search_direct([_Direct(vec, k, params, include, reply)])
        else:
            self._mailbox.offer(_Search(vec, k, params, where, where_text, include, reply))
        return await reply.wait()

    async def search_many(
        self, queries: np.ndarray, k: int, params: QueryParams, include: frozenset[Include]
    ) -> list[list[Hit]]:
        """The k nearest live documents of each row of `queries` (n x dim float32), best first,
        without filters: what `search` answers for each, taking the same paths, so the drain
        jobs and the loop's batching group them into few index searches. Through the mailbox
        they go `search_batch` at a time, each part answered before the next is queued, so one
        big batch takes no more of the mailbox than one drain of the loop. Raises like `search`
        (`Overloaded` when the mailbox is full)."""
        if queries.ndim != 2 or queries.shape[1] != self.dim:
            raise DimensionMismatch(f"queries have {queries.shape[-1]} dimensions, the collection {self.dim}")
        if self._idle and self._readers < self._max_reads and self._state.serves(params):
            replies: list[Reply[list[Hit]]] = [Reply() for _ in range(queries.shape[0])]
            self._search_direct([_Direct(q, k, params, include, r) for q, r in zip(queries, replies, strict=True)])
            return [await reply.wait() for reply in replies]
        out: list[list[Hit]] = []
        for start in range(0, queries.shape[0], self._batch):
            part = [(q, Reply[list[Hit]]()) for q in queries[start : start + self._batch]]
            for q, reply in part:
                self._mailbox.offer(_Search(q, k, params, None, None, include, reply))
            out.extend([await reply.wait() for _, reply in part])
        return out

    def _search_direct(self, searches: list[_Direct]) -> None:
        """Queue unfiltered searches for the drain jobs at once, starting as many more drains as
        the searches fill (`_MIN_PART` each, at least one) while fewer than `search_threads` are
        queued and not yet running; with every read slot taken and no drain queued, go through
        the mailbox."""
        with self._direct_lock:
            wanted = max(1, len(searches) // _MIN_PART)
            room = self._max_reads - self._readers
            starts = max(0, min(wanted, self._max_readers - self._drains_queued, room))
            queued = starts > 0 or self._drains_queued > 0
            if queued:
                self._direct.extend(searches)
            self._drains_queued += starts
        if queued:
            self.direct_searches += len(searches)
            for _ in range(starts):
                self._start_read(self._drain_direct, _answer_all, self._drain_not_run)
        else:
            for s in searches:
                self._mailbox.offer(_Search(s.query, s.k, s.params, None, None, s.include, s.reply))

    def _drain_direct(self) -> list[tuple[Reply[list[Hit]], list[Hit] | BaseException]]:
        """In a pool thread: answer every search queued for the direct path so far, those with
        the same (k, parameters, include) in one index search. Never raises: errors are answers."""
        with self._direct_lock:
            # A fair share, so the drains queued behind this one search on other threads.
            direct = self._direct
            share = -(-len(direct) // self._drains_queued)
            taken = [direct.popleft() for _ in range(share)]
            self._drains_queued -= 1
        groups: dict[tuple[int, QueryParams, frozenset[Include]], list[_Direct]] = {}
        for search in taken:
            groups.setdefault((search.k, search.params, search.include), []).append(search)
        answers: list[tuple[Reply[list[Hit]], list[Hit] | BaseException]] = []
        for (k, params, include), group in groups.items():
            try:
                results = self._state.search_unfiltered([s.query for s in group], k, include, 1, params)
            except BaseException as exc:  # handed to the callers, who own the error
                answers.extend((s.reply, exc) for s in group)
            else:
                answers.extend((s.reply, hits) for s, hits in zip(group, results, strict=True))
        return answers

    def _drain_not_run(self, error: BaseException) -> None:
        """A drain job the pool could not run (it is stopping): fail what only it would take."""
        with self._direct_lock:
            self._drains_queued -= 1
            orphans = list(self._direct) if self._drains_queued == 0 else []
            if orphans:
                self._direct.clear()
        for search in orphans:
            search.reply.fail(error)

    async def search_exact(
        self, queries: Sequence[Vector], k: int, where: Filter | None, where_text: TextFilter | None
    ) -> ExactRerun:
        """Exact hits of each query on a search thread, one pass over the vectors for all of them
        (see `ShardState.search_exact`). Raises `Overloaded` when the mailbox is full,
        `Unavailable` once the shard is shutting down."""
        reply: Reply[ExactRerun] = Reply()
        vecs = tuple(np.ascontiguousarray(q, dtype=np.float32).reshape(-1) for q in queries)
        self._mailbox.offer(_ExactSearch(vecs, k, where, where_text, reply))
        return await reply.wait()

    async def search_keyword(
        self,
        terms: Sequence[str],
        k: int,
        where: Filter | None,
        where_text: TextFilter | None,
        include: frozenset[Include],
    ) -> list[Hit]:
        """The k best live documents by BM25 for `terms` (see `keyword_index.query_terms`)
        among those passing the filters, best first; only documents holding a term. Raises
        `Overloaded` when the mailbox is full, `Unavailable` once the shard is shutting down."""
        reply: Reply[list[Hit]] = Reply()
        self._mailbox.offer(_KeywordSearch(tuple(terms), k, where, where_text, include, reply))
        return await reply.wait()

    async def get(self, ids: Sequence[DocId]) -> list[StoredDoc]:
        """The stored documents of these ids, in request order; missing ids are left out."""
        reply: Reply[list[StoredDoc]] = Reply()
        self._mailbox.offer(_Get(tuple(ids), reply))
        return await reply.wait()

    async def scan(
        self, after: DocId | None, limit: int, where: Filter | None, where_text: TextFilter | None
    ) -> list[StoredDoc]:
        """Up to `limit` live documents passing the filters with ids after `after`, in id order
        (see `ShardState.scan`). Raises `Overloaded` when the mailbox is full."""
        reply: Reply[list[StoredDoc]] = Reply()
        self._mailbox.offer(_Scan(after, limit, where, where_text, reply))
        return await reply.wait()

    async def count(self) -> int:
        reply: Reply[int] = Reply()
        self._mailbox.offer(_Count(reply))
        return await reply.wait()

    async def ids_matching(self, where: Filter | None, where_text: TextFilter | None) -> list[DocId]:
        """Ids of the live documents passing both filters (None passes everything)."""
        reply: Reply[list[DocId]] = Reply()
        self._mailbox.offer(_IdsMatching(where, where_text, reply))
        return await reply.wait()

    async def save_files(self, directory: Path) -> int:
        """Write this shard's snapshot files into `directory`; returns the live count they hold.

        Runs as a read in a pool thread: searches go on meanwhile, writes wait for it, so the
        files hold exactly the writes sent before this call. Raises OSError.
        """
        reply: Reply[int] = Reply()
        await self._mailbox.send(_SaveFiles(directory, reply))
        return await reply.wait()

    async def load_files(self, directory: Path) -> int:
        """Replace this shard's state by the one in snapshot files (verified by the caller), as
        a write; returns its live count. Raises ValueError (files that disagree), OSError."""
        reply: Reply[int] = Reply()
        self.writes_sent += 1  # a new state: cached results of the old one no longer match
        try:
            await self._mailbox.send(_LoadFiles(directory, reply))
            return await reply.wait()
        finally:
            self.writes_done += 1

    def peek(self, ids: Sequence[DocId]) -> list[StoredDoc]:
        """`get` on the caller's thread, with no message: for the collection's applier, between
        its own writes (the only writes), so no write is in progress. Raises Unavailable if one
        is (then ask with `get`)."""
        if self.writes_sent != self.writes_done:
            raise Unavailable("a write to this shard is in progress")
        return self._state.get(ids)

    def version(self) -> tuple[int, int, int] | None:
        """(shard number, writes sent, writes done) while no write is in flight, else None: two
        equal versions bracket a read that saw one state of this shard."""
        if self.writes_sent != self.writes_done:
            return None
        return (self.number, self.writes_sent, self.writes_done)

    def sizes(self) -> ShardSizes:
        """Documents, deleted slots, memory and mailbox depth now (for metrics; no message)."""
        return self._state.sizes(self._mailbox.depth, self._mailbox.size)

    def close(self) -> None:
        """No more messages: what is queued is still answered, then `run()` returns."""
        self._closing = True
        self._mailbox.close()

    # -- the loop -----------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Serve the mailbox until `close()`; in-flight reads finish before this returns."""
        task_status.started()
        try:
            await self._serve()
        finally:
            with anyio.CancelScope(shield=True):
                await self._readers_at_most(0)
            self._fail_queued()
            self._state.close()

    async def _serve(self) -> None:
        receive = self._receive
        while True:
            if (
                self._state.n_unindexed
                and not (self._catch_up_failed or self._closing)
                and (self._since_catch_up >= _CATCH_UP_EVERY or not (self._pending or self._mailbox.depth))
            ):
                await self._catch_up(_CATCH_UP_CHUNK)
            self._since_catch_up += 1
            if self._pending:
                msg = self._pending.popleft()
            else:
                try:
                    msg = receive.receive_nowait()
                except anyio.WouldBlock:
                    self._idle = True
                    try:
                        msg = await receive.receive()
                    except anyio.EndOfStream:
                        return
                    finally:
                        self._idle = False
                except anyio.EndOfStream:
                    return
            self._in_hand = [msg]
            if isinstance(msg, _Search):
                # Wait for a free slot first: queries queue meanwhile and go out as one batch.
                await self._readers_at_most(self._max_reads - 1)
                batch = self._drain_searches(msg)
                self._in_hand = list(batch)
                await self._dispatch_searches(batch)
            elif isinstance(msg, _Count):
                msg.reply.set(self._state.n_live)
            elif isinstance(msg, _Get):
                await self._readers_at_most(self._max_reads - 1)
                self._start_read(_bind(self._state.get, msg.ids), msg.reply.set, msg.reply.fail)
            elif isinstance(msg, _KeywordSearch):
                await self._readers_at_most(self._max_reads - 1)
                fn3 = _bind(self._state.search_keyword, msg.terms, msg.k, msg.where, msg.where_text, msg.include)
                self._start_read(fn3, msg.reply.set, msg.reply.fail)
            elif isinstance(msg, _IdsMatching):
                await self._readers_at_most(self._max_reads - 1)
                fn = _bind(self._state.ids_matching, msg.where, msg.where_text)
                self._start_read(fn, msg.reply.set, msg.reply.fail)
            elif isinstance(msg, _ExactSearch):
                await self._readers_at_most(self._max_reads - 1)
                exact = _bind(self._state.search_exact, msg.queries, msg.k, msg.where, msg.where_text)
                self._start_read(exact, msg.reply.set, msg.reply.fail)
            elif isinstance(msg, _Scan):
                await self._readers_at_most(self._max_reads - 1)
                scan = _bind(self._state.scan, msg.after, msg.limit, msg.where, msg.where_text)
                self._start_read(scan, msg.reply.set, msg.reply.fail)
            elif isinstance(msg, _Upsert | _Delete):
                await self._readers_at_most(0)
                await self._write(msg)
            elif isinstance(msg, _SaveFiles):
                # A snapshot's index holds every document it lists.
                if self._state.n_unindexed and not await self._catch_up(self._state.n_unindexed):
                    msg.reply.fail(OSError("the index could not take every document; no snapshot"))
                    continue
                await self._readers_at_most(self._max_reads - 1)
                self._start_read(_bind(self._state.save_files, msg.directory), msg.reply.set, msg.reply.fail)
            elif isinstance(msg, _LoadFiles):
                await self._readers_at_most(0)
                await self._load(msg)
            else:
                self._in_hand = []  # nothing to answer: it carries no known reply
                unknown_message("shard", msg)

    def _drain_searches(self, first: _Search) -> list[_Search]:
        """`first` and the searches queued right behind it, up to `search_batch`.

        Stops at the first message that is not a search: it is kept for the loop, so writes
        keep their place in the order.
        """
        batch = [first]
        while len(batch) < self._batch:
            try:
                msg = self._receive.receive_nowait()
            except (anyio.WouldBlock, anyio.EndOfStream):
                break
            if not isinstance(msg, _Search):
                self._pending.append(msg)
                break
            batch.append(msg)
        return batch

    async def _dispatch_searches(self, batch: list[_Search]) -> None:
        groups: dict[tuple[int, QueryParams, frozenset[Include]], list[_Search]] = {}
        filtered: list[_Search] = []
        for s in batch:
            if s.where is None and s.where_text is None:
                groups.setdefault((s.k, s.params, s.include), []).append(s)
            else:
                filtered.append(s)
        for (k, params, include), group in groups.items():
            await self._use_params(params)
            # Spread a big group over the free slots, one single-threaded knn_query each: hnswlib
            # runs a call of up to 4 queries per thread on one thread anyway, and the parts
            # come back at different times, so their callers' next queries overlap the search.
            free = self._max_reads - self._readers
            parts = max(1, min(free, self._max_readers, len(group) // _MIN_PART))
            threads = self._max_readers if parts == 1 and self._readers == 0 else 1
            size = -(-len(group) // parts)
            for start in range(0, len(group), size):
                part = group[start : start + size]
                fn = _bind(self._state.search_unfiltered, [s.query for s in part], k, include, threads, params)
                if threads > 1:
                    fn = self._pool.spread(fn)
                replies = [s.reply for s in part]
                self._start_read(fn, _deliver_all(replies), _fail_all(replies))
        for s in filtered:
            await self._use_params(s.params)
            fn2 = _bind(self._state.search_filtered, s.query, s.k, s.where, s.where_text, s.include, s.params)
            self._start_read(fn2, s.reply.set, s.reply.fail)

    async def _use_params(self, params: QueryParams) -> None:
        """Make `params` the index's state where it keeps them (changed only while no read is
        in flight), then wait for a free read slot."""
        if not self._state.serves(params):
            await self._readers_at_most(0)
            self._state.use_params(params)
        else:
            await self._readers_at_most(self._max_reads - 1)

    def _start_read(
        self, fn: Callable[[], T], ok: Callable[[T], None], fail: Callable[[BaseException], None]
    ) -> None:
        """Hand a read to the pool. Call only with a free slot (`_readers_at_most`)."""
        assert self._readers < self._max_reads
        self._readers += 1  # counted now, so a write queued next waits for this read

        def done(value: T) -> None:
            self._read_finished()
            ok(value)

        def failed(error: BaseException) -> None:
            self._read_finished()
            fail(error)

        self._pool.submit(fn, done, failed)

    def _read_finished(self) -> None:
        self._readers -= 1
        if self._waiter is not None:
            self._waiter.set()
            self._waiter = None

    async def _readers_at_most(self, limit: int) -> None:
        while self._readers > limit:
            if self._waiter is None:
                self._waiter = anyio.Event()
            await self._waiter.wait()

    async def _write(self, msg: _Upsert | _Delete) -> None:
        """Apply one write in a worker thread; the loop (and so every read) waits for it."""
        try:
            if isinstance(msg, _Upsert):
                # hnswlib adds with up to search_threads threads of its own: off the pin.
                upsert = _bind(self._state.upsert, msg.docs, msg.fresh_labels, msg.defer_index)
                await self._pool.call(self._pool.spread(upsert))
                msg.reply.set(None)
            elif isinstance(msg, _Delete):
                existed = await self._pool.call(_bind(self._state.delete, msg.ids))
                msg.reply.set(existed)
        except Exception as exc:
            msg.reply.fail(exc)
        except BaseException:
            msg.reply.fail(Unavailable("shard is shutting down"))
            raise

    async def _catch_up(self, limit: int) -> bool:
        """Add up to `limit` unindexed documents to the index, as a write; False if that
        failed (then they stay unindexed, searched exactly and still correct, and the loop
        stops trying)."""
        self._since_catch_up = 0
        await self._readers_at_most(0)
        self.writes_sent += 1  # answers may change (exact scores become the index's)
        try:
            await self._pool.call(self._pool.spread(_bind(self._state.index_unindexed, limit)))
        except Exception as exc:
            log.error("%s: adding documents to the index failed (%s)", self._mailbox.name, exc)
            self._catch_up_failed = True
            return False
        finally:
            self.writes_done += 1
        return True

    async def _load(self, msg: _LoadFiles) -> None:
        state = self._state
        try:
            loaded = await self._pool.call(
                _bind(
                    ShardState.load_files,
                    msg.directory,
                    state.dim,
                    state.metric,
                    state.config,
                    state.spec,
                    self._vectors_path(state.spec),
                )
            )
        except Exception as exc:
            msg.reply.fail(exc)
            return
        except BaseException:
            msg.reply.fail(Unavailable("shard is shutting down"))
            raise
        loaded.occupancy = state.occupancy  # one record of overlaps over the shard's life
        self._state = loaded
        state.close()
        msg.reply.set(loaded.n_live)

    def _fail_queued(self) -> None:
        """On exit (normal or cancelled), nobody waits forever: queued messages fail with
        `unavailable`."""
        self._mailbox.close()
        error = Unavailable("shard is shutting down")
        for msg in self._in_hand:  # a no-op for those already answered
            msg.reply.fail(error)
        while True:
            if self._pending:
                msg = self._pending.popleft()
            else:
                try:
                    msg = self._receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
            msg.reply.fail(error)
        self._receive.close()


def _bind(fn: Callable[..., T], *args: object) -> Callable[[], T]:
    return lambda: fn(*args)


def _deliver_all(replies: list[Reply[list[Hit]]]) -> Callable[[list[list[Hit]]], None]:
    def deliver(results: list[list[Hit]]) -> None:
        for reply, hits in zip(replies, results, strict=True):
            reply.set(hits)

    return deliver


def _answer_all(answers: list[tuple[Reply[list[Hit]], list[Hit] | BaseException]]) -> None:
    for reply, answer in answers:
        if isinstance(answer, BaseException):
            reply.fail(answer)
        else:
            reply.set(answer)


def _fail_all(replies: list[Reply[list[Hit]]]) -> Callable[[BaseException], None]:
    def fail(exc: BaseException) -> None:
        for reply in replies:
            reply.fail(exc)

    return fail
