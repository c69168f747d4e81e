"""The results cache and the query-embedding cache: bounded in bytes, least recently used out.

Never stale. A cached answer is keyed by its collection's *version*: the applied seq
(`applied_seq`) and, per shard, (shard number, writes sent, writes done). Any change applied to
the collection, by this node's committer or by whatever applies other nodes' changes, goes
through a shard's apply calls and so moves the version; the next lookup then misses and every
entry of the old version is dropped. An answer is stored only when the version did not move
while it was computed and no write was in flight, so what the cache holds is exactly what a fresh
query at that version computes. The ack of a write is sent after the shards applied it and the
applied seq moved, so a query sent after an ack cannot meet an answer from before it.

Embeddings: the text -> vector step is deterministic, so query vectors are cached by text with
no invalidation at all.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from collections.abc import Awaitable, Callable, Hashable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Generic, TypeVar, cast

from models import requests as rq
from models.errors import ShoalError
from models.records import Hit, Vector

if TYPE_CHECKING:
    from actors.catalog import Collection

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")

Version = tuple[object, ...]
_Key = tuple[str, Version, Hashable]  # (collection name, version, query_key)

# Fixed costs in the byte estimate: one cache entry with its key, and one hit.
_ENTRY_BYTES = 512
_HIT_BYTES = 160


def applied_seq(collection: Collection) -> int:
    """The seq of the last change applied to the collection on this node (the one accessor)."""
    return collection.last_seq


def collection_version(collection: Collection) -> Version | None:
    """The collection's version now, or None while a write to one of its shards is in flight."""
    parts: list[object] = [applied_seq(collection)]
    for shard in collection.shards:
        version = shard.version()
        if version is None:
            return None
        parts.append(version)
    return tuple(parts)


@dataclass(slots=True)
class CacheStats:
    hits: int = 0
    misses: int = 0
    evictions: int = 0  # dropped for room
    invalidations: int = 0  # dropped because their collection changed
    entries: int = 0
    bytes: int = 0
    limit_bytes: int = 0


class LruBytes(Generic[K, V]):
    """A map bounded in (estimated) bytes; the least recently used entries go first. Safe to
    share between threads (one lock; every operation is O(1) but `drop_where`)."""

    def __init__(self, limit_bytes: int) -> None:
        self._limit = max(0, limit_bytes)
        self._items: OrderedDict[K, tuple[V, int]] = OrderedDict()
        self._lock = threading.Lock()
        self.stats = CacheStats(limit_bytes=self._limit)

    def get(self, key: K) -> V | None:
        with self._lock:
            item = self._items.get(key)
            if item is None:
                self.stats.misses += 1
                return None
            self._items.move_to_end(key)
            self.stats.hits += 1
            return item[0]

    def put(self, key: K, value: V, size: int) -> None:
        """Keep `value` (of about `size` bytes); one larger than the whole bound is not kept."""
        if size > self._limit:
            return
        with self._lock:
            old = self._items.pop(key, None)
            if old is not None:
                self.stats.bytes -= old[1]
            self._items[key] = (value, size)
            self.stats.bytes += size
            while self.stats.bytes > self._limit:
                _, (_, dropped) = self._items.popitem(last=False)
                self.stats.bytes -= dropped
                self.stats.evictions += 1
            self.stats.entries = len(self._items)

    def __contains__(self, key: object) -> bool:
        with self._lock:
            return key in self._items

    def drop(self, keys: Sequence[K]) -> int:
        """Forget these keys (those present); returns how many were."""
        with self._lock:
            count = 0
            for key in keys:
                item = self._items.pop(key, None)
                if item is not None:
                    self.stats.bytes -= item[1]
                    count += 1
            self.stats.invalidations += count
            self.stats.entries = len(self._items)
            return count


def _hits_bytes(hits: Sequence[Hit]) -> int:
    size = _ENTRY_BYTES
    for hit in hits:
        size += _HIT_BYTES + len(hit.id)
        if hit.text is not None:
            size += len(hit.text)
        if hit.metadata:
            size += 64 * len(hit.metadata)
        if hit.vector is not None:
            size += int(hit.vector.nbytes)
    return size


def query_key(req: rq.Query, scope: frozenset[str] | None) -> Hashable:
    """Everything an answer depends on besides the collection's version. Filters by `repr`: it
    tells 1, 1.0 and True apart, which equality (and so a hash key) does not. A query by example
    (`like`) is keyed by the liked id and by the stored vector and text it was resolved to
    (`Engine.query` fills them in), so an answer never outlives the document it was made from."""
    vector = None if req.vector is None else req.vector.tobytes()
    return (
        req.mode,
        vector,
        req.text,
        req.k,
        repr(req.where),
        repr(req.where_text),
        tuple(sorted(req.include)),
        req.ef,
        req.nprobe,
        req.fusion if req.mode == "hybrid" else None,
        req.alpha if req.mode == "hybrid" and req.fusion == "weighted" else None,
        req.rrf_k if req.mode == "hybrid" and req.fusion == "rrf" else None,
        req.vector_candidates,
        req.keyword_candidates,
        None if scope is None else tuple(sorted(scope)),
        req.like,
    )


