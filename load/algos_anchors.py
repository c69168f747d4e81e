"""The in-process anchors of `load.algos`: the libraries behind Shoal's index kinds, built on the
same vectors and searched in this process.

Every anchor is searched the same two ways, on `threads` threads (the server's search pool), each
repeated for at least `seconds`: the whole query set in one batched call per pass (`qps`: the most
the library reaches here), and the query set cut into calls of `clients` queries (`qps_clients`:
the most that `clients` callers with one query in flight each can ever hand it at once, which is
what the server's batching of queued queries has to work with). recall@10 comes from the first
pass, QPS and the CPU this process spent per query from all of them. Each returns a
dict with its build time, insert rate, serialised bytes per vector and one point per sweep value
(`recall`, `qps`, `cpu_us_per_query`).

- `hnsw`: raw hnswlib (cosine), the same M / ef_construction as Shoal's, ef swept.
- `hnsw int8` / `hnsw f16`: faiss `IndexHNSWSQ` (8-bit / fp16 scalar quantiser), efSearch swept.
- `flat`: faiss `IndexFlatIP` (exact).
- `ivf`: faiss `IndexIVFFlat`; `ivf int8` / `ivf f16`: `IndexIVFScalarQuantizer`; nprobe swept.
- `lsh`: faiss `IndexLSH` (`nbits` random hyperplanes, Hamming search) returning `LSH_CANDIDATES`
  candidates that are re-ranked here by the exact inner product; one point per nbits.

Vectors are unit rows, so inner product is cosine. The quantised faiss anchors do not re-rank.

Each also returns its `SearchAt`: the built index searched at one value of its swept parameter,
so `load.algos` can time it again later, between Shoal's timed phases (`timed`).
"""

from __future__ import annotations

import importlib
import os
import tempfile
import time
from collections.abc import Callable, Sequence
from typing import Any

import hnswlib
import numpy as np
from numpy.typing import NDArray

from load.common import recall_at_k

# faiss ships no type information; it is used through `Any`.
faiss: Any = importlib.import_module("faiss")

K = 10
LSH_CANDIDATES = 100
_RERANK_CHUNK = 128

Search = Callable[[NDArray[np.float32]], NDArray[np.int64]]
# An anchor's search at one value of its swept parameter (ef, nprobe, nbits; None for flat).
SearchAt = Callable[[int | None], Search]


def _measure(
    search: Search, queries: NDArray[np.float32], truth: NDArray[np.int64], seconds: float, clients: int
) -> dict[str, Any]:
    """recall@10 of the first pass, then `timed`."""
    labels = search(queries)
    recall = recall_at_k(labels[:, :K].tolist(), truth, K)
    return {"recall": round(recall, 4), **timed(search, queries, seconds, clients)}


def _passes(search: Search, calls: Sequence[NDArray[np.float32]], seconds: float) -> tuple[float, float]:
    """(queries per second, CPU microseconds per query) of passes over `calls`, one search per
    element, for at least `seconds`."""
    started, cpu = time.perf_counter(), time.process_time()
    done = 0
    while True:
        for q in calls:
            search(q)
            done += len(q)
        if time.perf_counter() - started >= seconds:
            break
    elapsed, cpu_s = time.perf_counter() - started, time.process_time() - cpu
    return round(done / elapsed, 1), round(cpu_s / done * 1e6, 1)


def timed(search: Search, queries: NDArray[np.float32], seconds: float, clients: int) -> dict[str, float]:
    """Queries per second and CPU microseconds per query (this process, every thread) of `search`
    over at least `seconds` of passes, with the whole set per call (`qps`, `cpu_us_per_query`) and
    with `clients` queries per call (`qps_clients`, `cpu_us_per_query_clients`)."""
    whole = _passes(search, [queries], seconds)
    cut = [queries[i : i + clients] for i in range(0, len(queries), max(1, clients))]
    per_clients = _passes(search, cut, seconds)
    return {
        "qps": whole[0],
        "cpu_us_per_query": whole[1],
        "qps_clients": per_clients[0],
        "cpu_us_per_query_clients": per_clients[1],
    }


def _serialised_bytes(index: Any) -> int:
    return len(faiss.serialize_index(index))


def _result(library: str, params: dict[str, Any], build_s: float, n: int, nbytes: int) -> dict[str, Any]:
    return {
        "library": library,
        "params": params,
        "build_s": round(build_s, 3),
        "inserts_per_s": round(n / build_s, 1) if build_s > 0 else None,
        "bytes_per_vector": round(nbytes / n, 1),
        "points": [],
    }


