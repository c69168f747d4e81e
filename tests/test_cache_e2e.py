"""The results and query-embedding caches through real servers: every part of a query is part
of its key; the byte bound evicts; the embedding cache serves repeated texts; writers and
readers over WebSocket and HTTP never see a stale answer; and keyword and hybrid search hold
over several shards. Several nodes: tests/test_cache_cluster.py."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from shoal_client import ShoalClient
from tests.server_process import ServerProcess, local_server, metric

pytestmark = pytest.mark.timeout(240)

DIM = 8
# Small enough that a few dozen k=50 answers overflow it.
SMALL_CACHE_BYTES = 40_000


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32).tolist()


def name(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def river_docs(count: int) -> list[dict[str, Any]]:
    return [
        {
            "id": f"d{i}",
            "text": f"doc {i} river bank {'delta' if i % 3 == 0 else 'meadow'}",
            "vector": unit(i),
            "metadata": {"i": i, "even": i % 2 == 0},
        }
        for i in range(count)
    ]


# --- one node: the session's server ------------------------------------------------------------


async def test_every_part_of_a_query_is_part_of_its_key(server: ServerProcess, client: ShoalClient) -> None:
    coll = name("keys")
    await client.create_collection(coll, dim=DIM)
    await client.upsert(coll, river_docs(20))
    base: dict[str, Any] = {"text": "river delta", "vector": unit(3), "k": 4, "mode": "hybrid", "fusion": "weighted"}
    variants: list[dict[str, Any]] = [
        {**base, "k": 5},
        {**base, "where": {"even": True}},
        {**base, "where_text": {"$contains": "meadow"}},
        {**base, "include": ["metadata"]},
        {**base, "alpha": 0.9},
        {**base, "fusion": "rrf"},
        {**base, "fusion": "rrf", "rrf_k": 5},
        {**base, "vector_candidates": 8},
        {**base, "keyword_candidates": 8},
        {**base, "ef": 12},
        {**base, "mode": "keyword", "fusion": None, "vector": None},
        {"vector": unit(3), "k": 4},
        {"vector": unit(4), "k": 4},
    ]
    assert (await client.request("query", collection=coll, **base))["cached"] is False
    assert (await client.request("query", collection=coll, **base))["cached"] is True
    for variant in variants:
        args = {key: value for key, value in variant.items() if value is not None}
        first = await client.request("query", collection=coll, **args)
        assert first["cached"] is False, args
        again = await client.request("query", collection=coll, **args)
        assert again["cached"] is True and again["hits"] == first["hits"], args
    # Answers follow their own parameters, not a cached neighbour's.
    even = await client.request("query", collection=coll, **{**base, "where": {"even": True}})
    assert even["hits"] and all(h["id"][1:].isdigit() and int(h["id"][1:]) % 2 == 0 for h in even["hits"])
    meadow = await client.request("query", collection=coll, **{**base, "where_text": {"$contains": "meadow"}})
    assert meadow["hits"] and all(int(h["id"][1:]) % 3 != 0 for h in meadow["hits"])
    # The typed result and HTTP carry the flag too.
    assert (await client.query(coll, vector=unit(9), k=2)).cached is False
    assert (await client.query(coll, vector=unit(9), k=2)).cached is True
    async with httpx.AsyncClient(base_url=server.url) as http:
        body = {"text": "river", "k": 2, "mode": "keyword"}
        replies = [(await http.post(f"/v1/collections/{coll}/query", json=body)).json() for _ in range(2)]
    assert [r["cached"] for r in replies] == [False, True] and replies[0]["hits"] == replies[1]["hits"]


async def test_a_repeated_query_text_is_embedded_once(server: ServerProcess, client: ShoalClient) -> None:
    coll = name("emb")
    await client.create_collection(coll)  # the model's width: the server embeds
    await client.upsert(coll, [{"id": f"t{i}", "text": t} for i, t in enumerate(["a cat", "a dog", "tax forms"])])
    text = f"a small kitten {uuid.uuid4().hex}"  # no earlier test embedded it
    hits_line = 'shoal_embedding_cache_lookups_total{outcome="hit"}'
    miss_line = 'shoal_embedding_cache_lookups_total{outcome="miss"}'
    hits0, misses0 = await metric(server.url, hits_line), await metric(server.url, miss_line)
    first = await client.request("query", collection=coll, text=text, k=3)
    # Another k is another answer (a results-cache miss), but the same text: one embedding.
    second = await client.request("query", collection=coll, text=text, k=2)
    assert first["cached"] is False and second["cached"] is False
    assert second["hits"] == first["hits"][:2] and first["hits"][0]["id"] == "t0"
    assert await metric(server.url, miss_line) == misses0 + 1
    assert await metric(server.url, hits_line) == hits0 + 1


# --- a server of its own: a small cache, three shards -----------------------------------------


@pytest.fixture(scope="module")
def small_cache_server() -> Iterator[ServerProcess]:
    env = {"SHOAL_RESULTS_CACHE_BYTES": str(SMALL_CACHE_BYTES), "SHOAL_SHARDS_PER_COLLECTION": "3"}
    with local_server(env, quiet=True) as proc:
        yield proc


async def test_the_byte_bound_evicts_the_least_recent(small_cache_server: ServerProcess) -> None:
    url = small_cache_server.url
    coll = name("evict")
    async with ShoalClient.connect(small_cache_server.ws_url) as c:
        await c.create_collection(coll, dim=DIM)
        await c.upsert(coll, [{"id": f"e{i}", "vector": unit(100 + i)} for i in range(200)])
        evicted_line = 'shoal_results_cache_dropped_total{reason="evicted"}'
        evicted0 = await metric(url, evicted_line)
        assert (await c.request("query", collection=coll, vector=unit(0), k=50))["cached"] is False
        assert (await c.request("query", collection=coll, vector=unit(0), k=50))["cached"] is True
        for seed in range(1, 60):
            await c.request("query", collection=coll, vector=unit(seed), k=50)
            assert await metric(url, "shoal_results_cache_bytes ") <= SMALL_CACHE_BYTES
        assert await metric(url, evicted_line) > evicted0
        assert (await c.request("query", collection=coll, vector=unit(0), k=50))["cached"] is False
        assert (await c.request("query", collection=coll, vector=unit(59), k=50))["cached"] is True


async def test_keyword_and_hybrid_over_three_shards(small_cache_server: ServerProcess) -> None:
    coll = name("shards")
    async with ShoalClient.connect(small_cache_server.ws_url) as c:
        await c.create_collection(coll, dim=DIM)
        docs = [*river_docs(60), {"id": "best", "text": "delta delta delta river", "vector": unit(7)}]
        await c.upsert(coll, docs)
        holders = {d["id"] for d in docs if "delta" in d["text"]}
        keyword = await c.request("query", collection=coll, text="delta", k=100, mode="keyword")
        assert {h["id"] for h in keyword["hits"]} == holders  # every holder, from every shard, once
        assert keyword["hits"][0]["id"] == "best"
        scores = [h["score"] for h in keyword["hits"]]
        assert scores == sorted(scores, reverse=True)
        top = await c.request("query", collection=coll, text="delta", k=5, mode="keyword")
        assert [h["id"] for h in top["hits"]][:1] == ["best"] and len(top["hits"]) == 5
        for fusion in ("rrf", "weighted"):
            hybrid = await c.request(
                "query", collection=coll, text="delta", vector=unit(7), k=8, mode="hybrid", fusion=fusion
            )
            assert len(hybrid["hits"]) == 8 and hybrid["hits"][0]["id"] == "best", fusion
            assert all(set(h["scores"]) == {"vector", "keyword"} for h in hybrid["hits"])
        rare = await c.request(
            "query", collection=coll, text="delta", vector=unit(7), k=50, mode="hybrid",
            where={"even": True}, vector_candidates=50, keyword_candidates=50,
        )  # fmt: skip
        even_holders = {d["id"] for d in docs if d.get("metadata", {}).get("even") is True}
        assert {h["id"] for h in rare["hits"]} <= even_holders and len(rare["hits"]) == min(50, len(even_holders))


# --- never stale, several clients --------------------------------------------------------------

WRITERS = 4
STEPS = 25


class TagHistory:
    """Each tag's live ids after each of its writer's writes (one writer per tag, so its states
    are ordered). A write's state is recorded before it is sent (another client may see it
    before its ack arrives) and marked acked after. An answer read once state i was acked must
    be state i or a later one."""

    def __init__(self, tags: list[str]) -> None:
        self.states: dict[str, list[frozenset[str]]] = {t: [frozenset()] for t in tags}
        self.acked_at: dict[str, int] = dict.fromkeys(tags, 0)

    def now(self, tag: str) -> int:
        return self.acked_at[tag]

    def sending(self, tag: str, live: set[str]) -> None:
        self.states[tag].append(frozenset(live))

    def acked(self, tag: str) -> None:
        self.acked_at[tag] = len(self.states[tag]) - 1

    def fresh_enough(self, tag: str, since: int, got: set[str]) -> bool:
        return any(got == state for state in self.states[tag][since:])


async def test_interleaved_writers_and_readers_over_ws_and_http_never_see_a_stale_answer(
    server: ServerProcess, client: ShoalClient
) -> None:
    coll = name("stale")
    await client.create_collection(coll, dim=DIM)
    tags = [f"tag{uuid.uuid4().hex[:6]}w{w}" for w in range(WRITERS)]
    history = TagHistory(tags)
    checked = {"replies": 0, "cached": 0, "stale": 0}

    def modes(tag: str) -> list[dict[str, Any]]:
        where = {"tag": tag}
        return [
            {"vector": unit(5), "k": 100, "where": where},
            {"text": tag, "k": 100, "mode": "keyword"},
            {"text": tag, "vector": unit(6), "k": 100, "mode": "hybrid", "where": where},
        ]

    async def read_all(ask: Any) -> None:
        for tag in tags:
            since = history.now(tag)
            for q in modes(tag):
                for _ in range(2):  # the repeat is usually a cache hit
                    reply = await ask(q)
                    checked["replies"] += 1
                    checked["cached"] += reply["cached"] is True
                    if not history.fresh_enough(tag, since, {h["id"] for h in reply["hits"]}):
                        checked["stale"] += 1

    async def writer(w: int, ws: ShoalClient | None, http: httpx.AsyncClient | None) -> None:
        async def ask(q: dict[str, Any]) -> dict[str, Any]:
            if ws is not None:
                return await ws.request("query", collection=coll, **q)
            assert http is not None
            response = await http.post(f"/v1/collections/{coll}/query", json=q)
            assert response.status_code == 200, response.text
            reply: dict[str, Any] = response.json()
            return reply

        tag = tags[w]
        live: set[str] = set()
        rng = np.random.default_rng(w)
        for step in range(STEPS):
            if live and rng.random() < 0.3:
                gone = sorted(live)[int(rng.integers(len(live)))]
                body: dict[str, Any] = {"ids": [gone]}
                live.discard(gone)
                op = "delete"
            else:
                doc_id = f"{tag}-{step}"
                vector = unit(1000 * w + step)
                doc = {"id": doc_id, "text": f"{tag} step {step}", "vector": vector, "metadata": {"tag": tag}}
                body = {"docs": [doc]}
                live.add(doc_id)
                op = "upsert"
            history.sending(tag, live)
            if ws is not None:
                await ws.request(op, collection=coll, **body)
            else:
                assert http is not None
                assert (await http.post(f"/v1/collections/{coll}/{op}", json=body)).status_code == 200
            history.acked(tag)
            await read_all(ask)

    async with (
        ShoalClient.connect(server.ws_url) as ws0,
        ShoalClient.connect(server.ws_url) as ws1,
        httpx.AsyncClient(base_url=server.url, timeout=30) as http,
        anyio.create_task_group() as tg,
    ):
        tg.start_soon(writer, 0, ws0, None)
        tg.start_soon(writer, 1, ws1, None)
        tg.start_soon(writer, 2, None, http)
        tg.start_soon(writer, 3, None, http)
    print(f"stale check: {checked}")
    assert checked["replies"] == WRITERS * STEPS * WRITERS * 3 * 2
    assert checked["cached"] > checked["replies"] // 4, checked
    assert checked["stale"] == 0, checked
