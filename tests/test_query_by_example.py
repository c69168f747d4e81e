"""Query by example (`like`): a stored document's vector is the query, and the document is left
out of the hits; over WebSocket, HTTP, SSE and the blocking clients, through a real server."""

from __future__ import annotations

import asyncio
import shutil
import uuid
from collections.abc import Iterator
from typing import Any

import httpx
import numpy as np
import pytest

from shoal_client import BadRequest, LeaveEvent, MatchEvent, NotFound, ShoalClient, ShoalHTTP, subscribe_sse
from shoal_client.sync import SyncShoalClient, SyncShoalHTTP
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(120)
DIM = 8


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


def corpus(n: int, seed: int) -> np.ndarray:
    return np.stack([unit(row) for row in np.random.default_rng(seed).standard_normal((n, DIM))])


def exact_ids(vectors: np.ndarray, ids: list[str], query: np.ndarray, k: int, leave_out: str) -> list[str]:
    """The k nearest ids by cosine, `leave_out` excluded (the test's own reference)."""
    scores = vectors @ unit(query)
    order = [ids[i] for i in np.argsort(-scores, kind="stable") if ids[i] != leave_out]
    return order[:k]


async def filled(client: ShoalClient, n: int = 40, seed: int = 1, text: bool = False) -> tuple[str, np.ndarray]:
    name = unique("like")
    await client.create_collection(name, dim=DIM)
    vectors = corpus(n, seed)
    docs: list[dict[str, Any]] = []
    for i, v in enumerate(vectors):
        doc: dict[str, Any] = {"id": f"d{i}", "vector": v.tolist(), "metadata": {"g": i % 4}}
        if text:
            doc["text"] = f"river stone {i} " + ("heron " * (i % 3)) + ("willow" if i % 2 else "moss")
        docs.append(doc)
    await client.upsert(name, docs)
    return name, vectors


async def test_like_is_the_stored_vector_without_the_document(client: ShoalClient) -> None:
    name, vectors = await filled(client)
    ids = [f"d{i}" for i in range(len(vectors))]
    reply = await client.request("query", collection=name, like="d3", k=5)
    got = [hit["id"] for hit in reply["hits"]]
    assert got == exact_ids(vectors, ids, vectors[3], 5, leave_out="d3")
    assert "d3" not in got and len(got) == 5
    # The same as a vector query for its vector asking one more, minus the document itself.
    plain = await client.request("query", collection=name, vector=vectors[3].tolist(), k=6)
    assert plain["hits"][0]["id"] == "d3"
    assert got == [hit["id"] for hit in plain["hits"] if hit["id"] != "d3"]
    # The typed client.
    typed = await client.query(name, like="d3", k=5, include=["metadata"])
    assert [h.id for h in typed.hits] == got and typed.hits[0].metadata is not None


async def test_like_keeps_k_under_filters(client: ShoalClient) -> None:
    name, vectors = await filled(client)
    ids = [f"d{i}" for i in range(len(vectors))]
    # d4 is in group 0, which has 10 documents: 9 others, and all of them come back for k=9.
    same_group = await client.request("query", collection=name, like="d4", k=9, where={"g": 0})
    assert len(same_group["hits"]) == 9 and "d4" not in {h["id"] for h in same_group["hits"]}
    assert {h["id"] for h in same_group["hits"]} == {f"d{i}" for i in range(0, 40, 4)} - {"d4"}
    # A filter the liked document does not pass: k hits, the exact ones of that group.
    other = await client.request("query", collection=name, like="d4", k=5, where={"g": 1})
    group1 = [i for i in range(40) if i % 4 == 1]
    expected = exact_ids(vectors[group1], [ids[i] for i in group1], vectors[4], 5, leave_out="d4")
    assert [h["id"] for h in other["hits"]] == expected
    # More asked than there are other documents: every other document, the liked one never.
    everything = await client.request("query", collection=name, like="d0", k=100)
    assert len(everything["hits"]) == 39 and "d0" not in {h["id"] for h in everything["hits"]}


