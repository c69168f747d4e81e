"""`query_batch` end to end through a real server: every answer is the one `query` gives for the
same arguments (vector, filtered, text, keyword, hybrid, by example, over several shards), an
error of one query stays in its slot, a bad request fails whole, the results cache serves a
repeated batch, and the HTTP route, the sync client and a read-only key scoped to one
collection all behave like `query`."""

from __future__ import annotations

import json
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from shoal_client import (
    BadRequest,
    DimensionMismatch,
    Forbidden,
    InvalidVector,
    NotFound,
    QueryResult,
    ShoalClient,
    ShoalError,
    TooLarge,
)
from shoal_client.sync import SyncShoalClient
from tests.server_process import ServerProcess, local_server

pytestmark = pytest.mark.timeout(180)
DIM = 16
N = 400
MAX_BATCH = 64
KEYS = [
    {"key": "admin-key", "collections": "*", "access": "admin"},
    {"key": "reader-key", "collections": ["qb_vec"], "access": "read"},
]
TEXTS = [
    "the harbour seals sleep on warm rocks",
    "a shoal of herring turns in the bay",
    "fishing boats return before the storm",
    "lighthouse keepers log every passing ship",
    "tides rise twice a day along the coast",
    "gulls follow the herring boats home",
]
RNG = np.random.default_rng(5)
VECTORS = RNG.normal(size=(N, DIM)).astype(np.float32)
QUERIES = RNG.normal(size=(24, DIM)).astype(np.float32)


@pytest.fixture(scope="module")
def server() -> Iterator[ServerProcess]:
    env = {
        "SHOAL_SHARDS_PER_COLLECTION": "2",
        "SHOAL_MAX_QUERY_BATCH": str(MAX_BATCH),
        "SHOAL_EXACT_MAX_ROWS": "0",  # every unfiltered query goes to the index
        "SHOAL_API_KEYS": json.dumps(KEYS),
    }
    with local_server(env, quiet=True) as proc:
        c = SyncShoalClient(proc.ws_url, key="admin-key")
        try:
            c.create_collection("qb_vec", dim=DIM)
            c.upsert("qb_vec", [doc(i) for i in range(N)])
            c.create_collection("qb_text")
            c.upsert(
                "qb_text",
                [{"id": f"t{i}", "text": t, "metadata": {"n": i}} for i, t in enumerate(TEXTS)],
            )
            c.create_collection("qb_other", dim=DIM)
        finally:
            c.close()
        yield proc


def doc(i: int) -> dict[str, Any]:
    return {"id": f"d{i}", "vector": VECTORS[i].tolist(), "metadata": {"b": i % 4}}


def wire(result: QueryResult) -> list[tuple[str, float, Any]]:
    return [(h.id, round(h.score, 5), None if h.vector is None else h.vector.tolist()) for h in result.hits]


async def one_by_one(c: ShoalClient, collection: str, queries: list[dict[str, Any]]) -> list[Any]:
    return [wire(await c.query(collection, **q)) for q in queries]


def answered(results: list[QueryResult | ShoalError]) -> list[Any]:
    assert all(isinstance(r, QueryResult) for r in results), results
    return [wire(r) for r in results if isinstance(r, QueryResult)]


async def test_every_answer_is_the_one_query_gives(server: ServerProcess) -> None:
    queries: list[dict[str, Any]] = []
    for i, q in enumerate(QUERIES):
        item: dict[str, Any] = {"vector": q, "k": 5 if i % 3 else 10, "include": []}
        if i % 4 == 1:
            item["ef"] = 200
        if i % 5 == 2:
            item["include"] = ["vector", "metadata"]
        if i % 6 == 3:
            item["where"] = {"b": 1}
        queries.append(item)
    queries.append({"like": "d7", "k": 4, "include": []})
    async with ShoalClient.connect(server.ws_url, key="admin-key") as c:
        batch = await c.query_batch("qb_vec", queries)
        assert answered(batch) == await one_by_one(c, "qb_vec", queries)
        assert all(len(r.hits) == q["k"] for r, q in zip(batch, queries, strict=True) if isinstance(r, QueryResult))
        assert "d7" not in {h.id for h in batch[-1].hits} if isinstance(batch[-1], QueryResult) else False
        # Nearest neighbours really: the vector query of a stored vector finds that document first.
        own = await c.query_batch("qb_vec", [{"vector": VECTORS[i], "k": 1} for i in range(0, N, 40)])
        assert [r.hits[0].id for r in own if isinstance(r, QueryResult)] == [f"d{i}" for i in range(0, N, 40)]


