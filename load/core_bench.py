"""The core figures, in one run on one machine: recall, query QPS against raw hnswlib, ingest rates
and the text pipeline against raw onnxruntime.

    python -m load.core_bench [--url URL] [--size 20000] [--queries 1000] [--clients 8]
                              [--rounds 5] [--batch-queries 32] [--json results/core_bench.json]

1. Vector ingest: the real corpus (`load.corpus`: passages found on this machine, embedded by
   Shoal's model, exact top-100 ground truth) is upserted over WebSocket in batches of 500, each
   document with its vector, text and metadata `{"bucket": i % 100, "n": i}`; one client with one
   batch in flight, then (into a second collection) two clients.
2. Recall@10 at the server's default ef against the exact ground truth, and under the filter
   `{"bucket": q % 100}` (1 % of the documents) against the exact filtered ground truth (numpy).
3. Query QPS: `--clients` WebSocket connections, one outstanding request each (closed loop),
   ids and scores only (`include: []`, what hnswlib returns), against raw hnswlib in this process
   on the same vectors with the same M / ef_construction, at the smallest ef whose recall@10
   reaches Shoal's: `knn_query` over the whole query set with num_threads=2 (both cores), and a
   single-query loop on one and on two threads. Each round also times the same queries sent as
   `query_batch` requests of `--batch-queries` (one in flight per client), against the same
   whole-set call. Measured in `--rounds` interleaved rounds (raw,
   then Shoal, each round): every ratio is taken within a round, the median is reported. Beside
   the QPS ratio, the CPU each side spent per query (the server's, from /proc; raw hnswlib's, from
   this process) gives a ratio of queries per CPU-second that a busy neighbour on a shared machine
   does not move. Then shorter phases: the default `include` (text, metadata), the 1 % filter, and
   `ping` (the cost of the protocol and transport alone).
4. Text ingest: `--text-docs` corpus texts upserted as text only (the server embeds them),
   against raw onnxruntime in this process: the same `MiniLM` model, the same texts, sorted by
   token count all at once and cut into runs of the embedder's limits (`embed_batch` texts /
   `embed_batch_tokens` tokens), and the same total number of threads as the server's embedder
   (`embed_workers` x intra-op threads). Interleaved rounds as above.

The load generator runs on the same two cores as the server: the CPU used by this process, the
server and its PostgreSQL over each Shoal phase is reported beside the figures (`cpu`), so a ratio
can be read against who used the cores. Without `--url` a local server is started (127.0.0.1,
port 0, temporary data dir under /tmp) and its settings are read from this environment
(`SHOAL_*`); with `--url` the server is assumed to run the default settings.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import hnswlib
import numpy as np
from numpy.typing import NDArray

from actors.onnx_model import MiniLM, TokenIds
from load.common import (
    RESULTS_DIR,
    CpuMeter,
    Progress,
    Target,
    add_target_args,
    bench_header,
    format_table,
    log,
    recall_at_k,
    run_async,
    target,
    unique_name,
    write_json,
)
from load.dataset import BUCKETS, Dataset, load_dataset
from load.ingest import make_batches, run_ingest
from load.ingest import summarize as ingest_summary
from load.query import as_query_batches, close_clients, open_clients, query_requests, recall_of, run_closed
from load.query import summarize as query_summary
from models.config import EngineConfig
from server.settings import load_settings
from shoal_client import ShoalClient

K = 10
EF_SWEEP = (10, 12, 14, 16, 20, 24, 28, 32, 40, 48, 56, 64, 80, 96, 128, 160, 200, 256, 320, 400, 512)

TARGETS = {"recall": 0.95, "qps_ratio": 0.3, "text_ratio": 0.9}


# ----------------------------------------------------------------------------- raw hnswlib


def build_raw_index(vectors: NDArray[np.float32], config: EngineConfig) -> tuple[Any, float]:
    index = hnswlib.Index(space="cosine", dim=vectors.shape[1])
    index.init_index(
        max_elements=len(vectors), M=config.hnsw_m, ef_construction=config.hnsw_ef_construction, random_seed=100
    )
    started = time.perf_counter()
    index.add_items(vectors, np.arange(len(vectors)), num_threads=2)
    return index, time.perf_counter() - started


def raw_recall(index: Any, ds: Dataset, ef: int) -> float:
    index.set_ef(ef)
    labels, _ = index.knn_query(ds.query_vectors, k=K, num_threads=2)
    return recall_at_k(labels.tolist(), ds.truth, K)


def match_ef(index: Any, ds: Dataset, target_recall: float) -> tuple[int, float, list[dict[str, float]]]:
    """The smallest ef of the sweep whose recall@10 reaches `target_recall` (else the largest)."""
    sweep: list[dict[str, float]] = []
    for ef in EF_SWEEP:
        recall = raw_recall(index, ds, ef)
        sweep.append({"ef": ef, "recall": round(recall, 4)})
        if recall >= target_recall:
            return ef, recall, sweep
    return EF_SWEEP[-1], sweep[-1]["recall"], sweep


def raw_batch_qps(index: Any, queries: NDArray[np.float32], seconds: float) -> tuple[float, float]:
    """`knn_query` over the whole query set, num_threads=2, repeated for `seconds`:
    (queries per second, CPU microseconds per query)."""
    done, started, cpu = 0, time.perf_counter(), time.process_time()
    while True:
        index.knn_query(queries, k=K, num_threads=2)
        done += len(queries)
        elapsed = time.perf_counter() - started
        if elapsed >= seconds:
            return done / elapsed, (time.process_time() - cpu) / done * 1e6


def raw_single_qps(index: Any, queries: NDArray[np.float32], seconds: float, threads: int) -> tuple[float, float]:
    """One query per `knn_query` call (num_threads=1) from `threads` Python threads at once
    (hnswlib releases the GIL while it searches): (queries per second, CPU µs per query)."""
    counts = [0] * threads
    deadline = time.perf_counter() + seconds
    rows = [queries[i : i + 1] for i in range(len(queries))]

    def loop(t: int) -> None:
        n, i = 0, t
        while True:
            index.knn_query(rows[i % len(rows)], k=K, num_threads=1)
            n += 1
            i += threads
            if n % 64 == 0 and time.perf_counter() >= deadline:
                break
        counts[t] = n

    started, cpu = time.perf_counter(), time.process_time()
    workers = [threading.Thread(target=loop, args=(t,)) for t in range(threads)]
    for w in workers:
        w.start()
    for w in workers:
        w.join()
    done = sum(counts)
    return done / (time.perf_counter() - started), (time.process_time() - cpu) / done * 1e6


# ----------------------------------------------------------------------------- raw onnxruntime


def embed_chunks(rows: Sequence[TokenIds], batch: int, batch_tokens: int) -> list[list[TokenIds]]:
    """Rows sorted longest first, cut into runs of at most `batch` texts and `batch_tokens` padded
    tokens (texts x longest): the batching the server's embedder uses."""
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i]))
    chunks: list[list[TokenIds]] = []
    current: list[TokenIds] = []
    for i in order:
        row = rows[i]
        width = len(current[0]) if current else len(row)
        if current and (len(current) >= batch or (len(current) + 1) * width > batch_tokens):
            chunks.append(current)
            current = []
        current.append(row)
    if current:
        chunks.append(current)
    return chunks