async def test_like_errors_are_typed(client: ShoalClient) -> None:
    name, vectors = await filled(client, n=5)
    with pytest.raises(NotFound, match="nosuch"):
        await client.query(name, like="nosuch")
    with pytest.raises(NotFound):
        await client.query(unique("gone"), like="d0")
    for args in (
        {"like": "d0", "vector": vectors[0].tolist()},
        {"like": "d0", "text": "hello"},
        {"like": 5},
        {"like": ""},
        {"like": "d0", "mode": "keyword", "text": "river"},
        {"like": "d0", "mode": "hybrid", "vector": vectors[0].tolist()},
    ):
        with pytest.raises(BadRequest):
            await client.request("query", collection=name, k=3, **args)
    # Keyword and hybrid read the liked document's text: one without text cannot serve them.
    for mode in ("keyword", "hybrid"):
        with pytest.raises(BadRequest, match="has none"):
            await client.request("query", collection=name, like="d1", mode=mode)
    with pytest.raises(NotFound):
        await client.subscribe(name, like="nosuch", threshold=0.5)
    with pytest.raises(BadRequest):
        await client.request("subscribe", collection=name, like="d0", text="x", threshold=0.5)
    assert (await client.query(name, like="d0", k=2)).hits  # the connection still serves


async def test_like_keyword_and_hybrid_use_the_stored_text(client: ShoalClient) -> None:
    name, vectors = await filled(client, text=True)
    liked = (await client.get(name, ["d5"], include=["text"]))[0]
    keyword = await client.request("query", collection=name, like="d5", mode="keyword", k=4)
    by_text = await client.request("query", collection=name, text=liked["text"], mode="keyword", k=5)
    assert [h["id"] for h in keyword["hits"]] == [h["id"] for h in by_text["hits"] if h["id"] != "d5"][:4]
    assert len(keyword["hits"]) == 4
    hybrid = await client.request("query", collection=name, like="d5", mode="hybrid", k=4)
    both = await client.request(
        "query", collection=name, text=liked["text"], vector=vectors[5].tolist(), mode="hybrid", k=5
    )
    assert [h["id"] for h in hybrid["hits"]] == [h["id"] for h in both["hits"] if h["id"] != "d5"][:4]
    assert len(hybrid["hits"]) == 4


async def test_like_cache_follows_the_liked_document(client: ShoalClient) -> None:
    name, vectors = await filled(client)
    ids = [f"d{i}" for i in range(len(vectors))]
    first = await client.request("query", collection=name, like="d7", k=5)
    again = await client.request("query", collection=name, like="d7", k=5)
    assert first["cached"] is False and again["cached"] is True and again["hits"] == first["hits"]
    # A vector query for the same vector is another question (its answer holds d7).
    plain = await client.request("query", collection=name, vector=vectors[7].tolist(), k=5)
    assert plain["cached"] is False and plain["hits"][0]["id"] == "d7"
    # Re-upsert the liked document elsewhere: the answer follows its new vector.
    moved = unit(vectors[20] + 0.01 * vectors[21])
    await client.upsert(name, [{"id": "d7", "vector": moved.tolist()}])
    after = await client.request("query", collection=name, like="d7", k=5)
    assert after["cached"] is False
    vectors[7] = moved
    assert [h["id"] for h in after["hits"]] == exact_ids(vectors, ids, moved, 5, leave_out="d7")
    assert [h["id"] for h in after["hits"]] != [h["id"] for h in first["hits"]]
    assert after["hits"][0]["id"] == "d20"


async def test_like_over_http(server: ServerProcess, client: ShoalClient) -> None:
    name, vectors = await filled(client)
    ids = [f"d{i}" for i in range(len(vectors))]
    expected = exact_ids(vectors, ids, vectors[2], 3, leave_out="d2")
    async with httpx.AsyncClient() as http:
        raw = await http.post(f"{server.url}/v1/collections/{name}/query", json={"like": "d2", "k": 3})
        assert raw.status_code == 200, raw.text
        assert [h["id"] for h in raw.json()["hits"]] == expected
        missing = await http.post(f"{server.url}/v1/collections/{name}/query", json={"like": "nope"})
        assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    async with ShoalHTTP(server.url) as db:
        assert [h.id for h in (await db.query(name, like="d2", k=3)).hits] == expected


def test_like_with_the_blocking_clients(server: ServerProcess) -> None:
    name = unique("likesync")
    vectors = corpus(12, 5)
    with SyncShoalClient(server.ws_url) as db, SyncShoalHTTP(server.url) as http:
        db.create_collection(name, dim=DIM)
        db.upsert(name, [{"id": f"d{i}", "vector": v.tolist()} for i, v in enumerate(vectors)])
        expected = exact_ids(vectors, [f"d{i}" for i in range(12)], vectors[0], 4, leave_out="d0")
        assert [h.id for h in db.query(name, like="d0", k=4).hits] == expected
        assert [h.id for h in http.query(name, like="d0", k=4).hits] == expected
        # A sync subscription by example: a copy of d0 matches, d0 itself does not.
        sub = db.subscribe(name, like="d0", threshold=0.99)
        try:
            db.upsert(name, [{"id": "d0", "vector": vectors[0].tolist()}])
            ack = db.upsert(name, [{"id": "copy", "vector": vectors[0].tolist()}])
            event = next(iter(sub))
            assert isinstance(event, MatchEvent) and event.hit.id == "copy" and event.seq == ack.seq
        finally:
            sub.close()