async def test_many_filtered_queries_are_each_answered_as_query_answers_them(server: ServerProcess) -> None:
    # Served a few at a time (not searched together), in order, whatever their number.
    queries = [{"vector": QUERIES[i % len(QUERIES)], "k": 6, "where": {"b": i % 4}} for i in range(MAX_BATCH)]
    async with ShoalClient.connect(server.ws_url, key="admin-key") as c:
        batch = await c.query_batch("qb_vec", queries)
        assert answered(batch) == await one_by_one(c, "qb_vec", queries)
    assert all(h.metadata == {"b": i % 4} for i, r in enumerate(batch) if isinstance(r, QueryResult) for h in r.hits)


async def test_text_keyword_and_hybrid_queries_in_one_batch(server: ServerProcess) -> None:
    queries: list[dict[str, Any]] = [
        {"text": "herring boats", "k": 3},
        {"text": "herring", "mode": "keyword", "k": 3},
        {"text": "storm at sea", "mode": "hybrid", "k": 3},
        {"text": "storm at sea", "mode": "hybrid", "fusion": "weighted", "alpha": 0.3, "k": 3},
        {"like": "t1", "mode": "hybrid", "k": 2},
        {"text": "rocks", "k": 2, "where": {"n": {"$gte": 2}}},
    ]
    async with ShoalClient.connect(server.ws_url, key="admin-key") as c:
        batch = await c.query_batch("qb_text", queries)
        assert answered(batch) == await one_by_one(c, "qb_text", queries)
        keyword = batch[1]
        assert isinstance(keyword, QueryResult) and {h.id for h in keyword.hits} == {"t1", "t5"}


async def test_an_error_of_one_query_stays_in_its_slot(server: ServerProcess) -> None:
    good = {"vector": QUERIES[0], "k": 3}
    queries: list[dict[str, Any]] = [
        good,
        {"like": "no-such-doc"},
        {"vector": np.ones(DIM + 1, dtype=np.float32)},
        {"vector": np.zeros(DIM, dtype=np.float32)},
        {"vector": QUERIES[1], "nprobe": 4},  # an ivf parameter on an hnsw collection
        {"text": "a text query embeds to 384 values, not 16"},
        good,
    ]
    async with ShoalClient.connect(server.ws_url, key="admin-key") as c:
        batch = await c.query_batch("qb_vec", queries)
        expected = wire(await c.query("qb_vec", **good))
    assert [type(r) for r in batch] == [
        QueryResult,
        NotFound,
        DimensionMismatch,
        InvalidVector,
        BadRequest,
        DimensionMismatch,
        QueryResult,
    ]
    assert wire(batch[0]) == wire(batch[6]) == expected  # type: ignore[arg-type]
    assert "queries[2]" in str(batch[2])


@pytest.mark.parametrize(
    ("args", "error", "says"),
    [
        ({"collection": "qb_nope", "queries": [{"vector": [1.0] * DIM}]}, NotFound, "qb_nope"),
        ({"collection": "qb_vec", "queries": []}, BadRequest, "non-empty list"),
        ({"collection": "qb_vec", "queries": {"vector": [1.0] * DIM}}, BadRequest, "non-empty list"),
        ({"collection": "qb_vec", "queries": [{"vector": [1.0] * DIM}] * (MAX_BATCH + 1)}, TooLarge, "at most 64"),
        (
            {"collection": "qb_vec", "queries": [{"vector": [1.0] * DIM}, {"vector": [1.0] * DIM, "k": 0}]},
            BadRequest,
            "queries[1]",
        ),
        ({"collection": "qb_vec", "queries": [{"vector": [1.0] * DIM, "were": {}}]}, BadRequest, "queries[0]: unknown"),
        ({"collection": "qb_vec", "queries": [{"collection": "qb_other", "vector": [1.0] * DIM}]}, BadRequest, "once"),
        ({"collection": "qb_vec", "queries": [7]}, BadRequest, "queries[0] must be a map"),
        ({"collection": "qb_vec", "queries": [{"vector": [float("nan")] * DIM}]}, InvalidVector, "queries[0]"),
    ],
)
async def test_a_bad_request_fails_whole(server: ServerProcess, args: dict[str, Any], error: type, says: str) -> None:
    async with ShoalClient.connect(server.ws_url, key="admin-key") as c:
        with pytest.raises(error) as caught:
            await c.request("query_batch", **args)
        assert says in str(caught.value)
        assert (await c.request("ping")) == {}  # the connection serves on


