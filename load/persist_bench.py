"""Write throughput of the persistence layer: committed documents per second.

    python -m load.persist_bench [--batches 40] [--batch 500] [--dim 384] [--text-chars 300]
                                 [--writers 2] [--variants ...] [--url URL] [--json OUT.json]

Each batch is `--batch` documents with a random unit vector, ~300 characters of text and four
metadata fields, committed in one transaction with a durable (synchronous) commit. Variants, each
on a fresh collection:

- `copy`: `Persistence.commit_upserts` as shipped: binary COPY into the log, then one
  INSERT ... SELECT DISTINCT ON ... ON CONFLICT from the log into the docs table.
- `insert`: one multi-row statement instead of COPY: INSERT INTO log SELECT FROM unnest(arrays)
  in a data-modifying CTE feeding the docs upsert (`Tables.upsert_via_unnest`).
- `copy-toast-default`: `copy` with PostgreSQL's default toast_tuple_target (~2 KB) instead of
  the schema's 4080: rows over ~2 KB get their text compressed and then their vector moved to TOAST.
- `copy-vector-main`: the default target with the vector column's storage set to MAIN (compress,
  move out of line only as a last resort).

Each batch is written by every variant in turn, each to its own collection, so that the disk's
slow moments (checkpoints, a busy neighbour) fall on all variants alike. Every variant first
inserts `--batches` batches of new ids, then replaces the same ids once more (updates through
ON CONFLICT), then the full collection is read back with `load_collection`. docs/s is documents
over the summed batch latencies of one writer. With `--writers N` > 1, N writers then commit to N
collections at once (aggregate docs/s). Without `--url` it runs an embedded PostgreSQL in a
temporary directory under /tmp. Prints a table and optionally writes JSON.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

import anyio
import numpy as np

from actors.persistence import Persistence
from actors.pg_codecs import encode_metadata, encode_vector
from actors.pg_server import open_database
from actors.schema import Tables
from load.dataset import WORDS
from models.errors import NotFound
from models.records import DocId, Document, Metric

Writer = Callable[[Persistence, str, Sequence[Document]], Awaitable[tuple[int, int]]]



def make_batches(
    n_batches: int, batch: int, dim: int, seed: int, text_chars: int = 300
) -> list[list[Document]]:
    rng = np.random.default_rng(seed)
    out: list[list[Document]] = []
    for b in range(n_batches):
        vecs = rng.standard_normal((batch, dim)).astype(np.float32)
        vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
        docs = []
        for i in range(batch):
            n = b * batch + i
            words = rng.choice(WORDS, size=text_chars // 4 + 1)
            docs.append(
                Document(
                    DocId(f"doc-{n}"),
                    " ".join(words)[:text_chars],
                    vecs[i],
                    {"source": f"feed-{n % 7}", "n": n, "score": float(rng.random()), "tags": ["a", "b"]},
                )
            )
        out.append(docs)
    return out


async def write_copy(db: Persistence, name: str, docs: Sequence[Document]) -> tuple[int, int]:
    return await db.commit_upserts(name, docs)


async def write_insert(db: Persistence, name: str, docs: Sequence[Document]) -> tuple[int, int]:
    """The multi-row INSERT path, built on the same schema and codecs."""
    n = len(docs)
    ids = [d.id for d in docs]
    texts = [d.text for d in docs]
    vectors = [encode_vector(d.vector) for d in docs]
    metas = [encode_metadata(d.metadata) for d in docs]
    async with db._connection() as conn, conn.transaction():
        row = await conn.fetchrow(
            "UPDATE shoal_collections SET last_seq = last_seq + $2 WHERE name = $1 RETURNING id, last_seq",
            name,
            n,
        )
        if row is None:
            raise NotFound(name)
        last = int(row["last_seq"])
        tables = Tables(row["id"])
        await conn.execute(tables.upsert_via_unnest(), last - n + 1, ids, texts, vectors, metas, row["id"])
    return last - n + 1, last


def _summary(docs: int, latencies: list[float]) -> dict[str, float]:
    lat = sorted(latencies)
    total = sum(lat)
    return {
        "docs": docs,
        "seconds": round(total, 3),
        "docs_per_s": round(docs / total, 1),
        "batch_ms_p50": round(statistics.median(lat) * 1000, 2),
        "batch_ms_p99": round(lat[min(len(lat) - 1, int(len(lat) * 0.99))] * 1000, 2),
    }


async def collection_id(db: Persistence, name: str) -> int:
    async with db._connection() as conn:
        return int(await conn.fetchval("SELECT id FROM shoal_collections WHERE name = $1", name))


async def table_bytes(db: Persistence, name: str) -> dict[str, int]:
    t = Tables(await collection_id(db, name))
    async with db._connection() as conn:
        return {
            "docs_bytes": int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", t.docs)),
            "log_bytes": int(await conn.fetchval("SELECT pg_total_relation_size($1::regclass)", t.log)),
        }


async def time_load(db: Persistence, name: str) -> dict[str, float]:
    t0 = time.perf_counter()
    n = 0
    async for batch in db.load_collection(name):
        n += len(batch)
    elapsed = time.perf_counter() - t0
    return {"docs": n, "seconds": round(elapsed, 3), "docs_per_s": round(n / elapsed, 1)}


async def bench_interleaved(
    db: Persistence, variants: Sequence[str], batches: list[list[Document]], dim: int
) -> list[dict[str, Any]]:
    """Each batch is written by every variant in turn (to its own collection), so that the
    disk's slow moments fall on all variants alike."""
    names = {v: f"bench_{v.replace('-', '_')}" for v in variants}
    for variant, name in names.items():
        await db.create_collection(name, dim, Metric.COSINE)
        if variant in ("copy-toast-default", "copy-vector-main"):
            t = Tables(await collection_id(db, name))
            async with db._connection() as conn:
                for table in (t.docs, t.log):
                    await conn.execute(f"ALTER TABLE {table} RESET (toast_tuple_target)")
                    if variant == "copy-vector-main":
                        await conn.execute(f"ALTER TABLE {table} ALTER COLUMN vector SET STORAGE MAIN")
    writers: dict[str, Writer] = {v: write_insert if v == "insert" else write_copy for v in variants}
    results: dict[str, dict[str, Any]] = {v: {"variant": v} for v in variants}
    try:
        for variant in variants:  # warm-up: connections, prepared statements, first pages
            await writers[variant](db, names[variant], batches[0])
        for phase in ("insert", "replace"):
            latencies: dict[str, list[float]] = {v: [] for v in variants}
            for docs in batches[1:]:
                for variant in variants:
                    t0 = time.perf_counter()
                    await writers[variant](db, names[variant], docs)
                    latencies[variant].append(time.perf_counter() - t0)
            n_docs = sum(len(b) for b in batches[1:])
            for variant in variants:
                results[variant][phase] = _summary(n_docs, latencies[variant])
        for variant in variants:
            results[variant]["load"] = await time_load(db, names[variant])
            results[variant].update(await table_bytes(db, names[variant]))
    finally:
        for name in names.values():
            await db.drop_collection(name)
    return [results[v] for v in variants]


