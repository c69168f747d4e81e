"""Log compaction on real `shoal serve` nodes sharing one real PostgreSQL (`shoal postgres`):
rows every live node has applied and older than the retention are deleted; a resume before the
floor answers `gone` (WebSocket, SSE); one after it replays exactly; a live node that is behind
keeps the log it has not applied; a node back after the expiry rebuilds from the docs table."""

from __future__ import annotations

import os
import shutil
import signal
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import asyncpg
import httpx
import numpy as np
import pytest

from shoal_client import ShoalClient
from shoal_client.errors import Gone
from shoal_client.types import MatchEvent
from tests.server_process import ServerProcess, temp_data_dir
from tests.test_cluster import Postgres

pytestmark = pytest.mark.timeout(240)

DIM = 4
HOT = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
KEEP = 10  # SHOAL_LOG_RETENTION_CHANGES of every node here
EXPIRY_S = 4.0
NODE_ENV = {
    "SHOAL_FOLLOW_POLL_S": "0.3",
    "SHOAL_EMBED_WORKERS": "1",
    "SHOAL_SEARCH_THREADS": "1",
    "SHOAL_COMPACT_INTERVAL_S": "0.2",
    "SHOAL_LOG_RETENTION_CHANGES": str(KEEP),
    "SHOAL_NODE_EXPIRY_S": str(EXPIRY_S),
    "SHOAL_COMPACT_BATCH": "7",  # several steps per pass
}


@pytest.fixture(scope="module")
def database() -> Iterator[Postgres]:
    data_dir = temp_data_dir("shoal-compact-pg-")
    pg = Postgres(data_dir)
    try:
        yield pg
    finally:
        pg.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture
async def db(database: Postgres) -> AsyncIterator[asyncpg.Connection]:
    conn = await asyncpg.connect(database.url)
    try:
        yield conn
    finally:
        await conn.close()


def start_node(database: Postgres, data_dir: Path | None = None) -> ServerProcess:
    proc = ServerProcess(
        data_dir or temp_data_dir("shoal-compact-node-"), {**NODE_ENV, "SHOAL_DATABASE_URL": database.url}
    )
    proc.start()
    return proc


async def log_state(db: asyncpg.Connection, name: str) -> tuple[int, int, int, int]:
    """(log rows, lowest seq in the log or 0, log_floor, last_seq) of collection `name`."""
    cid, floor, last = await db.fetchrow("SELECT id, log_floor, last_seq FROM shoal_collections WHERE name = $1", name)
    rows, low = await db.fetchrow(f"SELECT count(*), coalesce(min(seq), 0) FROM shoal_log_{int(cid)}")
    return int(rows), int(low), int(floor), int(last)


async def write_one_by_one(client: ShoalClient, name: str, prefix: str, n: int) -> int:
    seq = 0
    for i in range(n):
        seq = (await client.upsert(name, [{"id": f"{prefix}{i}", "vector": HOT}])).seq
    return seq


async def wait_compacted(
    db: asyncpg.Connection, name: str, floor_at_least: int, timeout: float = 20
) -> tuple[int, int, int, int]:
    with anyio.fail_after(timeout):
        while True:
            state = await log_state(db, name)
            if state[2] >= floor_at_least:
                return state
            await anyio.sleep(0.1)


async def test_compaction_deletes_old_changes_and_resumes_before_the_floor_are_gone(
    database: Postgres, db: asyncpg.Connection
) -> None:
    a = start_node(database)
    try:
        async with ShoalClient.connect(a.ws_url) as ca:
            await ca.create_collection("cmp", dim=DIM)
            last = await write_one_by_one(ca, "cmp", "d", 50)
            rows, low, floor, last_seq = await wait_compacted(db, "cmp", last - KEEP)
            # Exactly the retention is left: the node has applied everything.
            assert (rows, low, floor, last_seq) == (KEEP, last - KEEP + 1, last - KEEP, last)

            # Before the floor: `gone` on the WebSocket (the subscribe reply) ...
            with pytest.raises(Gone) as info:
                await ca.subscribe("cmp", vector=HOT, threshold=0.5, after_seq=floor - 1)
            assert "without after_seq" in str(info.value)
            # ... and on SSE, 410 with the JSON error before any stream.
            async with httpx.AsyncClient(base_url=a.url) as http:
                for path, params, headers in (
                    ("/v1/collections/cmp/changes", {}, {"Last-Event-ID": "3"}),
                    (
                        "/v1/collections/cmp/subscribe",
                        {"vector": "1,0,0,0", "threshold": "0.5", "last_event_id": "3"},
                        {},
                    ),
                ):
                    response = await http.get(path, params=params, headers=headers)
                    assert response.status_code == 410, response.text
                    assert response.json()["error"]["code"] == "gone"
                metrics = (await http.get("/metrics")).text
                compacted = [line for line in metrics.splitlines() if line.startswith("shoal_log_compacted_rows_total")]
                assert compacted and float(compacted[0].split()[-1]) >= floor
                # At the floor the feed still resumes.
                async with http.stream(
                    "GET", "/v1/collections/cmp/changes", headers={"Last-Event-ID": str(floor)}
                ) as ok:
                    assert ok.status_code == 200

            # At the floor: the replay is exact, floor+1 .. last, once each.
            sub = await ca.subscribe("cmp", vector=HOT, threshold=0.5, after_seq=floor)
            seqs: list[int] = []
            with anyio.fail_after(10):
                async for event in sub:
                    if isinstance(event, MatchEvent):
                        seqs.append(event.seq)
                        if event.seq == last:
                            break
            assert seqs == list(range(floor + 1, last + 1))
    finally:
        a.stop()
    # A restart (snapshot + the log after it, or a rebuild) has every document.
    a2 = start_node(database, a.data_dir)
    try:
        async with ShoalClient.connect(a2.ws_url) as c:
            got = await c.get("cmp", [f"d{i}" for i in range(50)], include=[])
            assert len(got) == 50
    finally:
        a2.stop()
        shutil.rmtree(a.data_dir, ignore_errors=True)


