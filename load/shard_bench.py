"""Shard actor vs raw hnswlib: what the actor's mailbox, threads and batching cost.

    python -m load.shard_bench [--n 20000] [--dim 384] [--callers 8] [--ef 64] [--json OUT]

Same data, same index parameters and ef, same run:
- raw batch:  one `knn_query` over all queries with num_threads = search_threads (the ceiling);
- raw single: a loop of one-query `knn_query` calls, num_threads=1 (what a naive server does);
- shard:      `--callers` concurrent tasks, each awaiting `Shard.search` one query at a time.
Recall@k of both indexes against exact search is printed too, so a speed-up cannot hide a
worse graph. Data: seeded Gaussian clusters, queries are documents plus noise.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import anyio
import hnswlib
import numpy as np
from numpy.typing import NDArray

from actors import exact
from actors.indexes.base import query_params
from actors.read_pool import ReadPool
from actors.shard import Shard
from models.config import EngineConfig
from models.records import DEFAULT_INCLUDE, DocId, Metric, Seq, StoredDoc

F32 = NDArray[np.float32]


def clustered(n: int, dim: int, seed: int, clusters: int = 100) -> F32:
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 0.3
    pick = rng.integers(0, clusters, size=n)
    return (centres[pick] + 0.1 * rng.normal(size=(n, dim))).astype(np.float32)


def near(vectors: F32, n: int, seed: int) -> F32:
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(0, len(vectors), size=n)]
    return (picked + 0.05 * rng.normal(size=picked.shape)).astype(np.float32)


def recall(found: list[list[int]], truth: list[list[int]]) -> float:
    hits = sum(len(set(f) & set(t)) for f, t in zip(found, truth, strict=True))
    return hits / max(1, sum(len(t) for t in truth))


def timed(fn: Callable[[], int], min_seconds: float) -> tuple[float, float]:
    """(queries per second, CPU microseconds per query) of `fn`, which returns how many
    queries it answered; repeated for at least `min_seconds`. CPU time counts every thread of
    the process, so it stays meaningful on a machine shared with other work."""
    done, start, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        done += fn()
        elapsed = time.perf_counter() - start
        if elapsed >= min_seconds:
            return done / elapsed, (time.process_time() - cpu) / done * 1e6


async def shard_qps(
    shard: Shard, queries: F32, k: int, ef: int, callers: int, seconds: float
) -> tuple[float, float]:
    """(queries per second, CPU microseconds per query) of `callers` concurrent search loops."""
    deadline = time.perf_counter() + seconds
    count = 0

    async def caller(offset: int) -> None:
        nonlocal count
        i = offset
        while time.perf_counter() < deadline:
            await shard.search(queries[i % len(queries)], k, query_params(ef=ef), None, None, DEFAULT_INCLUDE)
            count += 1
            i += callers

    start, cpu = time.perf_counter(), time.process_time()
    async with anyio.create_task_group() as tg:
        for c in range(callers):
            tg.start_soon(caller, c)
    return count / (time.perf_counter() - start), (time.process_time() - cpu) / max(1, count) * 1e6


async def run(args: argparse.Namespace) -> dict[str, Any]:
    config = EngineConfig()
    metric = Metric(args.metric)
    vecs = clustered(args.n, args.dim, seed=1)
    queries = near(vecs, args.queries, seed=2)
    threads = config.search_threads

    t0 = time.perf_counter()
    raw = hnswlib.Index(space=metric.value, dim=args.dim)
    raw.init_index(max_elements=args.n, M=config.hnsw_m, ef_construction=config.hnsw_ef_construction)
    raw.add_items(vecs, np.arange(args.n), num_threads=threads)
    raw.set_ef(args.ef)
    raw_build = time.perf_counter() - t0

    pool = ReadPool(threads)
    shard = Shard(args.dim, metric, config, pool)
    with pool.running():
        async with anyio.create_task_group() as tg:
            await tg.start(shard.run)
            t0 = time.perf_counter()
            docs = [StoredDoc(DocId(f"d{i}"), None, v, {}, Seq(i + 1)) for i, v in enumerate(vecs)]
            for i in range(0, len(docs), 2_000):
                await shard.apply_upserts(docs[i : i + 2_000])
            shard_build = time.perf_counter() - t0

            sample = queries[:200]
            truth = [t.labels.tolist() for t in exact.search(vecs, exact.row_norms(vecs), sample, args.k, metric)]
            raw_labels, _ = raw.knn_query(sample, k=args.k, num_threads=threads)
            shard_found = []
            for q in sample:
                hits = await shard.search(q, args.k, args.ef, None, None, DEFAULT_INCLUDE)
                shard_found.append([int(h.id[1:]) for h in hits])

            def batch() -> int:
                return len(raw.knn_query(queries, k=args.k, num_threads=threads)[0])

            def single() -> int:
                for q in queries[:200]:
                    raw.knn_query(q, k=args.k, num_threads=1)
                return 200

            await shard_qps(shard, queries, args.k, args.ef, args.callers, 0.5)  # warm-up
            rounds: list[dict[str, float]] = []
            # Interleaved rounds, medians reported: the phases see the same background load.
            for _ in range(args.rounds):
                b_qps, b_cpu = timed(batch, args.seconds)
                s_qps, s_cpu = timed(single, args.seconds)
                a_qps, a_cpu = await shard_qps(shard, queries, args.k, args.ef, args.callers, args.seconds)
                rounds.append(
                    {"raw_batch": b_qps, "raw_single": s_qps, "shard": a_qps}
                    | {"cpu_raw_batch": b_cpu, "cpu_raw_single": s_cpu, "cpu_shard": a_cpu}
                )
            shard.close()

    def median(key: str) -> float:
        return float(np.median([r[key] for r in rounds]))

    def median_ratio(a: str, b: str) -> float:
        return round(float(np.median([r[a] / r[b] for r in rounds])), 3)

    result = {
        "n": args.n,
        "dim": args.dim,
        "metric": metric.value,
        "k": args.k,
        "ef": args.ef,
        "callers": args.callers,
        "search_threads": threads,
        "search_batch": config.search_batch,
        "cpus": os.cpu_count(),
        "rounds": args.rounds,
        "build_seconds": {"raw": round(raw_build, 2), "shard": round(shard_build, 2)},
        "recall": {"raw": recall(raw_labels.tolist(), truth), "shard": recall(shard_found, truth)},
        "qps": {key: round(median(key)) for key in ("raw_batch", "raw_single", "shard")},
        "cpu_us_per_query": {
            key: round(median("cpu_" + key), 1) for key in ("raw_batch", "raw_single", "shard")
        },
        "ratio": {
            "shard_vs_raw_batch": median_ratio("shard", "raw_batch"),
            "shard_vs_raw_single": median_ratio("shard", "raw_single"),
            "cpu_raw_batch_vs_shard": median_ratio("cpu_raw_batch", "cpu_shard"),
        },
        "per_round": [{key: round(v, 1) for key, v in r.items()} for r in rounds],
    }
    return result


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m load.shard_bench", description=__doc__.split("\n")[0])
    parser.add_argument("--n", type=int, default=20_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--queries", type=int, default=2_000)
    parser.add_argument("--k", type=int, default=10)
    parser.add_argument("--ef", type=int, default=EngineConfig().hnsw_ef_search)
    parser.add_argument("--callers", type=int, default=8)
    parser.add_argument("--metric", choices=[m.value for m in Metric], default="cosine")
    parser.add_argument("--seconds", type=float, default=3.0, help="duration of each timed phase")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved measurement rounds")
    parser.add_argument(
        "--loop", choices=["uvloop", "asyncio"], default="uvloop", help="default: as the server"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args(argv)

    result = anyio.run(run, args, backend_options={"use_uvloop": args.loop == "uvloop"})
    result["loop"] = args.loop
    qps, cpu, ratio, rec = result["qps"], result["cpu_us_per_query"], result["ratio"], result["recall"]
    threads, build = result["search_threads"], result["build_seconds"]
    print(f"shard bench: {args.n} x {args.dim} {args.metric}, k={args.k}, ef={args.ef}, {result['loop']}")
    print(f"  build          raw {build['raw']:>6.2f} s      shard {build['shard']:.2f} s")
    print(f"  recall@{args.k:<7} raw {rec['raw']:>6.3f}        shard {rec['shard']:.3f}")
    print(f"  medians of {args.rounds} interleaved rounds of {args.seconds:g} s:")
    rows = [
        ("raw batch", "raw_batch", f"one knn_query, {threads} threads"),
        ("raw single", "raw_single", "one-query calls"),
        ("shard", "shard", f"{args.callers} concurrent callers"),
    ]
    for label, key, what in rows:
        print(f"  {label:<12} {qps[key]:>8} q/s  {cpu[key]:>7} CPU us/q  ({what})")
    print(f"  shard / raw batch   {ratio['shard_vs_raw_batch']:.2f}")
    print(f"  shard / raw single  {ratio['shard_vs_raw_single']:.2f}")
    print(f"  CPU per query, raw batch / shard  {ratio['cpu_raw_batch_vs_shard']:.2f}")
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")
        print(f"  wrote {args.json}")


if __name__ == "__main__":
    main()
