"""The interleaved phase of `load.algos`: each variant's default point timed against its anchor
in alternating rounds, so that a slow spell of the shared machine lands on both sides of a ratio.

The sweep times a Shoal variant and, a minute or more later, its anchor. On this machine rates
move by a quarter or more from one minute to the next, and the ratio of two rates taken minutes
apart moves with them. Here each round times, back to back: Shoal's default point with one query
per request, the anchor at the settings that bracket Shoal's recall (calls of `clients` queries,
then the whole set per call), and Shoal's default point again as `query_batch` requests. A
round's ratio is Shoal's rate over the anchor's, interpolated at Shoal's recall from that round's
timings; the headline is the median over the rounds, with the lowest and highest beside it.
"""

from __future__ import annotations

import asyncio
import statistics
from collections.abc import Sequence
from typing import Any

import numpy as np
from numpy.typing import NDArray

from load import algos_anchors as anchors
from load.algos_report import qps_at_recall
from load.query import run_closed
from shoal_client import ShoalClient


def bracket(anchor: dict[str, Any], recall: float) -> tuple[list[dict[str, Any]], str]:
    """The anchor's sweep points to time against a Shoal point of `recall`: the one of highest
    recall at or below it and the one of lowest recall at or above it (one point when a setting
    matches, or when even the anchor's lowest recall is above it: `above`, the ratio is then an
    upper bound); none when no setting reaches it (`unreached`)."""
    points = [p for p in anchor.get("points", []) if p.get("recall") is not None]
    below = [p for p in points if p["recall"] <= recall]
    over = [p for p in points if p["recall"] >= recall]
    if not over:
        return [], "unreached"
    high = min(over, key=lambda p: (p["recall"], -p.get("qps", 0.0)))
    if not below:
        return [high], "above"
    low = max(below, key=lambda p: (p["recall"], p.get("qps", 0.0)))
    return ([high] if low is high else [low, high]), "interpolated"


def _spread(values: Sequence[float]) -> dict[str, float] | None:
    if not values:
        return None
    return {"median": round(statistics.median(values), 4), "min": round(min(values), 4), "max": round(max(values), 4)}


async def run_rounds(
    conns: Sequence[ShoalClient],
    requests: Sequence[dict[str, Any]],
    batches: Sequence[dict[str, Any]],
    anchor: dict[str, Any],
    search_at: anchors.SearchAt,
    queries: NDArray[np.float32],
    recall: float,
    *,
    rounds: int,
    seconds: float,
    clients: int,
) -> dict[str, Any]:
    """`rounds` rounds of Shoal's default point (`requests`, then `batches` when given) against
    the anchor bracketing `recall`: each round's rates and ratios, and their `ratio` and
    `batch_ratio_whole` spreads (median, min, max)."""
    used, match = bracket(anchor, recall)
    out: dict[str, Any] = {"rounds": rounds, "seconds": seconds, "anchor_match": match}
    if not used:
        return out
    param = anchor.get("param")
    out["anchor_at"] = [{"recall": p["recall"], **({param: p[param]} if param else {})} for p in used]
    per_round: list[dict[str, Any]] = []
    for _ in range(rounds):
        single = await run_closed(conns, requests, max_requests=10**9, seconds=seconds)
        timings = []
        for p in used:
            value = p.get(param) if param else None

            def time_anchor(value: int | None = value) -> dict[str, float]:
                return anchors.timed(search_at(value), queries, seconds, clients)

            timings.append(await asyncio.to_thread(time_anchor))
        one: dict[str, Any] = {"qps": round(single.qps, 1), "errors": single.errors.total}
        near, _ = qps_at_recall([(p["recall"], t["qps_clients"]) for p, t in zip(used, timings, strict=True)], recall)
        whole, _ = qps_at_recall([(p["recall"], t["qps"]) for p, t in zip(used, timings, strict=True)], recall)
        one["anchor_qps"] = None if near is None else round(near, 1)
        one["anchor_qps_whole"] = None if whole is None else round(whole, 1)
        one["ratio"] = None if not near else round(single.qps / near, 4)
        if batches:
            batched = await run_closed(conns, batches, max_requests=10**9, seconds=seconds, op="query_batch")
            qps = batched.ok * len(batches[0]["queries"]) / batched.seconds if batched.seconds > 0 else 0.0
            one["batch_qps"] = round(qps, 1)
            one["batch_errors"] = batched.errors.total + batched.failed_queries
            one["batch_ratio_whole"] = None if not whole else round(qps / whole, 4)
        per_round.append(one)
    out["per_round"] = per_round
    out["ratio"] = _spread([r["ratio"] for r in per_round if r.get("ratio") is not None])
    out["batch_ratio_whole"] = _spread(
        [r["batch_ratio_whole"] for r in per_round if r.get("batch_ratio_whole") is not None]
    )
    out["errors"] = sum(r["errors"] + r.get("batch_errors", 0) for r in per_round)
    return out


def rounds_summary(rounds: dict[str, Any] | None) -> dict[str, Any] | None:
    """What `run_rounds` measured, in brief: the medians of the rates and the spreads of the
    ratios (None when no round ran)."""
    if not rounds or not rounds.get("per_round"):
        return None
    per_round = rounds["per_round"]

    def median(key: str) -> float | None:
        values = [r[key] for r in per_round if r.get(key) is not None]
        return round(statistics.median(values), 1) if values else None

    return {
        "rounds": len(per_round),
        "anchor_match": rounds["anchor_match"],
        "qps": median("qps"),
        "anchor_qps": median("anchor_qps"),
        "ratio": rounds.get("ratio"),
        "batch_qps": median("batch_qps"),
        "anchor_qps_whole": median("anchor_qps_whole"),
        "batch_ratio_whole": rounds.get("batch_ratio_whole"),
    }
