"""Top-k standing queries: the live list of one subscription, and the vectorised step that keeps
every list of a collection exact as changes are applied.

A list is exact as of its `as_of` seq: it holds what a query for the same vector, k and filters
would answer at that seq (min(k, matching documents) hits, best first, those under the optional
threshold left out). One batch of changes moves every list of the collection forward:

1. the batch's final states (the last upsert of each id it leaves alive) are scored against all
   lists' vectors in one matrix product, with the filters and thresholds as one mask
   (`matching.score_matrix`);
2. a list is looked at only when some document of the batch beats its k-th score, or when one of
   its members was deleted or re-upserted (the caller's member index says which);
3. such a list merges its untouched members with the batch's candidates. That is exact when no
   member left, or when fewer than k documents matched before (the list was every match), or
   when the merged k-th score is still above the old k-th score (nothing outside the list can
   reach it). Otherwise the list is refilled with a query (`refill`), through the planner, at a
   seq the caller holds still (`Applier.consistent`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import anyio
import numpy as np

from actors import planner
from actors.matching import QuerySet, StandingQuery, doc_batch, exact_pair_scores, score_matrix
from models.errors import Overloaded, ShoalError
from models.filters import Filter, TextFilter
from models.records import DocId, Hit, Include, Metric, StoredDoc, Vector
from models.requests import Query

if TYPE_CHECKING:
    from actors.catalog import Collection

# Scores of one document may differ in the last float32 bits between the matrix product and the
# query path; comparisons with a k-th score allow this much, erring towards looking (or
# refilling) once more, never towards a wrong list.
SCORE_SLACK = 1e-5
# Refill queries of one step run at most this many at a time (each is one query per shard).
REFILL_CONCURRENCY = 8
# A refill a full shard queue refused is tried again after these pauses (seconds), then fails.
OVERLOADED_RETRIES = (0.005, 0.02, 0.05)


@dataclass(frozen=True, slots=True)
class TopkQuery:
    """What a top-k subscription asks for. `vector` is as given (or embedded)."""

    vector: Vector
    k: int
    threshold: float | None
    where: Filter | None
    where_text: TextFilter | None

    def standing(self) -> StandingQuery:
        """The same query as a standing query (no threshold: every score passes)."""
        threshold = -math.inf if self.threshold is None else self.threshold
        return StandingQuery(self.vector, threshold, self.where, self.where_text)


class TopkList:
    """One subscription's current list (best first), exact as of `as_of` (None: not made yet)."""

    __slots__ = ("_hits", "_kth", "as_of", "include", "query")

    def __init__(self, query: TopkQuery, include: frozenset[Include]) -> None:
        self.query = query
        self.include = include
        self._hits: list[Hit] = []
        self._kth = -math.inf
        self.as_of: int | None = None

    @property
    def hits(self) -> list[Hit]:
        return self._hits

    @hits.setter
    def hits(self, hits: list[Hit]) -> None:
        self._hits = hits
        # Kept with the list: every batch reads the k-th score of every list of the collection.
        self._kth = hits[-1].score if len(hits) >= self.query.k else -math.inf

    @property
    def full(self) -> bool:
        return len(self._hits) >= self.query.k

    def kth(self) -> float:
        """The score a document must beat to enter (-inf while fewer than k match)."""
        return self._kth

    def ids(self) -> tuple[DocId, ...]:
        return tuple(h.id for h in self.hits)


@dataclass(frozen=True, slots=True)
class StepResult:
    """What one batch did to the lists given to `step` (indices into them)."""

    changed: list[tuple[int, list[Hit]]]  # new whole lists, to push
    refill: list[int]  # lists that need a query
    looked_at: int


def make_hit(doc: StoredDoc, score: float, metric: Metric, include: frozenset[Include]) -> Hit:
    distance = -score if metric is Metric.L2 else 1.0 - score
    return Hit(
        doc.id,
        score,
        distance,
        doc.text if "text" in include else None,
        doc.metadata if "metadata" in include else None,
        doc.vector if "vector" in include else None,
    )


