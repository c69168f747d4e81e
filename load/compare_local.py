"""The in-process anchors of `load.compare`: raw hnswlib (the limit of Shoal's index) and numpy exact.

- hnswlib batch: one `knn_query` over the whole query set with num_threads = cores, repeated for
  the point's time; no server, no protocol, no per-query overhead: the ceiling.
- hnswlib single: one query per `knn_query` call, one thread, one caller: what the index costs
  per query without batching.
- numpy exact: the query set times the corpus matrix (`load.corpus.exact_top_k`: matmuls of 256
  queries, top-k by argpartition).
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import replace
from importlib.metadata import version
from typing import Any

import hnswlib
import numpy as np
from numpy.typing import NDArray

from load.common import log
from load.compare_common import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    CpuWindow,
    Ingest,
    K,
    Point,
    Raw,
    SystemResult,
    point_of,
)
from load.corpus import Corpus, exact_top_k

F32 = NDArray[np.float32]


def build_hnswlib(vectors: F32, threads: int) -> tuple[hnswlib.Index, float]:
    index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
    index.init_index(max_elements=len(vectors), M=HNSW_M, ef_construction=HNSW_EF_CONSTRUCTION, random_seed=1)
    started = time.perf_counter()
    index.add_items(vectors, np.arange(len(vectors)), num_threads=threads)
    return index, time.perf_counter() - started


def _batch_point(ef: int | None, raw: Raw, truth: NDArray[np.int64], cpu: CpuWindow) -> Point:
    """A point of whole-set calls: queries answered are calls x set size; no per-query latency."""
    point = point_of(ef, raw, truth, **cpu.stop())
    n = len(raw.first) * len(raw.latencies)
    ms = point.client_cpu_ms_per_query
    return replace(
        point,
        queries=n,
        qps=n / raw.seconds,
        p50_ms=None,
        p99_ms=None,
        client_cpu_ms_per_query=None if ms is None else ms * len(raw.latencies) / n,
    )


def _batches(search: Callable[[F32], NDArray[Any]], queries: F32, seconds: float) -> Raw:
    """Repeat the whole-set search for at least `seconds` (and at least once)."""
    raw = Raw()
    start = time.perf_counter()
    while True:
        t0 = time.perf_counter()
        rows = search(queries)
        raw.latencies.append(time.perf_counter() - t0)
        if not raw.first:
            raw.first = {q: list(map(int, r)) for q, r in enumerate(rows)}
        raw.seconds = time.perf_counter() - start
        if raw.seconds >= seconds:
            return raw


def run_hnswlib(
    batch: SystemResult,
    single: SystemResult,
    corpus: Corpus,
    efs: list[int],
    seconds: float,
    max_seconds: float,
    threads: int,
) -> None:
    """Fill `batch` (whole-set calls on `threads` threads) and `single` (one query per call)."""
    started = time.perf_counter()
    cpu = CpuWindow()
    index, build = build_hnswlib(corpus.vectors, threads)
    n = len(corpus.vectors)
    batch.ingest = Ingest(n, build, n, False, f"add_items, {threads} threads, in memory", **cpu.stop())
    single.ingest = batch.ingest
    batch.info = single.info = {"hnswlib": version("hnswlib"), "threads": threads}
    log(f"hnswlib: built {n} in {build:.1f}s ({n / build:.0f} docs/s)")
    queries, truth = corpus.query_vectors, corpus.ground_truth
    for ef in efs:
        index.set_ef(ef)
        cpu = CpuWindow()
        raw = _batches(lambda q: index.knn_query(q, k=K, num_threads=threads)[0], queries, seconds)
        batch.sweep.append(_batch_point(ef, raw, truth, cpu))
        cpu = CpuWindow()
        raw = Raw()
        t_start = time.perf_counter()
        i = 0
        while True:
            elapsed = time.perf_counter() - t_start
            if elapsed >= max_seconds or (elapsed >= seconds and len(raw.first) >= len(queries)):
                break
            q = i % len(queries)
            t0 = time.perf_counter()
            labels, _ = index.knn_query(queries[q], k=K, num_threads=1)
            raw.latencies.append(time.perf_counter() - t0)
            raw.first.setdefault(q, list(map(int, labels[0])))
            i += 1
        raw.seconds = time.perf_counter() - t_start
        single.sweep.append(point_of(ef, raw, truth, **cpu.stop()))
        b, s = batch.sweep[-1], single.sweep[-1]
        log(f"hnswlib ef={ef}: recall {b.recall:.4f}, batch {b.qps:.0f} q/s, single {s.qps:.0f} q/s")
    batch.seconds = single.seconds = time.perf_counter() - started


def run_numpy(result: SystemResult, corpus: Corpus, seconds: float) -> None:
    started = time.perf_counter()
    vectors = np.ascontiguousarray(corpus.vectors)
    cpu = CpuWindow()
    raw = _batches(lambda q: exact_top_k(vectors, q, K), corpus.query_vectors, seconds)
    result.sweep.append(_batch_point(None, raw, corpus.ground_truth, cpu))
    p = result.sweep[0]
    log(f"numpy exact: recall {p.recall:.4f}, {p.qps:.0f} q/s")
    result.info = {"numpy": np.__version__}
    result.seconds = time.perf_counter() - started