def raw_embed_seconds(model: MiniLM, texts: list[str], config: EngineConfig) -> tuple[float, float]:
    """Seconds (wall, CPU of this process) to tokenize and embed `texts` with the model called
    directly from `embed_workers` threads, batched as the server batches."""
    batch_tokens = int(getattr(config, "embed_batch_tokens", 1 << 30))
    started, cpu = time.perf_counter(), time.process_time()
    rows = model.tokenize(texts)
    chunks = embed_chunks(rows, config.embed_batch, batch_tokens)
    with ThreadPoolExecutor(max_workers=config.embed_workers) as pool:
        list(pool.map(model.encode_ids, chunks))
    return time.perf_counter() - started, time.process_time() - cpu


# ----------------------------------------------------------------------------- Shoal phases


async def shoal_query_phase(
    t: Target,
    requests: list[dict[str, Any]],
    clients: int,
    seconds: float,
    *,
    warmup: float = 1.0,
    quiet: bool = True,
    label: str = "shoal query",
    op: str = "query",
) -> dict[str, Any]:
    conns = await open_clients(t.url, clients)
    try:
        if warmup > 0:
            await run_closed(conns, requests, max_requests=10**9, seconds=warmup, op=op)
        meter = CpuMeter(t.pid, t.postgres_pid).start()
        with Progress(label, seconds=seconds, enabled=not quiet) as progress:
            run = await run_closed(conns, requests, max_requests=10**9, seconds=seconds, progress=progress, op=op)
        return query_summary(run, meter.stop())
    finally:
        await close_clients(conns)


