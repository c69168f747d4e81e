"""Index kinds side by side, in one run on one corpus: recall@10 against QPS, build time, insert
rate and memory per vector for every kind and quantisation through Shoal, and the same libraries
searched in this process as the anchors.

    python -m load.algos [--url URL] [--size 20000] [--queries 500] [--clients 8] [--batch-queries 32]
                         [--rounds 3] [--json results/algos.json] [--plot results/algos.png] [--quick]

Corpus: real passages embedded by Shoal's model (`load.corpus`, 384-d, exact top-100 ground
truth), or random unit vectors with `--source synthetic`. Documents are upserted with their
vector and metadata (no text, so no keyword index is built).

Through Shoal, one collection per variant, created with `index: {"kind", ...}` and dropped after
it is measured, one after the other:
- hnsw (m, ef_construction), and with `quantization` int8 and f16: query `ef` swept;
- flat: one point;
- ivf (nlist chosen by the server), and int8 / f16: query `nprobe` swept;
- lsh at the server's default nbits, and at a few other nbits (one collection each).
Each sweep starts with a point at the server's default (no query parameter). A variant the server
refuses with `bad_request` is reported as `refused` and skipped; so is a sweep value. The plain
hnsw variant, refused only because the server takes no `index` argument, is created without one
(the server's default index, hnsw with the same m / ef_construction) and says so.

Per variant: insert rate (`--writers` connections, upserts of `--batch` documents, acknowledged
when durable and searchable), build time (first upsert to indexed: every document in the shard
gauges, the shard mailbox empty and the index gauges steady), memory per vector (the collection's
`shoal_*_bytes` gauges on /metrics, and the growth of the server's resident memory,
`process_resident_memory_bytes`), and per sweep point recall@10 (one pass over the queries) and
QPS (`--clients` connections, one query in flight each, ids and scores only, for `--seconds`),
then the same queries as `query_batch` requests of `--batch-queries` (one request in flight per
connection, for `--seconds`: `batch`).

Anchors (`load.algos_anchors`), in this process while the server idles, on `search_threads`
threads (the server's search pool), searched two ways: in calls of `--clients` queries (the most
the clients ever have in flight, so the most the server can group into one library call: the
`ratio`), and the whole query set in one call per pass (the best the library reaches here:
`ratio_whole`; a `batch` phase, which hands the server as many queries at a time, is compared
with this one). Each Shoal point is compared with its anchor at equal recall
(`load.algos_report.qps_at_recall`). The load generator shares the cores
with the server: the CPU each used is in the JSON.

Rounds (`load.algos_rounds`, `--rounds`): once its anchor is swept, each variant's default point
is timed again in rounds that alternate Shoal (one query per request, then `query_batch`) with the
anchor at the settings bracketing Shoal's recall, so a slow spell of the machine falls on both
sides of each round's ratio; the headline ratios are the medians of the rounds (`rounds` in each
variant's summary). The collections are kept until then.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import numpy as np
from numpy.typing import NDArray
from prometheus_client.parser import text_string_to_metric_families

from load import algos_anchors as anchors
from load.algos_report import compare, plot, report
from load.algos_rounds import rounds_summary, run_rounds
from load.common import (
    RESULTS_DIR,
    CpuMeter,
    Target,
    add_target_args,
    bench_header,
    log,
    run_async,
    target,
    unique_name,
    write_json,
)
from load.dataset import Dataset, load_dataset
from load.ingest import run_ingest
from load.query import as_query_batches, close_clients, open_clients, recall_of, run_closed
from load.query import summarize as query_summary
from models.config import EngineConfig
from server.settings import load_settings
from shoal_client import ShoalClient
from shoal_client.codec import encode_vector
from shoal_client.errors import BadRequest, ShoalError
from shoal_client.ops import http_base

K = 10
EF_SWEEP = (10, 20, 40, 80, 160, 320)
NPROBE_SWEEP = (1, 2, 4, 8, 16, 32, 64)
LSH_NBITS = (256, 512, 1024)
QUICK_EF_SWEEP = (10, 40, 160)
QUICK_NPROBE_SWEEP = (1, 4, 16)
INDEXED_TIMEOUT_S = 600.0
# Polls of /metrics with nothing changing before a collection counts as indexed.
STEADY_POLLS = 4
POLL_S = 0.25


@dataclass(frozen=True, slots=True)
class Variant:
    """One Shoal collection: `family` names its plot panel and anchor; `param` is the query
    parameter swept over `sweep` (None: one point)."""

    family: str
    label: str
    index: dict[str, Any]
    param: str | None
    sweep: tuple[int, ...]
    server_default: bool = False  # the server's default index: created without `index` if refused


def variants(*, m: int, ef_construction: int, quick: bool) -> list[Variant]:
    ef = QUICK_EF_SWEEP if quick else EF_SWEEP
    nprobe = QUICK_NPROBE_SWEEP if quick else NPROBE_SWEEP
    hnsw = {"kind": "hnsw", "m": m, "ef_construction": ef_construction}
    out = [Variant("hnsw", "hnsw", hnsw, "ef", ef, server_default=True)]
    for q in ("int8", "f16"):
        out.append(Variant(f"hnsw {q}", f"hnsw {q}", {**hnsw, "quantization": q}, "ef", ef))
    out.append(Variant("flat", "flat", {"kind": "flat"}, None, ()))
    out.append(Variant("ivf", "ivf", {"kind": "ivf"}, "nprobe", nprobe))
    for q in ("int8", "f16"):
        out.append(Variant(f"ivf {q}", f"ivf {q}", {"kind": "ivf", "quantization": q}, "nprobe", nprobe))
    out.append(Variant("lsh", "lsh", {"kind": "lsh"}, None, ()))
    if not quick:
        for nbits in LSH_NBITS:
            out.append(Variant("lsh", f"lsh nbits={nbits}", {"kind": "lsh", "nbits": nbits}, None, ()))
    return out


# ----------------------------------------------------------------------------- /metrics


@dataclass
class Gauges:
    """One scrape: the per-collection samples (summed over shards) and the server's RSS."""

    collection: dict[str, float] = field(default_factory=dict)
    plans: dict[str, float] = field(default_factory=dict)
    rss: float | None = None
    cache_hits: float = 0.0