def step(
    lists: Sequence[TopkList],
    queries: QuerySet,
    final: Sequence[StoredDoc],
    changed_ids: frozenset[DocId],
    touched: set[int],
) -> StepResult:
    """Move `lists` (compiled as `queries`, same order) past one batch: `final` are the states
    the batch leaves alive for the ids it upserted, `changed_ids` every id it changed, `touched`
    the lists holding one of them. Pure; see the module docstring."""
    n = len(lists)
    kth = np.fromiter((lst._kth for lst in lists), dtype=np.float64, count=n)
    if final and n:
        batch = doc_batch([d.vector for d in final], [d.text for d in final], [d.metadata for d in final])
        scores, allowed = score_matrix(queries, batch)
        cand = np.where(allowed, scores.astype(np.float64), -np.inf)
        beaten = np.flatnonzero(cand.max(axis=1) >= kth - SCORE_SLACK)
    else:
        batch = None
        scores = np.zeros((n, 0), np.float32)
        allowed = np.zeros((n, 0), np.bool_)
        beaten = np.zeros(0, np.intp)
    look = sorted(set(beaten.tolist()) | touched)
    changed: list[tuple[int, list[Hit]]] = []
    refill: list[int] = []
    for s in look:
        lst = lists[s]
        old = lst.hits
        k = lst.query.k
        members = [h for h in old if h.id not in changed_ids]
        removed = len(old) - len(members)
        entrants: list[Hit] = []
        if batch is not None:
            row = allowed[s]
            if lst.full:
                row = row & (scores[s].astype(np.float64) >= kth[s] - SCORE_SLACK)
            cols = np.flatnonzero(row)
            if cols.shape[0]:
                if queries.metric is Metric.L2:
                    exact = exact_pair_scores(queries, np.full(cols.shape[0], s, np.intp), batch.vectors, cols)
                else:
                    exact = scores[s, cols]
                threshold = queries.thresholds[s]
                for c, score in zip(cols.tolist(), exact.tolist(), strict=True):
                    if score >= threshold:
                        entrants.append(make_hit(final[c], score, queries.metric, lst.include))
        merged = sorted(members + entrants, key=lambda h: -h.score)[:k]
        if lst.full and removed and (len(merged) < k or merged[-1].score <= kth[s] + SCORE_SLACK):
            refill.append(s)  # a document outside the list may now belong in it
            continue
        if tuple(h.id for h in merged) != lst.ids() or any(h.id in changed_ids for h in merged):
            changed.append((s, merged))
        elif merged:
            lst.hits = merged  # same list; scores of re-scored members may differ in the last bits
    return StepResult(changed, refill, len(look))


async def refill(collection: Collection, lst: TopkList) -> list[Hit]:
    """The list as a query answers it now (through the planner: each shard plans exact or index
    search with the filters), cut at the threshold. Raises what the shards raise."""
    query = lst.query
    hits = await planner.vector_side(collection, _as_query(collection.name, lst), query.vector, query.k)
    if query.threshold is not None:
        hits = [h for h in hits if h.score >= query.threshold]
    return hits


async def refill_many(collection: Collection, lists: Sequence[TopkList]) -> list[list[Hit] | ShoalError]:
    """`refill` of each list, a few at a time; a failed one gives its error in its place."""
    out: list[list[Hit] | ShoalError] = [[] for _ in lists]
    limiter = anyio.CapacityLimiter(REFILL_CONCURRENCY)

    async def one(i: int) -> None:
        async with limiter:
            for pause in (*OVERLOADED_RETRIES, None):
                try:
                    out[i] = await refill(collection, lists[i])
                    return
                except Overloaded as exc:  # a shard's queue is full for a moment
                    if pause is None:
                        out[i] = exc
                        return
                    await anyio.sleep(pause)
                except ShoalError as exc:
                    out[i] = exc
                    return

    async with anyio.create_task_group() as tg:
        for i in range(len(lists)):
            tg.start_soon(one, i)
    return out


def _as_query(collection_name: str, lst: TopkList) -> Query:
    q = lst.query
    return Query(
        collection=collection_name,
        vector=q.vector,
        text=None,
        k=q.k,
        where=q.where,
        where_text=q.where_text,
        include=lst.include,
        ef=None,
        mode="vector",
        fusion="rrf",
        alpha=0.5,
    )