async def shoal_ingest_phase(
    t: Target,
    collection: str,
    batches: list[list[dict[str, Any]]],
    clients: int,
    *,
    dim: int,
    quiet: bool,
    label: str,
    drop: bool,
) -> dict[str, Any]:
    async with ShoalClient.connect(t.url) as admin:
        await admin.create_collection(collection, dim=dim)
    conns = await open_clients(t.url, clients)
    try:
        docs = sum(len(b) for b in batches)
        meter = CpuMeter(t.pid, t.postgres_pid).start()
        with Progress(label, docs, unit="docs", enabled=not quiet) as progress:
            run = await run_ingest(conns, collection, batches, progress=progress)
        out = ingest_summary(run, meter.stop())
    finally:
        await close_clients(conns)
    async with ShoalClient.connect(t.url) as admin:
        out["count_check"] = await admin.count(collection) == run.docs
        if drop:
            await admin.drop_collection(collection)
    return out


def _per_request_us(phase: dict[str, Any], key: str) -> float | None:
    """CPU microseconds per answered request of a phase, from its `cpu` record."""
    seconds = phase["cpu"].get(key)
    return None if seconds is None or not phase["requests"] else round(seconds / phase["requests"] * 1e6, 1)


def _median(values: Sequence[float]) -> float:
    return float(statistics.median(values)) if values else float("nan")