async def test_subscribe_like_never_matches_itself(client: ShoalClient) -> None:
    name, vectors = await filled(client, n=10, seed=9)
    start = await client.upsert(name, [{"id": "noise", "vector": unit(-vectors[3]).tolist()}])
    sub = await client.subscribe(name, like="d3", threshold=0.95, include=["vector"])
    near = unit(vectors[3] + 0.05 * vectors[4])
    # The liked document re-upserted (moved away): its subscription keeps the old vector, and
    # the document itself is never pushed, neither as it was nor as it is now.
    await client.upsert(name, [{"id": "d3", "vector": vectors[3].tolist()}])
    await client.upsert(name, [{"id": "d3", "vector": vectors[8].tolist()}])
    ack = await client.upsert(
        name, [{"id": "twin", "vector": near.tolist()}, {"id": "far", "vector": vectors[8].tolist()}]
    )
    last = await client.upsert(name, [{"id": "end", "vector": vectors[3].tolist()}])
    got: list[MatchEvent] = []
    async with asyncio.timeout(30):
        async for event in sub:
            assert isinstance(event, MatchEvent), event
            got.append(event)
            if event.seq >= last.seq:
                break
    assert [(e.hit.id, e.seq) for e in got] == [("twin", ack.seq - 1), ("end", last.seq)]
    await sub.close()
    # Replay from the log after `start`: the same matches, d3 left out there too.
    replayed = await client.subscribe(name, like="twin", threshold=0.95, after_seq=start.seq)
    seen: list[str] = []
    left: list[str] = []
    async with asyncio.timeout(30):
        async for event in replayed:
            if isinstance(event, LeaveEvent):
                left.append(event.id)
                continue
            assert isinstance(event, MatchEvent)
            seen.append(event.hit.id)
            if event.seq >= last.seq:
                break
    await replayed.close()
    # twin's vector now is near d3's first vector: d3 (first re-upsert) and end match, d3 leaves
    # when it moves away, and twin itself never matches nor leaves.
    assert seen == ["d3", "end"]
    assert left == ["d3"]


async def test_sse_subscribe_by_example(server: ServerProcess, client: ShoalClient) -> None:
    name, vectors = await filled(client, n=6, seed=4)
    async with httpx.AsyncClient() as http:
        params = {"like": "nope", "threshold": "0.5"}
        bad = await http.get(f"{server.url}/v1/collections/{name}/subscribe", params=params)
        assert bad.status_code == 404 and bad.json()["error"]["code"] == "not_found"
    # Written before the stream opens and replayed after `start`: d1 itself is left out.
    start = await client.upsert(name, [{"id": "d1", "vector": vectors[1].tolist()}])
    await client.upsert(name, [{"id": "d1", "vector": vectors[1].tolist()}])
    ack = await client.upsert(name, [{"id": "again", "vector": vectors[1].tolist()}])
    stream = subscribe_sse(server.url, name, like="d1", threshold=0.99, last_event_id=start.seq)
    try:
        async with asyncio.timeout(20):
            event = await anext(stream)
        assert event.event == "match" and event.data["hit"]["id"] == "again" and event.seq == ack.seq
    finally:
        await stream.aclose()  # type: ignore[attr-defined]


@pytest.fixture(scope="module")
def sharded() -> Iterator[ServerProcess]:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir, {"SHOAL_SHARDS_PER_COLLECTION": "3"})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_like_across_shards(sharded: ServerProcess) -> None:
    async with ShoalClient.connect(sharded.ws_url) as client:
        name, vectors = await filled(client, n=60, seed=11)
        ids = [f"d{i}" for i in range(60)]
        for liked in ("d0", "d17", "d42"):  # wherever each one lives, it is found and left out
            reply = await client.request("query", collection=name, like=liked, k=7)
            assert [h["id"] for h in reply["hits"]] == exact_ids(vectors, ids, vectors[int(liked[1:])], 7, liked)
        with pytest.raises(NotFound):
            await client.query(name, like="d60")
