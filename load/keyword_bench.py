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

from actors.keyword_index import KeywordIndex
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
    docs = [StoredDoc(DocId(f"d{i}"), t, vectors[i], {}, Seq(i + 1)) for i, t in enumerate(texts)]
    timings: dict[str, float] = {}
    for label, keywords in (("without keyword index", False), ("with keyword index", True)):
        best = float("inf")
        for _ in range(3):
            state = ShardState(384, Metric.COSINE, EngineConfig(search_threads=1))
            if not keywords:
                state.keywords = _NoKeywords()
            started = time.perf_counter()
            for start in range(0, len(docs), 100):
                state.upsert(docs[start : start + 100])
            best = min(best, time.perf_counter() - started)
        timings[label] = best
        print(f"shard apply of {len(docs)} documents {label}: {best:.2f} s", flush=True)
    return timings


class _NoKeywords(KeywordIndex):
    def set(self, label: int, text: str | None) -> None:
        pass


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
