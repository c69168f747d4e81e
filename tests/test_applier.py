"""The applier through its own interface: real catalog and shard actors, a change log held in
memory (the order logic under test needs no database; tests/test_cluster.py runs it on one).
Out-of-order, duplicate and gap inputs from the two sides all end in the log's state, applied
once each, in seq order."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
import numpy as np
import pytest

from actors.applier import Applied
from actors.catalog import Catalog, Collection
from models.config import EngineConfig
from models.records import Change, DocId, Seq, StoredDoc

pytestmark = pytest.mark.timeout(60)

DIM = 4


def _vec(i: int) -> np.ndarray:
    v = np.zeros(DIM, np.float32)
    v[i % DIM] = 1.0
    v[(i + 1) % DIM] = 0.5
    return v


class MemoryLog:
    """A collection's change log: seq i at index i - 1, as PostgreSQL keeps it (no holes)."""

    def __init__(self) -> None:
        self.changes: list[Change] = []
        self.reads = 0

    def upsert(self, doc_id: str) -> StoredDoc:
        seq = len(self.changes) + 1
        vec = _vec(seq)
        self.changes.append(Change(Seq(seq), "upsert", DocId(doc_id), f"t{seq}", vec, {"n": seq}))
        return StoredDoc(DocId(doc_id), f"t{seq}", vec, {"n": seq}, Seq(seq))

    def delete(self, doc_id: str) -> tuple[DocId, int]:
        seq = len(self.changes) + 1
        self.changes.append(Change(Seq(seq), "delete", DocId(doc_id), None, None, None))
        return DocId(doc_id), seq

    async def changes_after(self, name: str, after_seq: int, limit: int) -> list[Change]:
        self.reads += 1
        return self.changes[after_seq : after_seq + limit]


class Harness:
    def __init__(self) -> None:
        self.log = MemoryLog()
        self.published: list[Applied] = []

    async def publish(self, applied: Applied) -> None:
        self.published.append(applied)

    def published_seqs(self) -> list[int]:
        return [seq for a in self.published for seq in [int(d.seq) for d in a.upserted] + [s for _, s in a.deleted]]


@asynccontextmanager
async def running() -> AsyncIterator[tuple[Harness, Collection]]:
    harness = Harness()
    config = EngineConfig(search_threads=1, pin_search_threads=False)
    catalog = Catalog(config, harness.log, harness.publish)
    async with anyio.create_task_group() as tg:
        await tg.start(catalog.run)
        collection = await catalog.add("c", DIM, "cosine", cid=1)  # type: ignore[arg-type]
        collection.applier._page = 2  # pages of two: gaps are filled over several reads
        yield harness, collection
        catalog.close()


async def _ids(collection: Collection, ids: list[str]) -> dict[str, int]:
    docs = await collection.shards[0].get([DocId(i) for i in ids])
    return {d.id: int(d.seq) for d in docs}


async def test_in_order_then_the_same_changes_again_are_applied_once() -> None:
    async with running() as (h, collection):
        batch = [h.log.upsert("a"), h.log.upsert("b")]
        await collection.applier.apply_upserts(batch)
        assert collection.last_seq == 2
        await collection.applier.apply_upserts(batch)  # duplicate (both inputs saw it)
        await collection.applier.apply_changes(h.log.changes)
        assert h.published_seqs() == [1, 2]
        assert h.log.reads == 0  # the local fast path reads nothing
        assert await collection.shards[0].count() == 2


async def test_a_gap_is_filled_from_the_log_first() -> None:
    async with running() as (h, collection):
        await collection.applier.apply_upserts([h.log.upsert("a")])
        # Another node commits 2..5 (a delete among them); this node's committer then hands seq 6.
        h.log.upsert("b")
        h.log.delete("a")
        h.log.upsert("c")
        h.log.upsert("b")
        mine = h.log.upsert("d")
        await collection.applier.apply_upserts([mine])
        assert collection.last_seq == 6
        assert h.published_seqs() == [1, 2, 3, 4, 5, 6]
        assert h.log.reads >= 2  # four missing changes, pages of two
        assert await _ids(collection, ["a", "b", "c", "d"]) == {"b": 5, "c": 4, "d": 6}
        # Each published run is one op and contiguous.
        for applied in h.published:
            assert not (applied.upserted and applied.deleted)


async def test_out_of_order_inputs_end_in_the_log_state() -> None:
    async with running() as (h, collection):
        local = [h.log.upsert(f"d{i}") for i in range(6)]
        # The follower read the whole log before the committer's fast path handed seqs 3..4.
        await collection.applier.apply_changes(h.log.changes[4:])  # 5..6: gap 1..4 filled first
        await collection.applier.apply_upserts(local[2:4])  # 3..4: at or below the applied seq
        await collection.applier.apply_upserts(local[:2])
        assert collection.last_seq == 6
        assert h.published_seqs() == [1, 2, 3, 4, 5, 6]
        assert await collection.shards[0].count() == 6


async def test_catch_up_and_waiting_for_a_seq() -> None:
    async with running() as (h, collection):
        for i in range(5):
            h.log.upsert(f"d{i}")
        h.log.delete("d0")
        assert not await collection.applier.wait_applied(6, 0.05)
        async with anyio.create_task_group() as tg:
            waited: list[bool] = []

            async def wait() -> None:
                waited.append(await collection.applier.wait_applied(6, 5))

            tg.start_soon(wait)
            await anyio.sleep(0.01)
            await collection.applier.catch_up(6)
        assert waited == [True]
        assert collection.last_seq == 6
        assert await collection.shards[0].count() == 4
        # A seq beyond the log's end is not invented: catch-up stops at the last committed change.
        await collection.applier.catch_up(9)
        assert collection.last_seq == 6
        assert h.published_seqs() == [1, 2, 3, 4, 5, 6]
