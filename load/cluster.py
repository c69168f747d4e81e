"""Cluster figures: two `shoal serve` nodes on one `shoal postgres`, all on this machine.

    python -m load.cluster [--rate 500] [--seconds 10] [--query-seconds 8] [--json PATH]

1. Replication: a writer on node A upserts `--rate` documents a second (batches of `--batch`); for
   every ack, node B is asked `count` with `min_seq` = the acked seq. Reported: ack on A ->
   answered on B (p50/p99/max), and ack on A -> the match pushed by a subscription on B.
2. Query throughput: `--clients` WebSocket clients send k=10 vector queries as fast as they are
   answered, first all to A, then split over A and B. Reported: QPS and server CPU ms per query
   (utime + stime of the node processes, from /proc). The nodes run without the results cache.

Prints a summary and writes JSON (`--json`, default results/cluster.json).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from load.server import ROOT, PostgresProcess, ServerProcess, temp_data_dir
from shoal_client import ShoalClient
from shoal_client.types import MatchEvent

DIM = 64
COLLECTION = "cluster_bench"


def _cpu_seconds(pid: int) -> float:
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _pct(values: list[float], q: float) -> float | None:
    return round(float(np.percentile(np.asarray(values), q)), 2) if values else None


def _summary_ms(values: list[float]) -> dict[str, Any]:
    return {"n": len(values), "p50": _pct(values, 50), "p99": _pct(values, 99), "max": _pct(values, 100)}


def _unit(rng: np.random.Generator, n: int) -> np.ndarray:
    v = rng.normal(size=(n, DIM)).astype(np.float32)
    v[:, 0] += 6.0  # all near one direction: the subscription below matches every document
    out: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return out


async def replication(a: ServerProcess, b: ServerProcess, args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(1)
    target = np.zeros(DIM, np.float32)
    target[0] = 1.0
    acked: dict[int, float] = {}
    pushed: dict[int, float] = {}
    visible_ms: list[float] = []
    async with ShoalClient.connect(a.ws_url) as ca, ShoalClient.connect(b.ws_url) as cb:
        await ca.create_collection(COLLECTION, dim=DIM)
        while COLLECTION not in [c.name for c in await cb.list_collections()]:
            await asyncio.sleep(0.01)
        sub = await cb.subscribe(COLLECTION, target, threshold=0.0)
        total = int(args.rate * args.seconds)

        async def listen() -> None:
            got = 0
            async for event in sub:
                if isinstance(event, MatchEvent):
                    pushed[event.seq] = time.monotonic()
                    got += 1
                    if got >= total:
                        return

        async def check(seq: int, at: float) -> None:
            await cb.request("count", collection=COLLECTION, min_seq=seq)
            visible_ms.append((time.monotonic() - at) * 1000)

        async def write(n: int) -> None:
            vectors = _unit(rng, args.batch)
            reply = await ca.upsert(
                COLLECTION, [{"id": f"d{n}-{i}", "vector": vectors[i]} for i in range(args.batch)]
            )
            at = time.monotonic()
            for seq in range(reply.seq - reply.count + 1, reply.seq + 1):
                acked[seq] = at
            await check(reply.seq, at)

        listener = asyncio.ensure_future(listen())
        writes: list[asyncio.Future[None]] = []
        interval = args.batch / args.rate
        start = time.monotonic()
        for n in range(total // args.batch):  # on schedule, not waiting for the previous ack
            due = start + n * interval
            await asyncio.sleep(max(0.0, due - time.monotonic()))
            writes.append(asyncio.ensure_future(write(n)))
        await asyncio.gather(*writes)
        elapsed = time.monotonic() - start
        try:
            await asyncio.wait_for(listener, 30)
        except TimeoutError:
            listener.cancel()
        # A push can beat the writer's own ack (both go out as A applies): that counts as 0.
        pushed_ms = [max(0.0, (at - acked[seq]) * 1000) for seq, at in pushed.items() if seq in acked]
    return {
        "docs": total,
        "rate_docs_s": round(total / elapsed, 1),
        "visible_on_b_ms": _summary_ms(visible_ms),
        "pushed_on_b_ms": _summary_ms(pushed_ms),
    }


async def query_load(targets: list[ServerProcess], args: argparse.Namespace) -> dict[str, Any]:
    rng = np.random.default_rng(2)
    queries = _unit(rng, 256)
    count = 0
    cpu_before = {p.pid: _cpu_seconds(p.pid) for p in targets if p.pid}
    stop_at = time.monotonic() + args.query_seconds

    async def worker(i: int) -> None:
        nonlocal count
        proc = targets[i % len(targets)]
        async with ShoalClient.connect(proc.ws_url) as client:
            j = i
            while time.monotonic() < stop_at:
                await client.query(COLLECTION, queries[j % len(queries)], k=10)
                count += 1
                j += 1

    started = time.monotonic()
    await asyncio.gather(*(worker(i) for i in range(args.clients)))
    elapsed = time.monotonic() - started
    cpu = sum(_cpu_seconds(pid) - before for pid, before in cpu_before.items())
    return {
        "nodes": len(targets),
        "clients": args.clients,
        "qps": round(count / elapsed, 1),
        "server_cpu_ms_per_query": round(cpu * 1000 / max(1, count), 3),
    }


async def run(args: argparse.Namespace) -> dict[str, Any]:
    pg_dir = temp_data_dir("shoal-cluster-bench-")
    pg = PostgresProcess(pg_dir)
    # No results cache: the query phases repeat 256 queries, which would measure the cache.
    env = {"SHOAL_DATABASE_URL": pg.url, "SHOAL_LOG_LEVEL": "warning", "SHOAL_RESULTS_CACHE_BYTES": "0"}
    nodes = [ServerProcess(temp_data_dir("shoal-cluster-node-"), env) for _ in range(2)]
    try:
        for proc in nodes:
            proc.start()
        a, b = nodes
        result: dict[str, Any] = {"replication": await replication(a, b, args)}
        result["query_one_node"] = await query_load([a], args)
        result["query_two_nodes"] = await query_load([a, b], args)
        return result
    finally:
        for proc in nodes:
            if proc.proc is not None:
                proc.stop()
            shutil.rmtree(proc.data_dir, ignore_errors=True)
        pg.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="load.cluster", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rate", type=float, default=500.0, help="documents a second written on node A")
    parser.add_argument("--batch", type=int, default=10, help="documents per upsert")
    parser.add_argument("--seconds", type=float, default=10.0, help="length of the write phase")
    parser.add_argument("--query-seconds", type=float, default=8.0, help="length of each query phase")
    parser.add_argument("--clients", type=int, default=16, help="concurrent query clients")
    parser.add_argument("--json", type=Path, default=ROOT / "results" / "cluster.json")
    args = parser.parse_args(argv)
    result = asyncio.run(run(args))
    rep = result["replication"]
    print(f"writes on A: {rep['docs']} docs at {rep['rate_docs_s']} docs/s")
    for key in ("visible_on_b_ms", "pushed_on_b_ms"):
        s = rep[key]
        print(f"  {key:18} n={s['n']} p50={s['p50']} p99={s['p99']} max={s['max']}")
    for key in ("query_one_node", "query_two_nodes"):
        q = result[key]
        print(f"{key}: {q['qps']} QPS, {q['server_cpu_ms_per_query']} ms server CPU/query ({q['clients']} clients)")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(result, indent=2))
    print(f"wrote {args.json}")


if __name__ == "__main__":
    main()
