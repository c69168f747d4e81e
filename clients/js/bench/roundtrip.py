"""Query round trip of the JavaScript client against the Python client, same server, same run.

Starts a `shoal serve` (embedded PostgreSQL), fills a collection with random vectors, then runs
N sequential `query` calls (a vector, k=10) with each client in turn and prints median and p99.
Usage (from the repository root, after scripts/setup and scripts/setup-js):
    PYTHONPATH=. .venv/bin/python clients/js/bench/roundtrip.py [N]
"""

from __future__ import annotations

import asyncio
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

from load.server import local_server
from shoal_client import ShoalClient

HERE = Path(__file__).resolve().parent
DIM, DOCS, COLLECTION = 384, 5000, "roundtrip"


async def fill(url: str) -> None:
    rng = np.random.default_rng(1)
    async with ShoalClient.connect(url) as db:
        await db.create_collection(COLLECTION, dim=DIM, if_not_exists=True)
        for start in range(0, DOCS, 1000):
            vectors = rng.standard_normal((1000, DIM)).astype(np.float32)
            await db.upsert(COLLECTION, [{"id": f"d{start + i}", "vector": v} for i, v in enumerate(vectors)])


async def python_roundtrips(url: str, n: int) -> dict[str, object]:
    rng = np.random.default_rng(2)
    vectors = rng.standard_normal((64, DIM)).astype(np.float32)
    times: list[float] = []
    async with ShoalClient.connect(url) as db:
        for i in range(100):  # warm-up
            await db.query(COLLECTION, vector=vectors[i % 64], k=10)
        for i in range(n):
            t0 = time.perf_counter()
            await db.query(COLLECTION, vector=vectors[i % 64], k=10)
            times.append((time.perf_counter() - t0) * 1000)
    times.sort()
    p99 = times[min(len(times) - 1, int(0.99 * len(times)))]
    return {"client": "python", "n": n, "median_ms": round(statistics.median(times), 3), "p99_ms": round(p99, 3)}


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 2000
    with local_server(quiet=True) as proc:
        asyncio.run(fill(proc.ws_url))
        js = subprocess.run(
            ["node", str(HERE / "roundtrip.mjs"), proc.ws_url, COLLECTION, str(DIM), str(n)],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=True,
        )
        print(js.stdout.strip())
        print(json.dumps(asyncio.run(python_roundtrips(proc.ws_url, n))))
        js = subprocess.run(
            ["node", str(HERE / "roundtrip.mjs"), proc.ws_url, COLLECTION, str(DIM), str(n)],
            cwd=HERE.parent,
            capture_output=True,
            text=True,
            check=True,
        )
        print(js.stdout.strip(), "(again)")


if __name__ == "__main__":
    main()