async def test_a_repeated_batch_is_answered_from_the_results_cache(server: ServerProcess) -> None:
    name = f"qb_cache_{uuid.uuid4().hex[:6]}"
    queries = [{"vector": q, "k": 5} for q in QUERIES[:6]]
    async with ShoalClient.connect(server.ws_url, key="admin-key") as c:
        await c.create_collection(name, dim=DIM)
        await c.upsert(name, [doc(i) for i in range(100)])
        first = await c.query_batch(name, queries)
        again = await c.query_batch(name, [*queries[:3], {"vector": QUERIES[7], "k": 5}])
        assert [r.cached for r in first if isinstance(r, QueryResult)] == [False] * 6
        assert [r.cached for r in again if isinstance(r, QueryResult)] == [True, True, True, False]
        assert [wire(r) for r in again[:3]] == [wire(r) for r in first[:3]]  # type: ignore[arg-type]
        # One cache for both ops: a batch's answer serves `query`, and the other way round.
        assert (await c.query(name, vector=QUERIES[4], k=5)).cached is True
        alone = await c.query(name, vector=QUERIES[9], k=5)
        mixed = await c.query_batch(name, [{"vector": QUERIES[9], "k": 5}, {"like": "missing"}])
        assert isinstance(mixed[0], QueryResult) and mixed[0].cached and wire(mixed[0]) == wire(alone)
        assert isinstance(mixed[1], NotFound)
        # A write moves the collection on: nothing of before is served, and the new document shows.
        await c.upsert(name, [{"id": "new", "vector": QUERIES[0].tolist()}])
        after = await c.query_batch(name, queries[:2])
        assert [r.cached for r in after if isinstance(r, QueryResult)] == [False, False]
        assert isinstance(after[0], QueryResult) and after[0].hits[0].id == "new"
        await c.drop_collection(name)


async def test_http_route_and_sync_client(server: ServerProcess) -> None:
    queries = [{"vector": QUERIES[i].tolist(), "k": 3} for i in range(4)] + [{"like": "missing"}]
    async with httpx.AsyncClient(base_url=server.url, headers={"authorization": "Bearer admin-key"}) as http:
        reply = await http.post("/v1/collections/qb_vec/query_batch", json={"queries": queries})
        assert reply.status_code == 200, reply.text
        body = reply.json()
        too_many = await http.post("/v1/collections/qb_vec/query_batch", json={"queries": queries * 20})
    assert too_many.status_code == 413 and too_many.json()["error"]["code"] == "too_large"
    assert body["took_ms"] >= 0 and body["results"][4] == {
        "error": {"code": "not_found", "message": "no document 'missing' in collection 'qb_vec'"}
    }
    with SyncShoalClient(server.ws_url, key="admin-key") as c:
        synced = c.query_batch("qb_vec", queries)
        alone = [wire(c.query("qb_vec", **q)) for q in queries[:4]]
    assert [wire(r) for r in synced[:4]] == alone  # type: ignore[arg-type]
    assert [[h["id"] for h in r["hits"]] for r in body["results"][:4]] == [[h[0] for h in a] for a in alone]
    assert isinstance(synced[4], NotFound)


async def test_a_read_key_reaches_only_its_collections(server: ServerProcess) -> None:
    async with ShoalClient.connect(server.ws_url, key="reader-key") as c:
        assert isinstance((await c.query_batch("qb_vec", [{"vector": QUERIES[0]}]))[0], QueryResult)
        with pytest.raises(Forbidden):
            await c.query_batch("qb_other", [{"vector": QUERIES[0]}])
