"""pgvector in `load.compare`: an HNSW index in an embedded PostgreSQL, queried with asyncpg.

The server is the one Shoal embeds (PostgreSQL 18 + pgvector, `actors.pg_server.open_database`,
durable commits: fsync and synchronous_commit on), in a temporary directory under /tmp.

- Table `items (id text primary key, body text, embedding vector(dim))` with the HNSW index
  (vector_cosine_ops, m=16, ef_construction=200, as Shoal's) created before the data arrives: the
  same streaming situation as Shoal's, where every acknowledged batch is durable and searchable.
- Ingest: one connection, binary COPY of 500 rows per batch, each its own committed transaction.
- Queries: `clients` connections in a closed loop, each with `hnsw.ef_search` set per sweep point,
  `SELECT id FROM items ORDER BY embedding <=> $1 LIMIT 10` (prepared by asyncpg).
"""

from __future__ import annotations

import asyncio
import shutil
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import asyncpg
from pgvector.asyncpg import register_vector

from actors.pg_server import open_database
from load.common import log, run_async
from load.compare_common import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    INGEST_BATCH,
    CpuWindow,
    Ingest,
    K,
    SystemResult,
    closed_loop,
    point_of,
)
from load.corpus import Corpus

QUERY = f"SELECT id FROM items ORDER BY embedding <=> $1 LIMIT {K}"


def _postmaster_pid(pgdata: Path) -> int | None:
    try:
        return int((pgdata / "postmaster.pid").read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return None


async def _setup(conn: Any, dim: int) -> None:
    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
    await register_vector(conn)
    await conn.execute(
        f"CREATE TABLE items (id text PRIMARY KEY, body text NOT NULL, embedding vector({dim}) NOT NULL)"
    )
    await conn.execute(
        "CREATE INDEX items_hnsw ON items USING hnsw (embedding vector_cosine_ops) "
        f"WITH (m = {HNSW_M}, ef_construction = {HNSW_EF_CONSTRUCTION})"
    )


async def _ingest(conn: Any, corpus: Corpus, postmaster: int | None) -> Ingest:
    cpu = CpuWindow(postmaster)
    started = time.perf_counter()
    for lo in range(0, len(corpus.ids), INGEST_BATCH):
        hi = min(lo + INGEST_BATCH, len(corpus.ids))
        records = [(corpus.ids[i], corpus.texts[i], corpus.vectors[i]) for i in range(lo, hi)]
        await conn.copy_records_to_table("items", records=records, columns=["id", "body", "embedding"])
    seconds = time.perf_counter() - started
    note = "one connection, COPY per batch, each committed (fsync on), HNSW index present"
    return Ingest(len(corpus.ids), seconds, INGEST_BATCH, True, note, **cpu.stop())


async def _run(
    result: SystemResult,
    corpus: Corpus,
    data_dir: Path,
    efs: list[int],
    clients: int,
    seconds: float,
    max_seconds: float,
) -> None:
    row_of = {doc_id: row for row, doc_id in enumerate(corpus.ids)}
    queries = corpus.query_vectors
    async with open_database(data_dir, None) as dsn:
        postmaster = _postmaster_pid(data_dir / "pg")
        conn = await asyncpg.connect(dsn)
        try:
            await _setup(conn, corpus.vectors.shape[1])
            result.ingest = await _ingest(conn, corpus, postmaster)
            log(f"pgvector: ingested {len(corpus.ids)} at {result.ingest.docs_per_s:.0f} docs/s")
            await conn.execute("ANALYZE items")
            plan = "\n".join(r[0] for r in await conn.fetch(f"EXPLAIN {QUERY}", queries[0]))
            if "items_hnsw" not in plan:
                raise RuntimeError(f"the query does not use the HNSW index:\n{plan}")
            result.info |= {
                "postgres": await conn.fetchval("SHOW server_version"),
                "pgvector": await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'"),
                "plan": [line[:100] for line in plan.splitlines()],  # the query vector's literal cut off
            }
        finally:
            await conn.close()
        conns = [await asyncpg.connect(dsn) for _ in range(clients)]
        try:
            for c in conns:
                await register_vector(c)

            def worker(c: Any) -> Callable[[int], Awaitable[list[int]]]:
                async def query(q: int) -> list[int]:
                    return [row_of[r[0]] for r in await c.fetch(QUERY, queries[q])]

                return query

            # Warm-up, not recorded: prepared statements, the index pages in shared buffers.
            await closed_loop([worker(c) for c in conns], len(queries), min(1.0, seconds), seconds)
            for ef in efs:
                for c in conns:
                    await c.execute("SELECT set_config('hnsw.ef_search', $1, false)", str(ef))
                cpu = CpuWindow(postmaster)
                raw = await closed_loop([worker(c) for c in conns], len(queries), seconds, max_seconds)
                point = point_of(ef, raw, corpus.ground_truth, **cpu.stop())
                result.sweep.append(point)
                log(f"pgvector ef={ef}: recall {point.recall:.4f}, {point.qps:.0f} q/s, p99 {point.p99_ms:.1f} ms")
        finally:
            await asyncio.gather(*(c.close() for c in conns), return_exceptions=True)


def run_pgvector(
    result: SystemResult, corpus: Corpus, efs: list[int], clients: int, seconds: float, max_seconds: float
) -> None:
    """Fill `result`; raises on failure, leaving in `result` what was measured before it."""
    started = time.perf_counter()
    # Under /tmp: as root the embedded PostgreSQL must be able to open every parent dir.
    data_dir = Path(tempfile.mkdtemp(prefix="shoal-compare-pg-", dir="/tmp"))
    try:
        run_async(lambda: _run(result, corpus, data_dir, efs, clients, seconds, max_seconds))
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
        result.seconds = time.perf_counter() - started
