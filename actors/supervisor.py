"""The supervisor: starts the actors in order, serves the engine API, stops them in reverse.

    start:  persistence -> embedder (its model loads meanwhile) -> catalog (+ shards) -> load
            collections (snapshot + log tail, or a rebuild) -> model loaded -> snapshotter ->
            subscriptions -> follower (first sync: caught up with the log) -> ingest -> ready
            -> broker sources (actors/sources)
    stop:   broker sources (commit and acknowledge what they read)
            -> ingest (drains acked work) -> follower -> subscriptions -> snapshotter (last
            snapshots) -> catalog -> embedder -> persistence

Several nodes on one database form a cluster: each collection's applier takes this node's commits
from ingest and every node's from the follower (actors/applier.py, actors/follower.py).

`Engine` is the only thing the edge talks to. Its methods take validated requests and return
typed results; they raise `ShoalError`s with wire codes.

A read races a drop of its collection whenever it awaits between finding the collection and
asking its shards (embedding a text query, or one shard after another): the shards it holds may
have stopped meanwhile and answer `unavailable`. The collection no longer exists then, so the
read answers `not_found`, as it would a moment later; `unavailable` stays for a server that is
stopping.
"""

from __future__ import annotations

import dataclasses
import heapq
import logging
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any, Protocol, cast

import anyio
import numpy as np
from anyio.abc import TaskGroup, TaskStatus

from actors import planner
from actors.applier import Applied, Publisher
from actors.catalog import Catalog, Collection
from actors.compactor import Compactor
from actors.db_health import DatabaseHealth
from actors.embedder import Embedder
from actors.follower import Follower, FollowerStats
from actors.indexes.base import QueryParams
from actors.ingest import Ingest
from actors.matching import StandingQuery
from actors.persistence import CatalogRow, Persistence
from actors.recall_sampler import RecallSampler, RecallStats
from actors.results_cache import CacheStats, EmbeddingCache, ResultsCache
from actors.snapshotter import Snapshotter
from actors.sources.actor import build_source
from actors.status import CollectionStatus, EngineStatus, PoolStatus, Queue
from actors.subscriber import Event, Subscriber
from actors.subscriptions import SubscriptionConfig, Subscriptions, SubscriptionStats
from actors.topk import TopkQuery
from models import requests as rq
from models.config import EngineConfig, Limits
from models.errors import BadRequest, DimensionMismatch, InvalidVector, NotFound, ShoalError, Unavailable, echo
from models.index_spec import check_query_params
from models.records import MODEL_DIM, CollectionInfo, DocId, Hit, Include, Metric, StoredDoc, Vector
from models.reply_size import check_rows_fit

log = logging.getLogger("shoal.engine")

# Queries of one `query_batch` that are not searched together (filtered, text, keyword, hybrid,
# by example) served at once.
BATCH_QUERIES_AT_ONCE = 16


class Actor(Protocol):
    async def run(self, *, task_status: TaskStatus[Any] = ...) -> None: ...

    def close(self) -> None: ...


