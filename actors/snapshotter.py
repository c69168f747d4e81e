"""Snapshots for fast restart: the background writer and the start-up restore.

Writing. `Snapshotter.run()` wakes every second (or every `snapshot_interval_s`, if shorter) and
snapshots each collection that has `snapshot_every_changes` changes since its last snapshot, or
any change and a snapshot older than `snapshot_interval_s`; `close()` makes it write every
collection with changes once more (clean shutdown: the engine closes it after ingest has drained
and before the shards stop). The seq a snapshot records is `Collection.last_seq` read before
any shard writes its files: the committer raises it only after every shard has applied the
change, so the files hold every change up to that seq (and perhaps a few later ones, which the
log replay at start applies again: upserts and deletes by id are idempotent). Shards write
their files as a read (searches continue, writes wait); checksums and fsyncs run in a worker
thread. A failed write is logged and counted, never fatal.

Restoring. `Snapshotter.restore(row)` loads a collection from its snapshot: verify every
file's checksum; in one consistent read of PostgreSQL, check the collection's identity, seq and
parameters, load the shards, replay the log after the snapshot's seq, and compare the live
count with PostgreSQL's. Anything wrong returns False after a warning (the caller rebuilds the
collection from the docs table) and removes the snapshot; only an unreachable database raises.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import anyio
import anyio.to_thread
from anyio.abc import TaskStatus

from actors.catalog import Catalog, Collection
from actors.persistence import CatalogRow, Persistence
from actors.snapshot import (
    Identity,
    Manifest,
    Params,
    ShardEntry,
    SnapshotInvalid,
    SnapshotStore,
    check_usable,
    file_entry,
    library_versions,
    metric_name,
)
from models.config import EngineConfig
from models.errors import NotFound, ShoalError
from models.index_spec import IndexSpec
from models.records import Change, DocId, StoredDoc

log = logging.getLogger("shoal.snapshots")

_counts_lock = threading.Lock()
_counts: Counter[tuple[str, str]] = Counter()

LOAD_RESULTS = ("loaded", "rebuilt", "absent")
WRITE_RESULTS = ("ok", "failed")


def _count(kind: str, result: str) -> None:
    with _counts_lock:
        _counts[(kind, result)] += 1


def snapshot_counts() -> dict[str, dict[str, int]]:
    """Since the process started: {"loads": {result: n}, "writes": {result: n}}. A load is
    `loaded` (snapshot and log tail), `rebuilt` (a snapshot was there but unusable) or `absent`."""
    with _counts_lock:
        return {
            "loads": {r: _counts[("loads", r)] for r in LOAD_RESULTS},
            "writes": {r: _counts[("writes", r)] for r in WRITE_RESULTS},
        }


def params_of(config: EngineConfig, spec: IndexSpec | None = None) -> Params:
    """The settings a snapshot's files depend on: the shard count, the hnsw defaults and the
    collection's index spec (None: not recorded)."""
    index = "" if spec is None else json.dumps(spec.to_wire(), sort_keys=True)
    return Params(max(1, config.shards_per_collection), config.hnsw_m, config.hnsw_ef_construction, index)


