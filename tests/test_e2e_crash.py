"""Durability with a real process: SIGKILL mid-stream loses nothing acked; SIGTERM drains."""

from __future__ import annotations

import asyncio
import shutil
import signal

import numpy as np
import pytest

from shoal_client import ShoalClient
from shoal_client import errors as ce
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(300)

DIM = 16


async def _missing(c: ShoalClient, collection: str, ids: list[str]) -> set[str]:
    """Which of `ids` the collection does not hold (asked 1,000 at a time)."""
    found: set[str] = set()
    for start in range(0, len(ids), 1_000):
        found |= {d["id"] for d in await c.get(collection, ids[start : start + 1_000], include=[])}
    return set(ids) - found


def vector_of(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=DIM).astype(np.float32)


async def _write_until_cut(url: str, acked: dict[str, int], batch: int, writers: int) -> None:
    """Several writers stream batches until the connection dies; record what was acked."""

    async def writer(w: int) -> None:
        n = 0
        async with ShoalClient.connect(url) as c:
            while True:
                ids = [w * 1_000_000 + n + j for j in range(batch)]
                docs = [{"id": str(i), "vector": vector_of(i), "metadata": {"w": w}} for i in ids]
                if w == 0:  # one writer sends text, so the embedder is mid-batch at the kill too
                    docs = [{"id": str(i), "text": f"document number {i} about topic {i % 7}"} for i in ids]
                try:
                    ack = await c.upsert("durable" if w else "durable_text", docs)
                except (ce.ClientError, ce.ShoalError):
                    return
                for i in ids:
                    acked[str(i)] = ack.seq
                n += batch

    results = await asyncio.gather(*(writer(w) for w in range(writers)), return_exceptions=True)
    assert all(r is None for r in results), results


async def _start_streaming(url: str, acked: dict[str, int], batch: int, writers: int, until: int) -> asyncio.Task[None]:
    """Create the two collections, start the writers, return once `until` documents are acked."""
    async with ShoalClient.connect(url) as c:
        await c.create_collection("durable", dim=DIM, metric="l2")
        await c.create_collection("durable_text")
    stream = asyncio.create_task(_write_until_cut(url.replace("http", "ws") + "/v1/ws", acked, batch, writers))
    while len(acked) < until:
        await asyncio.sleep(0.05)
    return stream


async def test_sigkill_mid_stream_loses_no_acked_write() -> None:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir)
    url = proc.start()
    try:
        acked: dict[str, int] = {}
        stream = await _start_streaming(url, acked, batch=50, writers=4, until=3_000)
        proc.kill()  # SIGKILL: no shutdown code runs at all
        await asyncio.wait_for(stream, 60)
        assert len(acked) >= 3_000

        restarted = ServerProcess(data_dir)
        url = restarted.start()
        try:
            async with ShoalClient.connect(url) as c:
                vector_ids = sorted(i for i in acked if int(i) >= 1_000_000)
                text_ids = sorted(i for i in acked if int(i) < 1_000_000)
                lost = await _missing(c, "durable", vector_ids)
                assert not lost, f"{len(lost)} acked documents lost"
                assert not await _missing(c, "durable_text", text_ids)
                # Searchable, not just stored: a sample finds itself as the nearest neighbour.
                for i in vector_ids[:: max(1, len(vector_ids) // 50)]:
                    hits = (await c.query("durable", vector=vector_of(int(i)), k=1)).hits
                    assert hits[0].id == i and hits[0].distance == pytest.approx(0.0, abs=1e-4)
                # seqs continue after the crash: the next write gets a larger seq than any acked one.
                ack = await c.upsert("durable", [{"id": "after", "vector": vector_of(1)}])
                assert ack.seq > max(seq for i, seq in acked.items() if int(i) >= 1_000_000)
        finally:
            restarted.stop()
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_sigterm_finishes_acked_work_and_restarts_clean() -> None:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir)
    url = proc.start()
    try:
        acked: dict[str, int] = {}
        stream = await _start_streaming(url, acked, batch=100, writers=3, until=1_000)
        code = await asyncio.to_thread(proc.stop, signal.SIGTERM)
        assert code in (0, -signal.SIGTERM), proc.log_tail()
        await asyncio.wait_for(stream, 60)
        log = proc.log_tail(400)
        assert "engine stopped" in log and "Traceback" not in log, log

        restarted = ServerProcess(data_dir)
        url = restarted.start()
        try:
            async with ShoalClient.connect(url) as c:
                ids = sorted(i for i in acked if int(i) >= 1_000_000)
                assert not await _missing(c, "durable", ids)
        finally:
            restarted.stop()
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
