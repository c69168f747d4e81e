"""Standing queries over the WebSocket, end to end through a real server and real clients."""

from __future__ import annotations

import asyncio
import random
import uuid
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import websockets

from shoal_client import ShoalClient
from shoal_client.errors import NotFound, TooLarge
from shoal_client.types import LaggedEvent, MatchEvent
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


async def metric(server: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient() as http:
        text = (await http.get(f"{server.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " ") or line.startswith(name + "{"):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


async def take(sub: Any, until_seq: int, timeout: float = 30.0) -> list[MatchEvent]:
    """Events of `sub` up to and including the one with seq `until_seq`."""
    out: list[MatchEvent] = []
    async with asyncio.timeout(timeout):
        async for event in sub:
            assert isinstance(event, MatchEvent), event
            out.append(event)
            if event.seq >= until_seq:
                return out
    raise AssertionError("subscription ended early")


def near(rng: np.random.Generator, target: np.ndarray, spread: float) -> np.ndarray:
    return unit(target + spread * rng.normal(size=target.shape[0]).astype(np.float32))


async def test_subscribe_pushes_exactly_the_matching_upserts(client: ShoalClient) -> None:
    name = unique("subs")
    await client.create_collection(name, dim=8)
    rng = np.random.default_rng(3)
    target = unit(np.eye(8, dtype=np.float32)[0])
    plain = await client.subscribe(name, vector=target, threshold=0.8)
    filtered = await client.subscribe(
        name,
        vector=target * 5,  # not normalised: cosine does not care
        threshold=0.8,
        where={"kind": "keep"},
        where_text={"$contains": "yes"},
        include=["vector", "metadata", "text"],
    )
    docs: list[dict[str, Any]] = []
    for i in range(60):
        vec = near(rng, target, 0.3) if i % 2 else unit(rng.normal(size=8).astype(np.float32))
        docs.append(
            {
                "id": f"d{i}",
                "vector": vec,
                "text": "yes" if i % 3 else "no",
                "metadata": {"kind": "keep" if i % 4 else "drop", "i": i},
            }
        )
    docs.append({"id": "last", "vector": target, "text": "yes", "metadata": {"kind": "keep"}})
    seqs: list[int] = []
    for start in range(0, len(docs), 7):  # several batches
        part = docs[start : start + 7]
        ack = await client.upsert(name, part)
        seqs.extend(range(ack.seq - len(part) + 1, ack.seq + 1))
    cos = {d["id"]: float(np.dot(d["vector"], target)) for d in docs}
    seq_of = {d["id"]: s for d, s in zip(docs, seqs, strict=True)}
    want_plain = [d["id"] for d in docs if cos[d["id"]] >= 0.8]
    want_filtered = [
        d["id"] for d in docs if cos[d["id"]] >= 0.8 and d["metadata"]["kind"] == "keep" and "yes" in d["text"]
    ]
    assert 5 < len(want_filtered) < len(want_plain) < len(docs)

    got_plain = await take(plain, seqs[-1])
    got_filtered = await take(filtered, seqs[-1])
    assert [e.hit.id for e in got_plain] == want_plain
    assert [e.hit.id for e in got_filtered] == want_filtered
    for events in (got_plain, got_filtered):
        assert [e.seq for e in events] == sorted({e.seq for e in events}), "strictly increasing seqs"
        for e in events:
            assert e.seq == seq_of[e.hit.id] and e.op == "upsert"
            assert e.hit.score == pytest.approx(cos[e.hit.id], abs=1e-5)
            assert e.hit.distance == pytest.approx(1 - e.hit.score, abs=1e-6)
    assert got_plain[0].hit.vector is None and got_plain[0].hit.text is not None  # default include
    first = got_filtered[0]
    assert first.hit.vector is not None and first.hit.vector.dtype == np.float32
    np.testing.assert_allclose(first.hit.vector, next(d["vector"] for d in docs if d["id"] == first.hit.id))
    # A push reports what a query for the same vector reports for that document.
    hits = {h.id: h for h in (await client.query(name, vector=target, k=len(docs))).hits}
    for e in got_plain:
        assert e.hit.score == pytest.approx(hits[e.hit.id].score, abs=1e-5)
    await plain.close()
    await filtered.close()


async def test_text_subscription_embeds_once_and_scores_like_a_query(client: ShoalClient) -> None:
    name = unique("subtext")
    await client.create_collection(name)
    query = "a cat sleeping on the sofa"
    sub = await client.subscribe(name, text=query, threshold=0.45)
    ack = await client.upsert(
        name,
        [
            {"id": "tax", "text": "The quarterly tax filing deadline is next Monday."},
            {"id": "cat", "text": "A kitten is napping on the couch."},
            {"id": "end", "text": query},
        ],
    )
    events = await take(sub, ack.seq)
    assert [e.hit.id for e in events] == ["cat", "end"]
    hits = {h.id: h for h in (await client.query(name, text=query, k=3)).hits}
    for e in events:
        assert e.hit.score == pytest.approx(hits[e.hit.id].score, abs=1e-4)
    assert hits["tax"].score < 0.45
    await sub.close()


async def test_unsubscribe_stops_pushes_and_unknown_sub_is_not_found(server: ServerProcess) -> None:
    name = unique("unsub")
    async with ShoalClient.connect(server.ws_url) as c:
        await c.create_collection(name, dim=4)
    target = [1.0, 0.0, 0.0, 0.0]
    async with websockets.connect(server.ws_url, subprotocols=[websockets.Subprotocol("shoal.v1")]) as ws:
        frames: list[dict[str, Any]] = []

        async def call(request_id: int, op: str, **args: Any) -> dict[str, Any]:
            await ws.send(msgpack.packb({"id": request_id, "op": op, **args}))
            async with asyncio.timeout(20):
                while True:
                    frame = msgpack.unpackb(await ws.recv())
                    frames.append(frame)
                    if frame.get("id") == request_id:
                        return dict(frame)

        gone = (await call(1, "subscribe", collection=name, vector=target, threshold=0.5))["sub"]
        stays = (await call(2, "subscribe", collection=name, vector=target, threshold=0.5))["sub"]
        assert gone != stays
        assert (await call(3, "unsubscribe", sub=gone))["ok"] is True
        again = await call(4, "unsubscribe", sub=gone)
        assert again["ok"] is False and again["error"]["code"] == "not_found"
        missing = await call(5, "unsubscribe", sub="s999999999")
        assert missing["error"]["code"] == "not_found"
        async with httpx.AsyncClient() as http:
            for i in range(3):
                body = {"docs": [{"id": f"x{i}", "vector": target}]}
                reply = await http.post(f"{server.url}/v1/collections/{name}/upsert", json=body)
                assert reply.status_code == 200
        seen_stays = 0
        async with asyncio.timeout(20):
            while seen_stays < 3:
                frame = msgpack.unpackb(await ws.recv())
                frames.append(frame)
                if frame.get("sub") == stays:
                    seen_stays += 1
        with pytest.raises(TimeoutError):  # and nothing more for either
            async with asyncio.timeout(0.5):
                frames.append(msgpack.unpackb(await ws.recv()))
        assert not [f for f in frames if "event" in f and f.get("sub") == gone]


async def test_dropping_the_collection_ends_its_subscriptions(client: ShoalClient) -> None:
    name = unique("drop")
    await client.create_collection(name, dim=4)
    sub = await client.subscribe(name, vector=[1.0, 0, 0, 0], threshold=0.0)
    await client.drop_collection(name)
    with pytest.raises(NotFound):
        async with asyncio.timeout(20):
            async for _ in sub:
                pass
    with pytest.raises(NotFound):
        await client.subscribe(name, vector=[1.0, 0, 0, 0], threshold=0.0)


async def test_500_subscriptions_one_batch_of_100_docs_match_numpy(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("many")
    dim, n_subs, n_docs = 16, 500, 100
    await client.create_collection(name, dim=dim)
    rng = np.random.default_rng(11)
    queries = rng.normal(size=(n_subs, dim)).astype(np.float32)
    docs = rng.normal(size=(n_docs, dim)).astype(np.float32)
    qn = queries / np.linalg.norm(queries, axis=1, keepdims=True)
    dn = docs / np.linalg.norm(docs, axis=1, keepdims=True)
    cos = qn @ dn.T
    thresholds = np.round(np.quantile(cos, 0.9, axis=1), 3)
    kinds = ["a", "b", "c"]
    subs = []
    for i in range(n_subs):
        where = None if i % 2 else {"kind": kinds[i % 3]}
        subs.append(await client.subscribe(name, vector=queries[i], threshold=float(thresholds[i]), where=where))
    batches_before = await metric(server, "shoal_subscription_batches_total")
    pairs_before = await metric(server, "shoal_subscription_pairs_scored_total")
    payload = [{"id": f"d{j}", "vector": docs[j], "metadata": {"kind": kinds[j % 3]}} for j in range(n_docs)]
    ack = await client.upsert(name, payload)  # one batch: 100 consecutive seqs
    first_seq = ack.seq - n_docs + 1
    expected: dict[int, list[int]] = {}
    for i in range(n_subs):
        expected[i] = [
            j for j in range(n_docs) if cos[i, j] >= thresholds[i] and (i % 2 or kinds[j % 3] == kinds[i % 3])
        ]
    total = sum(len(v) for v in expected.values())
    assert total > 2000

    async def drain(i: int) -> list[MatchEvent]:
        out: list[MatchEvent] = []
        async with asyncio.timeout(60):
            while len(out) < len(expected[i]):
                event = await subs[i].__anext__()
                assert isinstance(event, MatchEvent), event
                out.append(event)
        return out

    received = await asyncio.gather(*(drain(i) for i in range(n_subs)))
    for i, events in enumerate(received):
        assert [e.seq - first_seq for e in events] == expected[i]
        for e in events:
            assert e.hit.score == pytest.approx(float(cos[i, e.seq - first_seq]), abs=1e-5)
    await asyncio.sleep(0.3)
    assert all(sub.pending == 0 for sub in subs), "no push beyond the expected ones"
    # One vectorised step scored the whole batch against every subscription.
    assert await metric(server, "shoal_subscription_batches_total") - batches_before == 1
    assert await metric(server, "shoal_subscription_pairs_scored_total") - pairs_before == n_subs * n_docs
    for sub in subs:
        await sub.close()


async def test_after_seq_resume_under_concurrent_writes_is_exact(server: ServerProcess, client: ShoalClient) -> None:
    """A writer keeps writing; the subscriber drops its connection mid-stream several times and
    resumes with after_seq. The union of what it received is exactly the matches, once each."""
    name = unique("resume")
    dim = 8
    await client.create_collection(name, dim=dim)
    rng = np.random.default_rng(5)
    target = unit(np.ones(dim, np.float32))
    start = await client.upsert(name, [{"id": "before", "vector": target}])  # not part of the expected set
    written: list[tuple[int, str, np.ndarray]] = []
    writer_done = asyncio.Event()

    async def writer() -> None:
        async with ShoalClient.connect(server.ws_url) as w:
            for i in range(150):
                n = int(rng.integers(1, 4))
                batch = [
                    {
                        "id": f"w{i}_{k}",
                        "vector": near(rng, target, 0.4) if rng.random() < 0.6 else unit(rng.normal(size=dim)),
                    }
                    for k in range(n)
                ]
                ack = await w.upsert(name, batch)
                for k, doc in enumerate(batch):
                    written.append((ack.seq - n + 1 + k, doc["id"], doc["vector"]))
                await asyncio.sleep(0.004)
        writer_done.set()

    received: list[tuple[int, str]] = []
    reconnects = 0

    async def reader() -> None:
        nonlocal reconnects
        last = start.seq
        while True:
            async with ShoalClient.connect(server.ws_url) as r:
                sub = await r.subscribe(name, vector=target, threshold=0.75, after_seq=last)
                budget = random.Random(reconnects).randint(3, 25)
                while True:
                    if writer_done.is_set():
                        final = max(s for s, _, v in written if float(np.dot(v, target)) >= 0.75)
                        if last >= final:
                            return
                    try:
                        async with asyncio.timeout(0.5):
                            event = await sub.__anext__()
                    except TimeoutError:
                        continue
                    assert isinstance(event, MatchEvent)
                    assert event.seq > last, "in seq order, and nothing before the resume point"
                    received.append((event.seq, event.hit.id))
                    last = event.seq
                    budget -= 1
                    if budget == 0 and not writer_done.is_set():
                        break  # drop the connection mid-stream, pushes in flight are lost
            reconnects += 1

    async with asyncio.timeout(150):
        await asyncio.gather(writer(), reader())
    expected = [(s, i) for s, i, v in written if float(np.dot(v, target)) >= 0.75]
    assert reconnects >= 2
    assert len(received) == len(set(received)), "no duplicates"
    assert sorted(received) == sorted(expected), "no loss"


async def test_subscription_limit_per_connection(server: ServerProcess) -> None:
    # The default limit is 1,000 per connection; checked cheaply through the reply code only.
    async with ShoalClient.connect(server.ws_url) as c:
        name = unique("limit")
        await c.create_collection(name, dim=2)
        subs = [await c.subscribe(name, vector=[1.0, 0.0], threshold=0.9) for _ in range(1000)]
        with pytest.raises(TooLarge):
            await c.subscribe(name, vector=[1.0, 0.0], threshold=0.9)
        await subs[0].close()
        extra = await c.subscribe(name, vector=[1.0, 0.0], threshold=0.9)
        assert not isinstance(extra, LaggedEvent)