async def scrape(http: httpx.AsyncClient, name: str) -> Gauges:
    """The /metrics samples labelled `collection=name` (summed over shards), the planner's query
    counts by plan, `process_resident_memory_bytes` and the results cache's hits."""
    reply = await http.get("/metrics")
    reply.raise_for_status()
    out = Gauges()
    for family in text_string_to_metric_families(reply.text):
        for sample in family.samples:
            if sample.labels.get("collection") == name:
                out.collection[sample.name] = out.collection.get(sample.name, 0.0) + float(sample.value)
            elif sample.name == "process_resident_memory_bytes":
                out.rss = float(sample.value)
            elif sample.name == "shoal_results_cache_lookups_total" and sample.labels.get("outcome") == "hit":
                out.cache_hits = float(sample.value)
            elif (
                sample.name.startswith("shoal_planner_queries")
                and "plan" in sample.labels
                and not sample.name.endswith("_created")
            ):
                out.plans[sample.labels["plan"]] = float(sample.value)
    return out


def _bytes_gauges(g: Gauges) -> dict[str, float]:
    return {k: v for k, v in g.collection.items() if k.endswith("_bytes") and not k.endswith("_limit_bytes")}


def _indexing(g: Gauges) -> bool:
    """True while a per-collection gauge says the index is still being trained or built (a
    `*training*` or `*building*` gauge above 0, or a `*trained*` gauge at 0), when the server
    exports one: a background rebuild takes a core, and QPS measured meanwhile is not the kind's."""
    for key, value in g.collection.items():
        if ("training" in key or "building" in key) and value > 0:
            return True
        if "trained" in key and value <= 0:
            return True
    return False


