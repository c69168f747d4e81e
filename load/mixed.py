"""Mixed load: readers, writers and subscribers on one collection at once — the real-time workload.

    python -m load.mixed [--url URL] [--readers 4] [--writers 1] [--write-rate 200] [--batch 50]
                         [--subscribers 100] [--threshold T] [--seconds 10] [--json PATH]
                         [--source corpus|synthetic]

The collection is first filled with `--size` documents of the data set (`load.dataset`). Then,
for `--seconds`:
- `--readers` WebSocket clients query it in a closed loop (one request outstanding each; the
  held-out query vectors, k = 10);
- `--writers` WebSocket clients upsert new vector documents at a fixed total `--write-rate`
  (docs/s), in batches of `--batch`, each batch sent at its scheduled time (at most
  `--max-in-flight` batches outstanding per writer; past that the writer falls behind, and the
  achieved rate says so);
- `--subscribers` standing queries (WebSocket subscriptions over `--sub-conns` connections, the
  query vectors again) receive the new documents whose score reaches the threshold. Without
  `--threshold`, it is chosen from the data so that about `--match-fraction` of the
  (subscription, new document) pairs match.

Delivery latency runs from the writer receiving the ack of a document's batch (recorded per seq)
to a subscriber receiving its push (recorded per seq), both on this process's clock. After the
writers stop, pushes still in flight get up to `--drain` seconds to arrive. Reports query QPS
and latency, write docs/s and ack latency, ack -> delivery latency, pushes expected (computed
here with numpy) and delivered, `lagged` events, and errors by code, in one table and `--json`.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from load.common import (
    CpuMeter,
    ErrorCounts,
    Histogram,
    Progress,
    Target,
    add_target_args,
    format_table,
    machine_info,
    positive_bounds,
    run_and_report,
    unique_name,
)
from load.dataset import Dataset, add_dataset_args, load_dataset
from load.query import close_clients, fill_collection, open_clients, query_requests, run_closed
from shoal_client import ShoalClient
from shoal_client.errors import ConnectionClosed
from shoal_client.types import LaggedEvent
from shoal_client.ws import Subscription

REQUEST_TIMEOUT = 30.0
K = 10


@dataclass
class WriteResult:
    ack: Histogram = field(default_factory=Histogram)
    errors: ErrorCounts = field(default_factory=ErrorCounts)
    acked_at: dict[int, float] = field(default_factory=dict)  # seq -> ack time
    row_of_seq: dict[int, int] = field(default_factory=dict)  # seq -> data set row
    docs: int = 0
    batches: int = 0
    scheduled: int = 0
    seconds: float = 0.0


@dataclass
class SubResult:
    received: list[tuple[int, float]] = field(default_factory=list)  # (seq, receive time)
    errors: ErrorCounts = field(default_factory=ErrorCounts)
    lagged_events: int = 0
    lagged_dropped: int = 0


def auto_threshold(ds: Dataset, sub_rows: Sequence[int], doc_rows: Sequence[int], fraction: float) -> float:
    """The score that about `fraction` of the (subscription, document) pairs reach."""
    rows = np.unique(np.asarray(doc_rows))[:5_000]
    scores = ds.query_vectors[np.asarray(sub_rows)] @ ds.vectors[rows].T
    return float(np.floor(np.quantile(scores, 1.0 - fraction) * 1e4) / 1e4)


async def run_writers(
    clients: Sequence[ShoalClient],
    collection: str,
    batches: Sequence[list[dict[str, Any]]],
    rows: Sequence[list[int]],
    *,
    rate: float,
    seconds: float,
    max_in_flight: int,
) -> WriteResult:
    """Batch i goes out on writer i % W at start + i * batch / rate (while within `seconds`)."""
    result = WriteResult()
    clock = time.perf_counter
    n = len(clients)
    started = clock()

    async def send(client: ShoalClient, i: int, gate: asyncio.Semaphore) -> None:
        docs = batches[i]
        try:
            t0 = clock()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    reply = await client.request("upsert", collection=collection, docs=docs)
            except Exception as exc:
                result.errors.record(exc)
                return
            now = clock()
            result.ack.record(now - t0)
            last = int(reply["seq"])
            for k, row in enumerate(rows[i]):
                seq = last - len(docs) + 1 + k
                result.acked_at[seq] = now
                result.row_of_seq[seq] = row
            result.docs += len(docs)
            result.batches += 1
        finally:
            gate.release()

    async def schedule(w: int, client: ShoalClient) -> None:
        gate = asyncio.Semaphore(max(1, max_in_flight))
        tasks: set[asyncio.Task[None]] = set()
        for i in range(w, len(batches), n):
            due = started + i * len(batches[0]) / rate
            if due - started >= seconds:
                break
            delay = due - clock()
            if delay > 0:
                await asyncio.sleep(delay)
            await gate.acquire()
            if client.closed:
                gate.release()
                result.errors.record(ConnectionClosed())
                continue
            result.scheduled += len(batches[i])
            task = asyncio.get_running_loop().create_task(send(client, i, gate))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        if tasks:
            await asyncio.gather(*tasks)

    await asyncio.gather(*(schedule(w, c) for w, c in enumerate(clients)))
    result.seconds = clock() - started
    return result


async def listen(sub: Subscription, result: SubResult) -> None:
    clock = time.perf_counter
    try:
        async for event in sub:
            if isinstance(event, LaggedEvent):
                result.lagged_events += 1
                result.lagged_dropped += event.dropped
            else:
                result.received.append((event.seq, clock()))
    except Exception as exc:
        result.errors.record(exc)


async def bench(t: Target, ds: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    quiet = args.quiet
    name = unique_name("load_mixed")
    max_requests, seconds = positive_bounds(args.requests, args.seconds)
    total_docs = int(args.write_rate * seconds) if args.write_rate > 0 else 0
    batches = list(ds.batches(args.batch, total_docs, with_text=False, id_prefix="w_")) if total_docs else []
    rows = [[n % ds.size for n in range(i * args.batch, i * args.batch + len(b))] for i, b in enumerate(batches)]
    sub_rows = [i % len(ds.query_vectors) for i in range(args.subscribers)]
    threshold = args.threshold
    if threshold is None:
        doc_rows = [r for rs in rows for r in rs] or list(range(ds.size))
        threshold = auto_threshold(ds, sub_rows or [0], doc_rows, args.match_fraction)
    result: dict[str, Any] = {
        "benchmark": "mixed",
        "url": t.url,
        "source": ds.source,
        "collection": name,
        "size": ds.size,
        "readers": args.readers,
        "writers": args.writers,
        "write_rate": args.write_rate,
        "batch": args.batch,
        "subscribers": args.subscribers,
        "sub_conns": args.sub_conns,
        "threshold": threshold,
        "threshold_auto": args.threshold is None,
        "seconds_requested": seconds,
        "machine": machine_info(),
    }
    await fill_collection(t.url, name, ds, quiet=quiet)
    readers = await open_clients(t.url, args.readers)
    writers = await open_clients(t.url, args.writers if batches else 0)
    sub_clients = await open_clients(t.url, min(args.sub_conns, args.subscribers) if args.subscribers else 0)
    subs_result = SubResult()
    listeners: list[asyncio.Task[None]] = []
    subs: list[Subscription] = []
    try:
        for i, row in enumerate(sub_rows):
            client = sub_clients[i % len(sub_clients)]
            subs.append(await client.subscribe(name, vector=ds.query_vectors[row], threshold=threshold))
        listeners = [asyncio.create_task(listen(s, subs_result)) for s in subs]
        requests = query_requests(ds, name, k=K)
        meter = CpuMeter(t.pid, t.postgres_pid).start()
        with Progress("mixed (queries)", args.requests, seconds=seconds, enabled=not quiet) as progress:
            async with asyncio.timeout(seconds + 2 * REQUEST_TIMEOUT):
                reads, writes = await asyncio.gather(
                    run_closed(readers, requests, max_requests=max_requests, seconds=seconds, progress=progress),
                    run_writers(
                        writers,
                        name,
                        batches,
                        rows,
                        rate=args.write_rate,
                        seconds=seconds,
                        max_in_flight=args.max_in_flight,
                    ),
                )
        cpu = meter.stop()
        # The pushes the server owes: every (subscription, acknowledged document) pair at or
        # above the threshold, computed here independently.
        seqs = sorted(writes.row_of_seq)
        expected = 0
        if subs and seqs:
            scores = ds.query_vectors[np.asarray(sub_rows)] @ ds.vectors[[writes.row_of_seq[s] for s in seqs]].T
            expected = int(np.count_nonzero(scores >= threshold))
        deadline = time.perf_counter() + args.drain
        while len(subs_result.received) < expected and time.perf_counter() < deadline:
            await asyncio.sleep(0.05)
    finally:
        for task in listeners:
            task.cancel()
        await asyncio.gather(*listeners, return_exceptions=True)
        async with ShoalClient.connect(t.url) as admin:
            await admin.drop_collection(name)
        await close_clients([*readers, *writers, *sub_clients])

    delivery = Histogram()
    for seq, received in subs_result.received:
        acked = writes.acked_at.get(seq)
        if acked is not None:
            delivery.record(max(0.0, received - acked))
    errors = ErrorCounts()
    for part in (reads.errors, writes.errors, subs_result.errors):
        errors.merge(part)
    result.update(
        {
            "seconds": round(max(reads.seconds, writes.seconds), 3),
            "query": {
                "requests": reads.ok,
                "qps": round(reads.qps, 1),
                "latency_ms": reads.latency.summary_ms(),
                "errors": reads.errors.as_dict(),
            },
            "write": {
                "docs": writes.docs,
                "batches": writes.batches,
                "target_docs_per_s": args.write_rate,
                # Over the whole write window: the last batch is due just before its end.
                "docs_per_s": round(writes.docs / max(writes.seconds, seconds), 1),
                "ack_ms": writes.ack.summary_ms(),
                "errors": writes.errors.as_dict(),
            },
            "subscriptions": {
                "subscriptions": len(subs),
                "pushes_expected": expected,
                "pushes_delivered": len(subs_result.received),
                "match_fraction": round(expected / (len(subs) * len(seqs)), 4) if subs and seqs else None,
                "lagged_events": subs_result.lagged_events,
                "lagged_dropped": subs_result.lagged_dropped,
                "delivery_ms": delivery.summary_ms(),
                "errors": subs_result.errors.as_dict(),
            },
            "errors": errors.as_dict(),
            "error_count": errors.total,
            "cpu": cpu,
        }
    )
    return result


def print_summary(r: dict[str, Any]) -> None:
    q, w, s = r["query"], r["write"], r["subscriptions"]
    print(
        f"\nmixed load: {r['readers']} readers, {r['writers']} writers at {r['write_rate']:g} docs/s "
        f"(batch {r['batch']}), {s['subscriptions']} subscriptions (threshold {r['threshold']:g}"
        f"{', auto' if r['threshold_auto'] else ''}); {r['size']} docs, {r['source']}, {r['seconds']} s"
    )
    keys = ("p50", "p90", "p99", "p99_9", "max")

    def row(label: str, count: int, rate: float | None, hist: dict[str, Any]) -> list[Any]:
        return [label, count, rate, *(hist.get(k) for k in keys)]

    rows: list[list[Any]] = [
        row("query (latency)", q["requests"], q["qps"], q["latency_ms"]),
        row("write (batch ack)", w["docs"], w["docs_per_s"], w["ack_ms"]),
        row("push (ack -> delivery)", s["pushes_delivered"], None, s["delivery_ms"]),
        ["pushes expected / delivered", f"{s['pushes_expected']} / {s['pushes_delivered']}"],
        ["lagged events (dropped)", f"{s['lagged_events']} ({s['lagged_dropped']})"],
        ["errors", ", ".join(f"{k}={v}" for k, v in r["errors"].items()) or "0"],
    ]
    width = len(rows[0])
    rows = [x + [None] * (width - len(x)) for x in rows]
    headers = ["", "count", "per s", "p50 ms", "p90 ms", "p99 ms", "p99.9 ms", "max ms"]
    print(format_table(headers, rows))


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load.mixed", description=__doc__.split("\n")[0])
    add_target_args(p)
    p.add_argument("--readers", type=int, default=4, help="closed-loop query clients (default 4)")
    p.add_argument("--writers", type=int, default=1, help="writer connections (default 1)")
    p.add_argument("--write-rate", type=float, default=200.0, help="documents per second, all writers (default 200)")
    p.add_argument("--batch", type=int, default=50, help="documents per upsert (default 50)")
    p.add_argument("--max-in-flight", type=int, default=8, help="upserts outstanding per writer (default 8)")
    p.add_argument("--subscribers", type=int, default=100, help="standing queries (default 100)")
    p.add_argument("--sub-conns", type=int, default=4, help="connections holding them (default 4)")
    p.add_argument("--threshold", type=float, default=None, help="subscription threshold (default: from the data)")
    p.add_argument(
        "--match-fraction",
        type=float,
        default=0.02,
        help="without --threshold: share of (subscription, document) pairs that match (default 0.02)",
    )
    p.add_argument("--seconds", type=float, default=10.0, help="duration (default 10)")
    p.add_argument("--requests", type=int, default=None, help="at most this many queries")
    p.add_argument("--drain", type=float, default=10.0, help="seconds to wait for pushes after writing (default 10)")
    add_dataset_args(p, size=5_000, size_help="documents loaded before the run", queries=200)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.readers < 0 or args.writers < 1 or args.batch < 1 or args.subscribers < 0 or args.sub_conns < 1:
        raise SystemExit("--writers, --batch and --sub-conns must be >= 1; --readers and --subscribers >= 0")
    if not 0.0 < args.match_fraction < 1.0:
        raise SystemExit("--match-fraction must be between 0 and 1")
    ds = load_dataset(args.source, args.size, args.queries, dim=args.dim)
    return run_and_report(args, lambda t: bench(t, ds, args), print_summary)


if __name__ == "__main__":
    sys.exit(main())
