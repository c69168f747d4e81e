"""The catalog: which collections exist on this node and the shard actors that hold them.

The catalog owns the task group its shard actors live in. Two callers mutate it: the ingest
pipeline (this node's create and drop) and the log follower (collections created or dropped on
any node, and the start-up load). Changes are serialised by a lock and keyed by the catalog row's
id (`cid`), so the same create seen by both is applied once, and a collection dropped and created
again elsewhere replaces the old one here. A collection is listed only once its shards run and its
documents are loaded, so a query never sees a half-built one. Readers look collections up with
`get`, a plain dictionary read on the event loop.

Each collection has one `Applier` (actors/applier.py), the one writer of its shards and of its
`last_seq`.
"""

from __future__ import annotations

import zlib
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import anyio
import anyio.to_thread
from anyio.abc import TaskGroup, TaskStatus

from actors.applier import Applier, LogReader, Publisher
from actors.read_pool import ReadPool
from actors.shard import Shard
from models.config import EngineConfig
from models.errors import NotFound
from models.index_spec import IndexSpec, default_spec
from models.records import CollectionInfo, DocId, Metric


@dataclass(slots=True)
class Collection:
    """A collection as this node serves it. `last_seq` is the last change applied to the shards,
    written only by its applier; `cid` is its catalog row's id (0: not known)."""

    name: str
    dim: int
    metric: Metric
    shards: tuple[Shard, ...]
    last_seq: int = 0
    shard_done: tuple[anyio.Event, ...] = field(default=())
    cid: int = 0
    index: IndexSpec = field(default_factory=IndexSpec)
    applier: Applier = field(init=False)

    def __post_init__(self) -> None:
        self.applier = Applier(self, None, None)

    def shard_index(self, doc_id: DocId) -> int:
        """Stable placement of a document: crc32 of its id modulo the shard count."""
        if len(self.shards) == 1:
            return 0
        return zlib.crc32(doc_id.encode()) % len(self.shards)

    def info(self, count: int) -> CollectionInfo:
        return CollectionInfo(self.name, self.dim, self.metric, count, self.index.to_wire())


class Catalog:
    def __init__(
        self,
        config: EngineConfig,
        log_reader: LogReader | None = None,
        publish: Publisher | None = None,
        on_removed: Callable[[str], None] | None = None,
        vectors_dir: Path | None = None,
    ) -> None:
        self._config = config
        # Where quantised collections keep their full-precision vectors, memory-mapped.
        self._vectors_dir = vectors_dir
        self._log_reader = log_reader
        self._publish = publish
        self._on_removed = on_removed
        self._lock = anyio.Lock()
        # The threads every shard's searches and writes run on; the catalog owns them because it
        # owns the shards: they start before the first shard and stop after the last.
        self._pool = ReadPool(config.search_threads, pin=config.pin_search_threads)
        self._collections: dict[str, Collection] = {}
        self._task_group: TaskGroup | None = None
        self._closed = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        if self._vectors_dir is not None:  # mapped files a killed process left: nothing reads them
            await anyio.to_thread.run_sync(_remove_mapped_files, self._vectors_dir)
        with self._pool.running():
            async with anyio.create_task_group() as tg:
                self._task_group = tg
                task_status.started()
                await self._closed.wait()
                for collection in list(self._collections.values()):
                    await self._stop(collection)
                self._collections.clear()

    def close(self) -> None:
        self._closed.set()

    @property
    def read_pool(self) -> ReadPool:
        """The search threads every shard shares (read its size and queue for metrics)."""
        return self._pool

    def find(self, name: str) -> Collection | None:
        """The running collection, or None."""
        return self._collections.get(name)

    def get(self, name: str) -> Collection:
        """The running collection; raises NotFound."""
        collection = self._collections.get(name)
        if collection is None:
            raise NotFound(f"no collection named {name!r}")
        return collection

    def holds(self, collection: Collection) -> bool:
        """Whether `collection` is still the running one of its name (False once dropped, even
        if a new collection of that name was created since)."""
        return self._collections.get(collection.name) is collection

    def names(self) -> list[str]:
        return sorted(self._collections)

    def all(self) -> list[Collection]:
        return [self._collections[name] for name in sorted(self._collections)]

    async def add(
        self,
        name: str,
        dim: int,
        metric: Metric,
        cid: int = 0,
        load: Callable[[Collection], Awaitable[object]] | None = None,
        index: IndexSpec | None = None,
    ) -> Collection:
        """The running collection `name` with catalog id `cid`: the one already here if it has that
        id, else a new one (replacing an older incarnation), its shards started and `load` run
        before it is listed. Called by the ingest pipeline and the log follower only."""
        assert self._task_group is not None, "catalog is not running"
        async with self._lock:
            existing = self._collections.get(name)
            if existing is not None and (cid == 0 or existing.cid in (0, cid)):
                if cid:
                    existing.cid = cid
                return existing
            if existing is not None:
                await self._remove(name)
            spec = index if index is not None else default_spec(metric)
            shards = []
            done = []
            for _ in range(max(1, self._config.shards_per_collection)):
                shard = Shard(dim, metric, self._config, self._pool, spec=spec, vectors_dir=self._vectors_dir)
                finished = anyio.Event()
                await self._task_group.start(_run_shard, shard, finished)
                shards.append(shard)
                done.append(finished)
            collection = Collection(name, dim, metric, tuple(shards), 0, tuple(done), cid, spec)
            collection.applier = Applier(collection, self._log_reader, self._publish)
            try:
                if load is not None:
                    await load(collection)
            except BaseException:
                with anyio.CancelScope(shield=True):
                    await self._stop(collection)
                raise
            self._collections[name] = collection
            return collection

    async def remove(self, name: str, cid: int = 0) -> None:
        """Stop and forget `name` (only the incarnation with catalog id `cid`, if given)."""
        async with self._lock:
            existing = self._collections.get(name)
            if existing is not None and (cid == 0 or existing.cid in (0, cid)):
                await self._remove(name)

    async def _remove(self, name: str) -> None:
        collection = self._collections.pop(name, None)
        if collection is not None:
            if self._on_removed is not None:
                self._on_removed(name)
            await self._stop(collection)

    async def _stop(self, collection: Collection) -> None:
        for shard in collection.shards:
            shard.close()
        for finished in collection.shard_done:
            await finished.wait()

    async def counts(self, collection: Collection) -> int:
        return sum(await _gather_counts(collection.shards))


async def _gather_counts(shards: Sequence[Shard]) -> list[int]:
    return [await shard.count() for shard in shards]


async def _run_shard(shard: Shard, finished: anyio.Event, *, task_status: TaskStatus[None]) -> None:
    try:
        await shard.run(task_status=task_status)
    finally:
        finished.set()


def _remove_mapped_files(directory: Path) -> None:
    if directory.is_dir():
        for path in directory.glob("shard-*.f32"):
            path.unlink(missing_ok=True)