class ResultsCache:
    """Query answers by (collection, version, query). `limit_bytes` 0 turns it off."""

    def __init__(self, limit_bytes: int) -> None:
        self._lru: LruBytes[_Key, list[Hit]] = LruBytes(limit_bytes)
        self._enabled = limit_bytes > 0
        # Per collection name: the version its entries were made at, and their keys.
        self._current: dict[str, tuple[Version, list[_Key]]] = {}
        self._lock = threading.Lock()

    @property
    def stats(self) -> CacheStats:
        return self._lru.stats

    async def answer(
        self,
        collection: Collection,
        req: rq.Query,
        scope: frozenset[str] | None,
        compute: Callable[[], Awaitable[list[Hit]]],
    ) -> tuple[list[Hit], bool]:
        """(hits, cached): the cached answer of this query at the collection's current version,
        or `compute()`'s (kept when the version held still meanwhile). Raises what `compute`
        raises (errors are never cached)."""
        if not self._enabled:  # every query passes here: no lookup bookkeeping when off
            return await compute(), False
        version, keys, found = self._look_up(collection, [req], scope)
        if found[0] is not None:
            return found[0], True
        hits = await compute()
        self._keep(collection, version, keys, [hits])
        return hits, False

    async def answer_many(
        self,
        collection: Collection,
        reqs: Sequence[rq.Query],
        scope: frozenset[str] | None,
        compute: Callable[[list[int]], Awaitable[list[list[Hit] | ShoalError]]],
    ) -> list[tuple[list[Hit], bool] | ShoalError]:
        """What `answer` gives for each of `reqs`, with one `compute(positions)` for those not
        cached: it returns, in the order of `positions`, each one's hits or its error."""
        version, keys, found = self._look_up(collection, reqs, scope)
        missing = [i for i, hits in enumerate(found) if hits is None]
        computed = dict(zip(missing, await compute(missing) if missing else [], strict=True))
        fresh = [i for i in missing if not isinstance(computed[i], ShoalError)]
        if keys and fresh:
            self._keep(collection, version, [keys[i] for i in fresh], [cast(list[Hit], computed[i]) for i in fresh])
        out: list[tuple[list[Hit], bool] | ShoalError] = []
        for i, hits in enumerate(found):
            answer = computed.get(i)
            if hits is not None:
                out.append((hits, True))
            elif isinstance(answer, ShoalError):
                out.append(answer)
            else:
                out.append((cast(list[Hit], answer), False))
        return out

    def _look_up(
        self, collection: Collection, reqs: Sequence[rq.Query], scope: frozenset[str] | None
    ) -> tuple[Version | None, list[_Key], list[list[Hit] | None]]:
        """(the collection's version, each query's key, each one's cached hits or None); no keys
        when nothing can be cached (off, or a write is being applied)."""
        if not self._enabled:
            return None, [], [None] * len(reqs)
        version = collection_version(collection)
        if version is None:  # a write is being applied: nothing cached can be current
            self._lru.stats.misses += len(reqs)
            return None, [], [None] * len(reqs)
        self._retire(collection.name, version)
        keys = [(collection.name, version, query_key(req, scope)) for req in reqs]
        return version, keys, [self._lru.get(key) for key in keys]

    def _keep(
        self, collection: Collection, version: Version | None, keys: list[_Key], answers: list[list[Hit]]
    ) -> None:
        """Cache each answer under its key if the collection is still at `version`."""
        if not keys or version is None or collection_version(collection) != version:
            return
        with self._lock:
            current = self._current.get(collection.name)
            if current is None or current[0] != version:
                return
            kept = current[1]
            for key, hits in zip(keys, answers, strict=True):
                kept.append(key)
                self._lru.put(key, hits, _hits_bytes(hits))
            if len(kept) > 2 * self._lru.stats.entries + 64:  # most were evicted
                kept[:] = [k for k in kept if k in self._lru]

    def forget(self, name: str) -> None:
        """Drop every entry of a collection (it was dropped)."""
        with self._lock:
            old = self._current.pop(name, None)
        if old is not None:
            self._lru.drop(old[1])

    def _retire(self, name: str, version: Version) -> None:
        """Make `version` the collection's current one, dropping the entries of the former."""
        with self._lock:
            current = self._current.get(name)
            if current is not None and current[0] == version:
                return
            self._current[name] = (version, [])
        if current is not None:
            self._lru.drop(current[1])


class EmbeddingCache:
    """Query vectors by text (embedding is deterministic: never invalidated)."""

    def __init__(self, limit_bytes: int) -> None:
        self._lru: LruBytes[str, Vector] = LruBytes(limit_bytes)
        self._enabled = limit_bytes > 0

    @property
    def stats(self) -> CacheStats:
        return self._lru.stats

    async def vector(self, text: str, embed: Callable[[str], Awaitable[Vector]]) -> Vector:
        """The vector of `text`: cached, or `embed(text)` (then kept). Raises what embed raises."""
        if not self._enabled:
            return await embed(text)
        found = self._lru.get(text)
        if found is not None:
            return found
        vector = await embed(text)
        self._lru.put(text, vector, _ENTRY_BYTES + 4 * len(text) + int(vector.nbytes))
        return vector