async def wait_indexed(http: httpx.AsyncClient, name: str, docs: int) -> tuple[Gauges, float | None]:
    """Poll /metrics until the collection's shards hold `docs` documents, its mailboxes are
    empty, no gauge reports training, and its gauges stayed the same for `STEADY_POLLS` polls.
    Returns the last scrape and the `perf_counter` time of the first poll of that steady run (None
    if it did not happen within `INDEXED_TIMEOUT_S`)."""
    deadline = time.monotonic() + INDEXED_TIMEOUT_S
    last: dict[str, float] | None = None
    steady, since = 0, 0.0
    while True:
        polled = time.perf_counter()
        g = await scrape(http, name)
        settled = (
            g.collection.get("shoal_shard_documents", docs) == docs
            and g.collection.get("shoal_shard_queue", 0.0) == 0
            and not _indexing(g)
        )
        if settled and g.collection == last:
            steady += 1
        else:
            steady, since = (1 if settled else 0), polled
        last = dict(g.collection)
        if steady >= STEADY_POLLS:
            return g, since
        if time.monotonic() > deadline:
            return g, None
        await asyncio.sleep(POLL_S)


# ----------------------------------------------------------------------------- Shoal side


def _requests(ds: Dataset, name: str, param: str | None, value: int | None) -> list[dict[str, Any]]:
    vectors = [encode_vector(v) for v in ds.query_vectors]
    extra = {} if param is None or value is None else {param: value}
    return [{"collection": name, "k": K, "vector": v, "include": [], **extra} for v in vectors]


async def _shape(client: ShoalClient, name: str) -> dict[str, Any]:
    reply = await client.request("list_collections")
    for c in reply.get("collections", []):
        if isinstance(c, dict) and c.get("name") == name:
            return dict(c)
    return {}


async def _create(client: ShoalClient, name: str, dim: int, v: Variant) -> tuple[dict[str, Any], str | None]:
    """Create the collection; (its shape, a note when `index` had to be left out). Raises
    `BadRequest` when the server refuses the variant."""
    try:
        reply = await client.request("create_collection", name=name, dim=dim, index=v.index)
        return dict(reply.get("collection") or {}), None
    except BadRequest as exc:
        if not (v.server_default and "index" in exc.message):
            raise
        reply = await client.request("create_collection", name=name, dim=dim)
        return dict(reply.get("collection") or {}), f"created without `index` (the server answered: {exc.message})"


async def _sweep_point(
    t: Target,
    http: httpx.AsyncClient,
    conns: Sequence[ShoalClient],
    ds: Dataset,
    name: str,
    param: str | None,
    value: int | None,
    seconds: float,
    batch: int,
) -> dict[str, Any]:
    point: dict[str, Any] = {} if param is None else {param: value}
    requests = _requests(ds, name, param, value)
    try:
        await conns[0].request("query", **requests[0])
    except BadRequest as exc:
        return {**point, "status": "refused", "reason": exc.message}
    hits_before = (await scrape(http, name)).cache_hits
    once = await run_closed(conns, requests, max_requests=len(requests), seconds=600.0)
    recall = recall_of(ds, once.found, K, False)
    point.update(status="ok", recall=None if recall is None else round(recall, 4), errors=once.errors.as_dict())
    if seconds > 0:
        meter = CpuMeter(t.pid, t.postgres_pid).start()
        timed = await run_closed(conns, requests, max_requests=10**9, seconds=seconds)
        phase = query_summary(timed, meter.stop())
    else:
        phase = query_summary(once)
    point["qps"] = phase["qps"]
    # Answers from the results cache are not searches: a local server runs with it off.
    point["cache_hits"] = (await scrape(http, name)).cache_hits - hits_before
    point["latency_ms"] = {k: phase["latency_ms"].get(k) for k in ("p50", "p99")}
    if phase["error_count"] or once.errors.total:
        point["errors"] = {**point["errors"], **phase["errors"]}
    if "cpu" in phase:
        point["cpu"] = phase["cpu"]
        server_s = phase["cpu"].get("server_cpu_s")
        if server_s is not None and phase["requests"]:
            point["server_cpu_us_per_query"] = round(server_s / phase["requests"] * 1e6, 1)
    if batch > 1 and seconds > 0:
        point["batch"] = await _batch_phase(t, conns, requests, batch, seconds)
    return point


