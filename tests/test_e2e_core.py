"""End to end through a real server: collections, writes, reads, queries, filters."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from shoal_client import ShoalClient, ShoalHTTP
from shoal_client.errors import DimensionMismatch, Exists, NotFound
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def test_collection_lifecycle(client: ShoalClient) -> None:
    name = unique("life")
    info = await client.create_collection(name, dim=8, metric="l2")
    assert (info.name, info.dim, info.metric, info.count) == (name, 8, "l2", 0)
    with pytest.raises(Exists):
        await client.create_collection(name, dim=8)
    again = await client.create_collection(name, dim=8, if_not_exists=True)
    assert again.name == name
    assert name in [c.name for c in await client.list_collections()]
    await client.drop_collection(name)
    assert name not in [c.name for c in await client.list_collections()]
    with pytest.raises(NotFound):
        await client.drop_collection(name)
    with pytest.raises(NotFound):
        await client.query(name, vector=np.ones(8, np.float32))


async def test_text_documents_are_embedded_and_found(client: ShoalClient) -> None:
    name = unique("text")
    info = await client.create_collection(name)
    assert info.dim == 384 and info.metric == "cosine"
    docs = [
        {"id": "cat", "text": "A cat is sleeping on the warm windowsill.", "metadata": {"kind": "pet"}},
        {"id": "tax", "text": "The quarterly tax filing deadline is next Monday.", "metadata": {"kind": "work"}},
        {"id": "ship", "text": "The container ship docked in the harbour at dawn.", "metadata": {"kind": "travel"}},
    ]
    result = await client.upsert(name, docs)
    assert result.count == 3 and result.seq == 3
    hits = (await client.query(name, text="a kitten napping by the window", k=3)).hits
    assert next(h.id for h in hits) == "cat"
    assert hits[0].text == docs[0]["text"] and hits[0].metadata == {"kind": "pet"}
    assert hits[0].score == pytest.approx(1 - hits[0].distance, abs=1e-5)
    assert hits[0].score > hits[1].score >= hits[2].score
    filtered = (await client.query(name, text="a kitten", k=3, where={"kind": {"$ne": "pet"}})).hits
    assert {h.id for h in filtered} == {"tax", "ship"}


async def test_read_your_writes_on_every_ack(client: ShoalClient) -> None:
    name = unique("ryw")
    await client.create_collection(name, dim=16)
    rng = np.random.default_rng(1)
    for i in range(30):
        vec = rng.normal(size=16).astype(np.float32)
        ack = await client.upsert(name, [{"id": f"d{i}", "vector": vec}])
        assert ack.seq == i + 1
        hits = (await client.query(name, vector=vec, k=1)).hits
        assert hits[0].id == f"d{i}" and hits[0].score == pytest.approx(1.0, abs=1e-5)
    assert await client.count(name) == 30


@pytest.mark.parametrize("metric", ["cosine", "l2", "ip"])
async def test_scores_and_distances_match_numpy(client: ShoalClient, metric: str) -> None:
    name = unique(f"m_{metric}")
    await client.create_collection(name, dim=12, metric=metric)
    rng = np.random.default_rng(7)
    vectors = rng.normal(size=(200, 12)).astype(np.float32)
    await client.upsert(name, [{"id": str(i), "vector": v} for i, v in enumerate(vectors)])
    q = rng.normal(size=12).astype(np.float32)
    hits = (await client.query(name, vector=q, k=10, include=["vector"])).hits
    if metric == "cosine":
        sims = vectors @ q / (np.linalg.norm(vectors, axis=1) * np.linalg.norm(q))
        expect_score, expect_dist = sims, 1 - sims
    elif metric == "ip":
        expect_score = vectors @ q
        expect_dist = 1 - expect_score
    else:
        expect_dist = np.linalg.norm(vectors - q, axis=1)
        expect_score = -expect_dist
    order = np.argsort(-expect_score)[:10]
    assert [h.id for h in hits] == [str(i) for i in order]
    for hit in hits:
        i = int(hit.id)
        assert hit.score == pytest.approx(float(expect_score[i]), abs=1e-4)
        assert hit.distance == pytest.approx(float(expect_dist[i]), abs=1e-4)
        assert hit.vector is not None
        np.testing.assert_allclose(hit.vector, vectors[i], rtol=1e-6)


async def test_upsert_replaces_get_and_delete(client: ShoalClient) -> None:
    name = unique("crud")
    await client.create_collection(name, dim=4, metric="l2")
    await client.upsert(
        name,
        [
            {"id": "a", "vector": [1, 0, 0, 0], "text": "alpha", "metadata": {"n": 1, "tags": ["x", "y"]}},
            {"id": "b", "vector": [0, 1, 0, 0], "metadata": {"n": 2}},
            {"id": "c", "vector": [0, 0, 1, 0], "metadata": {"n": 3}},
        ],
    )
    ack = await client.upsert(name, [{"id": "a", "vector": [0, 0, 0, 1], "metadata": {"n": 10}}])
    assert ack.seq == 4
    docs = await client.get(name, ["a", "missing", "b"], include=["text", "metadata", "vector"])
    assert [d["id"] for d in docs] == ["a", "b"]
    assert "text" not in docs[0]  # replaced as a whole: the new version has no text
    assert docs[0]["metadata"] == {"n": 10}
    np.testing.assert_array_equal(docs[0]["vector"], np.array([0, 0, 0, 1], np.float32))
    assert await client.count(name) == 3
    deleted = await client.delete(name, ids=["b", "nope"])
    assert (deleted.deleted, deleted.seq) == (1, 5)
    deleted = await client.delete(name, where={"n": {"$gte": 3}})
    assert (deleted.deleted, deleted.seq) == (2, 7)
    assert await client.count(name) == 0
    assert (await client.query(name, vector=[1, 0, 0, 0], k=5)).hits == []
    # Re-adding a deleted id works and is found.
    await client.upsert(name, [{"id": "b", "vector": [0, 1, 0, 0]}])
    assert [h.id for h in (await client.query(name, vector=[0, 1, 0, 0], k=5)).hits] == ["b"]


async def test_filter_matching_one_percent_returns_k(server: ServerProcess) -> None:
    """20,000 documents, a filter matching ~1%: every filtered query returns k exact hits."""
    name = unique("sel")
    dim, n = 32, 20_000
    rng = np.random.default_rng(3)
    vectors = rng.normal(size=(n, dim)).astype(np.float32)
    groups = rng.integers(0, 100, size=n)
    async with ShoalClient.connect(server.ws_url) as c:
        await c.create_collection(name, dim=dim)
        for start in range(0, n, 2_000):
            await c.upsert(
                name,
                [
                    {"id": str(i), "vector": vectors[i], "metadata": {"group": int(groups[i]), "even": i % 2 == 0}}
                    for i in range(start, start + 2_000)
                ],
            )
        assert await c.count(name) == n
        normed = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        for trial in range(5):
            q = rng.normal(size=dim).astype(np.float32)
            group = int(rng.integers(0, 100))
            where = {"$and": [{"group": group}, {"even": {"$in": [True, False]}}]}
            hits = (await c.query(name, vector=q, k=10, where=where)).hits
            matching = np.flatnonzero(groups == group)
            assert len(matching) >= 10, "the 1% filter must match at least k documents"
            assert len(hits) == 10
            assert all(groups[int(h.id)] == group for h in hits)
            sims = normed[matching] @ (q / np.linalg.norm(q))
            expected = {str(i) for i in matching[np.argsort(-sims)[:10]]}
            assert {h.id for h in hits} == expected, f"trial {trial}"
        # A filter matching fewer than k documents returns all of them.
        few = (await c.query(name, vector=vectors[0], k=1000, where={"group": 5, "even": True})).hits
        assert len(few) == int(np.sum((groups == 5) & (np.arange(n) % 2 == 0)))
        await c.drop_collection(name)


async def test_pipelined_requests_on_one_connection(client: ShoalClient) -> None:
    name = unique("pipe")
    await client.create_collection(name, dim=8)
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(500, 8)).astype(np.float32)
    await client.upsert(name, [{"id": str(i), "vector": v} for i, v in enumerate(vectors)])
    results = await asyncio.gather(*(client.query(name, vector=vectors[i], k=1) for i in range(300)))
    assert [r.hits[0].id for r in results] == [str(i) for i in range(300)]


async def test_http_json_api(server: ServerProcess) -> None:
    name = unique("http")
    async with ShoalHTTP(server.url) as http:
        info = await http.create_collection(name, dim=3)
        assert info.dim == 3
        ack = await http.upsert(name, [{"id": "x", "vector": [1.0, 2.0, 3.0], "metadata": {"k": "v"}}])
        assert ack.seq == 1
        hits = (await http.query(name, vector=[1.0, 2.0, 3.0], k=1, include=["vector", "metadata"])).hits
        assert hits[0].id == "x" and hits[0].metadata == {"k": "v"}
        assert await http.count(name) == 1
        with pytest.raises(DimensionMismatch):
            await http.upsert(name, [{"id": "y", "vector": [1.0, 2.0]}])
        await http.drop_collection(name)
    async with ShoalHTTP(server.url, use_msgpack=True) as http:
        await http.create_collection(name, dim=3)
        await http.upsert(name, [{"id": "x", "vector": np.array([1, 2, 3], np.float32)}])
        hits = (await http.query(name, vector=[1.0, 2.0, 3.0], k=1, include=["vector"])).hits
        assert hits[0].vector is not None and list(hits[0].vector) == [1, 2, 3]
        await http.drop_collection(name)