def hnswlib_anchor(
    vectors: NDArray[np.float32],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    *,
    m: int,
    ef_construction: int,
    sweep: Sequence[int],
    threads: int,
    seconds: float,
    clients: int,
) -> tuple[dict[str, Any], SearchAt]:
    """Raw hnswlib: `add_items` on `threads` threads, then `knn_query` per ef of `sweep`."""
    n, dim = vectors.shape
    index = hnswlib.Index(space="cosine", dim=dim)
    index.init_index(max_elements=n, M=m, ef_construction=ef_construction, random_seed=100)
    started = time.perf_counter()
    index.add_items(vectors, np.arange(n), num_threads=threads)
    build_s = time.perf_counter() - started
    with tempfile.TemporaryDirectory(prefix="shoal-algos-") as tmp:
        path = os.path.join(tmp, "hnsw.bin")
        index.save_index(path)
        nbytes = os.path.getsize(path)
    out = _result("hnswlib", {"m": m, "ef_construction": ef_construction}, build_s, n, nbytes)
    out["param"] = "ef"

    def search(q: NDArray[np.float32]) -> NDArray[np.int64]:
        labels, _ = index.knn_query(q, k=K, num_threads=threads)
        return np.asarray(labels, dtype=np.int64)

    def search_at(ef: int | None) -> Search:
        index.set_ef(max(ef or K, K))
        return search

    for ef in sweep:
        out["points"].append({"ef": ef, **_measure(search_at(ef), queries, truth, seconds, clients)})
    return out, search_at


def _faiss_search(index: Any, threads: int) -> Search:
    """`index.search` for the top K; `threads` is set on every call: OpenMP keeps it per calling
    thread, and the later timings may run on another one."""

    def search(q: NDArray[np.float32]) -> NDArray[np.int64]:
        faiss.omp_set_num_threads(threads)
        _, labels = index.search(q, K)
        return np.asarray(labels, dtype=np.int64)

    return search


_SQ_TYPES = {"int8": "QT_8bit", "f16": "QT_fp16"}


def faiss_hnsw_sq_anchor(
    vectors: NDArray[np.float32],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    *,
    quantization: str,
    m: int,
    ef_construction: int,
    sweep: Sequence[int],
    threads: int,
    seconds: float,
    clients: int,
) -> tuple[dict[str, Any], SearchAt]:
    """faiss `IndexHNSWSQ` (inner product) with the `quantization` scalar quantiser."""
    faiss.omp_set_num_threads(threads)
    n, dim = vectors.shape
    qtype = getattr(faiss.ScalarQuantizer, _SQ_TYPES[quantization])
    index = faiss.IndexHNSWSQ(dim, qtype, m, faiss.METRIC_INNER_PRODUCT)
    index.hnsw.efConstruction = ef_construction
    started = time.perf_counter()
    index.train(vectors)
    index.add(vectors)
    build_s = time.perf_counter() - started
    params = {"m": m, "ef_construction": ef_construction, "quantization": quantization}
    out = _result(f"faiss IndexHNSWSQ {_SQ_TYPES[quantization]}", params, build_s, n, _serialised_bytes(index))
    out["param"] = "ef"
    search = _faiss_search(index, threads)

    def search_at(ef: int | None) -> Search:
        index.hnsw.efSearch = max(ef or K, K)
        return search

    for ef in sweep:
        out["points"].append({"ef": ef, **_measure(search_at(ef), queries, truth, seconds, clients)})
    return out, search_at


def faiss_flat_anchor(
    vectors: NDArray[np.float32],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    *,
    threads: int,
    seconds: float,
    clients: int,
) -> tuple[dict[str, Any], SearchAt]:
    """faiss `IndexFlatIP`: exact search, one point."""
    faiss.omp_set_num_threads(threads)
    n, dim = vectors.shape
    index = faiss.IndexFlatIP(dim)
    started = time.perf_counter()
    index.add(vectors)
    build_s = time.perf_counter() - started
    out = _result("faiss IndexFlatIP", {}, build_s, n, _serialised_bytes(index))
    out["param"] = None
    search = _faiss_search(index, threads)
    out["points"].append(_measure(search, queries, truth, seconds, clients))
    return out, lambda _value: search