class Snapshotter:
    """Writes and restores the snapshots of every collection under `root`."""

    def __init__(self, root: Path, catalog: Catalog, persistence: Persistence, config: EngineConfig) -> None:
        self.store = SnapshotStore(root)
        self._catalog = catalog
        self._persistence = persistence
        self._config = config
        self._interval = max(1e-3, config.snapshot_interval_s)
        self._every = max(1, config.snapshot_every_changes)
        # Per collection: (seq of the snapshot on disk, monotonic time it was written or loaded).
        self._saved: dict[str, tuple[int, float]] = {}
        self._failed_at: dict[str, float] = {}
        self._markers: dict[str, tuple[Collection, tuple[int, str]]] = {}
        self._stop = anyio.Event()
        self._started = time.monotonic()

    # -- life cycle -------------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Snapshot on schedule until `close()`, then once more for every changed collection."""
        task_status.started()
        tick = min(1.0, self._interval)
        await self._pass(final=False)  # also removes snapshots of collections that are gone
        while not self._stop.is_set():
            with anyio.move_on_after(tick):
                await self._stop.wait()
            if self._stop.is_set():
                break
            await self._pass(final=False)
        # Reached only on close(), not on cancellation: a clean shutdown.
        with anyio.CancelScope(shield=True):
            await self._pass(final=True)

    def close(self) -> None:
        self._stop.set()

    # -- writing --------------------------------------------------------------------------------

    async def _pass(self, final: bool) -> None:
        names = set(self._catalog.names())
        for name in list(self._saved):
            if name not in names:
                del self._saved[name]
        try:
            for name in await anyio.to_thread.run_sync(self.store.names):
                if name not in names:  # dropped, or unknown to this database
                    await anyio.to_thread.run_sync(self.store.remove, name)
        except OSError as exc:
            log.warning("snapshot directory %s cannot be read: %s", self.store.root, exc)
        for collection in self._catalog.all():
            if self._due(collection, final):
                await self.snapshot(collection)

    def _due(self, collection: Collection, final: bool) -> bool:
        now = time.monotonic()
        failed = self._failed_at.get(collection.name)
        if failed is not None and not final and now - failed < self._interval:
            return False
        # Never snapshotted (new, or rebuilt at start): as if snapshotted empty at start-up.
        seq, at = self._saved.get(collection.name, (0, self._started))
        if collection.last_seq == seq:
            return False
        return final or collection.last_seq - seq >= self._every or now - at >= self._interval

    async def snapshot(self, collection: Collection) -> bool:
        """Write a snapshot of `collection` now; True if one was committed. Never raises for a
        failure to write (logged as a warning and counted); cancellation propagates."""
        name = collection.name
        started = time.monotonic()
        try:
            marker = await self._marker(collection)
            seq = collection.last_seq  # before the files: every change up to it is in them
            shards = collection.shards
            gen = await anyio.to_thread.run_sync(self.store.new_generation, name, seq, len(shards))
            committed = False
            try:
                counts = [await shard.save_files(self.store.shard_dir(gen, i)) for i, shard in enumerate(shards)]
                entries = await anyio.to_thread.run_sync(_shard_entries, gen, counts)
                manifest = Manifest(
                    collection=name,
                    identity=Identity(marker[0], marker[1], collection.dim, metric_name(collection.metric)),
                    seq=seq,
                    count=sum(counts),
                    params=params_of(self._config, collection.index),
                    generation=gen.name,
                    shards=entries,
                )
                if self._current(name) is not collection:
                    return False  # dropped (or dropped and re-created) meanwhile
                await anyio.to_thread.run_sync(self.store.commit, manifest)
                committed = True
            finally:
                if not committed:
                    with anyio.CancelScope(shield=True):
                        await anyio.to_thread.run_sync(self.store.abandon, gen)
        except Exception as exc:  # a cache that failed to write: never the node's failure
            self._failed_at[name] = time.monotonic()
            _count("writes", "failed")
            log.warning("snapshot of collection %s failed: %s", name, exc)
            return False
        self._failed_at.pop(name, None)
        self._saved[name] = (seq, time.monotonic())
        _count("writes", "ok")
        log.info(
            "snapshot of collection %s written: %d documents, seq %d, %.2f s",
            name,
            manifest.count,
            seq,
            time.monotonic() - started,
        )
        return True

    def _current(self, name: str) -> Collection | None:
        try:
            return self._catalog.get(name)
        except NotFound:
            return None

    async def _marker(self, collection: Collection) -> tuple[int, str]:
        cached = self._markers.get(collection.name)
        if cached is not None and cached[0] is collection:
            return cached[1]
        marker = await self._persistence.collection_marker(collection.name)
        self._markers[collection.name] = (collection, marker)
        return marker

    # -- restoring --------------------------------------------------------------------------------

    async def restore(self, row: CatalogRow) -> Collection | None:
        """Load collection `row` into the catalog from its snapshot and the log after it.

        Returns the collection, listed and serving; None when there is no usable snapshot (then
        the catalog does not hold the collection, any unusable snapshot is removed, and a warning
        says why). Raises Unavailable (database unreachable) and NotFound (dropped meanwhile).
        """
        name = row.name
        started = time.monotonic()
        done: dict[str, int] = {}
        try:
            manifest = await anyio.to_thread.run_sync(self.store.read_manifest, name)
            if manifest is None:
                _count("loads", "absent")
                return None
            gen = await anyio.to_thread.run_sync(self.store.verify_files, manifest)
            async with self._persistence.log_after(name, manifest.seq) as tail:
                await tail.header()
                assert tail.marker is not None
                identity = Identity(tail.marker[0], tail.marker[1], row.dim, metric_name(row.metric))
                check_usable(manifest, identity, tail.last_seq, params_of(self._config, row.index), library_versions())

                async def load(collection: Collection) -> None:
                    # Runs before the catalog lists the collection: nothing else applies to it
                    # yet, and its applier follows the log from the seq set here.
                    for i, shard in enumerate(collection.shards):
                        loaded = await shard.load_files(self.store.shard_dir(gen, i))
                        if loaded != manifest.shards[i].count:
                            raise SnapshotInvalid(
                                f"shard {i} holds {loaded} documents, its manifest says {manifest.shards[i].count}"
                            )
                    done["files_ms"] = round((time.monotonic() - started) * 1000)
                    replayed = 0
                    async for batch in tail:
                        replayed += len(batch)
                        await _replay(collection, batch)
                    expected = tail.last_seq - manifest.seq
                    if replayed != expected:
                        raise SnapshotInvalid(
                            f"the log after seq {manifest.seq} has {replayed} changes,"
                            f" the database's seq says {expected}"
                        )
                    count = await self._catalog.counts(collection)
                    if count != tail.doc_count:
                        raise SnapshotInvalid(f"it restores {count} documents, the database has {tail.doc_count}")
                    collection.last_seq = tail.last_seq
                    done.update(count=count, replayed=replayed)

                # The catalog stops the collection again if `load` raises.
                collection = await self._catalog.add(name, row.dim, row.metric, row.cid, load, row.index)
                self._markers[name] = (collection, tail.marker)
        except ShoalError:
            raise
        except Exception as exc:  # a damaged or mismatched snapshot of any kind: rebuild instead
            await anyio.to_thread.run_sync(self.store.remove, name)
            _count("loads", "rebuilt")
            log.warning("collection %s: snapshot not used (%s); rebuilding it from the database", name, exc)
            return None
        self._saved[name] = (manifest.seq, time.monotonic())
        _count("loads", "loaded")
        log.info(
            "loaded collection %s from snapshot: %d documents, snapshot seq %d, %d changes replayed, seq %d,"
            " %.2f s (files %.2f s)",
            name,
            done["count"],
            manifest.seq,
            done["replayed"],
            collection.last_seq,
            time.monotonic() - started,
            done["files_ms"] / 1000,
        )
        return collection


