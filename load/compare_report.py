"""The figures `load.compare` prints and saves: ratios Shoal / system, the targets, the tables.

Two kinds of ratio. Wall-clock ones (docs/s, QPS, p99) are what a user sees on this machine at
this moment; on a shared machine they move with whatever else is running. CPU ones divide the CPU
time each system (server + client) spent per document or per query: what each would do with the
same cores to itself, much steadier under a noisy neighbour. Both are reported; the targets are
judged on the wall-clock ones, as stated.
"""

from __future__ import annotations

from typing import Any

from load.common import format_table
from load.compare_common import RECALL_TARGETS, Ingest, Point, SystemResult

# Targets from the issue, reported against (never met by weakening an anchor).
TARGETS = (
    ("query QPS at recall >= 0.95, Shoal / Chroma", "chroma", "qps@0.95", 5.0),
    ("query QPS at recall >= 0.95, Shoal / pgvector", "pgvector", "qps@0.95", 3.0),
    ("durable ingest docs/s with vectors, Shoal / Chroma", "chroma", "ingest", 3.0),
)

Ratios = dict[str, dict[str, float | None]]


def cpu_ms_per_query(p: Point | None) -> float | None:
    """Server + client CPU per query (client alone for in-process systems)."""
    if p is None or p.client_cpu_ms_per_query is None:
        return None
    return p.client_cpu_ms_per_query + (p.server_cpu_ms_per_query or 0.0)


def cpu_ms_per_doc(i: Ingest | None) -> float | None:
    if i is None or i.client_cpu is None or not i.docs:
        return None
    return (i.client_cpu + (i.server_cpu or 0.0)) * 1000.0 / i.docs


def _ratio(a: float | None, b: float | None) -> float | None:
    return round(a / b, 2) if a is not None and b else None


def ratios(systems: dict[str, SystemResult]) -> Ratios:
    """Shoal / system: `ingest`, `qps@T` and `p99@T` on the wall clock; `ingest_cpu` and `qps_cpu@T`
    as the inverse ratio of CPU per document / per query (above 1: Shoal needs less)."""
    shoal = systems.get("shoal")
    if shoal is None:
        return {}
    out: Ratios = {}
    for key, other in systems.items():
        if key == "shoal":
            continue
        row: dict[str, float | None] = {
            "ingest": _ratio(
                shoal.ingest.docs_per_s if shoal.ingest else None, other.ingest.docs_per_s if other.ingest else None
            ),
            "ingest_cpu": _ratio(cpu_ms_per_doc(other.ingest), cpu_ms_per_doc(shoal.ingest)),
        }
        for t in RECALL_TARGETS:
            mine, theirs = shoal.at_recall(t), other.at_recall(t)
            row[f"qps@{t:.2f}"] = _ratio(mine.qps if mine else None, theirs.qps if theirs else None)
            row[f"p99@{t:.2f}"] = _ratio(mine.p99_ms if mine else None, theirs.p99_ms if theirs else None)
            row[f"qps_cpu@{t:.2f}"] = _ratio(cpu_ms_per_query(theirs), cpu_ms_per_query(mine))
        out[key] = row
    return out


def targets(table: Ratios) -> list[dict[str, Any]]:
    out = []
    for name, system, metric, goal in TARGETS:
        value = table.get(system, {}).get(metric)
        cpu_metric = "ingest_cpu" if metric == "ingest" else metric.replace("qps@", "qps_cpu@")
        out.append(
            {
                "target": name,
                "goal": goal,
                "value": value,
                "met": None if value is None else value >= goal,
                "cpu_ratio": table.get(system, {}).get(cpu_metric),
            }
        )
    return out


def _fmt(value: float | None, digits: int = 0) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def _x(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}x"


def _name(r: SystemResult) -> str:
    return r.label if r.status == "ok" else f"{r.label} [FAILED]"


def sweep_table(systems: dict[str, SystemResult]) -> str:
    headers = ["system", "ef", "recall@10", "QPS", "p50 ms", "p99 ms", "server CPU ms/q", "client CPU ms/q"]
    headers += ["others' cores", "queries"]
    rows = [
        [
            key,
            "exact" if p.ef is None else p.ef,
            f"{p.recall:.4f}",
            _fmt(p.qps),
            _fmt(p.p50_ms, 2),
            _fmt(p.p99_ms, 2),
            _fmt(p.server_cpu_ms_per_query, 3),
            _fmt(p.client_cpu_ms_per_query, 3),
            _fmt(p.other_cores, 2),
            p.queries,
        ]
        for key, r in systems.items()
        for p in r.sweep
    ]
    return format_table(headers, rows)


def _not_reached(r: SystemResult) -> str:
    best = max((q.recall for q in r.sweep), default=None)
    return "-" if best is None else f"not reached (max {best:.3f})"


def summary(systems: dict[str, SystemResult], table: Ratios) -> tuple[list[str], list[list[str]]]:
    """Wall clock: ingest docs/s, then QPS (ef) / p99 / Shoal ratio at each recall target."""
    headers = ["system", "ingest docs/s", "Shoal/x"]
    for t in RECALL_TARGETS:
        headers += [f"QPS @R>={t:.2f}", "p99 ms", "Shoal/x"]
    rows = []
    for key, r in systems.items():
        mine = table.get(key, {})
        ingest = "-" if r.ingest is None else _fmt(r.ingest.docs_per_s) + ("" if r.ingest.durable else " (mem)")
        row = [_name(r), ingest, _x(mine.get("ingest"))]
        for t in RECALL_TARGETS:
            p = r.at_recall(t)
            if p is None:
                row += [_not_reached(r), "-", "-"]
                continue
            where = "exact" if p.ef is None else f"ef={p.ef}"
            row += [f"{_fmt(p.qps)} ({where})", _fmt(p.p99_ms, 1), _x(mine.get(f"qps@{t:.2f}"))]
        rows.append(row)
    return headers, rows


def efficiency(systems: dict[str, SystemResult], table: Ratios) -> tuple[list[str], list[list[str]]]:
    """CPU: ms per ingested document and per query (server + client) with the Shoal ratio, and the
    cores other processes kept busy meanwhile (the noise the wall-clock figures carry)."""
    headers = ["system", "ingest CPU ms/doc", "Shoal/x"]
    for t in RECALL_TARGETS:
        headers += [f"CPU ms/q @R>={t:.2f}", "Shoal/x"]
    headers += ["others' cores"]
    rows = []
    for key, r in systems.items():
        mine = table.get(key, {})
        row = [_name(r), _fmt(cpu_ms_per_doc(r.ingest), 3), _x(mine.get("ingest_cpu"))]
        for t in RECALL_TARGETS:
            p = r.at_recall(t)
            row += [_fmt(cpu_ms_per_query(p), 3), _x(mine.get(f"qps_cpu@{t:.2f}"))] if p else [_not_reached(r), "-"]
        others = [p.other_cores for p in r.sweep if p.other_cores is not None]
        row.append(_fmt(sum(others) / len(others), 2) if others else "-")
        rows.append(row)
    return headers, rows


def markdown(headers: list[str], rows: list[list[str]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def target_lines(results: dict[str, Any]) -> list[str]:
    out = []
    for t in results["targets"]:
        verdict = {True: "met", False: "NOT met", None: "not measured"}[t["met"]]
        out.append(
            f"target: {t['target']} >= {t['goal']:.0f}x: {_x(t['value'])} ({verdict}; "
            f"by CPU per unit of work: {_x(t['cpu_ratio'])})"
        )
    for key, system in results["systems"].items():
        if system["status"] != "ok":
            out.append(f"{key}: FAILED: {system['error']}")
    return out