async def bench(t: Target, ds: Dataset, config: EngineConfig, args: argparse.Namespace) -> dict[str, Any]:
    quiet = args.quiet
    say: Callable[[str], None] = lambda m: log(m, enabled=not quiet)  # noqa: E731
    name = unique_name("core_bench")
    out: dict[str, Any] = {
        **bench_header(
            "core",
            t,
            ds,
            config,
            embed_batch=config.embed_batch,
            embed_batch_tokens=getattr(config, "embed_batch_tokens", None),
            embed_workers=config.embed_workers,
            embed_intra_threads=config.embed_intra_threads,
        ),
        "clients": args.clients,
        "rounds": args.rounds,
        "targets": TARGETS,
    }

    # 1. vector ingest -------------------------------------------------------------------------
    say(f"vector ingest: {ds.size} documents, batches of {args.batch}")
    batches = make_batches(ds, "vector", ds.size, args.batch)
    ingest_1 = await shoal_ingest_phase(
        t, name, batches, 1, dim=ds.dim, quiet=quiet, label="ingest vectors, 1 client", drop=False
    )
    ingest_2 = await shoal_ingest_phase(
        t, name + "_b", batches, 2, dim=ds.dim, quiet=quiet, label="ingest vectors, 2 clients", drop=True
    )
    out["ingest_vector"] = {"batch": args.batch, "with_text": True, "clients_1": ingest_1, "clients_2": ingest_2}

    # 2. recall ----------------------------------------------------------------------------------
    say("recall at the default ef (unfiltered and 1% filter)")
    plain = query_requests(ds, name, k=K, include=[])
    query_batches = as_query_batches(plain, args.batch_queries)
    filtered = query_requests(ds, name, k=K, include=[], filtered=True)
    conns = await open_clients(t.url, args.clients)
    try:
        run_plain = await run_closed(conns, plain, max_requests=len(plain), seconds=600)
        run_filtered = await run_closed(conns, filtered, max_requests=len(filtered), seconds=600)
    finally:
        await close_clients(conns)
    recall = recall_of(ds, run_plain.found, K, False)
    recall_filtered = recall_of(ds, run_filtered.found, K, True)
    assert recall is not None and recall_filtered is not None
    out["recall"] = {
        "k": K,
        "ef": config.hnsw_ef_search,
        "unfiltered": round(recall, 4),
        "filtered_1pct": round(recall_filtered, 4),
        "filter": "{bucket: q % 100}",
        "filter_selectivity": round(float(np.mean(np.arange(ds.size) % BUCKETS == 0)), 4),
        "queries": len(run_plain.found),
        "errors": run_plain.errors.total + run_filtered.errors.total,
    }

    # 3. raw hnswlib at the same recall ---------------------------------------------------------
    say("raw hnswlib: build, then the ef that matches Shoal's recall")
    index, build_s = await asyncio.to_thread(build_raw_index, ds.vectors, config)
    raw_same_ef = await asyncio.to_thread(raw_recall, index, ds, config.hnsw_ef_search)
    raw_ef, raw_rec, sweep = await asyncio.to_thread(match_ef, index, ds, recall)
    index.set_ef(raw_ef)
    out["raw_hnswlib"] = {
        "build_seconds_2_threads": round(build_s, 3),
        "recall_at_server_ef": round(raw_same_ef, 4),
        "matched_ef": raw_ef,
        "matched_recall": round(raw_rec, 4),
        "ef_sweep": sweep,
    }

    # 4. query rounds --------------------------------------------------------------------------
    rounds: list[dict[str, Any]] = []
    for r in range(args.rounds):
        say(f"query round {r + 1}/{args.rounds}: raw hnswlib (ef {raw_ef}), then Shoal")
        meter = CpuMeter().start()
        raw_b, cpu_b = await asyncio.to_thread(raw_batch_qps, index, ds.query_vectors, args.raw_seconds)
        raw_1, cpu_1 = await asyncio.to_thread(raw_single_qps, index, ds.query_vectors, args.raw_seconds, 1)
        raw_2, _ = await asyncio.to_thread(raw_single_qps, index, ds.query_vectors, args.raw_seconds, 2)
        raw_cpu = meter.stop()
        shoal = await shoal_query_phase(
            t, plain, args.clients, args.query_seconds, quiet=quiet, label=f"shoal query, round {r + 1}"
        )
        batched = await shoal_query_phase(
            t,
            query_batches,
            args.clients,
            args.query_seconds / 2,
            quiet=quiet,
            label=f"shoal query_batch of {args.batch_queries}, round {r + 1}",
            op="query_batch",
        )
        batch_qps = batched["qps"] * args.batch_queries
        server_us = _per_request_us(shoal, "server_cpu_s")
        client_us = _per_request_us(shoal, "client_cpu_s")
        rounds.append(
            {
                "raw_batch_2_threads_qps": round(raw_b, 1),
                "raw_single_1_thread_qps": round(raw_1, 1),
                "raw_single_2_threads_qps": round(raw_2, 1),
                "raw_batch_cpu_us_per_query": round(cpu_b, 1),
                "raw_single_cpu_us_per_query": round(cpu_1, 1),
                "raw_cpu": raw_cpu,
                "shoal": shoal,
                "shoal_server_cpu_us_per_query": server_us,
                "shoal_client_cpu_us_per_query": client_us,
                "ratio_vs_batch_2_threads": round(shoal["qps"] / raw_b, 4),
                "ratio_vs_single_1_thread": round(shoal["qps"] / raw_1, 4),
                "ratio_vs_single_2_threads": round(shoal["qps"] / raw_2, 4),
                "shoal_batch": batched,
                "shoal_batch_qps": round(batch_qps, 1),
                "batch_ratio_vs_batch_2_threads": round(batch_qps / raw_b, 4),
                # Queries per CPU-second, Shoal's server against raw hnswlib's batch call: the
                # ratio both would reach if each had the cores to itself and kept them busy.
                "cpu_ratio_vs_batch": None if server_us is None else round(cpu_b / server_us, 4),
                "cpu_ratio_vs_batch_with_client": None
                if server_us is None or client_us is None
                else round(cpu_b / (server_us + client_us), 4),
            }
        )
    say("Shoal query with the default include (text, metadata), with the 1% filter, and ping")
    default_include = await shoal_query_phase(
        t, query_requests(ds, name, k=K), args.clients, args.query_seconds / 2, quiet=quiet, label="include default"
    )
    filtered_phase = await shoal_query_phase(
        t, filtered, args.clients, args.query_seconds / 2, quiet=quiet, label="1% filter"
    )
    ping_phase = await shoal_query_phase(
        t, [{}], args.clients, args.query_seconds / 2, quiet=quiet, label="ping", op="ping"
    )
    ping_phase["server_cpu_us_per_request"] = _per_request_us(ping_phase, "server_cpu_s")
    ping_phase["client_cpu_us_per_request"] = _per_request_us(ping_phase, "client_cpu_s")
    keys = (
        "raw_batch_2_threads_qps",
        "raw_single_1_thread_qps",
        "raw_single_2_threads_qps",
        "raw_batch_cpu_us_per_query",
        "raw_single_cpu_us_per_query",
        "shoal_server_cpu_us_per_query",
        "shoal_client_cpu_us_per_query",
        "ratio_vs_batch_2_threads",
        "ratio_vs_single_1_thread",
        "ratio_vs_single_2_threads",
        "shoal_batch_qps",
        "batch_ratio_vs_batch_2_threads",
        "cpu_ratio_vs_batch",
        "cpu_ratio_vs_batch_with_client",
    )
    median: dict[str, Any] = {key: round(_median([rd[key] for rd in rounds if rd[key] is not None]), 4) for key in keys}
    median |= {
        "shoal_qps": round(_median([rd["shoal"]["qps"] for rd in rounds]), 1),
        "shoal_p50_ms": _median([rd["shoal"]["latency_ms"]["p50"] for rd in rounds]),
        "shoal_p99_ms": _median([rd["shoal"]["latency_ms"]["p99"] for rd in rounds]),
        "client_share": round(_median([rd["shoal"]["cpu"]["client_share"] for rd in rounds]), 3),
        "server_share": round(_median([rd["shoal"]["cpu"]["server_share"] or 0.0 for rd in rounds]), 3),
        "others_share": round(_median([rd["shoal"]["cpu"]["others_share"] or 0.0 for rd in rounds]), 3),
        "others_share_raw": round(_median([rd["raw_cpu"]["others_share"] or 0.0 for rd in rounds]), 3),
    }
    out["query"] = {
        "k": K,
        "include": [],
        "server_ef": config.hnsw_ef_search,
        "raw_ef": raw_ef,
        "batch_queries": args.batch_queries,
        "rounds": rounds,
        "median": median,
        "include_default": default_include,
        "filtered_1pct": filtered_phase,
        "ping": ping_phase,
    }
    async with ShoalClient.connect(t.url) as admin:
        await admin.drop_collection(name)

    # 5. text ingest vs raw onnxruntime --------------------------------------------------------
    n_text: int = min(args.text_docs, ds.size)
    texts = ds.texts[:n_text]
    say(f"text ingest: {n_text} texts, batches of {args.batch}, {args.text_clients} clients, vs raw onnxruntime")
    model = await asyncio.to_thread(MiniLM, intra_threads=config.embed_intra_threads)
    await asyncio.to_thread(model.encode, texts[: config.embed_batch])  # warm the session up
    text_rounds: list[dict[str, Any]] = []
    for r in range(args.text_rounds):
        prefix = f"r{r}-"
        text_batches = make_batches(ds, "text", n_text, args.batch, id_prefix=prefix)

        async def raw_text() -> tuple[float, float, dict[str, Any]]:
            meter = CpuMeter().start()
            seconds, cpu_s = await asyncio.to_thread(raw_embed_seconds, model, texts, config)
            return n_text / seconds, cpu_s, meter.stop()

        async def shoal_text(r: int = r, text_batches: list[list[dict[str, Any]]] = text_batches) -> dict[str, Any]:
            return await shoal_ingest_phase(
                t,
                f"{name}_text{r}",
                text_batches,
                args.text_clients,
                dim=ds.dim,
                quiet=quiet,
                label=f"ingest text, round {r + 1}",
                drop=True,
            )

        # Alternate which goes first, so a drift in the machine's speed falls on both alike.
        if r % 2 == 0:
            raw_rate, raw_cpu_s, raw_cpu = await raw_text()
            phase = await shoal_text()
        else:
            phase = await shoal_text()
            raw_rate, raw_cpu_s, raw_cpu = await raw_text()
        server_cpu_s = phase["cpu"]["server_cpu_s"]
        text_rounds.append(
            {
                "raw_onnx_texts_per_s": round(raw_rate, 1),
                "raw_cpu": raw_cpu,
                "shoal": phase,
                "ratio": round(phase["docs_per_s"] / raw_rate, 4),
                "raw_cpu_ms_per_text": round(raw_cpu_s / n_text * 1e3, 3),
                "shoal_server_cpu_ms_per_doc": None
                if server_cpu_s is None
                else round(server_cpu_s / max(1, phase["docs"]) * 1e3, 3),
                # Texts per CPU-second, the server (embed + commit + index) against raw
                # onnxruntime (embed only): what the wall ratio is when nothing else runs.
                "cpu_ratio": None
                if server_cpu_s is None
                else round((raw_cpu_s / n_text) / (server_cpu_s / max(1, phase["docs"])), 4),
            }
        )
    out["ingest_text"] = {
        "docs": n_text,
        "batch": args.batch,
        "clients": args.text_clients,
        "raw_threads": config.embed_workers * config.embed_intra_threads,
        "rounds": text_rounds,
        "median": {
            "raw_onnx_texts_per_s": round(_median([x["raw_onnx_texts_per_s"] for x in text_rounds]), 1),
            "shoal_docs_per_s": round(_median([x["shoal"]["docs_per_s"] for x in text_rounds]), 1),
            "ratio": round(_median([x["ratio"] for x in text_rounds]), 4),
            "cpu_ratio": round(_median([x["cpu_ratio"] for x in text_rounds if x["cpu_ratio"] is not None]), 4),
            "raw_cpu_ms_per_text": round(_median([x["raw_cpu_ms_per_text"] for x in text_rounds]), 3),
            "shoal_server_cpu_ms_per_doc": round(
                _median([x["shoal_server_cpu_ms_per_doc"] or 0.0 for x in text_rounds]), 3
            ),
            "others_share_shoal": round(_median([x["shoal"]["cpu"]["others_share"] or 0.0 for x in text_rounds]), 3),
            "others_share_raw": round(_median([x["raw_cpu"]["others_share"] or 0.0 for x in text_rounds]), 3),
        },
    }
    return out


