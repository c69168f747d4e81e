"""Ingest load: documents per second and ack latency of durable upserts over WebSocket.

    python -m load.ingest [--url URL] [--mode vector|text] [--batch 500] [--docs N]
                          [--clients C] [--in-flight 1] [--seconds S] [--source corpus|synthetic]
                          [--json PATH]

Documents are passages of the real corpus (`load.corpus`) with the metadata
`{"bucket": i % 100, "n": i}`:
- `--mode vector`: each document carries its vector (embedded ahead of time by Shoal's model)
  and its text; the server validates, commits to PostgreSQL and indexes it;
- `--mode text`: each document carries only its text, so the server embeds it as well.
Past the end of the corpus, passages repeat under new ids.

`--clients` WebSocket connections share the batches; each keeps `--in-flight` upserts outstanding
(closed loop). A batch's ack latency runs from sending it to its reply (the reply comes after the
commit, when the documents are searchable). docs/s is documents acknowledged over the wall time
from the first send to the last ack. The run writes into a fresh collection (dropped at the end
unless `--keep`) and stops after `--docs` documents or `--seconds`, whichever comes first; it
then checks that the collection holds every acknowledged document.
"""

from __future__ import annotations

import argparse
import asyncio
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
    print_report,
    run_and_report,
    unique_name,
)
from load.dataset import Dataset, add_dataset_args, load_dataset
from load.query import close_clients, open_clients
from shoal_client import ShoalClient
from shoal_client.errors import ConnectionClosed

REQUEST_TIMEOUT = 120.0


@dataclass
class IngestResult:
    ack: Histogram = field(default_factory=Histogram)
    errors: ErrorCounts = field(default_factory=ErrorCounts)
    docs: int = 0
    batches: int = 0
    seconds: float = 0.0

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds > 0 else 0.0


def make_batches(
    ds: Dataset, mode: str, docs: int, batch: int, *, id_prefix: str = "", with_text: bool = True
) -> list[list[dict[str, Any]]]:
    """The upsert batches of a run, built before it starts (vectors already float32 `bin`)."""
    if mode not in ("vector", "text"):
        raise ValueError(f"mode must be vector or text, not {mode!r}")
    with_vector = mode == "vector"
    return list(
        ds.batches(batch, docs, with_vector=with_vector, with_text=with_text or not with_vector, id_prefix=id_prefix)
    )


async def run_ingest(
    clients: Sequence[ShoalClient],
    collection: str,
    batches: Sequence[list[dict[str, Any]]],
    *,
    in_flight: int = 1,
    seconds: float = 600.0,
    progress: Progress | None = None,
) -> IngestResult:
    """Upsert `batches` through `clients`, `in_flight` outstanding per client, until done or
    `seconds` have passed (batches in flight then still complete)."""
    result = IngestResult()
    queue = iter(batches)
    clock = time.perf_counter
    started = clock()
    deadline = started + seconds

    async def worker(client: ShoalClient) -> None:
        for docs in queue:
            if clock() >= deadline:
                return
            t0 = clock()
            try:
                async with asyncio.timeout(REQUEST_TIMEOUT):
                    reply = await client.request("upsert", collection=collection, docs=docs)
            except Exception as exc:
                result.errors.record(exc)
                if isinstance(exc, ConnectionClosed):
                    return
            else:
                result.ack.record(clock() - t0)
                result.docs += int(reply.get("count", len(docs)))
                result.batches += 1
                if progress is not None:
                    progress.update(len(docs))

    await asyncio.gather(*(worker(c) for c in clients for _ in range(max(1, in_flight))))
    result.seconds = clock() - started
    return result


def summarize(result: IngestResult, cpu: dict[str, Any] | None = None) -> dict[str, Any]:
    out: dict[str, Any] = {
        "docs": result.docs,
        "batches": result.batches,
        "errors": result.errors.as_dict(),
        "error_count": result.errors.total,
        "seconds": round(result.seconds, 3),
        "docs_per_s": round(result.docs_per_s, 1),
        "ack_ms": result.ack.summary_ms(),
    }
    if cpu is not None:
        out["cpu"] = cpu
    return out


