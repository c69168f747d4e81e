"""Shoal against the systems its users would otherwise pick: one corpus, one query set, one run.

    python -m load.compare [--size 20000] [--queries 1000] [--clients 8] [--seconds 3]
                           [--only shoal,chroma,pgvector,hnswlib,numpy] [--efs 10,16,...,256]
                           [--json results/compare.json] [--plot results/compare.png]
                           [--shoal-url URL] [--markdown PATH]

The corpus is `load.corpus`: real passages found on this machine, embedded by Shoal's model, with
exact top-100 ground truth. Every system gets the same vectors (and texts, where it stores them),
the same HNSW parameters (M=16, ef_construction=200, cosine) and the same ef sweep:

- shoal:    a `shoal serve` subprocess (or `--shoal-url`), WebSocket, `--clients` connections
            (`load.compare_shoal`);
- chroma:   Chroma as a server in its own virtualenv, driven by its HttpClient from there with
            `--clients` threads (`load.compare_chroma`);
- pgvector: an HNSW index in the embedded PostgreSQL, asyncpg, `--clients` connections
            (`load.compare_pg`);
- hnswlib:  the index Shoal uses, in-process: whole-set batch calls on every core (the limit) and
            one query per call (`load.compare_local`);
- numpy:    exact search by one matmul (recall 1 by definition).

Reported per system: ingest rate (batches of 500, durable where the system commits), and at
recall@10 >= 0.90 / 0.95 / 0.99 the QPS and p99 of the lowest ef that gets there, each with the
ratio Shoal / system. Systems run one after the other, each stopped before the next starts. A
system that fails is reported as failed with its reason; the others still run. The plot (recall
against QPS, log scale) is drawn by matplotlib in a side virtualenv.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

from load.common import format_table, log, machine_info, write_json
from load.compare_common import DEFAULT_EFS, HNSW_EF_CONSTRUCTION, HNSW_M, RECALL_TARGETS, K, SystemResult
from load.compare_report import efficiency, markdown, ratios, summary, sweep_table, target_lines, targets
from load.corpus import Corpus, load_corpus

SYSTEMS = ("shoal", "chroma", "pgvector", "hnswlib", "numpy")
# Run order: the in-process anchors first (cheap), Chroma last (slowest, may need an install).
ORDER = ("numpy", "hnswlib", "shoal", "pgvector", "chroma")
LABELS = {
    "shoal": "Shoal (WebSocket, {clients} clients)",
    "chroma": "Chroma server (HttpClient, {clients} threads)",
    "pgvector": "pgvector HNSW (asyncpg, {clients} conns)",
    "hnswlib": "hnswlib in-process (batch, {threads} threads)",
    "hnswlib_single": "hnswlib in-process (1 query/call)",
    "numpy": "numpy exact (batch matmul)",
}


def _machine() -> dict[str, Any]:
    info = machine_info()
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                info["mem_gib"] = round(int(line.split()[1]) / 1024**2, 1)
    except OSError:
        pass
    return info


def plot(results_json: Path, out: Path, spec: str) -> None:
    """Draw the PNG with matplotlib from its own side virtualenv. Raises on failure."""
    from load.compare_venv import ensure_venv, side_env

    python = ensure_venv("plot", [spec], ["matplotlib"])
    script = Path(__file__).with_name("compare_plot.py")
    done = subprocess.run(
        [str(python), str(script), str(results_json), str(out)],
        capture_output=True,
        text=True,
        timeout=300,
        env=side_env(),
        check=False,
    )
    if done.returncode != 0:
        raise RuntimeError(f"plot script exited {done.returncode}: {done.stderr.strip()[-800:]}")


def run_system(
    key: str, corpus: Corpus, args: argparse.Namespace, efs: list[int], systems: dict[str, SystemResult]
) -> None:
    """Run one system into `systems`; a failure is recorded there (with what was measured before
    it), never raised."""
    threads = os.cpu_count() or 1
    labels = {k: v.format(clients=args.clients, threads=threads) for k, v in LABELS.items()}
    results = [SystemResult(key, labels[key])]
    bounds = (args.seconds, args.max_seconds)
    run: Callable[[], None]
    if key == "shoal":
        from load.compare_shoal import run_shoal

        run = partial(run_shoal, results[0], corpus, efs, args.clients, *bounds, args.shoal_url)
    elif key == "pgvector":
        from load.compare_pg import run_pgvector

        run = partial(run_pgvector, results[0], corpus, efs, args.clients, *bounds)
    elif key == "chroma":
        from load.compare_chroma import run_chroma

        run = partial(run_chroma, results[0], corpus, efs, args.clients, *bounds, args.chroma_spec)
    elif key == "hnswlib":
        from load.compare_local import run_hnswlib

        results.append(SystemResult("hnswlib_single", labels["hnswlib_single"]))
        run = partial(run_hnswlib, results[0], results[1], corpus, efs, *bounds, threads)
    else:
        from load.compare_local import run_numpy

        run = partial(run_numpy, results[0], corpus, args.seconds)
    log(f"--- {key}")
    try:
        run()
    except Exception as exc:
        for r in results:
            r.status, r.error = "failed", f"{type(exc).__name__}: {exc}"
        log(f"{key} FAILED: {type(exc).__name__}: {exc}")
    for r in results:
        systems[r.key] = r


def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(prog="python -m load.compare", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20_000, help="corpus passages (default 20000)")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out queries (default 1000)")
    parser.add_argument("--clients", type=int, default=8, help="concurrent clients per server (default 8)")
    parser.add_argument("--seconds", type=float, default=3.0, help="minimum seconds per sweep point (default 3)")
    parser.add_argument(
        "--max-seconds", type=float, default=20.0, help="cap per sweep point (default 20; see the module doc)"
    )
    parser.add_argument("--efs", default=",".join(map(str, DEFAULT_EFS)), help="ef sweep (comma-separated)")
    parser.add_argument("--only", default=",".join(SYSTEMS), help=f"systems to run, of {','.join(SYSTEMS)}")
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results as JSON")
    parser.add_argument("--plot", type=Path, default=None, metavar="PATH", help="draw recall vs QPS to this PNG")
    parser.add_argument("--markdown", type=Path, default=None, metavar="PATH", help="write the summary as Markdown")
    parser.add_argument("--shoal-url", default=None, help="use this running Shoal (127.0.0.1) instead of starting one")
    parser.add_argument("--chroma-spec", default="chromadb", help="pip requirement for Chroma's venv")
    parser.add_argument("--plot-spec", default="matplotlib", help="pip requirement for the plot venv")
    args = parser.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = sorted(set(only) - set(SYSTEMS))
    if unknown:
        parser.error(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    efs = sorted({int(e) for e in args.efs.split(",")})
    if args.seconds <= 0 or args.max_seconds < args.seconds or args.clients < 1 or not efs or min(efs) < 1:
        parser.error("need --seconds > 0, --max-seconds >= --seconds, --clients >= 1 and efs >= 1")

    started = time.perf_counter()
    corpus = load_corpus(args.size, args.queries)
    log(f"corpus {corpus.path}: {len(corpus.ids)} passages, {len(corpus.query_texts)} queries")
    systems: dict[str, SystemResult] = {}
    for key in ORDER:
        if key in only:
            run_system(key, corpus, args, efs, systems)
    table = ratios(systems)
    results: dict[str, Any] = {
        "meta": {
            "date": dt.datetime.now(dt.UTC).strftime("%Y-%m-%d %H:%M UTC"),
            "command": "python -m load.compare " + " ".join(sys.argv[1:] if argv is None else argv),
            "machine": _machine(),
            "corpus": {
                "size": len(corpus.ids),
                "queries": len(corpus.query_texts),
                "dim": int(corpus.vectors.shape[1]),
                "path": str(corpus.path),
            },
            "k": K,
            "clients": args.clients,
            "seconds_per_point": args.seconds,
            "max_seconds_per_point": args.max_seconds,
            "efs": efs,
            "hnsw": {"M": HNSW_M, "ef_construction": HNSW_EF_CONSTRUCTION, "space": "cosine"},
            "seconds": round(time.perf_counter() - started, 1),
        },
        "recall_targets": list(RECALL_TARGETS),
        "systems": {key: r.to_json() for key, r in systems.items()},
        "ratios_shoal_over": table,
        "targets": targets(table),
    }
    print(sweep_table(systems))
    sections = [("Wall clock", *summary(systems, table)), ("CPU per unit of work", *efficiency(systems, table))]
    for title, headers, rows in sections:
        print(f"\n{title}:\n{format_table(headers, rows)}")
    print("\n" + "\n".join(target_lines(results)))
    if args.markdown is not None:
        args.markdown.parent.mkdir(parents=True, exist_ok=True)
        text = "\n\n".join(f"{title}:\n\n{markdown(headers, rows)}" for title, headers, rows in sections)
        args.markdown.write_text(text + "\n\n" + "\n".join(f"- {t}" for t in target_lines(results)) + "\n")
    if args.plot is not None:
        try:
            with tempfile.TemporaryDirectory() as tmp:
                data = Path(tmp, "compare.json")
                data.write_text(json.dumps(results), encoding="utf-8")
                plot(data, args.plot, args.plot_spec)
            results["plot"] = {"status": "ok", "path": str(args.plot)}
            print(f"plot: {args.plot}")
        except Exception as exc:
            results["plot"] = {"status": "failed", "error": f"{type(exc).__name__}: {exc}"}
            print(f"plot FAILED: {exc}")
    if args.json is not None:
        print(f"json: {write_json(args.json, results)}")
    return results


if __name__ == "__main__":
    main()
