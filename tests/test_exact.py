"""Exact kernels and the planner: checked against float64 numpy written out longhand."""

from __future__ import annotations

import numpy as np
import pytest
from numpy.typing import NDArray

from actors import exact
from actors.planner import choose_plan, merge_hits
from models.config import EngineConfig
from models.records import DocId, Hit, Metric

pytestmark = pytest.mark.timeout(60)

METRICS = [Metric.COSINE, Metric.L2, Metric.IP]


def reference(
    vectors: NDArray[np.float32], query: NDArray[np.float32], metric: Metric
) -> NDArray[np.float64]:
    """Protocol scores in float64, straight from the definitions."""
    v = vectors.astype(np.float64)
    q = query.astype(np.float64)
    if metric is Metric.COSINE:
        return (v @ q) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    if metric is Metric.IP:
        return v @ q
    return -np.linalg.norm(v - q, axis=1)


def data(n: int = 2_000, dim: int = 24, seed: int = 0) -> NDArray[np.float32]:
    rng = np.random.default_rng(seed)
    # Unnormalised on purpose: cosine must not assume unit vectors.
    return (rng.normal(size=(n, dim)) * rng.uniform(0.1, 5.0, size=(n, 1))).astype(np.float32)


@pytest.mark.parametrize("metric", METRICS)
def test_search_matches_reference(metric: Metric) -> None:
    vecs = data()
    norms = exact.row_norms(vecs)
    queries = data(5, seed=1)
    tops = exact.search(vecs, norms, queries, 10, metric)
    assert len(tops) == 5
    for q, top in zip(queries, tops, strict=True):
        ref = reference(vecs, q, metric)
        want = np.argsort(-ref, kind="stable")[:10]
        assert top.labels.tolist() == want.tolist()
        np.testing.assert_allclose(top.scores, ref[want], rtol=1e-5, atol=1e-5)
        dist = -ref[want] if metric is Metric.L2 else 1.0 - ref[want]
        np.testing.assert_allclose(top.distances, dist, rtol=1e-5, atol=1e-5)
        assert top.scores.dtype == np.float32 and top.distances.dtype == np.float32


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("fraction", [0.001, 0.01, 0.3, 0.9])
def test_search_with_mask_and_rows(metric: Metric, fraction: float) -> None:
    vecs = data()
    norms = exact.row_norms(vecs)
    rng = np.random.default_rng(7)
    mask = rng.random(vecs.shape[0]) < fraction
    mask[0] = True
    q = data(1, seed=3)[0]
    ref = reference(vecs, q, metric)
    ref[~mask] = -np.inf
    k = 25
    want = np.argsort(-ref, kind="stable")[: min(k, int(mask.sum()))]
    by_mask = exact.search(vecs, norms, q, k, metric, mask=mask)[0]
    by_rows = exact.search(vecs, norms, q, k, metric, rows=np.flatnonzero(mask))[0]
    for top in (by_mask, by_rows):
        assert len(top) == min(k, int(mask.sum()))
        assert top.labels.tolist() == want.tolist()
        np.testing.assert_allclose(top.scores, ref[want], rtol=1e-5, atol=1e-5)


def test_mask_shorter_than_matrix_excludes_the_rest() -> None:
    vecs = data(100)
    mask = np.ones(40, np.bool_)
    tops = exact.search(vecs, exact.row_norms(vecs), vecs[90], 100, Metric.L2, mask=mask)
    assert len(tops[0]) == 40 and int(tops[0].labels.max()) < 40


def test_empty_candidates_and_k_larger_than_rows() -> None:
    vecs = data(10)
    norms = exact.row_norms(vecs)
    assert len(exact.search(vecs, norms, vecs[0], 5, Metric.IP, mask=np.zeros(10, np.bool_))[0]) == 0
    assert len(exact.search(vecs, norms, vecs[0], 0, Metric.IP)[0]) == 0
    top = exact.search(vecs, norms, vecs[0], 50, Metric.COSINE)[0]
    assert len(top) == 10 and top.labels[0] == 0
    assert top.scores[0] == pytest.approx(1.0, abs=1e-6)


def test_l2_distance_of_near_duplicates_is_precise() -> None:
    # The |v|^2 - 2vq + |q|^2 expansion cancels catastrophically here; results are recomputed.
    base = np.full(64, 1000.0, np.float32)
    vecs = np.stack([base, base + np.float32(1e-3)]).astype(np.float32)
    top = exact.search(vecs, exact.row_norms(vecs), base, 2, Metric.L2)[0]
    assert top.labels.tolist() == [0, 1]
    assert top.distances[0] == 0.0
    want = float(np.linalg.norm(vecs[1].astype(np.float64) - vecs[0].astype(np.float64)))
    assert want > 0 and top.distances[1] == pytest.approx(want, rel=1e-3)


