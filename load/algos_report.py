"""Comparison, summary table and plot of `load.algos`.

- `qps_at_recall`: an anchor's QPS at a given recall@10, interpolated (log QPS, linear in recall)
  on the anchor's Pareto frontier (the fastest setting reaching at least that recall).
- `compare`: fills each Shoal point with the anchor's QPS at the recall it reached, and the ratios
  (against the anchor called with `clients` queries at a time, and with the whole query set).
- `summary_rows` / `report`: the printed table (one row per Shoal point, then the anchors).
- `plot`: recall@10 against QPS (log x), one panel per kind, Shoal solid and its anchor dashed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from load.common import format_table

SHOAL_HEADERS = [
    "kind",
    "params",
    "recall@10",
    "QPS",
    "anchor QPS",
    "ratio",
    "anchor QPS, whole set",
    "ratio, whole set",
    "batch QPS",
    "batch / whole set",
    "CPU ratio",
    "build s",
    "inserts/s",
    "B/vector",
    "RSS B/vector",
]
ROUND_HEADERS = [
    "kind",
    "recall@10",
    "rounds",
    "QPS",
    "anchor QPS",
    "ratio (min-max)",
    "batch QPS",
    "anchor QPS, whole set",
    "batch / whole set (min-max)",
]
ANCHOR_HEADERS = [
    "anchor",
    "library",
    "params",
    "recall@10",
    "QPS",
    "QPS, whole set",
    "build s",
    "inserts/s",
    "B/vector",
]


def frontier(points: Sequence[tuple[float, float]]) -> list[tuple[float, float]]:
    """(recall, qps) points that no other point beats on both, by increasing recall (so
    decreasing QPS)."""
    best: list[tuple[float, float]] = []
    for recall, qps in sorted(points, key=lambda p: (-p[0], -p[1])):
        if qps > 0 and (not best or qps > best[-1][1]):
            best.append((recall, qps))
    return best[::-1]


def qps_at_recall(points: Sequence[tuple[float, float]], recall: float) -> tuple[float | None, str]:
    """The anchor's QPS at `recall`, and how it was found: `interpolated` (between two settings,
    or at one), `above` (even the anchor's fastest setting reaches more recall: its QPS at
    `recall` is at least this, so a ratio against it is an upper bound), or `unreached` (no
    setting of the anchor reaches `recall`: None)."""
    front = frontier(points)
    if not front:
        return None, "unreached"
    if recall <= front[0][0]:
        return front[0][1], "interpolated" if math.isclose(recall, front[0][0], abs_tol=1e-9) else "above"
    for (r0, q0), (r1, q1) in itertools.pairwise(front):
        if r0 <= recall <= r1:
            share = 0.0 if r1 == r0 else (recall - r0) / (r1 - r0)
            return math.exp(math.log(q0) + share * (math.log(q1) - math.log(q0))), "interpolated"
    if math.isclose(recall, front[-1][0], abs_tol=1e-9):
        return front[-1][1], "interpolated"
    return None, "unreached"


def anchor_curve(
    anchor: dict[str, Any] | None, *, per_cpu: bool = False, calls: str = "clients"
) -> list[tuple[float, float]]:
    """The anchor's (recall, QPS) points, or (recall, queries per CPU-second) with `per_cpu`;
    `calls`: "clients" (`clients` queries per call) or "whole" (the whole set per call)."""
    if not anchor:
        return []
    suffix = "_clients" if calls == "clients" else ""
    out = []
    for p in anchor.get("points", []):
        cpu, qps = p.get("cpu_us_per_query" + suffix), p.get("qps" + suffix)
        if per_cpu and cpu:
            out.append((float(p["recall"]), 1e6 / float(cpu)))
        elif not per_cpu and qps:
            out.append((float(p["recall"]), float(qps)))
    return out


def compare(variant: dict[str, Any], anchor: dict[str, Any] | None) -> None:
    """Add to every measured point of `variant`, at equal recall: `anchor_qps`, `anchor_match` and
    `ratio` (Shoal QPS / the QPS of the anchor called with `clients` queries at a time, the most
    the clients ever have in flight), `anchor_qps_whole` and `ratio_whole` (the same against the
    whole query set per call: the library's ceiling here); and `anchor_cpu_us_per_query` and
    `cpu_ratio` (the anchor's CPU per query, `clients` per call, over the server's: queries per
    CPU-second, Shoal over the anchor), which a busy neighbour on a shared machine moves much less
    than QPS; and to a point timed with `query_batch` requests, `batch.ratio_whole` (its QPS over
    the whole-set anchor's: both hand the library many queries at a time)."""
    curve, cpu_curve = anchor_curve(anchor), anchor_curve(anchor, per_cpu=True)
    whole = anchor_curve(anchor, calls="whole")
    for point in variant.get("points", []):
        if point.get("recall") is None or not point.get("qps"):
            continue
        recall = float(point["recall"])
        qps, how = qps_at_recall(curve, recall)
        point["anchor_qps"] = None if qps is None else round(qps, 1)
        point["anchor_match"] = how
        point["ratio"] = None if qps is None else round(float(point["qps"]) / qps, 4)
        ceiling, _ = qps_at_recall(whole, recall)
        point["anchor_qps_whole"] = None if ceiling is None else round(ceiling, 1)
        point["ratio_whole"] = None if ceiling is None else round(float(point["qps"]) / ceiling, 4)
        batch = point.get("batch")
        if batch is not None and batch.get("qps"):
            # A batch is as many queries at a time as a library call of the whole set can be.
            batch["ratio_whole"] = None if ceiling is None else round(float(batch["qps"]) / ceiling, 4)
        per_cpu, _ = qps_at_recall(cpu_curve, recall)
        server_us = point.get("server_cpu_us_per_query")
        point["anchor_cpu_us_per_query"] = None if per_cpu is None else round(1e6 / per_cpu, 1)
        point["cpu_ratio"] = None if per_cpu is None or not server_us else round(1e6 / per_cpu / server_us, 4)


def _params(point: dict[str, Any], variant: dict[str, Any]) -> str:
    param = variant.get("param")
    index = variant.get("index") or {}
    fixed = ", ".join(f"{k}={v}" for k, v in index.items() if k not in ("kind", "quantization"))
    if param is None:
        swept = ""
    elif point.get(param) is None:
        default = (variant.get("default_query") or {}).get(param)
        swept = f"{param}=default" + (f" ({default})" if default is not None else "")
    else:
        swept = f"{param}={point[param]}"
    return ", ".join(p for p in (fixed, swept) if p) or "-"


def _ratio(point: dict[str, Any], key: str = "ratio") -> str:
    ratio = point.get(key)
    if ratio is None:
        return "unreached" if point.get("anchor_match") == "unreached" else "-"
    return f"{'<=' if point.get('anchor_match') == 'above' else ''}{ratio:.3f}"


def summary_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per Shoal point (the build columns on each variant's first row); refused kinds get
    one row saying so."""
    rows: list[list[Any]] = []
    for v in result["shoal"]:
        if v["status"] != "ok":
            rows.append([v["label"], f"{v['status']}: {v.get('reason', '')}"[:70], *["-"] * 13])
            continue
        build = v["build"]
        first = True
        for point in v["points"]:
            if point.get("status", "ok") != "ok":
                rows.append([v["label"], f"{_params(point, v)}: {point['status']}", *["-"] * 13])
                continue
            rows.append(
                [
                    v["label"],
                    _params(point, v),
                    point["recall"],
                    point["qps"],
                    point.get("anchor_qps"),
                    _ratio(point),
                    point.get("anchor_qps_whole"),
                    _ratio(point, "ratio_whole"),
                    (point.get("batch") or {}).get("qps"),
                    _ratio({**point, **(point.get("batch") or {})}, "ratio_whole") if point.get("batch") else "-",
                    _ratio(point, "cpu_ratio"),
                    build["build_s"] if first else "",
                    build["inserts_per_s"] if first else "",
                    v["memory"].get("bytes_per_vector") if first else "",
                    v["memory"].get("rss_bytes_per_vector") if first else "",
                ]
            )
            first = False
    return rows


def _spread_cell(spread: dict[str, float] | None, match: str) -> str:
    if not spread:
        return "-"
    bound = "<=" if match == "above" else ""
    return f"{bound}{spread['median']:.3f} ({spread['min']:.3f}-{spread['max']:.3f})"


def round_rows(result: dict[str, Any]) -> list[list[Any]]:
    """One row per variant timed in rounds against its anchor: medians of the rounds."""
    rows: list[list[Any]] = []
    for line in result.get("summary", []):
        r = line.get("rounds")
        if not r:
            continue
        match = r["anchor_match"]
        rows.append(
            [
                line["label"],
                line["default_recall"],
                r["rounds"],
                r["qps"],
                r["anchor_qps"],
                _spread_cell(r["ratio"], match),
                r["batch_qps"] if r["batch_qps"] is not None else "-",
                r["anchor_qps_whole"],
                _spread_cell(r["batch_ratio_whole"], match),
            ]
        )
    return rows


def anchor_rows(result: dict[str, Any]) -> list[list[Any]]:
    rows: list[list[Any]] = []
    for family, a in result["anchors"].items():
        first = True
        fixed = ", ".join(f"{k}={v}" for k, v in a["params"].items())
        builds = {b["nbits"]: b for b in a.get("builds", [])}  # lsh: one build per nbits
        for point in a["points"]:
            param = a.get("param")
            swept = "" if param is None else f"{param}={point[param]}"
            build = builds.get(point.get("nbits"))
            if build is not None:
                rows.append(
                    [
                        family if first else "",
                        a["library"] if first else "",
                        ", ".join(p for p in (fixed, swept) if p),
                        point["recall"],
                        point.get("qps_clients"),
                        point["qps"],
                        build["build_s"],
                        build["inserts_per_s"],
                        build["bytes_per_vector"],
                    ]
                )
                first = False
                continue
            rows.append(
                [
                    family if first else "",
                    a["library"] if first else "",
                    ", ".join(p for p in (fixed, swept) if p) or "-",
                    point["recall"],
                    point.get("qps_clients"),
                    point["qps"],
                    a["build_s"] if first else "",
                    a["inserts_per_s"] if first else "",
                    a["bytes_per_vector"] if first else "",
                ]
            )
            first = False
    return rows


def report(result: dict[str, Any]) -> str:
    c = result["corpus"]
    lines = [
        f"index kinds: {c['docs']} vectors ({c['source']}, dim {c['dim']}), {c['queries']} queries, "
        f"recall@10 against the exact top-10; {result['fairness']}",
        format_table(SHOAL_HEADERS, summary_rows(result)),
        "",
        "anchors, in-process:",
        format_table(ANCHOR_HEADERS, anchor_rows(result)),
        "",
        "ratio: Shoal QPS / the anchor's QPS interpolated at the recall Shoal reached ('<=': the anchor's "
        "fastest setting already has more recall), the anchor called with as many queries at a time as "
        "the clients have in flight; whole set: the anchor called with every query at once. batch QPS: "
        "the same queries in query_batch requests (one in flight per client); batch / whole set: its "
        "ratio to the whole-set anchor at the same recall. CPU ratio: "
        "the same with queries per CPU-second (the "
        "server's CPU, the anchor's). B/vector: the server's index and vector gauges (/metrics) per "
        "vector; RSS B/vector: growth of the server's resident memory per vector.",
    ]
    rounds = round_rows(result)
    if rounds:
        lines += [
            "",
            "default parameters, timed against the anchor in interleaved rounds (medians; each round: "
            "Shoal one query per request, the anchor at the settings bracketing Shoal's recall in calls "
            "of as many queries as the clients have in flight and with the whole set, Shoal query_batch):",
            format_table(ROUND_HEADERS, rounds),
        ]
    plans = [f"{v['label']} {v['plans']}" for v in result["shoal"] if v.get("plans")]
    if plans:
        lines.append("Shoal's searches by plan over each sweep: " + "; ".join(plans))
    return "\n".join(lines)


def _curve(points: Sequence[dict[str, Any]], key: str = "qps") -> tuple[list[float], list[float]]:
    measured = [p for p in points if p.get("recall") is not None and p.get(key)]
    # In recall order, as a sweep trades one for the other: QPS measured on a shared machine is
    # not monotone, and a line in QPS order zig-zags.
    measured.sort(key=lambda p: (float(p["recall"]), -float(p[key])))
    return [float(p[key]) for p in measured], [float(p["recall"]) for p in measured]


def plot(result: dict[str, Any], path: Path) -> Path:
    """recall@10 against QPS (log x), one panel per kind: Shoal solid (one query per request) and
    dash-dotted (query_batch requests), its anchor dashed (called with the clients' queries at a
    time) and dotted (the whole set per call)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

    families = list(dict.fromkeys([v["family"] for v in result["shoal"]] + list(result["anchors"])))
    cols = min(4, max(1, len(families)))
    rows = math.ceil(len(families) / cols)
    fig, axes = plt.subplots(rows, cols, figsize=(4.2 * cols, 3.4 * rows), squeeze=False)
    for ax, family in zip(axes.flat, families, strict=False):
        variants = [v for v in result["shoal"] if v["family"] == family]
        shoal_points = [p for v in variants if v["status"] == "ok" for p in v["points"]]
        if family == "lsh":  # one collection per nbits: the curve runs across them
            shoal_points = [p for p in shoal_points if p.get("recall") is not None]
        x, y = _curve(shoal_points)
        if x:
            ax.plot(x, y, "o-", color="tab:blue", label="Shoal")
        batched = [{**p["batch"], "recall": p["recall"]} for p in shoal_points if p.get("batch")]
        bx, by = _curve(batched)
        if bx:
            size = batched[0].get("queries_per_request")
            ax.plot(bx, by, "D-.", color="tab:green", label=f"Shoal, query_batch of {size}")
        anchor = result["anchors"].get(family)
        ax_y: list[float] = []
        if anchor:
            ax_x, ax_y = _curve(anchor["points"], "qps_clients")
            ax.plot(ax_x, ax_y, "s--", color="tab:orange", label=f"{anchor['library']}, {result['clients']} per call")
            whole_x, whole_y = _curve(anchor["points"])
            ax.plot(whole_x, whole_y, "^:", color="tab:gray", label=f"{anchor['library']}, whole set per call")
            ax_y = ax_y + whole_y
        refused = any(v["status"] != "ok" for v in variants)
        ax.set_title(family + (" (Shoal: refused)" if refused and not x else ""), fontsize=10)
        ax.set_xscale("log")
        # Ticks at 1, 2 and 5 per decade, labelled in full: a panel may span less than a decade.
        ax.xaxis.set_major_locator(LogLocator(subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda value, _pos: f"{value:,.0f}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
        ax.set_xlabel("QPS (log)")
        ax.set_ylabel("recall@10")
        recalls = y + ax_y
        ax.set_ylim(max(0.0, min(recalls, default=0.0) - 0.05), 1.01)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7, loc="lower left")
    for ax in list(axes.flat)[len(families) :]:
        ax.set_visible(False)
    c = result["corpus"]
    fig.suptitle(f"recall@10 vs QPS: {c['docs']} x {c['dim']}-d ({c['source']}), {c['queries']} queries", fontsize=11)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path.resolve()
