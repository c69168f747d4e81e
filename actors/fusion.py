"""Fusing a vector and a keyword result list into one ranking: RRF and weighted (min-max).

Pure functions over best-first hit lists. A fused hit carries `scores` with each side's raw
score (None for a side that did not return the document) and `distance` None.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.records import DocId, Hit, SideScores

DEFAULT_RRF_K = 60


def rrf(vector: Sequence[Hit], keyword: Sequence[Hit], k: int, rrf_k: int = DEFAULT_RRF_K) -> list[Hit]:
    """Reciprocal rank fusion: each side adds 1 / (rrf_k + rank) (rank from 1) to a document's
    score. The k best, best first; ties keep the vector side's order, then the keyword side's."""
    fused: dict[DocId, float] = {}
    for hits in (vector, keyword):
        for rank, hit in enumerate(hits, start=1):
            fused[hit.id] = fused.get(hit.id, 0.0) + 1.0 / (rrf_k + rank)
    return _ranked(fused, vector, keyword, k)


def weighted(vector: Sequence[Hit], keyword: Sequence[Hit], k: int, alpha: float) -> list[Hit]:
    """`alpha` * the vector score + (1 - alpha) * the keyword score, each min-max normalised to
    0..1 over its side's candidates (all equal: 1); a side that missed a document adds 0."""
    fused: dict[DocId, float] = {}
    for hits, weight in ((vector, alpha), (keyword, 1.0 - alpha)):
        for hit, norm in zip(hits, _min_max([h.score for h in hits]), strict=True):
            fused[hit.id] = fused.get(hit.id, 0.0) + weight * norm
    return _ranked(fused, vector, keyword, k)


def keyword_only(hits: Sequence[Hit]) -> list[Hit]:
    """Keyword hits as the reply carries them: `scores` with the keyword score alone."""
    return [hit._replace(scores=SideScores(None, hit.score)) for hit in hits]


def _min_max(scores: list[float]) -> list[float]:
    if not scores:
        return []
    low, high = min(scores), max(scores)
    if high <= low:
        return [1.0] * len(scores)
    span = high - low
    return [(s - low) / span for s in scores]


def _ranked(fused: dict[DocId, float], vector: Sequence[Hit], keyword: Sequence[Hit], k: int) -> list[Hit]:
    by_vector = {hit.id: hit for hit in vector}
    by_keyword = {hit.id: hit for hit in keyword}
    order = {doc_id: i for i, doc_id in enumerate(fused)}  # insertion order: vector side first
    best = sorted(fused, key=lambda doc_id: (-fused[doc_id], order[doc_id]))[: max(0, k)]
    out: list[Hit] = []
    for doc_id in best:
        v, kw = by_vector.get(doc_id), by_keyword.get(doc_id)
        base = v if v is not None else kw
        assert base is not None
        scores = SideScores(None if v is None else v.score, None if kw is None else kw.score)
        out.append(base._replace(score=fused[doc_id], distance=None, scores=scores))
    return out
