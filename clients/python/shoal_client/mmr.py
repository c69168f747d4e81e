"""Maximal marginal relevance over Shoal hits, for the framework stores' `mmr` searches.

MMR needs each candidate's similarity to the query and to the candidates already picked. The
latter comes from the hits' vectors (requested with `include=["vector"]`). The former is the
cosine of the query vector when the caller has it; when Shoal embedded the query itself, it is
read off the hit: under `cosine` the score is that cosine, under `ip` the inner product (the
cosine for unit vectors, as Shoal's own embeddings are), under `l2` it is 1 - d²/2 (exact for unit
vectors).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
from numpy.typing import NDArray

from shoal_client.types import Hit


def query_similarity(hit: Hit, metric: str) -> float:
    """The hit's cosine similarity to the query, from its score or distance under `metric`."""
    if metric == "l2" and hit.distance is not None:  # keyword and hybrid hits have no distance
        return 1.0 - hit.distance * hit.distance / 2.0
    return hit.score


def mmr_order(
    hits: Sequence[Hit],
    k: int,
    lambda_mult: float,
    *,
    metric: str,
    query_vector: NDArray[np.float32] | None = None,
) -> list[Hit]:
    """Up to `k` of `hits`, greedily picked to maximise
    `lambda_mult * sim(query, d) - (1 - lambda_mult) * max(sim(d, picked))`.

    `lambda_mult` 1 is plain similarity order, 0 maximum diversity. Raises `ValueError` for a
    `lambda_mult` outside 0..1 or a hit without a vector.
    """
    if not 0.0 <= lambda_mult <= 1.0:
        raise ValueError(f"lambda_mult must be between 0 and 1, not {lambda_mult}")
    if k <= 0 or not hits:
        return []
    if any(hit.vector is None for hit in hits):
        raise ValueError("maximal marginal relevance needs every hit's vector (include 'vector')")
    vectors = np.stack([np.asarray(hit.vector, np.float32) for hit in hits])
    unit = vectors / np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
    if query_vector is not None:
        q = np.asarray(query_vector, np.float32)
        to_query = unit @ (q / max(float(np.linalg.norm(q)), 1e-12))
    else:
        to_query = np.asarray([query_similarity(hit, metric) for hit in hits], np.float32)
    between = unit @ unit.T
    picked: list[int] = []
    # The highest similarity of each candidate to any picked one (nothing picked yet: no penalty).
    redundancy = np.full(len(hits), -np.inf, np.float32)
    available = np.ones(len(hits), bool)
    while len(picked) < min(k, len(hits)):
        penalty = np.where(np.isfinite(redundancy), redundancy, 0.0)
        gain = lambda_mult * to_query - (1.0 - lambda_mult) * penalty
        gain[~available] = -np.inf
        best = int(np.argmax(gain))
        picked.append(best)
        available[best] = False
        redundancy = np.maximum(redundancy, between[best])
    return [hits[i] for i in picked]