def faiss_ivf_anchor(
    vectors: NDArray[np.float32],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    *,
    nlist: int,
    quantization: str | None,
    sweep: Sequence[int],
    threads: int,
    seconds: float,
    clients: int,
) -> tuple[dict[str, Any], SearchAt]:
    """faiss `IndexIVFFlat` (or `IndexIVFScalarQuantizer` with `quantization`), trained on every
    vector, nprobe per value of `sweep` (at most nlist)."""
    faiss.omp_set_num_threads(threads)
    n, dim = vectors.shape
    quantizer = faiss.IndexFlatIP(dim)
    if quantization is None:
        index = faiss.IndexIVFFlat(quantizer, dim, nlist, faiss.METRIC_INNER_PRODUCT)
        library = "faiss IndexIVFFlat"
    else:
        qtype = getattr(faiss.ScalarQuantizer, _SQ_TYPES[quantization])
        index = faiss.IndexIVFScalarQuantizer(quantizer, dim, nlist, qtype, faiss.METRIC_INNER_PRODUCT)
        library = f"faiss IndexIVFScalarQuantizer {_SQ_TYPES[quantization]}"
    started = time.perf_counter()
    index.train(vectors)
    index.add(vectors)
    build_s = time.perf_counter() - started
    params: dict[str, Any] = {"nlist": nlist}
    if quantization is not None:
        params["quantization"] = quantization
    out = _result(library, params, build_s, n, _serialised_bytes(index))
    out["param"] = "nprobe"
    search = _faiss_search(index, threads)

    def search_at(nprobe: int | None) -> Search:
        index.nprobe = min(nprobe or 1, nlist)
        return search

    for nprobe in sweep:
        out["points"].append({"nprobe": nprobe, **_measure(search_at(nprobe), queries, truth, seconds, clients)})
    return out, search_at


def faiss_lsh_anchor(
    vectors: NDArray[np.float32],
    queries: NDArray[np.float32],
    truth: NDArray[np.int64],
    *,
    nbits_values: Sequence[int],
    threads: int,
    seconds: float,
    clients: int,
    candidates: int = LSH_CANDIDATES,
) -> tuple[dict[str, Any], SearchAt]:
    """faiss `IndexLSH` per nbits: `candidates` nearest by Hamming distance, re-ranked by the exact
    inner product on the float32 vectors (kept beside the index: `rerank_bytes_per_vector`)."""
    faiss.omp_set_num_threads(threads)
    n, dim = vectors.shape
    out: dict[str, Any] = {
        "library": "faiss IndexLSH + exact re-rank",
        "params": {"candidates": candidates},
        "param": "nbits",
        "rerank_bytes_per_vector": dim * 4,
        "builds": [],
        "points": [],
    }
    searches: dict[int, Search] = {}
    for nbits in nbits_values:
        index = faiss.IndexLSH(dim, nbits)
        started = time.perf_counter()
        index.train(vectors)
        index.add(vectors)
        build_s = time.perf_counter() - started
        out["builds"].append(
            {
                "nbits": nbits,
                "build_s": round(build_s, 3),
                "inserts_per_s": round(n / build_s, 1) if build_s > 0 else None,
                "bytes_per_vector": round(_serialised_bytes(index) / n, 1),
            }
        )

        def search(q: NDArray[np.float32], index: Any = index) -> NDArray[np.int64]:
            faiss.omp_set_num_threads(threads)
            _, found = index.search(q, candidates)
            found = np.asarray(found, dtype=np.int64)
            best = np.empty((len(q), K), dtype=np.int64)
            for start in range(0, len(q), _RERANK_CHUNK):  # bounded temporary: chunk x candidates x dim
                part = found[start : start + _RERANK_CHUNK]
                rows = np.where(part < 0, 0, part)
                scores = np.matmul(vectors[rows], q[start : start + _RERANK_CHUNK, :, None])[..., 0]
                scores[part < 0] = -np.inf
                order = np.argsort(-scores, axis=1, kind="stable")[:, :K]
                best[start : start + len(part)] = np.take_along_axis(part, order, axis=1)
            return best

        searches[nbits] = search
        out["points"].append({"nbits": nbits, **_measure(search, queries, truth, seconds, clients)})
    # The headline build is the one with one bit per dimension (the reference), if run.
    same = [b for b in out["builds"] if b["nbits"] == dim]
    first = same[0] if same else (out["builds"][0] if out["builds"] else {})
    out["build_s"] = first.get("build_s")
    out["inserts_per_s"] = first.get("inserts_per_s")
    out["bytes_per_vector"] = first.get("bytes_per_vector")
    return out, lambda nbits: searches[nbits if nbits is not None else dim]
