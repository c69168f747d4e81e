"""Restart to ready: from a snapshot (after SIGTERM; after SIGKILL with a log tail) vs a rebuild.

    python -m load.restart [--docs 100000] [--dim 384] [--tail 5000] [--json results/restart.json]

One data dir, one collection of random unit vectors, four restarts of a real `shoal serve`:
1. load the documents, SIGTERM (the shutdown writes a snapshot): shutdown time;
2. start -> /readyz 200 (loaded from the snapshot);
3. `--tail` more writes (none snapshotted: the schedule is off), SIGKILL, start -> ready
   (snapshot + log replay);
4. SIGTERM, start with SHOAL_SNAPSHOTS=off -> ready (the full rebuild from PostgreSQL).
"Ready" is /readyz answering 200, timed from process start. Each start checks the document
count and the loads counter on /metrics, so a figure never comes from a wrong start.
"""

from __future__ import annotations

import argparse
import asyncio
import re
import shutil
import signal
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import numpy as np

from load.common import RESULTS_DIR, format_table, write_json
from load.server import ServerProcess, temp_data_dir
from shoal_client import ShoalClient

COLLECTION = "restart"
# No snapshot by time or count during the run: only clean shutdowns write one.
SCHEDULE_OFF = {
    "SHOAL_SNAPSHOT_INTERVAL_S": "86400",
    "SHOAL_SNAPSHOT_EVERY_CHANGES": "1000000000",
    "SHOAL_WRITE_DEADLINE_S": "120",  # a loaded machine must not fail the bulk load
}


def _unit(rng: np.random.Generator, n: int, dim: int) -> np.ndarray:
    v = rng.standard_normal((n, dim)).astype(np.float32)
    unit: np.ndarray = v / np.linalg.norm(v, axis=1, keepdims=True)
    return unit


def _ready_after_start(proc: ServerProcess, timeout: float = 300.0) -> float:
    """Start `proc`; seconds from process start until /readyz answers 200."""
    t0 = time.monotonic()
    url = proc.start(timeout)
    while time.monotonic() - t0 < timeout:
        try:
            with urllib.request.urlopen(url + "/readyz", timeout=5) as resp:
                if resp.status == 200:
                    return time.monotonic() - t0
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.02)
    raise RuntimeError("server never became ready")


def _loads(url: str) -> dict[str, float]:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    return {m[0]: float(m[1]) for m in re.findall(r'^shoal_snapshot_loads_total\{result="(\w+)"\} (\S+)$', text, re.M)}


async def _write(url: str, ids: range, vectors: np.ndarray, create: bool, dim: int) -> int:
    async with ShoalClient.connect(url) as c:
        if create:
            await c.create_collection(COLLECTION, dim=dim, metric="cosine")
        batch = 1_000
        for start in range(0, len(ids), batch):
            part = ids[start : start + batch]
            docs = [{"id": f"d{i}", "vector": vectors[start + j]} for j, i in enumerate(part)]
            await c.upsert(COLLECTION, docs)
        return await c.count(COLLECTION)


async def _count(url: str) -> int:
    async with ShoalClient.connect(url) as c:
        return await c.count(COLLECTION)


def _stop(proc: ServerProcess) -> float:
    t0 = time.monotonic()
    code = proc.stop(signal.SIGTERM, timeout=120)
    if code not in (0, -signal.SIGTERM):
        raise RuntimeError(f"server exited with {code}:\n{proc.log_tail()}")
    return time.monotonic() - t0


def run(docs: int, dim: int, tail: int, rebuild: bool = True) -> dict[str, Any]:
    rng = np.random.default_rng(42)
    data_dir = temp_data_dir("shoal-restart-")
    results: dict[str, Any] = {"docs": docs, "dim": dim, "tail": tail}
    try:
        proc = ServerProcess(data_dir, SCHEDULE_OFF)
        url = proc.start()
        t0 = time.monotonic()
        n = asyncio.run(_write(url, range(docs), _unit(rng, docs, dim), True, dim))
        results["load_s"] = time.monotonic() - t0
        assert n == docs, n
        results["shutdown_after_load_s"] = _stop(proc)  # includes writing the snapshot

        proc = ServerProcess(data_dir, SCHEDULE_OFF)
        results["ready_after_sigterm_s"] = _ready_after_start(proc)
        assert _loads(proc.url).get("loaded") == 1, proc.log_tail()
        assert asyncio.run(_count(proc.url)) == docs

        # Half new ids, half replaced ones: the log tail the next start replays.
        ids = range(docs - tail // 2, docs - tail // 2 + tail)
        n = asyncio.run(_write(proc.url, ids, _unit(rng, tail, dim), False, dim))
        proc.kill()
        proc = ServerProcess(data_dir, SCHEDULE_OFF)
        results["ready_after_sigkill_s"] = _ready_after_start(proc)
        assert _loads(proc.url).get("loaded") == 1, proc.log_tail()
        assert asyncio.run(_count(proc.url)) == n
        results["shutdown_after_tail_s"] = _stop(proc)

        results["ready_rebuild_s"] = float("nan")
        if rebuild:
            proc = ServerProcess(data_dir, {**SCHEDULE_OFF, "SHOAL_SNAPSHOTS": "off"})
            results["ready_rebuild_s"] = _ready_after_start(proc)
            assert asyncio.run(_count(proc.url)) == n
            _stop(proc)
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    results["sigterm_vs_rebuild"] = results["ready_after_sigterm_s"] / results["ready_rebuild_s"]
    results["sigkill_vs_rebuild"] = results["ready_after_sigkill_s"] / results["ready_rebuild_s"]
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=384)
    parser.add_argument("--tail", type=int, default=5_000, help="writes after the last snapshot, before SIGKILL")
    parser.add_argument("--json", type=Path, default=RESULTS_DIR / "restart.json")
    parser.add_argument("--no-rebuild", action="store_true", help="skip the full-rebuild start")
    args = parser.parse_args()
    results = run(args.docs, args.dim, args.tail, rebuild=not args.no_rebuild)
    rows = [
        ["ready after SIGTERM (snapshot)", results["ready_after_sigterm_s"], results["sigterm_vs_rebuild"]],
        [
            f"ready after SIGKILL (snapshot + {args.tail} log rows)",
            results["ready_after_sigkill_s"],
            results["sigkill_vs_rebuild"],
        ],
        ["ready, full rebuild (snapshots off)", results["ready_rebuild_s"], 1.0],
        ["shutdown writing the snapshot", results["shutdown_after_load_s"], None],
    ]
    print(f"{args.docs:,} vectors of {args.dim} dimensions (loaded in {results['load_s']:.1f} s)")
    print(format_table(["restart", "seconds", "vs rebuild"], rows))
    print(f"JSON: {write_json(args.json, results)}", file=sys.stderr)


if __name__ == "__main__":
    main()
