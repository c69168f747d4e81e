"""Query planning: which search answers a query on one shard, and merging across shards.

Pure functions, so the choice can be tested and explained without an index; the one side
effect is a count of the plans chosen, for the server's metrics (`plan_counts`).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Sequence
from typing import Literal, get_args

from models.config import EngineConfig
from models.records import Hit

Plan = Literal["hnsw", "exact", "hnsw_filtered"]
PLANS: tuple[Plan, ...] = get_args(Plan)

# Queries per plan since the process started. Shard reads run in pool threads, hence the lock.
_counts_lock = threading.Lock()
_counts: dict[Plan, int] = dict.fromkeys(PLANS, 0)


def choose_plan(n_live: int, n_match: int, k: int, config: EngineConfig, queries: int = 1) -> Plan:
    """How one shard answers a query whose filter matches `n_match` of its `n_live` documents.

    An unfiltered query has n_match == n_live (so does a filter that matches everything, which
    then needs no filter callback at all).

    - "exact": numpy over the matching rows. Chosen when they are few (at most
      `exact_max_rows`), when the filter is selective (fraction below `exact_selectivity`; HNSW
      under a tight filter walks most of the graph and may come back short), or when k asks for
      every match anyway. Also for empty candidate sets, where it returns nothing at once.
    - "hnsw": the graph, no filter.
    - "hnsw_filtered": the graph with a per-label filter callback.

    `queries` (the batch the plan answers) is added to the plan's count in `plan_counts`.
    """
    plan = _plan(n_live, n_match, k, config)
    with _counts_lock:
        _counts[plan] += queries
    return plan


def plan_counts() -> dict[Plan, int]:
    """Queries answered per plan since the process started (all engines of the process)."""
    with _counts_lock:
        return dict(_counts)


def _plan(n_live: int, n_match: int, k: int, config: EngineConfig) -> Plan:
    if n_match <= 0 or n_match <= config.exact_max_rows or k >= n_match:
        return "exact"
    if n_match >= n_live:
        return "hnsw"
    if n_match / n_live < config.exact_selectivity:
        return "exact"
    return "hnsw_filtered"


def merge_hits(per_shard: Sequence[list[Hit]], k: int) -> list[Hit]:
    """The k best hits over all shards' best-first lists, best first (ties: earlier shard first).

    Ids are unique across shards (a document lives on exactly one), so no deduplication.
    """
    if k <= 0:
        return []
    if len(per_shard) == 1:
        return per_shard[0][:k]
    merged = heapq.merge(*per_shard, key=lambda hit: -hit.score)
    out: list[Hit] = []
    for hit in merged:
        out.append(hit)
        if len(out) == k:
            break
    return out