class Engine:
    """The running engine of one node."""

    def __init__(
        self,
        dsn: str,
        config: EngineConfig,
        limits: Limits,
        subscriptions: SubscriptionConfig | None = None,
        snapshot_dir: Path | None = None,
        vectors_dir: Path | None = None,
        sources: Sequence[str] = (),
    ) -> None:
        self.config = config
        self.limits = limits
        self.persistence = Persistence(
            dsn,
            pool_size=config.pg_pool_size,
            connect_timeout=config.db_connect_timeout_s,
            acquire_timeout=config.db_command_timeout_s,
            command_timeout=config.db_command_timeout_s,
            probe_interval=config.db_probe_interval_s,
            probe_timeout=config.db_probe_timeout_s,
        )
        self.embedder = Embedder(config)
        self._listeners: list[Publisher] = []
        self.subscriptions = Subscriptions(self.persistence, subscriptions)
        self.catalog = Catalog(
            config,
            self.persistence,
            self._publish,
            on_removed=self._collection_removed,
            vectors_dir=vectors_dir,
        )
        self.ingest = Ingest(config, self.persistence, self.embedder, self.catalog)
        self.sources = [build_source(url, self) for url in sources]
        self.follower = Follower(
            dsn,
            self.persistence,
            self.catalog,
            self._load_collection,
            poll_s=config.follow_poll_s,
            connect_timeout=config.db_connect_timeout_s,
        )
        self.compactor = Compactor(self.catalog, self.persistence, config)
        self.add_listener(self.subscriptions.publish)
        # Snapshots for fast restart, when given a directory for them.
        self.snapshotter = (
            None if snapshot_dir is None else Snapshotter(snapshot_dir, self.catalog, self.persistence, config)
        )
        self.results = ResultsCache(config.results_cache_bytes)
        self.embeddings = EmbeddingCache(config.embedding_cache_bytes)
        self.recall = RecallSampler(config, self.catalog)
        self.ready = False

    # -- lifecycle ----------------------------------------------------------------------------

    @classmethod
    @asynccontextmanager
    async def running(
        cls,
        dsn: str,
        config: EngineConfig,
        limits: Limits,
        subscriptions: SubscriptionConfig | None = None,
        snapshot_dir: Path | None = None,
        vectors_dir: Path | None = None,
        sources: Sequence[str] = (),
    ) -> AsyncIterator[Engine]:
        engine = cls(dsn, config, limits, subscriptions, snapshot_dir, vectors_dir, sources)
        # Opened before the task group, so that a StartupError (unreachable database, no
        # pgvector) reaches the caller as itself, not inside an exception group.
        await engine.persistence.open()
        started: list[tuple[Actor, anyio.Event]] = []
        async with anyio.create_task_group() as tg:
            try:
                started.append((engine.persistence, await _start(tg, engine.persistence)))
                # The model loads while the collections do (they need no embedding): a restart
                # is ready sooner by the model's load time.
                model_loaded = anyio.Event()
                started.append((engine.embedder, _start_soon(tg, engine.embedder, model_loaded)))
                started.append((engine.catalog, await _start(tg, engine.catalog)))
                await engine._load_collections()
                await model_loaded.wait()
                if engine.snapshotter is not None:  # stops after ingest, before the shards
                    started.append((engine.snapshotter, await _start(tg, engine.snapshotter)))
                started.append((engine.subscriptions, await _start(tg, engine.subscriptions)))
                started.append((engine.recall, await _start(tg, engine.recall)))
                # Started once caught up with what other nodes committed while this one was down.
                started.append((engine.follower, await _start(tg, engine.follower)))
                started.append((engine.ingest, await _start(tg, engine.ingest)))
                started.append((engine.compactor, await _start(tg, engine.compactor)))
                for source in engine.sources:  # after ingest, stopped before it
                    started.append((source, await _start(tg, source)))
                engine.ready = True
                log.info("engine ready: %d collection(s)", len(engine.catalog.names()))
                yield engine
            finally:
                engine.ready = False
                engine.persistence.begin_shutdown()  # no writer waits on a dead database now
                # Reverse order; each actor finishes its queued work before the next one closes.
                with anyio.CancelScope(shield=True):
                    for running, finished in reversed(started):
                        running.close()
                        await finished.wait()

    async def _load_collections(self) -> None:
        """Load every collection from its snapshot and the log after it, or else rebuild it from
        PostgreSQL: the durable state is the source of truth."""
        for row in await self.persistence.catalog_rows():
            if self.snapshotter is not None and await self.snapshotter.restore(row) is not None:
                continue
            await self._load_collection(row)

    async def _load_collection(self, row: CatalogRow) -> Collection:
        """Start `row`'s collection here, its shards loaded from a snapshot of the live documents;
        its applier then follows the log from the snapshot's seq. Raises NotFound, Unavailable."""

        async def load(collection: Collection) -> None:
            async with self.persistence.load_collection(row.name) as snapshot:
                loaded = await collection.applier.load(snapshot, lambda: snapshot.last_seq)
            log.info("loaded collection %s: %d documents, seq %d", row.name, loaded, collection.last_seq)

        return await self.catalog.add(row.name, row.dim, row.metric, row.cid, load, row.index)

    async def _read_target(self, name: str, min_seq: int | None) -> Collection:
        """The collection a read names, once it has applied its changes through `min_seq`. A
        reader that gives a seq knows the collection exists, so one created on another node and
        not followed here yet is looked up in the shared catalog first instead of answering
        `not_found` until the next poll. Raises NotFound, Unavailable."""
        if min_seq is not None and self.catalog.find(name) is None:
            with anyio.move_on_after(self.config.min_seq_wait_ms / 1000):
                await self.follower.sync()
        collection = self.catalog.get(name)
        await self._applied_through(collection, min_seq)
        return collection

    async def _applied_through(self, collection: Collection, min_seq: int | None) -> None:
        """Return once `collection` has applied its changes through `min_seq` (None: at once).
        Raises Unavailable after `min_seq_wait_ms`, NotFound if it was dropped meanwhile."""
        if min_seq is None or collection.last_seq >= min_seq:
            return
        self.follower.wake(collection.name)  # don't wait for the next poll if a hint was lost
        if not await collection.applier.wait_applied(min_seq, self.config.min_seq_wait_ms / 1000):
            raise Unavailable(
                f"this node has applied collection {collection.name!r} through seq "
                f"{collection.last_seq}, not yet {min_seq}; retry, or ask another node"
            )
        if self.catalog.find(collection.name) is not collection:
            raise NotFound(f"no collection named {collection.name!r}")

    def add_listener(self, listener: Publisher) -> None:
        """Called after every applied change, after its ack (subscriptions, change streams)."""
        self._listeners.append(listener)

    async def _publish(self, applied: Applied) -> None:
        for listener in self._listeners:
            await listener(applied)

    # -- operations ---------------------------------------------------------------------------

    async def create_collection(self, req: rq.CreateCollection) -> CollectionInfo:
        dim = req.dim if req.dim is not None else MODEL_DIM
        index = req.index.resolved(dim, self.config.hnsw_m, self.config.hnsw_ef_construction)
        try:
            return await self.ingest.create_collection(req.name, dim, req.metric, req.if_not_exists, index)
        except NotFound:
            if not req.if_not_exists:
                raise
        # It exists in the shared catalog (another node created it) and is not followed here yet.
        await self.follower.sync()
        collection = self.catalog.get(req.name)
        return collection.info(await self.catalog.counts(collection))

    async def list_collections(self) -> list[CollectionInfo]:
        infos = []
        for collection in self.catalog.all():
            try:
                infos.append(collection.info(await self.catalog.counts(collection)))
            except Unavailable as exc:
                if self.catalog.holds(collection):
                    raise
                log.debug("collection %s dropped while listed: %s", collection.name, exc.message)
        return infos

    async def drop_collection(self, req: rq.DropCollection) -> None:
        self.catalog.get(req.name)
        await self.ingest.drop_collection(req.name)  # the catalog's removal calls _collection_removed

    def _collection_removed(self, name: str) -> None:
        """A collection left the catalog, dropped here or on another node (the follower): its
        cached answers, recall figures and subscriptions go with it."""
        self.results.forget(name)
        self.recall.forget(name)
        self.subscriptions.collection_dropped(name)

    async def upsert(self, req: rq.Upsert) -> tuple[int, int]:
        self.check_upsert(req)
        return await self.ingest.upsert(req.collection, req.docs)

    def check_upsert(self, req: rq.Upsert) -> None:
        """What an upsert is refused for before it is queued (the edges and the broker sources
        alike). Raises NotFound, DimensionMismatch, InvalidVector."""
        collection = self.catalog.get(req.collection)
        for doc in req.docs:
            if doc.vector is None:
                if collection.dim != MODEL_DIM:
                    raise DimensionMismatch(
                        f"document {doc.id!r} has only text, which embeds to {MODEL_DIM} dimensions; "
                        f"collection {collection.name!r} has dim {collection.dim}"
                    )
            else:
                _check_vector(collection, doc.vector, f"document {doc.id!r}")

    async def delete(self, req: rq.Delete) -> tuple[int, int]:
        self.catalog.get(req.collection)
        return await self.ingest.delete(req.collection, req.ids, req.where, req.where_text)

    async def get(self, req: rq.Get) -> list[StoredDoc]:
        """The documents of `req.ids` that exist, in request order; without ids, one page (see
        `scan`). Raises NotFound for an unknown collection."""
        if req.ids is None:
            return (await self.scan(req))[0]
        collection = await self._read_target(req.collection, req.min_seq)
        found: dict[str, StoredDoc] = {}
        try:
            for shard in collection.shards:
                for doc in await shard.get(req.ids):
                    found[doc.id] = doc
        except Unavailable as exc:
            raise self._read_failed(collection, exc) from None
        docs = [found[i] for i in dict.fromkeys(req.ids) if i in found]
        check_rows_fit(docs, req.include, collection.dim, self.limits)
        return docs

    async def scan(self, req: rq.Get) -> tuple[list[StoredDoc], bool]:
        """One page of a paged `get`: up to `req.limit` live documents passing its filters with
        ids after `req.after`, in id order, and whether more follow. Each shard returns its
        next `limit + 1` in id order; the merge of those cut at `limit` is the page, and more
        follow exactly when the shards returned more than `limit` in all. Raises NotFound."""
        collection = await self._read_target(req.collection, req.min_seq)
        shards = collection.shards
        want = req.limit + 1
        per_shard: list[list[StoredDoc]] = [[] for _ in shards]
        errors: list[ShoalError] = []

        async def one(i: int) -> None:
            try:
                per_shard[i] = await shards[i].scan(req.after, want, req.where, req.where_text)
            except ShoalError as exc:  # raised as itself below, not inside an exception group
                errors.append(exc)

        try:
            if len(shards) == 1:
                per_shard[0] = await shards[0].scan(req.after, want, req.where, req.where_text)
            else:
                async with anyio.create_task_group() as tg:
                    for i in range(len(shards)):
                        tg.start_soon(one, i)
                if errors:
                    raise errors[0]
        except Unavailable as exc:
            raise self._read_failed(collection, exc) from None
        merged = list(heapq.merge(*per_shard, key=lambda doc: doc.id))
        return merged[: req.limit], len(merged) > req.limit

    async def count(self, req: rq.Count) -> int:
        collection = await self._read_target(req.collection, req.min_seq)
        try:
            return await self.catalog.counts(collection)
        except Unavailable as exc:
            raise self._read_failed(collection, exc) from None

    def _read_failed(self, collection: Collection, error: Unavailable) -> ShoalError:
        """What a read answers when a shard of `collection` was stopped under it: `not_found` if
        the collection was dropped meanwhile, else `error` (the server is stopping)."""
        if self.catalog.holds(collection):
            return error
        return NotFound(f"no collection named {collection.name!r} (it was dropped)")

    async def query_vector(self, collection: Collection, vector: Vector | None, text: str | None) -> Vector:
        """The query's vector: as given (checked), or the embedding of its text."""
        if vector is not None:
            _check_vector(collection, vector, "the query vector")
            return vector
        assert text is not None
        if collection.dim != MODEL_DIM:
            raise DimensionMismatch(
                f"a text query embeds to {MODEL_DIM} dimensions; "
                f"collection {collection.name!r} has dim {collection.dim}"
            )
        return await self.embeddings.vector(text, self.embedder.embed_query)

    async def query(self, req: rq.Query, scope: frozenset[str] | None = None) -> tuple[list[Hit], bool]:
        """(hits, cached): the query's answer (see `planner.execute`), from the results cache
        when this collection has not changed since the same query (by a caller of the same
        `scope`) was answered. Raises NotFound (also when the collection is dropped while the
        query runs), DimensionMismatch, InvalidVector, Overloaded, Unavailable, and TooLarge when
        the hits' texts and vectors alone would not fit in one frame."""
        collection = await self._read_target(req.collection, req.min_seq)
        check_query_params(collection.index, collection.name, req.ef, req.nprobe)
        if req.like is not None:
            req = await self._resolve_like(collection, req)
        # A query by example asks for one hit more and leaves the liked document out, so it
        # still answers min(k, other matching documents).
        run = req if req.like is None else _one_more(req)
        asked: list[Vector] = []

        async def vector_of() -> Vector:
            vector = await self.query_vector(collection, run.vector, run.text)
            asked.append(vector)
            return vector

        async def compute() -> list[Hit]:
            seq = collection.last_seq
            try:
                hits = await planner.execute(collection, run, vector_of, self.config)
            except Unavailable as exc:
                raise self._read_failed(collection, exc) from None
            if run.mode == "vector" and asked:
                self.recall.offer(collection, asked[0], run.k, run.where, run.where_text, hits, seq)
            if req.like is not None:
                hits = [hit for hit in hits if hit.id != req.like][: req.k]
            check_rows_fit(hits, req.include, collection.dim, self.limits)
            return hits

        return await self.results.answer(collection, req, scope, compute)

    async def query_batch(
        self, req: rq.QueryBatch, scope: frozenset[str] | None = None
    ) -> list[tuple[list[Hit], bool] | ShoalError]:
        """Each query's (hits, cached), as `query` answers it, or the error it alone met. The
        unfiltered vector queries are searched together: one `planner.vector_side_many` per
        (k, index parameters, include), so the index sees them as one batch; the others are
        served by `query`, `BATCH_QUERIES_AT_ONCE` at a time. Raises, for the whole batch,
        NotFound and Unavailable (the collection, after every `min_seq` given)."""
        min_seqs = [q.min_seq for q in req.queries if q.min_seq is not None]
        collection = await self._read_target(req.collection, max(min_seqs) if min_seqs else None)
        out: dict[int, tuple[list[Hit], bool] | ShoalError] = {}
        plain: list[int] = []
        alone: list[int] = []
        for i, q in enumerate(req.queries):
            if q.mode != "vector" or q.vector is None or q.where is not None or q.where_text is not None:
                alone.append(i)
                continue
            try:
                check_query_params(collection.index, collection.name, q.ef, q.nprobe)
                _check_vector(collection, q.vector, f"queries[{i}]: the query vector")
            except ShoalError as exc:
                out[i] = exc
                continue
            plain.append(i)
        # A batch of many filtered or text queries must not become that many searches and
        # embeddings queued at once.
        limiter = anyio.CapacityLimiter(BATCH_QUERIES_AT_ONCE)

        async def one(i: int) -> None:
            async with limiter:
                try:
                    out[i] = await self.query(req.queries[i], scope)
                except ShoalError as exc:
                    out[i] = exc

        searched = [req.queries[i] for i in plain]
        async with anyio.create_task_group() as tg:
            for i in alone:
                tg.start_soon(one, i)
            if plain:
                compute = partial(self._search_plain, collection, searched)
                answers = await self.results.answer_many(collection, searched, scope, compute)
                out.update(zip(plain, answers, strict=True))
        return [out[i] for i in range(len(req.queries))]

    async def _search_plain(
        self, collection: Collection, reqs: Sequence[rq.Query], positions: list[int]
    ) -> list[list[Hit] | ShoalError]:
        """The hits of `reqs[p]` for each p of `positions` (unfiltered vector queries, checked),
        those with the same (k, index parameters, include) searched as one batch; or the error
        of each (its group's search failed, or its rows would not fit in a frame)."""
        seq = collection.last_seq
        groups: dict[tuple[int, QueryParams, frozenset[Include]], list[int]] = {}
        for p in positions:
            r = reqs[p]
            groups.setdefault((r.k, planner.index_params(r), r.include), []).append(p)
        found: dict[int, list[Hit] | ShoalError] = {}
        for members in groups.values():
            first = reqs[members[0]]
            queries = np.stack([cast(Vector, reqs[p].vector) for p in members])
            try:
                lists = await planner.vector_side_many(
                    collection, queries, first.k, planner.index_params(first), first.include
                )
            except ShoalError as exc:
                error = self._read_failed(collection, exc) if isinstance(exc, Unavailable) else exc
                found.update((p, error) for p in members)
                continue
            for p, hits in zip(members, lists, strict=True):
                r = reqs[p]
                self.recall.offer(collection, cast(Vector, r.vector), r.k, None, None, hits, seq)
                try:
                    check_rows_fit(hits, r.include, collection.dim, self.limits)
                    found[p] = hits
                except ShoalError as exc:
                    found[p] = exc
        return [found[p] for p in positions]

    async def _liked(self, collection: Collection, doc_id: DocId) -> StoredDoc:
        """The stored document a query by example names. Raises NotFound (no such document, or
        the collection was dropped meanwhile), Unavailable."""
        try:
            found = await collection.shards[collection.shard_index(doc_id)].get([doc_id])
        except Unavailable as exc:
            raise self._read_failed(collection, exc) from None
        if not found:
            raise NotFound(f"no document {echo(doc_id)} in collection {collection.name!r}")
        return found[0]

    async def _resolve_like(self, collection: Collection, req: rq.Query) -> rq.Query:
        """`req` with the liked document's vector as its query vector and, for the keyword and
        hybrid modes, its text as the query text. Raises NotFound, BadRequest (a keyword or
        hybrid query by example of a document without text)."""
        assert req.like is not None
        liked = await self._liked(collection, req.like)
        if req.mode == "vector":
            return dataclasses.replace(req, vector=liked.vector, text=None)
        if liked.text is None:
            raise BadRequest(f"mode {req.mode!r} needs text, and document {echo(req.like)} has none")
        return dataclasses.replace(req, vector=liked.vector if req.mode == "hybrid" else None, text=liked.text)

    # -- standing queries -----------------------------------------------------------------------

    async def subscribe(self, req: rq.Subscribe, *, close_on_overflow: bool) -> Subscriber:
        """A registered match subscriber (see `Subscriptions.register`); a text query is embedded
        once, here. Raises NotFound, DimensionMismatch, InvalidVector, Overloaded, Unavailable."""
        collection = self.catalog.get(req.collection)
        if req.like is not None:
            vector = (await self._liked(collection, req.like)).vector
        else:
            vector = await self.query_vector(collection, req.vector, req.text)
        if self.catalog.get(req.collection) is not collection:  # dropped while embedding
            raise NotFound(f"no collection named {req.collection!r}")
        query: StandingQuery | TopkQuery
        if req.k is not None:  # a top-k list starts from the current state, whatever after_seq says
            query = TopkQuery(vector, req.k, req.threshold, req.where, req.where_text)
        else:
            assert req.threshold is not None, "a threshold subscription has a threshold"
            query = StandingQuery(vector, req.threshold, req.where, req.where_text, exclude=req.like)
            await self.persistence.check_resumable(req.collection, req.after_seq)
        return self.subscriptions.register(
            collection,
            query,
            include=req.include,
            after_seq=req.after_seq,
            close_on_overflow=close_on_overflow,
        )

    async def changes(self, name: str, after_seq: int | None) -> Subscriber:
        """A registered change-feed subscriber (closed, not counted, when it overflows). Raises
        NotFound, Gone (`after_seq` before the compacted log), Overloaded, Unavailable."""
        collection = self.catalog.get(name)
        await self.persistence.check_resumable(name, after_seq)
        if self.catalog.get(name) is not collection:  # dropped meanwhile
            raise NotFound(f"no collection named {name!r}")
        return self.subscriptions.register(collection, None, after_seq=after_seq, close_on_overflow=True)

    # -- what the edges need besides the operations (they talk to the Engine, not its actors) ---

    @property
    def subscription_config(self) -> SubscriptionConfig:
        """The bounds of subscriptions (per connection, buffers, grace of a closing stream)."""
        return self.subscriptions.config

    async def replay_page(self, sub: Subscriber) -> list[Event]:
        """The next page of `sub`'s replay from the durable log (see `Subscriptions.replay_page`).
        Raises NotFound if the collection is gone, Unavailable if the database is unreachable."""
        return [e for e in await self.subscriptions.replay_page(sub) if not sub.excludes(e)]

    def recall_stats(self, name: str) -> RecallStats:
        """Collection `name`'s recall estimate for its index (see actors/recall_sampler.py)."""
        return self.recall.stats(name)

    def subscription_stats(self) -> SubscriptionStats:
        return self.subscriptions.stats()

    def close_subscriptions(self) -> None:
        """End every subscription, told `unavailable` (the server is stopping); refuse new ones."""
        self.subscriptions.close_all()

    def collection_dim(self, name: str) -> int | None:
        """The vector width of collection `name`, None if there is none (a plain lookup)."""
        try:
            return self.catalog.get(name).dim
        except NotFound:
            return None

    async def database_reachable(self) -> bool:
        """True if PostgreSQL answers a query now."""
        return await self.persistence.ping()

    @property
    def database_health(self) -> DatabaseHealth:
        """What this node believes about the database now (kept by the probe and the pool);
        reading it never waits, so /readyz and the write deadline answer while it hangs."""
        return self.persistence.health

    def cache_stats(self) -> dict[str, CacheStats]:
        """The results cache's and the query-embedding cache's counters, by cache."""
        return {"results": self.results.stats, "embeddings": self.embeddings.stats}

    def follower_stats(self) -> FollowerStats:
        """How far this node has applied the change log other nodes write."""
        return self.follower.stats()

    def status(self) -> EngineStatus:
        """Sizes, queues and their bounds now, for an operator's metrics. Sends no message to any
        actor, so it answers even while they are busy (a figure may be a write behind)."""
        collections = tuple(
            CollectionStatus(c.name, tuple(shard.sizes() for shard in c.shards)) for c in self.catalog.all()
        )
        embed = self.embedder.queue_depths()
        queues = {
            "ingest": Queue(self.ingest.queued, self.config.ingest_queue),
            "embed_query": Queue(embed["query"].queued, embed["query"].limit),
            "embed_bulk": Queue(embed["bulk"].queued, embed["bulk"].limit),
            "subscriptions": Queue(self.subscriptions.stats().queued, self.subscriptions.config.sub_mailbox),
        }
        pool = self.persistence.pool_stats()
        database = None if pool is None else PoolStatus(*pool)
        read_pool = self.catalog.read_pool
        return EngineStatus(
            self.ready, collections, queues, database, read_pool.threads, read_pool.queued, self.embedder.stats
        )