async def _batch_phase(
    t: Target, conns: Sequence[ShoalClient], requests: Sequence[dict[str, Any]], size: int, seconds: float
) -> dict[str, Any]:
    """The same queries sent as `query_batch` requests of `size` (one in flight per client):
    queries per second, failed queries, and the server's CPU per query."""
    batches = as_query_batches(requests, size)
    meter = CpuMeter(t.pid, t.postgres_pid).start()
    timed = await run_closed(conns, batches, max_requests=10**9, seconds=seconds, op="query_batch")
    cpu = meter.stop()
    queries = timed.ok * len(batches[0]["queries"])
    failed = timed.failed_queries
    out: dict[str, Any] = {
        "queries_per_request": size,
        "qps": round(queries / timed.seconds, 1) if timed.seconds > 0 else 0.0,
        "latency_ms": {"p50": timed.latency.percentile_ms(50), "p99": timed.latency.percentile_ms(99)},
        "errors": {**timed.errors.as_dict(), **({"failed_queries": failed} if failed else {})},
    }
    server_s = cpu.get("server_cpu_s")
    if server_s is not None and queries:
        out["server_cpu_us_per_query"] = round(server_s / queries * 1e6, 1)
    return out


async def shoal_variant(
    t: Target,
    ds: Dataset,
    v: Variant,
    batches: list[list[dict[str, Any]]],
    args: argparse.Namespace,
    query_defaults: dict[str, int],
) -> dict[str, Any]:
    """Build and measure one variant's collection: `status` is `ok`, `refused` (the server
    answered bad_request to the collection) or `failed` (writes lost or refused), with `reason`.
    A measured collection is kept for the rounds against its anchor (its name in `collection`;
    `drop` it after them); any other is dropped here."""
    name = unique_name("algos")
    kept = False
    out: dict[str, Any] = {"family": v.family, "label": v.label, "index_requested": v.index, "param": v.param}
    async with httpx.AsyncClient(base_url=http_base(t.url), timeout=30.0) as http, ShoalClient.connect(t.url) as admin:
        before = await scrape(http, name)
        try:
            shape, note = await _create(admin, name, ds.dim, v)
        except BadRequest as exc:
            return {**out, "status": "refused", "reason": exc.message}
        try:
            if note:
                out["note"] = note
            out.update(await _build(t, http, admin, name, ds, batches, args))
            out["shape"] = await _shape(admin, name) or shape
            out["index"] = out["shape"].get("index") or ({"kind": "hnsw"} if note else v.index)
            if v.param is not None:
                # The query parameter's default: from the shape when the server reports it there.
                reported = out["index"].get(v.param, query_defaults.get(v.param))
                out["default_query"] = {v.param: reported}
            out["memory"] = _memory(before, out.pop("gauges"), out["build"]["docs"])
            if out["status"] != "ok":
                return out
            out.update(await _sweep(t, http, name, ds, v, args))
            out["collection"], kept = name, True
            return out
        finally:
            if not kept:
                await drop(t, name)


async def drop(t: Target, name: str) -> None:
    """Drop collection `name` (a failure is logged: the run goes on)."""
    try:
        async with ShoalClient.connect(t.url) as admin:
            await admin.drop_collection(name)
    except ShoalError as exc:
        log(f"could not drop {name}: {exc}")


