"""Vectorised matching of a batch of documents against every standing query of a collection.

Pure functions, no I/O: the subscriptions actor calls `match` once per applied batch (in a
worker thread when the batch x queries product is large) and once per page when a subscriber
replays the durable log.

One step per batch, whatever the number of subscriptions:

1. scores: one matrix product, (S queries x d) @ (d x B documents). Under cosine both sides are
   normalised first, so the product is the cosine similarity; `ip` is the raw product; `l2` uses
   |q|^2 - 2 q.v + |v|^2, and the pairs near the threshold are recomputed directly (the expansion
   loses precision for near-duplicates), the same formula the query path uses for its hits.
2. filters: the batch's metadata becomes one `MetadataColumns` store; each *distinct* filter
   (subscriptions are grouped by identical `where` / `where_text`) is evaluated once into a mask
   over the batch, giving a (G groups x B) matrix; each query takes its group's row by indexing.
3. threshold: `score >= threshold` as one comparison over the (S x B) matrix, anded with the
   filter matrix; `np.nonzero` lists the matching (query, document) pairs, ordered by query and
   then by document, i.e. by seq within each query.

Scores and distances follow `actors.exact` (PROTOCOL.md): what a push reports is what a query
for the same vector would report for that document. The threshold is compared with the score as
reported (float32, widened), so a push's score is always >= its threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from numpy.typing import NDArray

from actors.exact import distance_of, l1_scores, row_norms
from models.filters import Filter, MetadataColumns, TextFilter, text_mask
from models.records import DocId, Metadata, Metric, Vector

F32 = NDArray[np.float32]
Ints = NDArray[np.intp]

_TINY = np.float32(1e-30)
# Score matrices are cut into column chunks of at most this many elements to bound memory.
_CHUNK_ELEMENTS = 1 << 22
# l2 candidates: squared distances within this fraction of |q|^2 + |v|^2 of the threshold are
# recomputed directly; float32 rounding of the expansion stays far below it.
_L2_SLACK = 1e-4


@dataclass(frozen=True, slots=True)
class StandingQuery:
    """What one subscription asks for. `vector` is as given (or embedded), not normalised."""

    vector: Vector
    threshold: float
    where: Filter | None
    where_text: TextFilter | None
    # A query by example: the liked document, which never matches its own subscription.
    exclude: DocId | None = None


@dataclass(frozen=True, slots=True)
class QuerySet:
    """The standing queries of one collection as matrices; build with `compile_queries`."""

    metric: Metric
    vectors: F32  # (S, d); unit rows under cosine
    sq_norms: F32  # (S,) squared norms, for l2
    thresholds: NDArray[np.float64]  # (S,)
    groups: Ints  # (S,) index into `filters`
    filters: tuple[tuple[Filter | None, TextFilter | None], ...]  # distinct (where, where_text)

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True, slots=True)
class DocBatch:
    """The documents of one applied batch (or one page of the log), in seq order."""

    vectors: F32  # (B, d)
    texts: Sequence[str | None]
    metadata: Sequence[Metadata]

    def __len__(self) -> int:
        return int(self.vectors.shape[0])


@dataclass(frozen=True, slots=True)
class Matches:
    """Matching pairs of one chunk of documents: query index, document index, score, distance.

    Pairs are ordered by query, then by document; across chunks, documents only move forward.
    """

    queries: Ints
    docs: Ints
    scores: F32
    distances: F32

    def __len__(self) -> int:
        return int(self.queries.shape[0])


def _filter_key(where: Filter | None, where_text: TextFilter | None) -> tuple[str, str]:
    # Dataclass equality would merge {"a": 1} with {"a": true} (1 == True in Python), which the
    # filter language keeps apart; the repr names the value's type.
    return repr(where), repr(where_text)


def compile_queries(queries: Sequence[StandingQuery], metric: Metric, dim: int) -> QuerySet:
    """Stack standing queries into a QuerySet (empty when `queries` is)."""
    if not queries:
        return QuerySet(
            metric,
            np.zeros((0, dim), np.float32),
            np.zeros(0, np.float32),
            np.zeros(0, np.float64),
            np.zeros(0, np.intp),
            (),
        )
    vectors = np.ascontiguousarray(np.stack([q.vector for q in queries]), dtype=np.float32)
    norms = row_norms(vectors)
    if metric is Metric.COSINE:
        vectors = (vectors / np.maximum(norms, _TINY)[:, None]).astype(np.float32, copy=False)
    keys: dict[tuple[str, str], int] = {}
    filters: list[tuple[Filter | None, TextFilter | None]] = []
    groups = np.empty(len(queries), dtype=np.intp)
    for i, q in enumerate(queries):
        key = _filter_key(q.where, q.where_text)
        index = keys.get(key)
        if index is None:
            index = keys[key] = len(filters)
            filters.append((q.where, q.where_text))
        groups[i] = index
    return QuerySet(
        metric,
        vectors,
        (norms * norms).astype(np.float32),
        np.array([q.threshold for q in queries], dtype=np.float64),
        groups,
        tuple(filters),
    )


def doc_batch(vectors: Sequence[Vector], texts: Sequence[str | None], metadata: Sequence[Metadata]) -> DocBatch:
    matrix = np.ascontiguousarray(np.stack(list(vectors)), dtype=np.float32)
    return DocBatch(matrix, texts, metadata)


def filter_masks(queries: QuerySet, docs: DocBatch) -> NDArray[np.bool_] | None:
    """(G, B) mask of each distinct filter over the batch; None when no query has a filter."""
    if all(where is None and text is None for where, text in queries.filters):
        return None
    n = len(docs)
    columns: MetadataColumns | None = None
    out = np.ones((len(queries.filters), n), dtype=np.bool_)
    for g, (where, where_text) in enumerate(queries.filters):
        if where is not None:
            if columns is None:
                columns = MetadataColumns.from_rows(docs.metadata)
            out[g] &= columns.mask(where, n)
        if where_text is not None:
            out[g] &= text_mask(where_text, docs.texts)
    return out


def match(queries: QuerySet, docs: DocBatch) -> list[Matches]:
    """Every (query, document) pair whose score reaches the query's threshold and whose document
    passes the query's filters, one `Matches` per chunk of documents."""
    if len(queries) == 0 or len(docs) == 0:
        return []
    masks = filter_masks(queries, docs)
    step = max(1, _CHUNK_ELEMENTS // len(queries))
    out: list[Matches] = []
    for start in range(0, len(docs), step):
        stop = min(start + step, len(docs))
        allowed = None if masks is None else masks[queries.groups, start:stop]
        found = _match_chunk(queries, docs.vectors[start:stop], allowed)
        if len(found):
            out.append(Matches(found.queries, found.docs + start, found.scores, found.distances))
    return out


def _match_chunk(queries: QuerySet, vectors: F32, allowed: NDArray[np.bool_] | None) -> Matches:
    if queries.metric is Metric.L1:
        return _match_l1(queries, vectors, allowed)
    thresholds = queries.thresholds[:, None]
    dots: F32 = queries.vectors @ vectors.T  # (S, b)
    if queries.metric is Metric.L2:
        return _match_l2(queries, vectors, dots, allowed)
    if queries.metric is Metric.COSINE:
        norms = row_norms(vectors)
        scores: F32 = (dots / np.maximum(norms, _TINY)[None, :]).astype(np.float32, copy=False)
        np.clip(scores, -1.0, 1.0, out=scores)
    else:
        scores = dots
    hits = scores.astype(np.float64) >= thresholds
    if allowed is not None:
        hits &= allowed
    qi, di = np.nonzero(hits)
    chosen = scores[qi, di].astype(np.float32)
    return Matches(qi, di, chosen, distance_of(chosen, queries.metric))


def _match_l2(queries: QuerySet, vectors: F32, dots: F32, allowed: NDArray[np.bool_] | None) -> Matches:
    v_sq = row_norms(vectors) ** 2
    both = queries.sq_norms[:, None] + v_sq[None, :]
    sq = np.maximum(both - 2.0 * dots, 0.0)
    # score = -distance >= threshold  <=>  distance <= -threshold (nothing, if threshold > 0)
    limit = -queries.thresholds[:, None]
    limit_sq = np.where(limit >= 0.0, limit * limit, -np.inf)
    candidates = sq <= limit_sq + _L2_SLACK * both + 1e-12
    if allowed is not None:
        candidates &= allowed
    qi, di = np.nonzero(candidates)
    if qi.shape[0] == 0:
        empty = np.zeros(0, np.float32)
        return Matches(qi, di, empty, empty)
    # Exact distances of the candidates, in bounded pieces (a pair costs d floats here).
    dim = max(1, vectors.shape[1])
    piece = max(1, _CHUNK_ELEMENTS // dim)
    dist = np.empty(qi.shape[0], np.float32)
    for s in range(0, qi.shape[0], piece):
        diff = queries.vectors[qi[s : s + piece]] - vectors[di[s : s + piece]]
        dist[s : s + piece] = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float32))
    scores = (-dist).astype(np.float32)
    keep = scores.astype(np.float64) >= queries.thresholds[qi]
    return Matches(qi[keep], di[keep], scores[keep], dist[keep])