def _one_more(req: rq.Query) -> rq.Query:
    """`req` asking for one hit (and one candidate per side) more: room for the liked document."""
    return dataclasses.replace(
        req,
        k=req.k + 1,
        vector_candidates=None if req.vector_candidates is None else req.vector_candidates + 1,
        keyword_candidates=None if req.keyword_candidates is None else req.keyword_candidates + 1,
    )


def _check_vector(collection: Collection, vector: Vector, what: str) -> None:
    if vector.shape[0] != collection.dim:
        raise DimensionMismatch(
            f"{what} has {vector.shape[0]} values; collection {collection.name!r} has dim {collection.dim}"
        )
    if collection.metric is Metric.COSINE and not np.count_nonzero(vector):  # cheaper than .any()
        raise InvalidVector(f"{what} is all zeros, which has no direction under cosine")


def _start_soon(tg: TaskGroup, actor: Actor, started: anyio.Event) -> anyio.Event:
    """Start an actor in `tg` without waiting: `started` is set when it reports started; the
    returned event when its run() has returned. If run() raises first, the task group fails."""
    finished = anyio.Event()

    async def runner() -> None:
        try:
            async with anyio.create_task_group() as inner:
                await inner.start(actor.run)
                started.set()
        finally:
            finished.set()

    tg.start_soon(runner)
    return finished


async def _start(tg: TaskGroup, actor: Actor) -> anyio.Event:
    """Start an actor in `tg`; the returned event is set when its run() has returned."""
    finished = anyio.Event()

    async def runner(*, task_status: TaskStatus[Any]) -> None:
        try:
            await actor.run(task_status=task_status)
        finally:
            finished.set()

    await tg.start(runner)
    return finished