def _shard_entries(gen: Path, counts: Sequence[int]) -> tuple[ShardEntry, ...]:
    """Checksum and fsync every shard's files (in a worker thread)."""
    out = []
    for i, count in enumerate(counts):
        sdir = SnapshotStore.shard_dir(gen, i)
        names = sorted(p.name for p in sdir.iterdir() if p.is_file())
        out.append(ShardEntry(count, {f: file_entry(sdir / f) for f in names}))
    return tuple(out)


async def _replay(collection: Collection, changes: Sequence[Change]) -> None:
    """Apply a batch of log changes in order. Only the last change of an id in the batch
    matters, so the batch becomes one upsert and one delete per shard, on disjoint ids."""
    last: dict[DocId, Change] = {}
    for change in changes:
        last.pop(change.doc_id, None)  # keep dict order = order of last change
        last[change.doc_id] = change
    upserts: dict[int, list[StoredDoc]] = {}
    deletes: dict[int, list[DocId]] = {}
    for doc_id, change in last.items():
        shard = collection.shard_index(doc_id)
        if change.op == "delete":
            deletes.setdefault(shard, []).append(doc_id)
        else:
            vector: Any = change.vector
            meta = change.metadata if change.metadata is not None else {}
            upserts.setdefault(shard, []).append(StoredDoc(doc_id, change.text, vector, meta, change.seq))
    for shard, docs in upserts.items():
        await collection.shards[shard].apply_upserts(docs, fresh_labels=True, defer_index=True)
    for shard, ids in deletes.items():
        await collection.shards[shard].apply_deletes(ids)