async def bench(t: Target, ds: Dataset, args: argparse.Namespace) -> dict[str, Any]:
    quiet = args.quiet
    name = args.collection or unique_name("load_ingest")
    docs = args.docs if args.docs is not None else (20_000 if args.mode == "vector" else 2_000)
    batches = make_batches(ds, args.mode, docs, args.batch, with_text=not args.vector_only)
    result: dict[str, Any] = {
        "benchmark": "ingest",
        "url": t.url,
        "mode": args.mode,
        "with_text": args.mode == "text" or not args.vector_only,
        "batch": args.batch,
        "clients": args.clients,
        "in_flight": args.in_flight,
        "collection": name,
        "source": ds.source,
        "requested_docs": docs,
        "machine": machine_info(),
    }
    async with ShoalClient.connect(t.url) as admin:
        await admin.create_collection(name, dim=ds.dim, if_not_exists=True)
        before = await admin.count(name)
    clients = await open_clients(t.url, args.clients)
    try:
        meter = CpuMeter(t.pid, t.postgres_pid).start()
        with Progress(f"ingest ({args.mode})", docs, seconds=args.seconds, unit="docs", enabled=not quiet) as p:
            run = await run_ingest(clients, name, batches, in_flight=args.in_flight, seconds=args.seconds, progress=p)
        cpu = meter.stop()
        async with ShoalClient.connect(t.url) as admin:
            after = await admin.count(name)
            if args.collection is None and not args.keep:
                await admin.drop_collection(name)
    finally:
        await close_clients(clients)
    result.update(summarize(run, cpu))
    # Upserts of new ids: every acknowledged document must be there (re-runs into an existing
    # collection may replace ids, so only a fresh collection is checked exactly).
    result["count_after"] = after
    result["count_check"] = (after - before == run.docs) if before == 0 else None
    if result["count_check"] is False:
        log(f"count check failed: {after - before} new documents, {run.docs} acknowledged", enabled=True)
    return result


def print_summary(r: dict[str, Any]) -> None:
    ack = r["ack_ms"]
    print(
        f"\ningest load: {r['mode']} mode{' (+text)' if r['mode'] == 'vector' and r['with_text'] else ''}, "
        f"batch {r['batch']}, {r['clients']} clients x {r['in_flight']} in flight; {r['source']}"
    )
    rows: list[list[Any]] = [
        ["docs acknowledged", r["docs"]],
        ["batches", r["batches"]],
        ["errors", r["error_count"]],
        ["seconds", r["seconds"]],
        ["docs/s", r["docs_per_s"]],
    ]
    for key in ("p50", "p90", "p99", "p99_9", "max"):
        rows.append([f"ack latency {key.replace('_', '.')} ms", ack.get(key)])
    rows.append(["count check", {True: "ok", False: "FAILED", None: "-"}[r["count_check"]]])
    print_report(rows, r)


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load.ingest", description=__doc__.split("\n")[0])
    add_target_args(p)
    p.add_argument("--mode", choices=["vector", "text"], default="vector")
    p.add_argument("--batch", type=int, default=500, help="documents per upsert (default 500)")
    p.add_argument("--docs", type=int, default=None, help="documents in all (vector 20000, text 2000)")
    p.add_argument("--clients", type=int, default=1, help="WebSocket connections (default 1)")
    p.add_argument("--in-flight", type=int, default=1, help="upserts outstanding per client (default 1)")
    p.add_argument("--seconds", type=float, default=300.0, help="at most this long (default 300)")
    p.add_argument("--vector-only", action="store_true", help="vector mode: send no text with the vectors")
    p.add_argument("--collection", default=None, help="write into this collection (created if missing, kept)")
    p.add_argument("--keep", action="store_true", help="keep the collection written to")
    add_dataset_args(p, size=20_000, size_help="distinct documents to draw from", queries=None)
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.batch < 1 or args.clients < 1 or args.in_flight < 1:
        raise SystemExit("--batch, --clients and --in-flight must be >= 1")
    if args.mode == "text" and args.source == "synthetic" and args.dim != 384:
        raise SystemExit("text mode embeds to 384 dimensions: use --dim 384")
    ds = load_dataset(args.source, args.size, 10 if args.source == "synthetic" else 1_000, dim=args.dim)
    return run_and_report(args, lambda t: bench(t, ds, args), print_summary)


if __name__ == "__main__":
    sys.exit(main())