async def _rounds(
    t: Target,
    ds: Dataset,
    name: str,
    r: dict[str, Any],
    anchor: dict[str, Any],
    search_at: anchors.SearchAt,
    args: argparse.Namespace,
) -> dict[str, Any]:
    """The default point of measured variant `r` (collection `name`) against its anchor, in
    `--rounds` interleaved rounds (`load.algos_rounds`)."""
    requests = _requests(ds, name, None, None)
    batches = as_query_batches(requests, args.batch_queries) if args.batch_queries > 1 else []
    conns = await open_clients(t.url, args.clients)
    try:
        if args.warmup > 0:  # the collection idled while the rest of its family was measured
            await run_closed(conns, requests, max_requests=10**9, seconds=args.warmup)
        return await run_rounds(
            conns,
            requests,
            batches,
            anchor,
            search_at,
            unit(ds.query_vectors),
            float(r["points"][0]["recall"]),
            rounds=args.rounds,
            seconds=args.round_seconds,
            clients=args.clients,
        )
    finally:
        await close_clients(conns)


async def _build(
    t: Target,
    http: httpx.AsyncClient,
    admin: ShoalClient,
    name: str,
    ds: Dataset,
    batches: list[list[dict[str, Any]]],
    args: argparse.Namespace,
) -> dict[str, Any]:
    """Upsert every batch, wait until indexed: `build` (times, rate, CPU), `gauges` (the scrape
    once indexed) and `status`."""
    writers = await open_clients(t.url, args.writers)
    try:
        meter = CpuMeter(t.pid, t.postgres_pid).start()
        started = time.perf_counter()
        ingest = await run_ingest(writers, name, batches, seconds=INDEXED_TIMEOUT_S)
        cpu = meter.stop()
    finally:
        await close_clients(writers)
    gauges, indexed_at = await wait_indexed(http, name, ingest.docs)
    indexed = indexed_at is not None
    # Until the state that stayed steady was first seen (the confirming polls do not count).
    build_s = (indexed_at if indexed_at is not None else time.perf_counter()) - started
    count = await admin.count(name)
    out: dict[str, Any] = {
        "build": {
            "docs": ingest.docs,
            "insert_s": round(ingest.seconds, 3),
            "inserts_per_s": round(ingest.docs_per_s, 1),
            "build_s": round(build_s, 3),
            "indexed": indexed,
            "batch": args.batch,
            "writers": args.writers,
            "cpu": cpu,
        },
        "gauges": gauges,
        "status": "ok",
    }
    if ingest.errors.total or count != ds.size:
        out["status"] = "failed"
        out["reason"] = f"{ingest.docs} acknowledged, count {count}, errors {ingest.errors.as_dict()}"
    elif not indexed:
        out["build"]["note"] = f"not steady after {INDEXED_TIMEOUT_S:.0f} s; measured anyway"
    return out


async def _sweep(
    t: Target, http: httpx.AsyncClient, name: str, ds: Dataset, v: Variant, args: argparse.Namespace
) -> dict[str, Any]:
    """The server's default point, then every value of the variant's sweep: `points`, and `plans`
    (the planner's query counts by plan over the sweep, e.g. how many went to exact search)."""
    conns = await open_clients(t.url, args.clients)
    try:
        if args.warmup > 0:
            warm = _requests(ds, name, None, None)
            await run_closed(conns, warm, max_requests=10**9, seconds=args.warmup)
        plans_before = (await scrape(http, name)).plans
        points = []
        for value in [None, *v.sweep]:
            point = await _sweep_point(t, http, conns, ds, name, v.param, value, args.seconds, args.batch_queries)
            shown = "default" if value is None else f"{v.param}={value}"
            log(f"{v.label}, {shown}: {_brief(point)}", enabled=not args.quiet)
            points.append(point)
        plans_after = (await scrape(http, name)).plans
    finally:
        await close_clients(conns)
    plans = {p: plans_after[p] - plans_before.get(p, 0.0) for p in plans_after}
    return {"points": points, "plans": {p: n for p, n in plans.items() if n}}


def _brief(point: dict[str, Any]) -> str:
    if point.get("status") != "ok":
        return f"{point.get('status')}: {point.get('reason', '')}"
    batch = point.get("batch")
    batched = "" if batch is None else f", {batch['qps']} QPS in batches of {batch['queries_per_request']}"
    return f"recall@10 {point['recall']}, {point['qps']} QPS{batched}"


