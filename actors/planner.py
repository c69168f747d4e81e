"""Query planning: which search answers a query on one shard, merging across shards, and
running a query's sides (`execute`): vector, keyword (BM25), or both fused for hybrid.

The plan functions are pure, so the choice can be tested and explained without an index; the
one side effect is a count of the plans chosen, for the server's metrics (`plan_counts`).
"""

from __future__ import annotations

import heapq
import threading
from collections.abc import Awaitable, Callable, Sequence
from functools import partial
from typing import TYPE_CHECKING, Literal, TypeVar, get_args

import anyio
import numpy as np

from actors import fusion
from actors.indexes.base import QueryParams, query_params
from actors.keyword_index import query_terms
from models.config import EngineConfig
from models.errors import ShoalError
from models.records import Hit, Include, Vector

if TYPE_CHECKING:
    from actors.catalog import Collection
    from models.requests import Query

T = TypeVar("T")
Plan = Literal["hnsw", "exact", "hnsw_filtered", "keyword"]
PLANS: tuple[Plan, ...] = get_args(Plan)

# Queries per plan since the process started. Shard reads run in pool threads, hence the lock.
_counts_lock = threading.Lock()
_counts: dict[Plan, int] = dict.fromkeys(PLANS, 0)


def choose_plan(
    n_live: int, n_match: int, k: int, config: EngineConfig, queries: int = 1, index_usable: bool = True
) -> Plan:
    """How one shard answers a query whose filter matches `n_match` of its `n_live` documents.

    An unfiltered query has n_match == n_live (so does a filter that matches everything, which
    then needs no filter callback at all). The plans name the shard's index whatever its kind
    ("hnsw" is kept as the metric label of "the index"); `index_usable` False (a `flat`
    collection, an `ivf` not trained yet) always plans "exact". An index that comes back short
    is answered exactly too, so a filter never makes a query come back short.

    - "exact": numpy over the matching rows. Chosen when they are few (at most
      `exact_max_rows`), when the filter is selective (fraction below `exact_selectivity`; HNSW
      under a tight filter walks most of the graph and may come back short), or when k asks for
      every match anyway. Also for empty candidate sets, where it returns nothing at once.
    - "hnsw": the index, no filter.
    - "hnsw_filtered": the index with a per-label filter (callback or id selector).

    `queries` (the batch the plan answers) is added to the plan's count in `plan_counts`.
    """
    plan = _plan(n_live, n_match, k, config) if index_usable else "exact"
    with _counts_lock:
        _counts[plan] += queries
    return plan


def plan_counts() -> dict[Plan, int]:
    """Queries answered per plan since the process started (all engines of the process)."""
    with _counts_lock:
        return dict(_counts)


def would_plan(n_live: int, n_match: int, k: int, config: EngineConfig, index_usable: bool = True) -> Plan:
    """The plan `choose_plan` picks for these counts, without counting it."""
    return _plan(n_live, n_match, k, config) if index_usable else "exact"


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


# -- running a query ------------------------------------------------------------------------------


def candidate_depths(req: Query, config: EngineConfig) -> tuple[int, int]:
    """(vector side, keyword side) candidate depths of a hybrid query: as asked, else
    max(k, `hybrid_candidates`)."""
    default = max(req.k, config.hybrid_candidates)
    return (req.vector_candidates or default, req.keyword_candidates or default)


async def execute(
    collection: Collection, req: Query, vector_of: Callable[[], Awaitable[Vector]], config: EngineConfig
) -> list[Hit]:
    """The hits of `req` on `collection`, best first. `vector_of` gives the query vector (called
    only when a vector side runs, concurrently with the keyword side). Each shard plans its own
    vector search (`choose_plan`); the keyword side scores BM25 over the shard's filter mask.

    Vector mode: min(k, matches) hits. Keyword: up to k hits, each holding a query term (none for
    a query of only stop words). Hybrid: min(k, matches) fused hits. Raises what the shards and
    `vector_of` raise."""
    if req.mode == "vector":
        return await vector_side(collection, req, await vector_of(), req.k)
    terms = query_terms(req.text or "")
    if req.mode == "keyword":
        return fusion.keyword_only(await keyword_side(collection, req, terms, req.k))
    vector_depth, keyword_depth = candidate_depths(req, config)

    async def run_vector() -> list[Hit]:
        return await vector_side(collection, req, await vector_of(), vector_depth)

    vector, keyword = await _gather([run_vector, lambda: keyword_side(collection, req, terms, keyword_depth)])
    if req.fusion == "weighted":
        return fusion.weighted(vector, keyword, req.k, req.alpha)
    return fusion.rrf(vector, keyword, req.k, req.rrf_k)


async def _gather(calls: Sequence[Callable[[], Awaitable[T]]]) -> list[T]:
    """Every call's result, run at once; raises the first `ShoalError` itself (a task group
    would wrap it in an exception group, which no caller maps to a wire code)."""
    results: dict[int, T] = {}
    errors: list[ShoalError] = []

    async def one(i: int) -> None:
        try:
            results[i] = await calls[i]()
        except ShoalError as exc:
            errors.append(exc)

    async with anyio.create_task_group() as tg:
        for i in range(len(calls)):
            tg.start_soon(one, i)
    if errors:
        raise errors[0]
    return [results[i] for i in range(len(calls))]


def index_params(req: Query) -> QueryParams:
    """The query's index parameters (checked against the collection's kind by the engine)."""
    return query_params(ef=req.ef, nprobe=req.nprobe)


async def vector_side(collection: Collection, req: Query, vector: Vector, depth: int) -> list[Hit]:
    """The `depth` nearest documents passing the query's filters, over every shard."""
    shards = collection.shards
    params = index_params(req)
    if len(shards) == 1:
        return await shards[0].search(vector, depth, params, req.where, req.where_text, req.include)
    calls = [partial(s.search, vector, depth, params, req.where, req.where_text, req.include) for s in shards]
    return merge_hits(await _gather(calls), depth)


async def vector_side_many(
    collection: Collection, queries: np.ndarray, k: int, params: QueryParams, include: frozenset[Include]
) -> list[list[Hit]]:
    """The k nearest documents of each row of `queries` (n x dim), unfiltered, over every shard:
    one `Shard.search_many` per shard, merged per query."""
    shards = collection.shards
    if len(shards) == 1:
        return await shards[0].search_many(queries, k, params, include)
    per_shard = await _gather([partial(s.search_many, queries, k, params, include) for s in shards])
    return [merge_hits(lists, k) for lists in zip(*per_shard, strict=True)]


async def keyword_side(collection: Collection, req: Query, terms: Sequence[str], depth: int) -> list[Hit]:
    """The `depth` best documents by BM25 holding a term and passing the filters, over every
    shard (each shard scores with its own term statistics)."""
    if not terms:
        return []
    with _counts_lock:
        _counts["keyword"] += 1
    shards = collection.shards
    if len(shards) == 1:
        return await shards[0].search_keyword(terms, depth, req.where, req.where_text, req.include)
    calls = [partial(s.search_keyword, terms, depth, req.where, req.where_text, req.include) for s in shards]
    return merge_hits(await _gather(calls), depth)
