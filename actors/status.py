"""What an operator sees of a running engine: sizes, queues and their bounds, at one moment.

`Engine.status()` fills an `EngineStatus` on the event loop without messaging any actor, so a
scrape of the server's metrics never queues behind work: every number is read from the owner's
plain attributes and may be a write behind.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actors.embedder import EmbedderStats

# hnswlib's memory per element, estimated from its layout: the vector, the level-0 links (2M of
# 4 bytes, plus their count) and the label in one block allocated for the whole capacity, with a
# link-list pointer and a lock per slot; upper levels (M links on 1/(M-1) levels per element on
# average) and the label map grow with the elements added.
_LABEL_BYTES = 8
_LINK_BYTES = 4
_SLOT_OVERHEAD = 8 + 40  # linkLists_ pointer + std::mutex
_LABEL_MAP_BYTES = 48  # unordered_map node


def hnsw_bytes(capacity: int, elements: int, dim: int, m: int) -> int:
    """The estimated memory of an hnswlib index of `capacity` slots holding `elements`."""
    level0 = dim * 4 + 2 * m * _LINK_BYTES + _LINK_BYTES + _LABEL_BYTES
    upper = (m * _LINK_BYTES + _LINK_BYTES) / max(1, m - 1)
    return int(capacity * (level0 + _SLOT_OVERHEAD) + elements * (upper + _LABEL_MAP_BYTES))


@dataclass(frozen=True, slots=True)
class ShardSizes:
    """One shard: live documents, deleted slots waiting for reuse, and memory."""

    documents: int
    deleted: int
    capacity: int  # slots allocated (the index grows by doubling)
    index_bytes: int  # the index's memory (estimated: `hnsw_bytes`, `VectorIndex.memory_bytes`)
    vector_bytes: int  # the exact replica's arrays in RAM (vectors unless mapped, norms, flags, seqs)
    queued: int  # messages in the shard's mailbox
    queue_limit: int
    kind: str = "hnsw"  # the index kind, with its quantisation (e.g. "ivf_int8")
    mapped_bytes: int = 0  # full-precision vectors memory-mapped from a file (quantised kinds)
    ready: bool = True  # False while the index declines (an ivf not trained yet): exact search
    builds: int = 0  # background (re)builds swapped in (ivf training, quantised hnsw rebuilds)
    building: bool = False  # a background (re)build is running now
    unindexed: int = 0  # documents scored exactly until the index has caught up with them

    @property
    def bytes_per_vector(self) -> float:
        """RAM per live document of the index plus the replica's arrays (0 when empty)."""
        return (self.index_bytes + self.vector_bytes) / self.documents if self.documents else 0.0


@dataclass(frozen=True, slots=True)
class CollectionStatus:
    name: str
    shards: tuple[ShardSizes, ...]


@dataclass(frozen=True, slots=True)
class Queue:
    """A bounded queue now: what waits in it, and its bound."""

    queued: int
    limit: int


@dataclass(frozen=True, slots=True)
class PoolStatus:
    """The database connection pool: open connections in use, idle, the bound, and callers
    waiting for a connection."""

    in_use: int
    idle: int
    limit: int
    waiting: int


@dataclass(frozen=True, slots=True)
class EngineStatus:
    ready: bool
    collections: tuple[CollectionStatus, ...]
    queues: dict[str, Queue]  # "ingest", "embed_query", "embed_bulk", "subscriptions"
    database: PoolStatus | None  # None while the pool is not open
    search_threads: int
    # Jobs waiting for a search thread; bounded by the shards (each hands over at most twice
    # `search_threads` reads at a time).
    search_pool_queued: int
    embedder: EmbedderStats  # the actor's own counters: read them, never write them