def _memory(before: Gauges, after: Gauges, docs: int) -> dict[str, Any]:
    gauges = _bytes_gauges(after)
    known = [gauges[k] for k in ("shoal_index_bytes", "shoal_vector_bytes") if k in gauges]
    total = sum(known) if known else (sum(gauges.values()) if gauges else None)
    rss = None if before.rss is None or after.rss is None else after.rss - before.rss
    return {
        "gauges": gauges,
        "bytes_per_vector": None if total is None or docs == 0 else round(total / docs, 1),
        "rss_delta_bytes": rss,
        "rss_bytes_per_vector": None if rss is None or docs == 0 else round(rss / docs, 1),
    }


# ----------------------------------------------------------------------------- anchors


def unit(rows: NDArray[np.float32]) -> NDArray[np.float32]:
    norms = np.linalg.norm(rows, axis=1, keepdims=True)
    return np.ascontiguousarray(rows / np.where(norms == 0, 1.0, norms), dtype=np.float32)


def default_nlist(n: int) -> int:
    """The anchor's nlist when the server reports none: sqrt(n), the usual starting point."""
    return max(1, round(math.sqrt(n)))


def _reported(results: Sequence[dict[str, Any]], key: str) -> list[int]:
    """The values of index parameter `key` the server reported for these variants."""
    found = []
    for r in results:
        value = (r.get("index") or {}).get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            found.append(value)
    return found


def run_anchor(
    family: str,
    ds: Dataset,
    results: Sequence[dict[str, Any]],
    sweeps: dict[str, tuple[int, ...]],
    config: EngineConfig,
    args: argparse.Namespace,
) -> tuple[dict[str, Any], anchors.SearchAt | None]:
    """The in-process anchor of `family`, built and swept (`status` `failed` with `reason` if the
    library raised), and its search at a value of the swept parameter (None if it failed)."""
    vectors, queries, truth = unit(ds.vectors), unit(ds.query_vectors), ds.truth
    common: dict[str, Any] = {"threads": config.search_threads, "seconds": args.anchor_seconds, "clients": args.clients}
    kind, _, quantization = family.partition(" ")
    try:
        if kind == "hnsw":
            hnsw: dict[str, Any] = {
                "m": config.hnsw_m,
                "ef_construction": config.hnsw_ef_construction,
                "sweep": sweeps["ef"],
                **common,
            }
            if quantization:
                out, search_at = anchors.faiss_hnsw_sq_anchor(
                    vectors, queries, truth, quantization=quantization, **hnsw
                )
            else:
                out, search_at = anchors.hnswlib_anchor(vectors, queries, truth, **hnsw)
        elif kind == "flat":
            out, search_at = anchors.faiss_flat_anchor(vectors, queries, truth, **common)
        elif kind == "ivf":
            reported = _reported(results, "nlist")
            nlist = reported[0] if reported else default_nlist(len(vectors))
            out, search_at = anchors.faiss_ivf_anchor(
                vectors,
                queries,
                truth,
                nlist=nlist,
                quantization=quantization or None,
                sweep=sweeps["nprobe"],
                **common,
            )
            out["nlist_from"] = "the server's collection shape" if reported else "sqrt(n) (the server reported none)"
        elif kind == "lsh":
            nbits = {ds.dim, *_reported(results, "nbits")}
            nbits |= {int(r["index_requested"]["nbits"]) for r in results if "nbits" in r["index_requested"]}
            out, search_at = anchors.faiss_lsh_anchor(vectors, queries, truth, nbits_values=sorted(nbits), **common)
        else:
            raise ValueError(f"no anchor for {family!r}")
    except Exception as exc:
        return {"status": "failed", "reason": f"{type(exc).__name__}: {exc}", "points": []}, None
    out["status"] = "ok"
    out["threads"] = config.search_threads
    return out, search_at


# ----------------------------------------------------------------------------- the run