async def test_a_live_node_keeps_its_log_and_one_back_after_the_expiry_rebuilds(
    database: Postgres, db: asyncpg.Connection
) -> None:
    a, b = start_node(database), start_node(database)
    try:
        async with ShoalClient.connect(b.ws_url) as cb:
            await cb.create_collection("two", dim=DIM)
            base = await write_one_by_one(cb, "two", "x", 30)
            await wait_compacted(db, "two", base - KEEP)
            # A is alive but frozen (within the expiry): B's compaction keeps what A has not applied.
            assert a.proc is not None
            with anyio.fail_after(10):
                while (
                    await db.fetchval(
                        "SELECT min(applied_seq) FROM shoal_node_seqs n "
                        "JOIN shoal_collections c ON c.id = n.collection_id WHERE c.name = 'two'"
                    )
                ) != base:
                    await anyio.sleep(0.1)
            os.kill(a.proc.pid, signal.SIGSTOP)
            try:
                last = await write_one_by_one(cb, "two", "y", 30)
                await anyio.sleep(1.5)  # several compaction passes of B
                rows, low, floor, _ = await log_state(db, "two")
                assert floor <= base and low <= base + 1 and rows >= last - base
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            async with ShoalClient.connect(a.ws_url) as ca:
                with anyio.fail_after(15):
                    while await ca.count("two") != 60:
                        await anyio.sleep(0.1)
            await wait_compacted(db, "two", last - KEEP)

            # A stops (its snapshot is at `last`); B writes on; after the expiry the log past A's
            # snapshot is compacted, so A's restart must rebuild from the docs table.
            a.stop()
            final = await write_one_by_one(cb, "two", "z", 30)
            await anyio.sleep(EXPIRY_S + 1)
            _, _, floor, _ = await log_state(db, "two")
            assert floor == final - KEEP > last
            a = start_node(database, a.data_dir)
            async with ShoalClient.connect(a.ws_url) as ca:
                assert await ca.count("two") == 90
                got = await ca.get("two", [f"{p}{i}" for p in "xyz" for i in range(30)], include=[])
                assert len(got) == 90
            assert "snapshot not used" in a.log_path.read_text()
    finally:
        for proc in (a, b):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
            shutil.rmtree(proc.data_dir, ignore_errors=True)


async def test_a_node_frozen_past_the_expiry_reloads_the_collection_instead_of_the_gap(
    database: Postgres, db: asyncpg.Connection
) -> None:
    a, b = start_node(database), start_node(database)
    try:
        async with ShoalClient.connect(b.ws_url) as cb:
            await cb.create_collection("far", dim=DIM)
            base = await write_one_by_one(cb, "far", "p", 20)
            async with ShoalClient.connect(a.ws_url) as ca:
                with anyio.fail_after(15):
                    while await ca.count("far") != 20:
                        await anyio.sleep(0.1)
            assert a.proc is not None
            os.kill(a.proc.pid, signal.SIGSTOP)  # alive, but silent for longer than the expiry
            try:
                last = await write_one_by_one(cb, "far", "q", 30)
                await wait_compacted(db, "far", last - KEEP, timeout=EXPIRY_S + 15)
                assert last - KEEP > base  # what A still needs is gone from the log
            finally:
                os.kill(a.proc.pid, signal.SIGCONT)
            async with ShoalClient.connect(a.ws_url) as ca:
                with anyio.fail_after(20):
                    while await ca.count("far") != 50:
                        await anyio.sleep(0.1)
                got = await ca.get("far", [f"{p}{i}" for p in "pq" for i in range(20 if p == "p" else 30)], include=[])
                assert len(got) == 50
                assert await ca.upsert("far", [{"id": "after", "vector": HOT}])  # and A still writes
            assert "reloading it from the database" in a.log_path.read_text()
    finally:
        for proc in (a, b):
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
            shutil.rmtree(proc.data_dir, ignore_errors=True)
