"""Query round trip of the JavaScript client against the Python client, same server, same run.

    python -m load.js_roundtrip [--queries 2000] [--rounds 3] [--json PATH] [--url URL]

Fills a collection with random vectors, then runs `--queries` sequential `query` calls (a
vector, k=10, one at a time on one connection) with each client in turn, `--rounds` times,
alternating which goes first, so a change in the machine's speed falls on both. The JS side is
`clients/js/bench/roundtrip.mjs` under node, using the package as a user installs it (run
`scripts/setup-js` first). Prints median and p99 per client (the median of the rounds) and their
ratio; `--json` writes every round.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import subprocess
import time
from pathlib import Path
from typing import Any

import numpy as np

from load.common import add_target_args, format_table, target, unique_name, write_json
from load.server import ROOT
from shoal_client import ShoalClient

JS_DIR = ROOT / "clients" / "js"
JS_SCRIPT = JS_DIR / "bench" / "roundtrip.mjs"
DIM, DOCS, WARM_UP = 384, 5000, 100


def ws_url(url: str) -> str:
    return url.replace("http://", "ws://", 1).rstrip("/") + "/v1/ws"


async def fill(url: str, collection: str, docs: int) -> None:
    rng = np.random.default_rng(1)
    async with ShoalClient.connect(url) as db:
        await db.create_collection(collection, dim=DIM)
        for start in range(0, docs, 1000):
            vectors = rng.standard_normal((min(1000, docs - start), DIM)).astype(np.float32)
            await db.upsert(collection, [{"id": f"d{start + i}", "vector": v} for i, v in enumerate(vectors)])


def summary(times_ms: list[float]) -> dict[str, float]:
    times_ms = sorted(times_ms)
    p99 = times_ms[min(len(times_ms) - 1, int(0.99 * len(times_ms)))]
    return {"median_ms": round(statistics.median(times_ms), 3), "p99_ms": round(p99, 3)}


async def python_round(url: str, collection: str, n: int) -> dict[str, float]:
    vectors = np.random.default_rng(2).standard_normal((64, DIM)).astype(np.float32)
    times: list[float] = []
    async with ShoalClient.connect(url) as db:
        for i in range(WARM_UP):
            await db.query(collection, vector=vectors[i % 64], k=10)
        for i in range(n):
            started = time.perf_counter()
            await db.query(collection, vector=vectors[i % 64], k=10)
            times.append((time.perf_counter() - started) * 1000)
    return summary(times)


def js_round(url: str, collection: str, n: int) -> dict[str, float]:
    done = subprocess.run(
        ["node", str(JS_SCRIPT), url, collection, str(DIM), str(n)],
        cwd=JS_DIR,
        capture_output=True,
        text=True,
        timeout=600,
        check=False,
    )
    if done.returncode != 0:
        raise SystemExit(f"the JS client failed (run scripts/setup-js first?): {done.stderr.strip()[-500:]}")
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return {"median_ms": float(result["median_ms"]), "p99_ms": float(result["p99_ms"])}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=2000, help="sequential queries per client and round")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--docs", type=int, default=DOCS)
    add_target_args(parser)
    args = parser.parse_args()
    rounds: dict[str, list[dict[str, float]]] = {"js": [], "python": []}
    with target(args.url, quiet=args.quiet) as server:
        url, collection = ws_url(server.url), unique_name("roundtrip")
        asyncio.run(fill(url, collection, args.docs))
        for i in range(args.rounds):
            order = ("js", "python") if i % 2 == 0 else ("python", "js")
            for client in order:
                if client == "js":
                    rounds["js"].append(js_round(url, collection, args.queries))
                else:
                    rounds["python"].append(asyncio.run(python_round(url, collection, args.queries)))
    medians = {c: statistics.median(r["median_ms"] for r in rs) for c, rs in rounds.items()}
    p99s = {c: statistics.median(r["p99_ms"] for r in rs) for c, rs in rounds.items()}
    rows = [[c, args.queries, args.rounds, medians[c], p99s[c]] for c in ("js", "python")]
    print(format_table(["client", "queries/round", "rounds", "median ms", "p99 ms"], rows))
    ratio = medians["js"] / medians["python"]
    print(f"JS / Python median round trip: {ratio:.2f}")
    if args.json:
        result: dict[str, Any] = {"queries": args.queries, "docs": args.docs, "rounds": rounds}
        result |= {"median_ms": medians, "p99_ms": p99s, "ratio_js_python_median": ratio}
        write_json(Path(args.json), result)


if __name__ == "__main__":
    main()
