"""Keyword and hybrid query throughput against text-vector queries, the results cache's speed-up,
and what the keyword index adds to applying writes.

    python -m load.keyword_bench [--seconds 8] [--concurrency 8] [--out keyword_bench.json]

Starts a local server with both caches off (`SHOAL_RESULTS_CACHE_BYTES=0`,
`SHOAL_EMBEDDING_CACHE_BYTES=0`) for the QPS comparison, so every query embeds and searches,
and one with the defaults for cache hit vs miss latency. Documents are the `load.quality`
documents (text and their precomputed vectors); queries are its labelled query texts, cycled.
Ingest: the shard's apply of the same documents with and without the keyword index.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np

from actors.keyword_index import KeywordIndex, term_counts
from actors.shard_state import ShardState
from load.corpus import load_corpus
from load.quality import build
from load.server import local_server
from models.config import EngineConfig
from models.records import DocId, Metric, Seq, StoredDoc
from shoal_client import ShoalClient


async def _load(client: ShoalClient, name: str, texts: list[str], vectors: np.ndarray[Any, Any]) -> None:
    await client.create_collection(name)
    for start in range(0, len(texts), 500):
        docs = [
            {"id": f"d{i}", "text": texts[i], "vector": vectors[i]} for i in range(start, min(len(texts), start + 500))
        ]
        await client.upsert(name, docs)


async def _qps(
    client: ShoalClient, name: str, queries: list[str], args: dict[str, Any], seconds: float, conc: int
) -> float:
    done = 0
    stop = time.perf_counter() + seconds

    async def worker(w: int) -> None:
        nonlocal done
        i = w
        while time.perf_counter() < stop:
            await client.query(name, text=queries[i % len(queries)], k=10, **args)
            i += conc
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(worker(w) for w in range(conc)))
    return done / (time.perf_counter() - started)


async def _serve_bench(
    texts: list[str], vectors: np.ndarray[Any, Any], queries: list[str], a: argparse.Namespace
) -> dict[str, Any]:
    out: dict[str, Any] = {}
    env = {"SHOAL_RESULTS_CACHE_BYTES": "0", "SHOAL_EMBEDDING_CACHE_BYTES": "0"}
    with local_server(env) as proc:
        async with ShoalClient.connect(proc.ws_url) as c:
            out["ingest_docs_per_s"] = await _ingest_e2e(c, texts, vectors)
            await _load(c, "kb", texts, vectors)
            for label, args in (
                ("vector (text)", {}),
                ("keyword", {"mode": "keyword"}),
                ("hybrid rrf", {"mode": "hybrid"}),
                ("hybrid weighted", {"mode": "hybrid", "fusion": "weighted", "alpha": 0.5}),
            ):
                out[label] = await _qps(c, "kb", queries, args, a.seconds, a.concurrency)
                print(f"{label}: {out[label]:.1f} queries/s", flush=True)
    with local_server() as proc:
        async with ShoalClient.connect(proc.ws_url) as c:
            await _load(c, "kb", texts, vectors)
            miss: list[float] = []
            hit: list[float] = []
            for q in queries[:200]:
                for bucket in (miss, hit):
                    started = time.perf_counter()
                    result = await c.query("kb", text=q, k=10, mode="hybrid")
                    bucket.append(time.perf_counter() - started)
                    assert result.cached == (bucket is hit)
            out["cache_miss_ms"] = statistics.median(miss) * 1000
            out["cache_hit_ms"] = statistics.median(hit) * 1000
            print(f"hybrid text query, median: miss {out['cache_miss_ms']:.2f} ms, hit {out['cache_hit_ms']:.2f} ms")
    return out


def _ingest_bench(texts: list[str], vectors: np.ndarray[Any, Any]) -> dict[str, float]:
    """Seconds to apply the documents to a shard (hnswlib, arrays, keyword index), and of that
    the keyword side's two steps alone: tokenising and indexing."""
    docs = [StoredDoc(DocId(f"d{i}"), t, vectors[i], {}, Seq(i + 1)) for i, t in enumerate(texts)]
    timings: dict[str, float] = {"shard_apply_s": float("inf"), "tokenise_s": float("inf"), "index_s": float("inf")}
    for _ in range(3):
        state = ShardState(384, Metric.COSINE, EngineConfig(search_threads=1))
        started = time.perf_counter()
        for start in range(0, len(docs), 100):
            state.upsert(docs[start : start + 100])
        timings["shard_apply_s"] = min(timings["shard_apply_s"], time.perf_counter() - started)
        started = time.perf_counter()
        counts = [term_counts(t) for t in texts]
        timings["tokenise_s"] = min(timings["tokenise_s"], time.perf_counter() - started)
        index = KeywordIndex()
        started = time.perf_counter()
        for label, c in enumerate(counts):
            index.set_counts(label, c)
        timings["index_s"] = min(timings["index_s"], time.perf_counter() - started)
    print(f"{len(docs)} documents: {timings}", flush=True)
    return timings


async def _ingest_e2e(client: ShoalClient, texts: list[str], vectors: np.ndarray[Any, Any]) -> dict[str, float]:
    """Docs/s of upserts (batches of 100, vectors given) with their text and without it."""
    out: dict[str, float] = {}
    for label, with_text in (("with_text", True), ("without_text", False), ("with_text_again", True)):
        name = f"ing_{label}"
        await client.create_collection(name)
        started = time.perf_counter()
        for start in range(0, len(texts), 100):
            rows = range(start, min(len(texts), start + 100))
            docs = [{"id": f"d{i}", "vector": vectors[i], **({"text": texts[i]} if with_text else {})} for i in rows]
            await client.upsert(name, docs)
        out[label] = len(texts) / (time.perf_counter() - started)
        print(f"ingest {label}: {out[label]:.0f} docs/s", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--out", type=Path, default=Path("keyword_bench.json"))
    a = parser.parse_args(argv)
    corpus = load_corpus(2000, 50)
    _, labelled = build(2000, 50, 300)
    texts, vectors = corpus.texts, corpus.vectors
    queries = [q for _, q, _ in labelled]
    results = {"ingest": _ingest_bench(texts, vectors), **asyncio.run(_serve_bench(texts, vectors, queries, a))}
    a.out.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
