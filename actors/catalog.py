"""The catalog: which collections exist on this node and the shard actors that hold them.

The catalog owns the task group its shard actors live in. Only the ingest pipeline mutates it
(create, drop, load), one change at a time and in the same order as the writes around it, so a
query never sees a collection whose shards are not running. Readers look collections up with
`get`, a plain dictionary read on the event loop.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field

import anyio
from anyio.abc import TaskGroup, TaskStatus

from actors.read_pool import ReadPool
from actors.shard import Shard
from models.config import EngineConfig
from models.errors import NotFound
from models.records import CollectionInfo, DocId, Metric


@dataclass(slots=True)
class Collection:
    """A collection as this node serves it. `last_seq` is the last change applied to the shards."""

    name: str
    dim: int
    metric: Metric
    shards: tuple[Shard, ...]
    last_seq: int = 0
    shard_done: tuple[anyio.Event, ...] = field(default=())

    def shard_index(self, doc_id: DocId) -> int:
        """Stable placement of a document: crc32 of its id modulo the shard count."""
        if len(self.shards) == 1:
            return 0
        return zlib.crc32(doc_id.encode()) % len(self.shards)

    def info(self, count: int) -> CollectionInfo:
        return CollectionInfo(self.name, self.dim, self.metric, count)


class Catalog:
    def __init__(self, config: EngineConfig) -> None:
        self._config = config
        # The threads every shard's searches and writes run on; the catalog owns them because it
        # owns the shards: they start before the first shard and stop after the last.
        self._pool = ReadPool(config.search_threads, pin=config.pin_search_threads)
        self._collections: dict[str, Collection] = {}
        self._task_group: TaskGroup | None = None
        self._closed = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
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

    async def add(self, name: str, dim: int, metric: Metric, last_seq: int) -> Collection:
        """Start the shard actors of a collection (called by the ingest pipeline only)."""
        assert self._task_group is not None, "catalog is not running"
        shards = []
        done = []
        for _ in range(max(1, self._config.shards_per_collection)):
            shard = Shard(dim, metric, self._config, self._pool)
            finished = anyio.Event()
            await self._task_group.start(_run_shard, shard, finished)
            shards.append(shard)
            done.append(finished)
        collection = Collection(name, dim, metric, tuple(shards), last_seq, tuple(done))
        self._collections[name] = collection
        return collection

    async def remove(self, name: str) -> None:
        collection = self._collections.pop(name, None)
        if collection is not None:
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
