"""Exact (brute-force) nearest neighbours in numpy, and the one definition of score and distance.

Pure functions over a float32 matrix whose row index is the label. They are the reference the
HNSW search is checked against, and the plan for small or tightly filtered candidate sets.

Score and distance follow PROTOCOL.md:
- cosine: score = cosine similarity in [-1, 1], distance = 1 - score (vectors need not be
  normalised);
- ip:     score = inner product,     distance = 1 - score;
- l2:     distance = Euclidean distance (not squared), score = -distance;
- l1:     distance = sum of absolute differences (Manhattan), score = -distance.
Higher score is always better.

Callers run these in a worker thread: over large matrices they are "big numpy".
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import faiss
import numpy as np
from numpy.typing import NDArray

from models.records import Metric

F32 = NDArray[np.float32]
Labels = NDArray[np.int64]
Mask = NDArray[np.bool_]

# faiss's bundled stubs do not list its by-index kernels (`candidate_dots`).
_faiss_kernels: Any = faiss
# Below this norm a row is treated as empty (unused slots are zero); it never divides by zero.
_TINY = np.float32(1e-30)
# Scores computed per chunk stay under this many elements (queries x rows), to bound memory.
_CHUNK_ELEMENTS = 1 << 22
# With a mask selecting more than this fraction of rows, scoring every row and masking out the
# rest is cheaper than gathering the selected rows into a copy.
_GATHER_BELOW = 0.25


@dataclass(frozen=True, slots=True)
class TopK:
    """Nearest rows of one query, best first: labels, scores and distances of equal length."""

    labels: Labels
    scores: F32
    distances: F32

    def __len__(self) -> int:
        return int(self.labels.shape[0])


EMPTY = TopK(np.empty(0, np.int64), np.empty(0, np.float32), np.empty(0, np.float32))


def row_norms(vectors: F32) -> F32:
    """Euclidean norm of each row (kept beside the matrix: cosine and l2 both need it)."""
    sq: F32 = np.einsum("ij,ij->i", vectors, vectors, dtype=np.float32)
    out: F32 = np.sqrt(sq, dtype=np.float32)
    return out


def scores_of(vectors: F32, norms: F32, queries: F32, metric: Metric) -> F32:
    """Score of every (query, row) pair, shape (queries, rows); higher is better.

    `norms` are the row norms of `vectors` (see `row_norms`). l2 uses the expansion
    |v|^2 - 2 v.q + |q|^2, which loses precision for near-duplicates: `search` recomputes the
    distances of the rows it returns directly.
    """
    if metric is Metric.L1:
        return l1_scores(vectors, queries)
    return _from_dots(queries @ vectors.T, queries, norms[None, :], metric)


def candidate_scores(vectors: F32, norms: F32, queries: F32, rows: NDArray[np.int64], metric: Metric) -> F32:
    """Score of each query against its own candidate rows: `rows` is (queries, candidates) of
    row indices into `vectors`, the result the same shape; higher is better. The formulas of
    `scores_of`, for a batch whose queries each have other rows (a re-rank)."""
    if metric is Metric.L1:
        picked = vectors[rows]  # (queries, candidates, dim): one gather for the batch
        neg_l1: F32 = -np.abs(picked - queries[:, None, :]).sum(axis=2, dtype=np.float32)
        return neg_l1
    dots = candidate_dots(vectors, queries, rows)
    if queries.shape[0] == 1:  # a 1-D query: its norm is a scalar (see `_from_dots`)
        return _from_dots(dots[0], queries[0], norms[rows[0]], metric)[None, :]
    return _from_dots(dots, queries, norms[rows], metric)


def candidate_dots(vectors: F32, queries: F32, rows: NDArray[np.int64]) -> F32:
    """The inner product of each query with each of its candidate rows (`rows` as in
    `candidate_scores`), read where they lie: faiss's by-index kernel skips the copy that a numpy
    gather makes of every candidate row, which cost more than the products (README, "Index
    kinds"). Raises IndexError for a row outside `vectors`: the kernel reads unchecked."""
    if rows.size and (int(rows.min()) < 0 or int(rows.max()) >= vectors.shape[0]):
        raise IndexError(f"candidate rows outside 0..{vectors.shape[0] - 1}")
    base = np.ascontiguousarray(vectors, dtype=np.float32)
    q = np.ascontiguousarray(queries, dtype=np.float32)
    ids = np.ascontiguousarray(rows, dtype=np.int64)
    dots: F32 = np.empty(ids.shape, np.float32)
    _faiss_kernels.fvec_inner_products_by_idx(
        faiss.swig_ptr(dots),
        faiss.swig_ptr(q),
        faiss.swig_ptr(base),
        faiss.swig_ptr(ids),
        q.shape[1],
        ids.shape[0],
        ids.shape[1],
    )
    return dots


def _from_dots(dots: F32, queries: F32, norms: F32, metric: Metric) -> F32:
    """ip / cosine / l2 scores from the dot products of each query (a row of `dots`) with its
    rows, whose norms `norms` holds in the same shape (or broadcast to it). A single query may
    come 1-D, with 1-D `dots`: its norm is then a scalar, which costs less than `row_norms` and
    its broadcasts, and every query of a quantised or lsh index is re-ranked one at a time
    (README, "What bounds one query per request")."""
    if metric is Metric.IP:
        return dots
    # float32 scalar or column: the arithmetic below stays float32
    q_norms = np.sqrt(np.dot(queries, queries)) if queries.ndim == 1 else row_norms(queries)[:, None]
    if metric is Metric.COSINE:
        cos: F32 = dots / np.maximum(q_norms * norms, _TINY)
        return cos
    sq: F32 = norms * norms - 2.0 * dots + q_norms * q_norms
    neg: F32 = -np.sqrt(np.maximum(sq, np.float32(0.0)))
    return neg


def l1_scores(vectors: F32, queries: F32) -> F32:
    """-(sum of absolute differences) of every (query, row) pair, shape (queries, rows).

    faiss's pairwise kernel: numpy would materialise a (queries, rows, dim) difference."""
    if vectors.shape[0] == 0 or queries.shape[0] == 0:
        return np.zeros((queries.shape[0], vectors.shape[0]), np.float32)
    dist = faiss.pairwise_distances(
        np.ascontiguousarray(queries, dtype=np.float32),
        np.ascontiguousarray(vectors, dtype=np.float32),
        faiss.METRIC_L1,
    )
    neg: F32 = np.negative(dist).astype(np.float32, copy=False)
    return neg


def distance_of(scores: F32, metric: Metric) -> F32:
    """The protocol distance for protocol scores."""
    if metric is Metric.L2 or metric is Metric.L1:
        return (-scores).astype(np.float32, copy=False)
    return (1.0 - scores).astype(np.float32, copy=False)


def from_hnsw(raw: F32, metric: Metric) -> tuple[F32, F32]:
    """(score, distance) from hnswlib's distances.

    hnswlib's 'cosine' and 'ip' spaces return 1 - similarity, which is already the protocol
    distance; its 'l2' space returns the squared Euclidean distance. Cosine is clipped to its
    range: float rounding can put an exact duplicate a hair past similarity 1.
    """
    # Plain ufuncs on float32 stay float32 (Python scalars are weakly typed) and skip the
    # argument handling of np.clip / astype, which cost more than the arithmetic per query.
    raw = np.asarray(raw, dtype=np.float32)
    if metric is Metric.L2:
        dist = np.sqrt(np.maximum(raw, 0.0))
        return np.negative(dist), dist
    if metric is Metric.COSINE:
        raw = np.minimum(np.maximum(raw, 0.0), 2.0)
    return np.subtract(1.0, raw, dtype=np.float32), raw


def top_indices(scores: F32, k: int) -> NDArray[np.intp]:
    """Column indices of the k best scores of each row of a 2-D array, best first.

    Ties keep the lower index first, so results are deterministic.
    """
    n = scores.shape[1]
    k = min(k, n)
    if k <= 0:
        return np.empty((scores.shape[0], 0), np.intp)
    neg = -scores
    if k < n:
        part = np.argpartition(neg, k - 1, axis=1)[:, :k]
        part.sort(axis=1)  # index order, so the stable sort below breaks ties by index
        order = np.argsort(np.take_along_axis(neg, part, axis=1), axis=1, kind="stable")
        result: NDArray[np.intp] = np.take_along_axis(part, order, axis=1)
        return result
    return np.argsort(neg, axis=1, kind="stable")


def _refine_l2(vectors: F32, query: F32, labels: Labels) -> tuple[Labels, F32]:
    """Recompute l2 distances of the chosen rows directly and re-sort by them."""
    diff = vectors[labels] - query[None, :]
    dist = np.sqrt(np.einsum("ij,ij->i", diff, diff, dtype=np.float32)).astype(np.float32)
    order = np.argsort(dist, kind="stable")
    return labels[order], dist[order]


def _finish(vectors: F32, query: F32, labels: Labels, scores: F32, metric: Metric) -> TopK:
    if metric is Metric.L2:
        labels, dist = _refine_l2(vectors, query, labels)
        return TopK(labels, (-dist).astype(np.float32), dist)
    if metric is Metric.COSINE:  # rounding can step just outside [-1, 1]
        scores = np.clip(scores, -1.0, 1.0)
    return TopK(labels, scores.astype(np.float32, copy=False), distance_of(scores, metric))


def search(
    vectors: F32,
    norms: F32,
    queries: F32,
    k: int,
    metric: Metric,
    *,
    rows: NDArray[np.integer] | None = None,
    mask: Mask | None = None,
) -> list[TopK]:
    """Exact top-k of each query over the rows of `vectors` (rows are labels).

    Restrict the candidates with `rows` (label indices) or `mask` (bool per row, may be shorter
    than `vectors`: rows past its end are excluded); with neither, every row is a candidate.
    Each query gets min(k, number of candidates) results, best first.
    """
    queries = np.ascontiguousarray(np.atleast_2d(queries), dtype=np.float32)
    m = queries.shape[0]
    if mask is not None:
        n_sel = int(np.count_nonzero(mask))
        if n_sel == 0 or k <= 0:
            return [EMPTY] * m
        if n_sel < _GATHER_BELOW * mask.shape[0]:
            rows = np.flatnonzero(mask)
        else:
            return _search_masked(vectors[: mask.shape[0]], norms[: mask.shape[0]], queries, k, metric, mask)
    if rows is None:
        rows = np.arange(vectors.shape[0], dtype=np.int64)
    rows = np.asarray(rows, dtype=np.int64)
    if rows.shape[0] == 0 or k <= 0:
        return [EMPTY] * m
    sub = vectors[rows]
    sub_norms = norms[rows]
    out: list[TopK] = []
    step = max(1, _CHUNK_ELEMENTS // rows.shape[0])
    for start in range(0, m, step):
        chunk = queries[start : start + step]
        scores = scores_of(sub, sub_norms, chunk, metric)
        idx = top_indices(scores, k)
        for i in range(chunk.shape[0]):
            labels = rows[idx[i]]
            out.append(_finish(vectors, chunk[i], labels, scores[i, idx[i]], metric))
    return out


def _search_masked(vectors: F32, norms: F32, queries: F32, k: int, metric: Metric, mask: Mask) -> list[TopK]:
    """Score all rows, then exclude the unselected ones (cheaper than a gather for dense masks)."""
    k = min(k, int(np.count_nonzero(mask)))
    excluded = ~mask
    out: list[TopK] = []
    step = max(1, _CHUNK_ELEMENTS // max(1, vectors.shape[0]))
    for start in range(0, queries.shape[0], step):
        chunk = queries[start : start + step]
        scores = scores_of(vectors, norms, chunk, metric)
        scores[:, excluded] = -np.inf
        idx = top_indices(scores, k)
        for i in range(chunk.shape[0]):
            labels = idx[i].astype(np.int64)
            out.append(_finish(vectors, chunk[i], labels, scores[i, idx[i]], metric))
    return out