def _headline(r: dict[str, Any]) -> dict[str, Any]:
    """A variant in one line: its default point and its build and memory figures."""
    line: dict[str, Any] = {"label": r["label"], "family": r["family"], "status": r["status"]}
    if r["status"] != "ok":
        line["reason"] = r.get("reason")
        return line
    default = r["points"][0]
    best = max((p for p in r["points"] if p.get("recall") is not None), key=lambda p: p["recall"], default=None)
    line.update(
        index=r.get("index"),
        default_recall=default.get("recall"),
        default_qps=default.get("qps"),
        default_ratio=default.get("ratio"),
        default_ratio_whole=default.get("ratio_whole"),
        default_batch_qps=(default.get("batch") or {}).get("qps"),
        default_batch_ratio_whole=(default.get("batch") or {}).get("ratio_whole"),
        rounds=rounds_summary(r.get("rounds")),
        best_recall=None if best is None else best["recall"],
        build_s=r["build"]["build_s"],
        inserts_per_s=r["build"]["inserts_per_s"],
        bytes_per_vector=r["memory"]["bytes_per_vector"],
        rss_bytes_per_vector=r["memory"]["rss_bytes_per_vector"],
    )
    return line


def _memory_ratios(summary: list[dict[str, Any]]) -> dict[str, float]:
    """Bytes per vector of each quantised variant over the float32 variant of its kind."""
    base = {s["family"]: s.get("bytes_per_vector") for s in summary if s["status"] == "ok"}
    out: dict[str, float] = {}
    for s in summary:
        kind, _, q = s["family"].partition(" ")
        if q and s["status"] == "ok" and s.get("bytes_per_vector") and base.get(kind):
            out[s["family"]] = round(s["bytes_per_vector"] / base[kind], 4)
    return out


