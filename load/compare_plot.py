"""Recall against QPS for every system of a `load.compare` run, as a PNG.

    <plot venv>/bin/python load/compare_plot.py RESULTS.json OUT.png

Run by `load.compare` with the Python of a side virtualenv that has matplotlib (never a Shoal
dependency); imports only the standard library and matplotlib. One curve per system (its ef
sweep), exact search as a single point, dotted verticals at the recall targets.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from typing import Any

matplotlib: Any = importlib.import_module("matplotlib")
matplotlib.use("Agg")
plt: Any = importlib.import_module("matplotlib.pyplot")


def plot(results: dict[str, Any], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(9, 6), dpi=120)
    for key, system in results["systems"].items():
        points = [p for p in system["sweep"] if p["qps"] > 0]
        if not points:
            continue
        points.sort(key=lambda p: p["ef"] or 0)
        xs, ys = [p["recall"] for p in points], [p["qps"] for p in points]
        style = {"linewidth": 2.5, "zorder": 5} if key == "shoal" else {"linewidth": 1.5}
        (line,) = ax.plot(xs, ys, marker="o", markersize=4, label=system["label"], **style)
        for p in points[:: max(1, len(points) // 4)]:
            if p["ef"] is not None:
                ax.annotate(f"ef {p['ef']}", (p["recall"], p["qps"]), fontsize=7, color=line.get_color(), alpha=0.8)
    for target in results.get("recall_targets", []):
        ax.axvline(target, color="grey", linestyle=":", linewidth=1)
    ax.set_yscale("log")
    ax.set_xlabel("recall@10 (against exact top-10)")
    ax.set_ylabel("queries per second (log)")
    meta = results["meta"]
    ax.set_title(
        f"{meta['corpus']['size']} passages, {meta['corpus']['queries']} queries, "
        f"{meta['clients']} clients, {meta['machine'].get('cpus')} cores ({meta['date']})",
        fontsize=10,
    )
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out)


def main() -> None:
    results_path, out = Path(sys.argv[1]), Path(sys.argv[2])
    plot(json.loads(results_path.read_text(encoding="utf-8")), out)


if __name__ == "__main__":
    main()
