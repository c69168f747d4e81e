"""`shoal import` against the Python client's own pipelined upsert, on the same server in one run.

    python -m load.import_bench [--docs 100000] [--dim 64] [--batch 1000] [--in-flight 4]

Writes `--docs` documents with random float32 vectors (and a little metadata) to a JSONL file,
imports it with `shoal import` (a subprocess, as a user runs it), then upserts the same documents
with `ShoalClient.upsert` from memory, `--in-flight` batches awaiting acks at once, into a second
collection. Prints docs/s of both and their ratio; `--json PATH` writes them.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from load.common import add_target_args, format_table, target, unique_name, write_json
from load.server import ROOT
from server.transfer import Window, upsert_with_retries
from shoal_client import ShoalClient


def make_docs(n: int, dim: int, seed: int = 5) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    return [{"id": f"doc-{i:07d}", "vector": vectors[i], "metadata": {"i": i, "group": f"g{i % 17}"}} for i in range(n)]


def write_jsonl(path: Path, docs: list[dict[str, Any]]) -> None:
    with path.open("w", encoding="utf-8") as out:
        for doc in docs:
            out.write(json.dumps({**doc, "vector": doc["vector"].tolist()}, separators=(",", ":")) + "\n")


def run_import(url: str, path: Path, collection: str, batch: int, in_flight: int) -> tuple[float, float]:
    """Wall seconds of `shoal import` (process start-up included) and the seconds its summary
    line reports (connected to finished)."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "clients" / "python"), str(ROOT)])}
    command = [sys.executable, "-m", "server.cli", "import", str(path), "--collection", collection, "--url", url]
    command += ["--batch", str(batch), "--in-flight", str(in_flight), "--no-progress"]
    started = time.perf_counter()
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, check=False)
    seconds = time.perf_counter() - started
    if done.returncode != 0:
        raise SystemExit(f"shoal import failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    reported = re.search(r" in ([0-9.]+) s ", done.stderr)
    return seconds, float(reported.group(1)) if reported else seconds


async def client_upsert(url: str, docs: list[dict[str, Any]], collection: str, batch: int, in_flight: int) -> float:
    async with ShoalClient.connect(url) as client:
        await client.create_collection(collection, dim=int(docs[0]["vector"].shape[0]))
        slots = Window(in_flight)  # the same back-off as import
        started = time.perf_counter()

        async def send(part: list[dict[str, Any]]) -> None:
            try:
                await upsert_with_retries(client, collection, part, slots)
            finally:
                await slots.release()

        async with asyncio.TaskGroup() as tasks:
            for i in range(0, len(docs), batch):
                await slots.acquire()
                tasks.create_task(send(docs[i : i + batch]))
        seconds = time.perf_counter() - started
        assert await client.count(collection) == len(docs)
        return seconds


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--docs", type=int, default=100_000)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--batch", type=int, default=1_000)
    parser.add_argument("--in-flight", type=int, default=4)
    parser.add_argument(
        "--write-deadline",
        type=float,
        default=60.0,
        help="SHOAL_WRITE_DEADLINE_S of the local server (a throughput run on a busy machine)",
    )
    add_target_args(parser)
    args = parser.parse_args()
    docs = make_docs(args.docs, args.dim)
    with (
        tempfile.TemporaryDirectory(prefix="shoal-import-") as tmp,
        target(args.url, quiet=args.quiet, env={"SHOAL_WRITE_DEADLINE_S": str(args.write_deadline)}) as server,
    ):
        path = Path(tmp) / "docs.jsonl"
        write_jsonl(path, docs)
        size_mb = path.stat().st_size / 2**20
        imported, inside = run_import(server.url, path, unique_name("imp"), args.batch, args.in_flight)
        upserted = asyncio.run(client_upsert(server.url, docs, unique_name("ups"), args.batch, args.in_flight))
    inside = max(inside, 1e-3)  # the summary rounds its seconds: a tiny smoke run can print 0.0
    rows = [
        ["shoal import, wall (with start-up)", args.docs, round(imported, 2), round(args.docs / imported)],
        ["shoal import, its summary", args.docs, round(inside, 2), round(args.docs / inside)],
        ["client pipelined upsert (memory -> server)", args.docs, round(upserted, 2), round(args.docs / upserted)],
    ]
    print(format_table(["path", "docs", "seconds", "docs/s"], rows))
    ratio = upserted / imported
    print(f"import / client throughput: {ratio:.2f} (file {size_mb:.0f} MiB, dim {args.dim})")
    if args.json:
        result = {"docs": args.docs, "dim": args.dim, "import_s": imported, "import_summary_s": inside}
        result |= {"upsert_s": upserted, "ratio": ratio}
        write_json(args.json, result)


if __name__ == "__main__":
    main()
