"""Query load: N concurrent WebSocket clients, closed loop or open loop (fixed arrival rate).

    python -m load.query [--url URL] [--clients 8] [--mode closed|open] [--rate R]
                         [--requests N] [--seconds S] [--k 10] [--ef EF] [--include text,metadata]
                         [--filter] [--text] [--collection NAME] [--source corpus|synthetic]
                         [--size 20000] [--json PATH]

Each client is one `ShoalClient` connection. Queries are the held-out query passages of the real
corpus (`load.corpus`; or random unit vectors with `--source synthetic`), sent as vectors (or as
text with `--text`, which exercises the embedder). Without `--collection`, the script first loads
the corpus into a fresh collection (dropped at the end unless `--keep`), so recall@k against the
exact ground truth is reported too.

- closed loop: every client keeps `--pipeline` requests (default 1) outstanding and sends the
  next as soon as one returns. Throughput is what the server sustains; latency is per request.
- open loop: requests are scheduled at a fixed total `--rate` (spread over the clients) and each
  is sent at its scheduled time, whether or not earlier ones have returned (pipelining, at most
  `--max-in-flight` per client). Latency is measured from the scheduled send time, so a stall
  shows up in every request it delayed (no coordinated omission); `send_lag` says how late the
  generator itself was.

The run stops after `--requests` requests or `--seconds` seconds, whichever comes first, after a
`--warmup` of unrecorded requests. Reports QPS, latency p50/p90/p99/p99.9 (log-linear histogram),
the server's own `took_ms`, errors by code, recall@k, and the CPU used by this process, the
server and its PostgreSQL (when the server was started here).
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from load.common import (
    CpuMeter,
    ErrorCounts,
    Histogram,
    Progress,
    Target,
    add_target_args,
    log,
    machine_info,
    positive_bounds,
    print_report,
    recall_at_k,
    run_and_report,
    unique_name,
)
from load.dataset import BUCKETS, Dataset, add_dataset_args, load_dataset
from shoal_client import ShoalClient
from shoal_client.codec import encode_vector
from shoal_client.errors import ConnectionClosed, NotFound

REQUEST_TIMEOUT = 30.0


@dataclass
class RunResult:
    """What one measured phase saw."""

    latency: Histogram = field(default_factory=Histogram)
    took: Histogram = field(default_factory=Histogram)  # the server's own took_ms
    send_lag: Histogram | None = None  # open loop: actual send - scheduled send
    service: Histogram | None = None  # open loop: reply - actual send
    errors: ErrorCounts = field(default_factory=ErrorCounts)
    found: dict[int, list[str]] = field(default_factory=dict)  # query index -> hit ids (first reply)
    seconds: float = 0.0
    scheduled: int = 0
    failed_queries: int = 0  # queries of `query_batch` replies answered with an error

    @property
    def ok(self) -> int:
        return self.latency.count

    @property
    def qps(self) -> float:
        return self.ok / self.seconds if self.seconds > 0 else 0.0

    def _note(self, q: int, reply: dict[str, Any]) -> None:
        took = reply.get("took_ms")
        if isinstance(took, int | float):
            self.took.record(took / 1000.0)
        results = reply.get("results")
        if results is not None:
            self.failed_queries += sum(1 for r in results if "error" in r)
        if q not in self.found:
            self.found[q] = [h["id"] for h in reply.get("hits", ())]


def query_requests(
    ds: Dataset,
    collection: str,
    *,
    k: int = 10,
    ef: int | None = None,
    include: list[str] | None = None,
    filtered: bool = False,
    text: bool = False,
) -> list[dict[str, Any]]:
    """One request's args per query (vectors pre-encoded): the generator does no work per request
    beyond sending it. With `filtered`, query q carries `where: {bucket: q % 100}` (1 %)."""
    out: list[dict[str, Any]] = []
    for q in range(len(ds.query_vectors)):
        args: dict[str, Any] = {"collection": collection, "k": k}
        if text:
            args["text"] = ds.query_texts[q]
        else:
            args["vector"] = encode_vector(ds.query_vectors[q])
        if include is not None:
            args["include"] = include
        if ef is not None:
            args["ef"] = ef
        if filtered:
            args["where"] = {"bucket": q % BUCKETS}
        out.append(args)
    return out


def as_query_batches(requests: Sequence[dict[str, Any]], size: int) -> list[dict[str, Any]]:
    """`query` requests (all of one collection) as `query_batch` requests of `size` queries
    each, in the same order. Only whole batches, so every request carries as many queries (the
    remainder is left out), unless there are fewer than `size`: then one batch of them all."""
    whole = len(requests) - len(requests) % size or len(requests)
    out = []
    for start in range(0, whole, size):
        part = requests[start : start + size]
        queries = [{key: value for key, value in r.items() if key != "collection"} for r in part]
        out.append({"collection": part[0]["collection"], "queries": queries})
    return out


async def _one(client: ShoalClient, args: dict[str, Any], op: str = "query") -> dict[str, Any]:
    async with asyncio.timeout(REQUEST_TIMEOUT):
        return await client.request(op, **args)


async def run_closed(
    clients: Sequence[ShoalClient],
    requests: Sequence[dict[str, Any]],
    *,
    max_requests: int,
    seconds: float,
    pipeline: int = 1,
    progress: Progress | None = None,
    first_query: int = 0,
    op: str = "query",
) -> RunResult:
    """Closed loop: `pipeline` outstanding requests per client until a bound is reached."""
    result = RunResult()
    counter = itertools.count()
    n_queries = len(requests)
    started = time.perf_counter()
    deadline = started + seconds
    clock = time.perf_counter

    async def worker(client: ShoalClient) -> None:
        request = client.request
        while True:
            i = next(counter)
            if i >= max_requests or clock() >= deadline:
                return
            q = (first_query + i) % n_queries
            t0 = clock()
            try:
                # No timeout per request (asyncio.timeout cost ~10% of this process's CPU per
                # query): the watchdog below bounds the whole run instead.
                reply = await request(op, **requests[q])
            except Exception as exc:
                result.errors.record(exc)
                if isinstance(exc, ConnectionClosed):
                    return
            else:
                result.latency.record(clock() - t0)
                result._note(q, reply)
            if progress is not None:
                progress.update()

    async def watchdog() -> None:
        # A request unanswered REQUEST_TIMEOUT after the run should have ended means a stuck
        # server: closing the clients fails what is in flight (counted as errors), and the
        # workers return with what they measured.
        await asyncio.sleep(seconds + REQUEST_TIMEOUT)
        for client in clients:
            await client.close()

    guard = asyncio.create_task(watchdog())
    try:
        await asyncio.gather(*(worker(c) for c in clients for _ in range(max(1, pipeline))))
    finally:
        guard.cancel()
    result.seconds = time.perf_counter() - started
    result.scheduled = min(next(counter), max_requests)
    return result


async def run_open(
    clients: Sequence[ShoalClient],
    requests: Sequence[dict[str, Any]],
    *,
    rate: float,
    max_requests: int,
    seconds: float,
    max_in_flight: int = 128,
    progress: Progress | None = None,
    op: str = "query",
) -> RunResult:
    """Open loop: request i is due at start + i / rate and goes out on client i % N at that time.
    Latency counts from the due time (coordinated-omission free)."""
    if rate <= 0:
        raise ValueError("open loop needs --rate > 0")
    result = RunResult(send_lag=Histogram(), service=Histogram())
    assert result.send_lag is not None and result.service is not None
    send_lag, service = result.send_lag, result.service
    n_clients, n_queries = len(clients), len(requests)
    total = min(max_requests, int(rate * seconds))
    clock = time.perf_counter
    started = clock() + 0.05  # a moment to spread the clients' first sleeps

    async def send(client: ShoalClient, q: int, due: float, gate: asyncio.Semaphore) -> None:
        try:
            sent = clock()
            send_lag.record(max(0.0, sent - due))
            try:
                reply = await _one(client, requests[q], op)
            except Exception as exc:
                result.errors.record(exc)
            else:
                done = clock()
                result.latency.record(done - due)
                service.record(done - sent)
                result._note(q, reply)
            if progress is not None:
                progress.update()
        finally:
            gate.release()

    async def schedule(c: int, client: ShoalClient) -> None:
        gate = asyncio.Semaphore(max(1, max_in_flight))
        tasks: set[asyncio.Task[None]] = set()
        for i in range(c, total, n_clients):
            due = started + i / rate
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()  # at the bound, later requests wait; their latency still counts
            if client.closed:
                gate.release()
                result.errors.record(ConnectionClosed())
                continue
            task = asyncio.get_running_loop().create_task(send(client, i % n_queries, due, gate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    await asyncio.gather(*(schedule(c, client) for c, client in enumerate(clients)))
    result.seconds = clock() - started
    result.scheduled = total
    return result


async def open_clients(url: str, n: int) -> list[ShoalClient]:
    clients: list[ShoalClient] = []
    try:
        for _ in range(n):
            clients.append(await ShoalClient.open(url, ping_interval=None))
    except BaseException:
        await close_clients(clients)
        raise
    return clients


async def close_clients(clients: Sequence[ShoalClient]) -> None:
    await asyncio.gather(*(c.close() for c in clients), return_exceptions=True)


async def fill_collection(
    url: str,
    name: str,
    ds: Dataset,
    *,
    batch: int = 500,
    writers: int = 2,
    quiet: bool = False,
) -> float:
    """Create `name` (dim of `ds`) and upsert every document of `ds` by vector, with its text and
    metadata; returns the seconds it took."""
    started = time.perf_counter()
    batches = list(ds.batches(batch))
    async with ShoalClient.connect(url) as admin:
        await admin.create_collection(name, dim=ds.dim)
    clients = await open_clients(url, writers)
    try:
        with Progress(f"loading {name}", ds.size, unit="docs", enabled=not quiet) as progress:
            queue = iter(batches)

            async def writer(client: ShoalClient) -> None:
                for docs in queue:
                    await client.upsert(name, docs)
                    progress.update(len(docs))

            await asyncio.gather(*(writer(c) for c in clients))
    finally:
        await close_clients(clients)
    return time.perf_counter() - started


def recall_of(ds: Dataset, found: dict[int, list[str]], k: int, filtered: bool) -> float | None:
    """Mean recall@k over the queries answered, against the exact (filtered) ground truth."""
    if not found:
        return None
    rows = ds.row_of()
    queries = sorted(found)
    got = [[rows.get(i, -1) for i in found[q]] for q in queries]
    if filtered:
        return recall_at_k(got, ds.filtered_truth([q % BUCKETS for q in queries], k), k)
    if ds.truth.shape[1] < k:
        return None
    return recall_at_k(got, ds.truth[queries], k)


def summarize(result: RunResult, cpu: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "requests": result.ok,
        "errors": result.errors.as_dict(),
        "error_count": result.errors.total,
        "failed_queries": result.failed_queries,
        "seconds": round(result.seconds, 3),
        "qps": round(result.qps, 1),
        "latency_ms": result.latency.summary_ms(),
        "server_took_ms": result.took.summary_ms(),
    }
    if result.send_lag is not None:
        out["send_lag_ms"] = result.send_lag.summary_ms()
    if result.service is not None:
        out["service_ms"] = result.service.summary_ms()
    if cpu is not None:
        out["cpu"] = cpu
    return out


async def bench(t: Target, ds: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    quiet = args.quiet
    op = "ping" if args.ping else "query"
    own = args.collection is None and not args.ping
    name = args.collection or unique_name("load_query")
    include = None if args.include is None else [f for f in args.include.split(",") if f]
    max_requests, seconds = positive_bounds(args.requests, args.seconds)
    result: dict[str, Any] = {
        "benchmark": "query",
        "op": op,
        "url": t.url,
        "mode": args.mode,
        "clients": args.clients,
        "pipeline": args.pipeline if args.mode == "closed" else None,
        "rate": args.rate if args.mode == "open" else None,
        "k": args.k,
        "ef": args.ef,
        "include": include,
        "filtered": args.filter,
        "text_queries": args.text,
        "collection": name,
        "source": ds.source,
        "docs": ds.size if own else None,
        "queries": len(ds.query_vectors),
        "machine": machine_info(),
    }
    if args.ping:
        result.update(collection=None, docs=None)
    elif own:
        log(f"loading {ds.size} documents into {name} ...", enabled=not quiet)
        result["load_seconds"] = round(await fill_collection(t.url, name, ds, quiet=quiet), 3)
    else:
        async with ShoalClient.connect(t.url) as admin:
            found = [c for c in await admin.list_collections() if c.name == name]
            if not found:
                raise NotFound("not_found", f"collection {name!r} does not exist")
            if found[0].dim != ds.dim and not args.text:
                raise SystemExit(f"collection {name!r} has dim {found[0].dim}, the queries {ds.dim}")
            result["docs"] = found[0].count
    requests: list[dict[str, Any]] = [{}]
    if not args.ping:
        requests = query_requests(ds, name, k=args.k, ef=args.ef, include=include, filtered=args.filter, text=args.text)
    clients = await open_clients(t.url, args.clients)
    try:
        if args.warmup > 0:
            await run_closed(clients, requests, max_requests=10**9, seconds=args.warmup, pipeline=1, op=op)
        meter = CpuMeter(t.pid, t.postgres_pid).start()
        bound = max_requests if args.mode == "closed" else min(max_requests, int(args.rate * seconds))
        with Progress(f"query ({args.mode})", bound, seconds=seconds, enabled=not quiet) as progress:
            if args.mode == "closed":
                run = await run_closed(
                    clients,
                    requests,
                    max_requests=max_requests,
                    seconds=seconds,
                    pipeline=args.pipeline,
                    progress=progress,
                    op=op,
                )
            else:
                run = await run_open(
                    clients,
                    requests,
                    rate=args.rate,
                    max_requests=max_requests,
                    seconds=seconds,
                    max_in_flight=args.max_in_flight,
                    progress=progress,
                    op=op,
                )
        cpu = meter.stop()
    finally:
        await close_clients(clients)
        if own and not args.keep:
            async with ShoalClient.connect(t.url) as admin:
                await admin.drop_collection(name)
    result.update(summarize(run, cpu))
    if args.mode == "open":
        result["achieved_rate"] = round(run.ok / run.seconds, 1) if run.seconds > 0 else 0.0
    recall = recall_of(ds, run.found, args.k, args.filter) if own else None
    result["recall_at_k"] = None if recall is None else round(recall, 4)
    return result


def _include_label(include: list[str] | None) -> str:
    if include is None:
        return "server default"
    return ",".join(include) if include else "ids and scores only"


def print_summary(r: dict[str, Any]) -> None:
    lat = r["latency_ms"]
    if r["op"] == "ping":
        print(f"\nping load: {r['mode']} loop, {r['clients']} clients")
    else:
        print(
            f"\nquery load: {r['mode']} loop, {r['clients']} clients"
            + (f", {r['pipeline']} in flight each" if r["mode"] == "closed" else f", {r['rate']}/s scheduled")
            + f", k={r['k']}, ef={r['ef'] or 'default'}, include={_include_label(r['include'])}"
            + (", 1% filter" if r["filtered"] else "")
            + (", text queries" if r["text_queries"] else "")
            + f"; {r['docs']} docs ({r['source']})"
        )
    rows: list[list[Any]] = [
        ["requests ok", r["requests"]],
        ["errors", r["error_count"]],
        ["seconds", r["seconds"]],
        ["QPS", r["qps"]],
    ]
    for key in ("p50", "p90", "p99", "p99_9", "max"):
        rows.append([f"latency {key.replace('_', '.')} ms", lat.get(key)])
    took = r["server_took_ms"]
    if took.get("count"):
        rows.append(["server took_ms p50 / p99", f"{took['p50']} / {took['p99']}"])
    if "send_lag_ms" in r:
        rows.append(["send lag p99 ms", r["send_lag_ms"].get("p99")])
        rows.append(["achieved rate /s", r["achieved_rate"]])
    if r.get("recall_at_k") is not None:
        rows.append([f"recall@{r['k']}", r["recall_at_k"]])
    print_report(rows, r)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load.query", description=__doc__.split("\n")[0])
    add_target_args(p)
    p.add_argument("--clients", type=int, default=8, help="WebSocket connections (default 8)")
    p.add_argument("--mode", choices=["closed", "open"], default="closed")
    p.add_argument("--rate", type=float, default=1000.0, help="open loop: requests/s in total")
    p.add_argument("--pipeline", type=int, default=1, help="closed loop: requests in flight per client")
    p.add_argument("--max-in-flight", type=int, default=128, help="open loop: bound per client")
    p.add_argument("--requests", type=int, default=50_000, help="at most this many requests")
    p.add_argument("--seconds", type=float, default=20.0, help="at most this long (measured part)")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of unrecorded closed-loop load first")
    p.add_argument("--k", type=int, default=10)
    p.add_argument("--ef", type=int, default=None, help="search breadth (default: the server's)")
    p.add_argument(
        "--include",
        default=None,
        help="comma-separated fields to return (text,metadata,vector); '' for ids and scores only; "
        "default: the server's default",
    )
    p.add_argument("--filter", action="store_true", help="every query filtered to 1%% of the docs")
    p.add_argument("--text", action="store_true", help="send query texts (embedded by the server)")
    p.add_argument(
        "--ping", action="store_true", help="send `ping` instead of queries: the protocol and transport ceiling"
    )
    p.add_argument("--collection", default=None, help="query this existing collection instead")
    p.add_argument("--keep", action="store_true", help="keep the loaded collection")
    add_dataset_args(p, size=20_000, size_help="documents to load", queries=1_000)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.clients < 1 or args.k < 1:
        raise SystemExit("--clients and --k must be >= 1")
    ds = load_dataset(args.source, args.size, args.queries, dim=args.dim)
    return run_and_report(args, lambda t: bench(t, ds, args), print_summary)


if __name__ == "__main__":
    sys.exit(main())
