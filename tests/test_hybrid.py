"""Hybrid search: fusion units, and both fusions end to end over WebSocket and HTTP."""

from __future__ import annotations

import uuid

import numpy as np
import pytest

from actors.fusion import rrf, weighted
from models.records import DocId, Hit
from shoal_client import ShoalClient, ShoalHTTP
from shoal_client.errors import BadRequest
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)
DIM = 8


def _hits(*pairs: tuple[str, float]) -> list[Hit]:
    return [Hit(DocId(i), s, 0.0) for i, s in pairs]


def test_rrf_and_weighted_fuse_both_sides() -> None:
    vector = _hits(("a", 0.9), ("b", 0.8), ("c", 0.1))
    keyword = _hits(("c", 7.0), ("d", 3.0), ("a", 1.0))
    fused = rrf(vector, keyword, 4, rrf_k=60)
    assert [h.id for h in fused][:2] == ["a", "c"]  # on both sides
    assert fused[0].score == pytest.approx(1 / 61 + 1 / 63)
    assert fused[0].scores == (0.9, 1.0) and fused[0].distance is None
    assert {h.id for h in fused} == {"a", "b", "c", "d"}
    only_vector = weighted(vector, keyword, 4, alpha=1.0)
    assert [h.id for h in only_vector][:3] == ["a", "b", "c"]
    only_keyword = weighted(vector, keyword, 2, alpha=0.0)
    assert [h.id for h in only_keyword] == ["c", "d"]
    first, second = weighted(vector, keyword, 2, alpha=0.5)
    # a: 0.5 * 1 + 0.5 * 0; c: 0.5 * 0 + 0.5 * 1. A tie keeps the vector side's order.
    assert (first.id, second.id) == ("a", "c") and first.score == second.score == pytest.approx(0.5)
    assert second.scores is not None and second.scores.vector == 0.1 and second.scores.keyword == 7.0


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32).tolist()


async def _collection(client: ShoalClient, n: int = 40) -> str:
    name = f"hy_{uuid.uuid4().hex[:8]}"
    await client.create_collection(name, dim=DIM)
    docs = [
        {
            "id": f"d{i}",
            "text": f"document {i} about {'rivers' if i % 4 == 0 else 'mountains'} number{i}",
            "vector": unit(i),
            "metadata": {"n": i, "even": i % 2 == 0},
        }
        for i in range(n)
    ]
    await client.upsert(name, docs)
    return name


async def test_hybrid_both_fusions_carry_side_scores(client: ShoalClient) -> None:
    name = await _collection(client)
    query_vec = unit(5)  # d5's own vector: the vector side's best
    for fusion, extra in (("rrf", {"rrf_k": 10}), ("weighted", {"alpha": 0.5}), ("rrf", {})):
        result = await client.query(
            name, vector=query_vec, text="number12", k=5, mode="hybrid", fusion=fusion, **extra  # type: ignore[arg-type]
        )
        ids = [h.id for h in result.hits]
        assert len(ids) == 5 and len(set(ids)) == 5
        assert {"d5", "d12"} <= set(ids), (fusion, ids)
        for hit in result.hits:
            assert hit.distance is None and hit.scores is not None
            assert hit.scores.vector is not None or hit.scores.keyword is not None
        d12 = next(h for h in result.hits if h.id == "d12")
        assert d12.scores is not None and d12.scores.keyword is not None and d12.scores.keyword > 0
        scores = [h.score for h in result.hits]
        assert scores == sorted(scores, reverse=True)
    # alpha 1: the vector side alone decides; alpha 0: the keyword side.
    args = {"vector": query_vec, "text": "number12", "k": 1, "mode": "hybrid", "fusion": "weighted"}
    top_v = await client.query(name, alpha=1.0, **args)  # type: ignore[arg-type]
    top_k = await client.query(name, alpha=0.0, **args)  # type: ignore[arg-type]
    assert top_v.hits[0].id == "d5" and top_k.hits[0].id == "d12"


async def test_hybrid_filters_apply_to_both_sides_with_min_k_matches(client: ShoalClient) -> None:
    name = await _collection(client)
    # Filter: 3 documents match; the text matches one of them and others outside the filter.
    where = {"n": {"$in": [1, 2, 3]}}
    hits = (await client.query(name, vector=unit(0), text="rivers number2", k=10, mode="hybrid", where=where)).hits
    assert sorted(h.id for h in hits) == ["d1", "d2", "d3"]
    hits = (
        await client.query(
            name, vector=unit(0), text="rivers", k=7, mode="hybrid", where={"even": True},
            where_text={"$contains": "mountains"},
        )
    ).hits
    assert len(hits) == 7
    assert all(int(h.id[1:]) % 2 == 0 and int(h.id[1:]) % 4 != 0 for h in hits)
    # Candidate depths deeper than k, and a keyword side with no match: still k hits.
    hits = (
        await client.query(
            name, vector=unit(0), text="zzz", k=6, mode="hybrid", vector_candidates=20, keyword_candidates=6
        )
    ).hits
    assert len(hits) == 6 and all(h.scores is not None and h.scores.keyword is None for h in hits)


async def test_hybrid_over_http_and_text_embedding(server: ServerProcess, client: ShoalClient) -> None:
    name = f"hyt_{uuid.uuid4().hex[:8]}"
    await client.create_collection(name)  # the model's dim: text queries embed
    await client.upsert(
        name,
        [
            {"id": "xml", "text": "The parser links against libxml2 for XML feeds."},
            {"id": "cat", "text": "A kitten naps on the sunny windowsill."},
            {"id": "tax", "text": "File the quarterly taxes before Monday."},
        ],
    )
    async with ShoalHTTP(server.url) as http:
        result = await http.query(name, text="libxml2 parser", k=2, mode="hybrid")
        assert result.hits[0].id == "xml" and result.hits[0].scores is not None
        assert result.hits[0].scores.vector is not None and result.hits[0].scores.keyword is not None
        kw = await http.query(name, text="kitten", k=3, mode="keyword")
        assert [h.id for h in kw.hits] == ["cat"]


async def test_hybrid_and_vector_bad_input(client: ShoalClient) -> None:
    name = await _collection(client, 4)
    v = unit(1)
    bad = [
        {"mode": "hybrid", "vector": v},  # no text
        {"vector": v, "fusion": "rrf"},  # fusion with vector mode
        {"vector": v, "alpha": 0.5},
        {"vector": v, "rrf_k": 10},
        {"mode": "vector", "vector": v, "vector_candidates": 20},
        {"mode": "hybrid", "text": "x", "vector": v, "fusion": "weighted", "alpha": 1.5},
        {"mode": "hybrid", "text": "x", "vector": v, "fusion": "weighted", "alpha": -0.1},
        {"mode": "hybrid", "text": "x", "vector": v, "fusion": "borda"},
        {"mode": "hybrid", "text": "x", "vector": v, "alpha": 0.5},  # alpha belongs to weighted
        {"mode": "hybrid", "text": "x", "vector": v, "fusion": "weighted", "rrf_k": 3},
        {"mode": "hybrid", "text": "x", "vector": v, "k": 10, "vector_candidates": 5},
        {"mode": "fuzzy", "text": "x"},
    ]
    for args in bad:
        with pytest.raises(BadRequest):
            await client.request("query", collection=name, **args)