def test_batched_queries_match_one_at_a_time() -> None:
    vecs = data()
    norms = exact.row_norms(vecs)
    queries = data(40, seed=9)
    batch = exact.search(vecs, norms, queries, 7, Metric.COSINE)
    for q, top in zip(queries, batch, strict=True):
        single = exact.search(vecs, norms, q, 7, Metric.COSINE)[0]
        assert single.labels.tolist() == top.labels.tolist()


@pytest.mark.parametrize("metric", METRICS)
@pytest.mark.parametrize("queries", [1, 5])
def test_candidate_scores_match_reference(metric: Metric, queries: int) -> None:
    """Each query against its own candidate rows (a re-rank), repeats included, read in place."""
    rng = np.random.default_rng(11)
    vectors = rng.standard_normal((300, 24)).astype(np.float32)
    qs = rng.standard_normal((queries, 24)).astype(np.float32)
    rows = rng.integers(0, 300, (queries, 40)).astype(np.int64)
    rows[:, 1] = rows[:, 0]
    got = exact.candidate_scores(vectors, exact.row_norms(vectors), qs, rows, metric)
    assert got.shape == rows.shape and got.dtype == np.float32
    for i in range(queries):
        np.testing.assert_allclose(got[i], reference(vectors[rows[i]], qs[i], metric), rtol=1e-5, atol=1e-4)


def test_candidate_dots_refuse_rows_outside_the_matrix() -> None:
    vectors = np.ones((10, 4), np.float32)
    query = np.ones((1, 4), np.float32)
    np.testing.assert_array_equal(exact.candidate_dots(vectors, query, np.array([[0, 9]])), [[4.0, 4.0]])
    for bad in ([[0, 10]], [[-1, 2]]):
        with pytest.raises(IndexError):
            exact.candidate_dots(vectors, query, np.array(bad, np.int64))


@pytest.mark.parametrize("metric", METRICS)
def test_from_hnsw_conversions(metric: Metric) -> None:
    import hnswlib

    vecs = data(300, dim=16)
    space = {Metric.COSINE: "cosine", Metric.L2: "l2", Metric.IP: "ip"}[metric]
    index = hnswlib.Index(space=space, dim=16)
    index.init_index(max_elements=300, M=16, ef_construction=100)
    index.add_items(vecs, np.arange(300))
    index.set_ef(300)
    q = data(1, dim=16, seed=5)
    labels, raw = index.knn_query(q, k=10)
    scores, dists = exact.from_hnsw(raw[0], metric)
    ref = reference(vecs, q[0], metric)[labels[0].astype(np.int64)]
    np.testing.assert_allclose(scores, ref, rtol=1e-4, atol=1e-4)
    dist = -ref if metric is Metric.L2 else 1.0 - ref
    np.testing.assert_allclose(dists, dist, rtol=1e-4, atol=1e-4)


def test_top_indices_breaks_ties_by_index() -> None:
    scores = np.array([[1.0, 3.0, 3.0, 2.0, 3.0]], np.float32)
    assert exact.top_indices(scores, 3).tolist() == [[1, 2, 4]]
    assert exact.top_indices(scores, 9).tolist() == [[1, 2, 4, 3, 0]]


def test_choose_plan() -> None:
    cfg = EngineConfig(exact_max_rows=1_000, exact_selectivity=0.05)
    assert choose_plan(0, 0, 10, cfg) == "exact"
    assert choose_plan(500, 500, 10, cfg) == "exact"  # small: exact is cheap and perfect
    assert choose_plan(100_000, 100_000, 10, cfg) == "hnsw"
    assert choose_plan(100_000, 900, 10, cfg) == "exact"  # few matches
    assert choose_plan(100_000, 4_000, 10, cfg) == "exact"  # 4 %: too selective for the graph
    assert choose_plan(100_000, 6_000, 10, cfg) == "hnsw_filtered"
    assert choose_plan(100_000, 6_000, 6_000, cfg) == "exact"  # k asks for every match


def hit(doc_id: str, score: float) -> Hit:
    return Hit(DocId(doc_id), score, 1.0 - score)


def test_merge_hits() -> None:
    a = [hit("a1", 0.9), hit("a2", 0.5), hit("a3", 0.1)]
    b = [hit("b1", 0.95), hit("b2", 0.4)]
    c: list[Hit] = []
    assert [h.id for h in merge_hits([a, b, c], 4)] == ["b1", "a1", "a2", "b2"]
    assert [h.id for h in merge_hits([a, b], 10)] == ["b1", "a1", "a2", "b2", "a3"]
    assert merge_hits([a], 2) == a[:2]
    assert merge_hits([a, b], 0) == []
    # l2 scores are negative distances: higher is still better.
    assert [h.id for h in merge_hits([[hit("x", -2.0)], [hit("y", -1.0)]], 2)] == ["y", "x"]