async def bench_parallel(
    db: Persistence, writers: int, batches: list[list[Document]], dim: int
) -> dict[str, Any]:
    """`writers` tasks, each committing all batches to its own collection at the same time."""
    names = [f"bench_parallel_{i}" for i in range(writers)]
    for name in names:
        await db.create_collection(name, dim, Metric.COSINE)
    latencies: list[float] = []

    async def writer(name: str) -> None:
        for docs in batches:
            t0 = time.perf_counter()
            await db.commit_upserts(name, docs)
            latencies.append(time.perf_counter() - t0)

    try:
        t0 = time.perf_counter()
        async with anyio.create_task_group() as tg:
            for name in names:
                tg.start_soon(writer, name)
        elapsed = time.perf_counter() - t0
    finally:
        for name in names:
            await db.drop_collection(name)
    n_docs = writers * sum(len(b) for b in batches)
    return {
        "writers": writers,
        "docs": n_docs,
        "seconds": round(elapsed, 3),
        "docs_per_s": round(n_docs / elapsed, 1),
        "batch_ms_p50": round(statistics.median(latencies) * 1000, 2),
    }


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    batches = make_batches(args.batches + 1, args.batch, args.dim, args.seed, args.text_chars)
    with tempfile.TemporaryDirectory(prefix="shoal-bench-", dir="/tmp") as tmp:
        async with open_database(Path(tmp), args.url) as dsn, Persistence(dsn, pool_size=4) as db:
            results = await bench_interleaved(db, args.variants, batches, args.dim)
            for res in results:
                ins, rep, load = res["insert"], res["replace"], res["load"]
                print(
                    f"{res['variant']:20s} insert {ins['docs_per_s']:>8.0f} docs/s "
                    f"(batch p50 {ins['batch_ms_p50']:5.1f} ms, p99 {ins['batch_ms_p99']:5.1f} ms)  "
                    f"replace {rep['docs_per_s']:>8.0f} docs/s (p50 {rep['batch_ms_p50']:5.1f} ms)  "
                    f"load {load['docs_per_s']:>8.0f} docs/s  "
                    f"docs {res['docs_bytes'] / 2**20:.1f} MiB, log {res['log_bytes'] / 2**20:.1f} MiB",
                    flush=True,
                )
            parallel = None
            if args.writers > 1:
                parallel = await bench_parallel(db, args.writers, batches[1:], args.dim)
                print(
                    f"copy x{args.writers} collections    {parallel['docs_per_s']:>8.0f} docs/s in total "
                    f"(batch p50 {parallel['batch_ms_p50']:.1f} ms)",
                    flush=True,
                )
    return {
        "benchmark": "persist",
        "batch": args.batch,
        "batches": args.batches,
        "dim": args.dim,
        "text_chars": args.text_chars,
        "database": "url" if args.url else "embedded",
        "results": results,
        "parallel": parallel,
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m load.persist_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--batches", type=int, default=40, help="timed batches per phase")
    parser.add_argument("--batch", type=int, default=500, help="documents per batch")
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--text-chars", type=int, default=300, help="characters of text per document")
    parser.add_argument(
        "--writers", type=int, default=2, help="also: this many writers on as many collections at once"
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=["copy", "insert", "copy-toast-default"],
        choices=["copy", "insert", "copy-toast-default", "copy-vector-main"],
    )
    parser.add_argument("--seed", type=int, default=7)
    parser.add_argument("--url", default=None, help="PostgreSQL URL (default: embedded server)")
    parser.add_argument("--json", type=Path, default=None, help="write the results here")
    args = parser.parse_args(argv)
    result = anyio.run(main_async, args)
    if args.json is not None:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