async def bench(t: Target, ds: Dataset, config: EngineConfig, args: argparse.Namespace) -> dict[str, Any]:
    say: Callable[[str], None] = lambda m: log(m, enabled=not args.quiet)  # noqa: E731
    chosen = variants(m=config.hnsw_m, ef_construction=config.hnsw_ef_construction, quick=args.quick)
    if args.kinds:
        wanted = {k.strip() for k in args.kinds.split(",") if k.strip()}
        chosen = [v for v in chosen if v.family in wanted or v.family.split(" ")[0] in wanted]
    sweeps: dict[str, tuple[int, ...]] = {
        "ef": QUICK_EF_SWEEP if args.quick else EF_SWEEP,
        "nprobe": QUICK_NPROBE_SWEEP if args.quick else NPROBE_SWEEP,
    }
    out: dict[str, Any] = {
        **bench_header(
            "algos",
            t,
            ds,
            config,
            search_batch=config.search_batch,
            shards_per_collection=config.shards_per_collection,
        ),
        "k": K,
        "clients": args.clients,
        "writers": args.writers,
        "batch": args.batch,
        "seconds_per_point": args.seconds,
        "sweeps": {k: list(v) for k, v in sweeps.items()},
        "fairness": (
            f"Shoal: {args.clients} WebSocket clients, one query per request, one in flight each (the "
            f"server batches queued queries per shard, up to {config.search_batch}); anchors on "
            f"{config.search_threads} threads, in calls of {args.clients} queries (ratio) and with the "
            "whole query set in one call per pass (ratio, whole set)"
        ),
    }
    batches = list(ds.batches(args.batch, with_text=False))
    results: list[dict[str, Any]] = []
    found_anchors: dict[str, dict[str, Any]] = {}
    for family in dict.fromkeys(v.family for v in chosen):
        family_results = []
        for v in (v for v in chosen if v.family == family):
            say(f"Shoal {v.label}: {ds.size} vectors, index {v.index}")
            r = await shoal_variant(t, ds, v, batches, args, {"ef": config.hnsw_ef_search})
            if r["status"] != "ok":
                say(f"Shoal {v.label}: {r['status']}: {r.get('reason')}")
            family_results.append(r)
        say(f"anchor for {family}, in-process")
        anchor, search_at = await asyncio.to_thread(run_anchor, family, ds, family_results, sweeps, config, args)
        if anchor["status"] != "ok":
            say(f"anchor for {family} failed: {anchor['reason']}")
        found_anchors[family] = anchor
        for r in family_results:
            compare(r, anchor)
            name = r.pop("collection", None)
            if name is None:
                continue
            try:
                if search_at is not None and args.rounds > 0 and r["points"][0].get("recall") is not None:
                    say(f"{r['label']}: {args.rounds} rounds against the anchor, interleaved")
                    r["rounds"] = await _rounds(t, ds, name, r, anchor, search_at, args)
            finally:
                await drop(t, name)
        results.extend(family_results)
    out["shoal"] = results
    out["anchors"] = found_anchors
    out["summary"] = [_headline(r) for r in results]
    out["memory_vs_float32"] = _memory_ratios(out["summary"])
    return out


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load.algos", description=__doc__.split("\n")[0])
    add_target_args(p)
    p.set_defaults(json=RESULTS_DIR / "algos.json")
    p.add_argument("--plot", type=Path, default=RESULTS_DIR / "algos.png", help="PNG plot (default results/algos.png)")
    p.add_argument("--size", type=int, default=None, help="corpus vectors (default 20000; --quick 3000)")
    p.add_argument("--queries", type=int, default=None, help="held-out queries (default 500; --quick 100)")
    p.add_argument("--clients", type=int, default=8, help="WebSocket query clients (default 8)")
    p.add_argument("--writers", type=int, default=2, help="WebSocket upsert clients (default 2)")
    p.add_argument("--batch", type=int, default=500, help="documents per upsert (default 500)")
    p.add_argument("--seconds", type=float, default=None, help="timed QPS phase per point (default 3; --quick 0)")
    p.add_argument(
        "--batch-queries",
        type=int,
        default=32,
        help="also time each point with query_batch requests of this many queries (default 32; 1: not)",
    )
    p.add_argument("--anchor-seconds", type=float, default=None, help="anchor QPS per point (default 2; --quick 0)")
    p.add_argument("--warmup", type=float, default=None, help="seconds of queries before a sweep (default 1)")
    p.add_argument(
        "--rounds",
        type=int,
        default=None,
        help="rounds of each default point against its anchor, interleaved (default 3; --quick 1; 0: none)",
    )
    p.add_argument("--round-seconds", type=float, default=None, help="each timing of a round (default 2; --quick 0.2)")
    p.add_argument("--kinds", default=None, help="comma-separated kinds to run (hnsw,flat,ivf,lsh; default all)")
    p.add_argument("--source", choices=["corpus", "synthetic"], default="corpus")
    p.add_argument(
        "--quick", action="store_true", help="smoke test: 3000 vectors, 100 queries, short sweeps, one pass per point"
    )
    return p


def _resolve(args: argparse.Namespace) -> argparse.Namespace:
    quick = args.quick
    defaults = {
        "size": 3_000 if quick else 20_000,
        "queries": 100 if quick else 500,
        "seconds": 0.0 if quick else 3.0,
        "anchor_seconds": 0.0 if quick else 2.0,
        "warmup": 0.2 if quick else 1.0,
        "rounds": 1 if quick else 3,
        "round_seconds": 0.2 if quick else 2.0,
    }
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.size < K or args.queries < 1 or args.clients < 1 or args.writers < 1 or args.batch < 1:
        raise SystemExit(f"--size must be >= {K}; --queries, --clients, --writers and --batch >= 1")
    return args


def main(argv: Sequence[str] | None = None) -> int:
    args = _resolve(parser().parse_args(argv))
    ds = load_dataset(args.source, args.size, args.queries)
    config = load_settings().engine if args.url is None else EngineConfig()
    started = time.perf_counter()
    # The sweep repeats the same queries: with the results cache on, most would be answered from it.
    with target(args.url, quiet=args.quiet, env={"SHOAL_RESULTS_CACHE_BYTES": "0"}) as t:
        result = run_async(lambda: bench(t, ds, config, args))
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["plot"] = str(plot(result, Path(args.plot)))
    print(report(result))
    path = write_json(Path(args.json), result)
    print(f"results written to {path}\nplot written to {result['plot']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
