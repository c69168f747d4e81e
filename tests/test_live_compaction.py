"""Leaves and log compaction (nodes of tests/test_compaction.py: 10 changes kept): live, a leave's
old version comes from the shards, so compaction does not matter; a replay whose leave depends on
a compacted version answers `gone`, one whose replayed changes all match replays them."""

from __future__ import annotations

import shutil

import anyio
import asyncpg
import numpy as np
import pytest

from shoal_client import ShoalClient
from shoal_client.errors import Gone
from shoal_client.types import LeaveEvent, MatchEvent
from tests.test_cluster import Postgres
from tests.test_compaction import HOT, KEEP, database, db, start_node, wait_compacted, write_one_by_one

pytestmark = pytest.mark.timeout(240)
__all__ = ["database", "db"]  # the PostgreSQL fixtures of tests/test_compaction.py

COLD = np.array([0.0, 1.0, 0.0, 0.0], np.float32)


async def test_leave_of_a_document_whose_history_was_compacted(database: Postgres, db: asyncpg.Connection) -> None:
    node = start_node(database)
    try:
        async with ShoalClient.connect(node.ws_url) as c:
            await c.create_collection("lc", dim=4)
            last = await write_one_by_one(c, "lc", "d", 30)
            await wait_compacted(db, "lc", last - KEEP)  # d0's upsert (seq 1) is gone from the log
            live = await c.subscribe("lc", HOT, threshold=0.5)
            s = (await c.upsert("lc", [{"id": "d0", "vector": COLD}])).seq
            with anyio.fail_after(10):
                event = await live.__aiter__().__anext__()
            assert isinstance(event, LeaveEvent) and (event.seq, event.id) == (s, "d0")
            await live.close()

            # Replaying that change needs d0's version before it, which only the compacted log had.
            with pytest.raises(Gone) as info:
                again = await c.subscribe("lc", HOT, threshold=0.5, after_seq=s - 1)
                with anyio.fail_after(10):
                    await again.__aiter__().__anext__()
            assert "compacted" in str(info.value)

            # A replayed re-upsert that matches is a match, whatever came before.
            s2 = (await c.upsert("lc", [{"id": "d1", "vector": HOT}])).seq
            ok = await c.subscribe("lc", HOT, threshold=0.5, after_seq=s)
            with anyio.fail_after(10):
                event = await ok.__aiter__().__anext__()
            assert isinstance(event, MatchEvent) and (event.seq, event.hit.id) == (s2, "d1")
            await ok.close()
    finally:
        node.stop()
        shutil.rmtree(node.data_dir, ignore_errors=True)