# ----------------------------------------------------------------------------- report


def _ok(value: float | None, target: float) -> str:
    if value is None or math.isnan(value):
        return "-"
    return "yes" if value >= target else "NO"


def report(r: dict[str, Any]) -> str:
    """The summary table: one row per figure, with its anchor, ratio and target where it has them."""
    q, med, rec = r["query"], r["query"]["median"], r["recall"]
    ti, vi, raw = r["ingest_text"], r["ingest_vector"], r["raw_hnswlib"]
    build_rate = round(r["corpus"]["docs"] / raw["build_seconds_2_threads"], 1)
    ping = q["ping"]
    rows: list[list[Any]] = [
        [f"recall@10, ef={rec['ef']}", rec["unfiltered"], "-", "-", ">= 0.95", _ok(rec["unfiltered"], 0.95)],
        ["recall@10, 1% filter", rec["filtered_1pct"], "-", "-", ">= 0.95", _ok(rec["filtered_1pct"], 0.95)],
        [
            f"QPS, {r['clients']} clients vs hnswlib batch, 2 threads (ef {q['raw_ef']})",
            med["shoal_qps"],
            med["raw_batch_2_threads_qps"],
            med["ratio_vs_batch_2_threads"],
            ">= 0.3",
            _ok(med["ratio_vs_batch_2_threads"], 0.3),
        ],
        [
            f"QPS, {r['clients']} clients x query_batch of {q['batch_queries']} vs hnswlib batch, 2 threads",
            med["shoal_batch_qps"],
            med["raw_batch_2_threads_qps"],
            med["batch_ratio_vs_batch_2_threads"],
            "(>= 0.3)",
            _ok(med["batch_ratio_vs_batch_2_threads"], 0.3),
        ],
        [
            "QPS vs hnswlib single-query loop, 2 threads",
            med["shoal_qps"],
            med["raw_single_2_threads_qps"],
            med["ratio_vs_single_2_threads"],
            ">= 0.3",
            _ok(med["ratio_vs_single_2_threads"], 0.3),
        ],
        [
            "QPS vs hnswlib single-query loop, 1 thread",
            med["shoal_qps"],
            med["raw_single_1_thread_qps"],
            med["ratio_vs_single_1_thread"],
            "-",
            "-",
        ],
        [
            "CPU us/query: server vs hnswlib batch",
            med["shoal_server_cpu_us_per_query"],
            med["raw_batch_cpu_us_per_query"],
            med["cpu_ratio_vs_batch"],
            "(>= 0.3)",
            _ok(med["cpu_ratio_vs_batch"], 0.3),
        ],
        [
            "CPU us/query: server + load generator vs hnswlib batch",
            round(med["shoal_server_cpu_us_per_query"] + med["shoal_client_cpu_us_per_query"], 1),
            med["raw_batch_cpu_us_per_query"],
            med["cpu_ratio_vs_batch_with_client"],
            "-",
            "-",
        ],
        ["latency p50 / p99 ms", f"{med['shoal_p50_ms']} / {med['shoal_p99_ms']}", "-", "-", "-", "-"],
        [
            "CPU share, queries: generator / server / others",
            f"{med['client_share']} / {med['server_share']} / {med['others_share']}",
            "-",
            "-",
            "-",
            "-",
        ],
        ["CPU share of others during raw phases", med["others_share_raw"], "-", "-", "-", "-"],
        ["QPS, include text+metadata", q["include_default"]["qps"], "-", "-", "-", "-"],
        ["QPS, 1% filter", q["filtered_1pct"]["qps"], "-", "-", "-", "-"],
        [
            "ping: QPS, server CPU us/request",
            f"{ping['qps']:,.0f}, {ping['server_cpu_us_per_request']}",
            "-",
            "-",
            "-",
            "-",
        ],
        [
            f"ingest docs/s, vectors, batch {vi['batch']}, 1 client vs hnswlib add_items",
            vi["clients_1"]["docs_per_s"],
            build_rate,
            round(vi["clients_1"]["docs_per_s"] / build_rate, 4),
            "-",
            "-",
        ],
        [
            f"ingest docs/s, vectors, batch {vi['batch']}, 2 clients",
            vi["clients_2"]["docs_per_s"],
            build_rate,
            round(vi["clients_2"]["docs_per_s"] / build_rate, 4),
            "-",
            "-",
        ],
        [
            f"ingest docs/s, text, {ti['clients']} clients vs onnxruntime, {ti['raw_threads']} threads",
            ti["median"]["shoal_docs_per_s"],
            ti["median"]["raw_onnx_texts_per_s"],
            ti["median"]["ratio"],
            ">= 0.9",
            _ok(ti["median"]["ratio"], 0.9),
        ],
        [
            "CPU ms/text: server (embed+commit+index) vs onnxruntime",
            ti["median"]["shoal_server_cpu_ms_per_doc"],
            ti["median"]["raw_cpu_ms_per_text"],
            ti["median"]["cpu_ratio"],
            "(>= 0.9)",
            _ok(ti["median"]["cpu_ratio"], 0.9),
        ],
        [
            "CPU share of others: text ingest / raw onnxruntime",
            f"{ti['median']['others_share_shoal']} / {ti['median']['others_share_raw']}",
            "-",
            "-",
            "-",
            "-",
        ],
    ]
    lines = [
        f"core figures: {r['corpus']['docs']} passages ({r['corpus']['source']}), "
        f"{r['corpus']['queries']} queries, {r['machine'].get('cpus')} CPUs; medians of {r['rounds']} "
        f"interleaved query rounds and {len(ti['rounds'])} text rounds (per-round figures in the JSON)",
        format_table(["figure", "shoal", "anchor", "ratio", "target", "met"], rows),
    ]
    return "\n".join(lines)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load.core_bench", description=__doc__.split("\n")[0])
    add_target_args(p)
    p.set_defaults(json=RESULTS_DIR / "core_bench.json")
    p.add_argument("--size", type=int, default=20_000, help="corpus passages (default 20000)")
    p.add_argument("--queries", type=int, default=1_000, help="held-out queries (default 1000)")
    p.add_argument("--clients", type=int, default=8, help="WebSocket query clients (default 8)")
    p.add_argument("--batch", type=int, default=500, help="documents per upsert (default 500)")
    p.add_argument("--rounds", type=int, default=5, help="interleaved query rounds (default 5: the machine is noisy)")
    p.add_argument("--query-seconds", type=float, default=8.0, help="Shoal query phase per round")
    p.add_argument("--raw-seconds", type=float, default=3.0, help="each raw hnswlib phase per round")
    p.add_argument(
        "--batch-queries", type=int, default=32, help="queries per query_batch request, batched phase (default 32)"
    )
    p.add_argument("--text-docs", type=int, default=2_000, help="texts for the text ingest (default 2000)")
    p.add_argument("--text-clients", type=int, default=2, help="clients for the text ingest (default 2)")
    p.add_argument("--text-rounds", type=int, default=2, help="interleaved text rounds (default 2)")
    p.add_argument("--source", choices=["corpus", "synthetic"], default="corpus")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.rounds < 1 or args.text_rounds < 1:
        raise SystemExit("--rounds and --text-rounds must be >= 1")
    ds = load_dataset(args.source, args.size, args.queries)
    config = load_settings().engine if args.url is None else EngineConfig()
    started = time.perf_counter()
    # The query rounds repeat the same queries: with the results cache on, nearly all would be
    # answered from it (server time 0.02 ms), which is no search to set against hnswlib's.
    with target(args.url, quiet=args.quiet, env={"SHOAL_RESULTS_CACHE_BYTES": "0"}) as t:
        result = run_async(lambda: bench(t, ds, config, args))
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(report(result))
    path = write_json(Path(args.json), result)
    print(f"results written to {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
