"""Shoal in `load.compare`: a real `shoal serve` subprocess driven over its WebSocket protocol.

Ingest: one writer upserts the corpus (id, text and vector) in batches of 500, each awaited: an
ack means committed in PostgreSQL and visible to queries, so the rate is a durable one. Server CPU
is that of the Shoal process and of its embedded PostgreSQL. Queries:
`clients` connections in a closed loop, one request in flight each, `ef` per request, ids only
(`include=[]`), query vectors encoded to wire bytes once up front.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import numpy as np

from load.common import log, run_async, target, unique_name
from load.compare_common import (
    INGEST_BATCH,
    CpuWindow,
    Ingest,
    K,
    SystemResult,
    closed_loop,
    point_of,
)
from load.corpus import Corpus
from shoal_client import ShoalClient
from shoal_client.codec import encode_vector


@contextlib.asynccontextmanager
async def _connections(url: str, n: int) -> AsyncIterator[list[ShoalClient]]:
    clients: list[ShoalClient] = []
    try:
        for _ in range(n):
            clients.append(await ShoalClient.open(url))
        yield clients
    finally:
        for c in clients:
            await c.close()


async def _ingest(
    shoal: ShoalClient, name: str, corpus: Corpus, server_pids: tuple[int | None, ...]
) -> tuple[Ingest, list[float]]:
    acks: list[float] = []
    cpu = CpuWindow(*server_pids)
    started = time.perf_counter()
    for lo in range(0, len(corpus.ids), INGEST_BATCH):
        docs = [
            {"id": corpus.ids[i], "text": corpus.texts[i], "vector": corpus.vectors[i]}
            for i in range(lo, min(lo + INGEST_BATCH, len(corpus.ids)))
        ]
        t0 = time.perf_counter()
        await shoal.upsert(name, docs)
        acks.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    note = "one writer, each batch awaited; ack = committed in PostgreSQL and searchable"
    return Ingest(len(corpus.ids), seconds, INGEST_BATCH, True, note, **cpu.stop()), acks


async def _run(
    result: SystemResult,
    corpus: Corpus,
    url: str,
    efs: list[int],
    clients: int,
    seconds: float,
    max_seconds: float,
    server_pids: tuple[int | None, ...],
) -> None:
    name = unique_name("compare")
    row_of = {doc_id: row for row, doc_id in enumerate(corpus.ids)}
    wire = [encode_vector(q) for q in corpus.query_vectors]
    async with ShoalClient.connect(url) as admin:
        await admin.create_collection(name, dim=corpus.vectors.shape[1], metric="cosine")
        try:
            result.ingest, acks = await _ingest(admin, name, corpus, server_pids)
            count = await admin.count(name)
            if count != len(corpus.ids):
                raise RuntimeError(f"the collection holds {count} documents after ingest, not {len(corpus.ids)}")
            ack_ms = np.asarray(acks) * 1000
            result.info["ingest_ack_ms"] = {
                "p50": round(float(np.percentile(ack_ms, 50)), 1),
                "p99": round(float(np.percentile(ack_ms, 99)), 1),
            }
            log(f"shoal: ingested {count} at {result.ingest.docs_per_s:.0f} docs/s")
            async with _connections(url, clients) as conns:

                def worker(c: ShoalClient, ef: int | None) -> Callable[[int], Awaitable[list[int]]]:
                    async def query(q: int) -> list[int]:
                        reply = await c.query(name, vector=wire[q], k=K, ef=ef, include=[])
                        return [row_of[h.id] for h in reply.hits]

                    return query

                # Warm-up, not recorded: connections, code paths, caches.
                await closed_loop([worker(c, None) for c in conns], len(wire), min(1.0, seconds), seconds)
                for ef in efs:
                    cpu = CpuWindow(*server_pids)
                    raw = await closed_loop([worker(c, ef) for c in conns], len(wire), seconds, max_seconds)
                    point = point_of(ef, raw, corpus.ground_truth, **cpu.stop())
                    result.sweep.append(point)
                    log(f"shoal ef={ef}: recall {point.recall:.4f}, {point.qps:.0f} q/s, p99 {point.p99_ms:.1f} ms")
        finally:
            with contextlib.suppress(Exception):
                await admin.drop_collection(name)


def run_shoal(
    result: SystemResult,
    corpus: Corpus,
    efs: list[int],
    clients: int,
    seconds: float,
    max_seconds: float,
    url: str | None,
) -> None:
    """Fill `result` against the server at `url`, or (None) a `shoal serve` started and stopped here.

    Raises on failure, leaving in `result` what was measured before it.
    """
    started = time.perf_counter()
    try:
        with target(url) as server:
            result.info["server"] = url or "python -m server.cli serve (subprocess, embedded PostgreSQL)"
            pids = (server.pid, server.postgres_pid)
            run_async(lambda: _run(result, corpus, server.url, efs, clients, seconds, max_seconds, pids))
    finally:
        result.seconds = time.perf_counter() - started