def _match_l1(queries: QuerySet, vectors: F32, allowed: NDArray[np.bool_] | None) -> Matches:
    """l1: score = -(sum of absolute differences), computed exactly for every pair."""
    scores = l1_scores(vectors, queries.vectors)  # (S, b)
    hits = scores.astype(np.float64) >= queries.thresholds[:, None]
    if allowed is not None:
        hits &= allowed
    qi, di = np.nonzero(hits)
    chosen = scores[qi, di].astype(np.float32)
    return Matches(qi, di, chosen, distance_of(chosen, queries.metric))


def score_matrix(queries: QuerySet, docs: DocBatch) -> tuple[F32, NDArray[np.bool_]]:
    """(scores, allowed), both (S, B): every query's score of every document, and whether the
    document passes the query's filters and reaches its threshold. The one matrix product of a
    top-k step; under l2 the scores come from the expansion (see `exact_pair_scores`)."""
    s, b = len(queries), len(docs)
    if s == 0 or b == 0:
        return np.zeros((s, b), np.float32), np.zeros((s, b), np.bool_)
    dots: F32 = queries.vectors @ docs.vectors.T
    norms = row_norms(docs.vectors)
    if queries.metric is Metric.COSINE:
        scores: F32 = (dots / np.maximum(norms, _TINY)[None, :]).astype(np.float32, copy=False)
        np.clip(scores, -1.0, 1.0, out=scores)
    elif queries.metric is Metric.IP:
        scores = dots
    else:
        sq = np.maximum(queries.sq_norms[:, None] + (norms * norms)[None, :] - 2.0 * dots, 0.0)
        scores = (-np.sqrt(sq)).astype(np.float32, copy=False)
    allowed: NDArray[np.bool_] = scores.astype(np.float64) >= queries.thresholds[:, None]
    masks = filter_masks(queries, docs)
    if masks is not None:
        allowed &= masks[queries.groups]
    return scores, allowed


def exact_pair_scores(queries: QuerySet, qi: Ints, vectors: F32, di: Ints) -> F32:
    """Scores of the pairs (queries qi[j], vectors di[j]) computed directly: under l2 the
    distance itself, not the expansion (what the query path reports for its hits)."""
    if queries.metric is not Metric.L2:
        q = queries.vectors[qi]
        v = vectors[di]
        dots: F32 = np.einsum("ij,ij->i", q, v, dtype=np.float32)
        if queries.metric is Metric.COSINE:
            cos: F32 = (dots / np.maximum(row_norms(v), _TINY)).astype(np.float32)
            np.clip(cos, -1.0, 1.0, out=cos)
            return cos
        return dots
    diff = queries.vectors[qi] - vectors[di]
    dist: F32 = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float32)).astype(np.float32)
    return (-dist).astype(np.float32)
