"""Hostile input, end to end: every bad value gets its typed error and never hurts other clients.

Over a real server (the session `server` fixture): WebSocket with our client and with plain
`websockets` (bytes our client would never send), HTTP JSON / msgpack with httpx (JSON text can
spell lone surrogates, which msgpack cannot), and SSE. One actor-level test forces a shared batch
to fail in PostgreSQL, past validation, to show that the committer isolates the job at fault.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import signal
import struct
import tempfile
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from actors.pg_server import open_database
from actors.supervisor import Engine
from models import requests as rq
from models.codec import frame_items
from models.config import EngineConfig, Limits
from models.errors import Unavailable
from models.records import FLOAT32_MAX, DocId, Document, Hit, Include, Metric, SideScores
from shoal_client import ShoalClient
from shoal_client import errors as ce
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)

BOUND = Limits().max_vector_norm
SURROGATE = "\\udfff"  # as JSON text: decodes to a lone surrogate


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def raw(server: ServerProcess) -> AsyncIterator[ClientConnection]:
    async with websockets.connect(server.ws_url, subprotocols=["shoal.v1"], max_size=None) as ws:  # type: ignore[list-item]
        yield ws


@pytest.fixture
async def http(server: ServerProcess) -> AsyncIterator[httpx.AsyncClient]:
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as client:
        yield client


async def call(ws: ClientConnection, frame: dict[Any, Any] | bytes) -> dict[str, Any]:
    await ws.send(frame if isinstance(frame, bytes) else msgpack.packb(frame, use_bin_type=True))
    reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 60), raw=False)
    assert isinstance(reply, dict)
    return reply


def error_of(reply: dict[str, Any]) -> tuple[str, str]:
    assert reply["ok"] is False, reply
    return reply["error"]["code"], reply["error"]["message"]


async def post_json(http: httpx.AsyncClient, path: str, body: str) -> tuple[int, dict[str, Any]]:
    """POST raw JSON text; the reply must itself be strict JSON (no NaN / Infinity)."""
    response = await http.post(path, content=body.encode(), headers={"content-type": "application/json"})
    return response.status_code, json.loads(response.text, parse_constant=_refuse_constant)


def _refuse_constant(name: str) -> Any:
    raise AssertionError(f"the server sent the non-finite JSON number {name}")


def assert_finite_hits(hits: list[dict[str, Any]]) -> None:
    for hit in hits:
        assert math.isfinite(hit["score"]) and math.isfinite(hit["distance"]), hit


# --- 1. strings PostgreSQL and the tokenizer cannot hold -------------------------------------------


async def test_lone_surrogates_and_nul_answer_bad_request_naming_the_field(
    server: ServerProcess, http: httpx.AsyncClient
) -> None:
    name = unique("sur")
    text_name = unique("surt")
    async with ShoalClient.connect(server.ws_url) as c:
        await c.create_collection(name, dim=2)
        await c.create_collection(text_name)
        s = SURROGATE
        cases = [
            (name, "upsert", f'{{"docs":[{{"id":"a{s}","vector":[1,0]}}]}}', "document id"),
            (name, "upsert", f'{{"docs":[{{"id":"a","text":"x{s}","vector":[1,0]}}]}}', "text"),
            (text_name, "upsert", f'{{"docs":[{{"id":"a","text":"x{s}"}}]}}', "text"),
            (name, "upsert", f'{{"docs":[{{"id":"a","vector":[1,0],"metadata":{{"k{s}":1}}}}]}}', "key"),
            (name, "upsert", f'{{"docs":[{{"id":"a","vector":[1,0],"metadata":{{"k":"v{s}"}}}}]}}', "metadata 'k'"),
            (name, "upsert", f'{{"docs":[{{"id":"a","vector":[1,0],"metadata":{{"k":["v{s}"]}}}}]}}', "metadata 'k'"),
            (name, "delete", f'{{"ids":["a{s}"]}}', "document id"),
            (name, "delete", f'{{"where":{{"k":"v{s}"}}}}', "where.k"),
            (name, "delete", f'{{"where_text":{{"$contains":"v{s}"}}}}', "where_text.$contains"),
            (name, "query", f'{{"vector":[1,0],"where":{{"k":{{"$in":["v{s}"]}}}}}}', "where.k.$in[0]"),
            (name, "query", f'{{"vector":[1,0],"where_text":{{"$not_contains":"{s}"}}}}', "where_text"),
            (text_name, "query", f'{{"text":"hello{s}"}}', "'text'"),
            (name, "get", f'{{"ids":["a{s}"]}}', "document id"),
        ]
        for collection, op, body, field in cases:
            status, reply = await post_json(http, f"/v1/collections/{collection}/{op}", body)
            assert status == 400 and reply["error"]["code"] == "bad_request", (op, body, reply)
            assert field in reply["error"]["message"] and "surrogate" in reply["error"]["message"], reply
        status, reply = await post_json(http, "/v1/collections", f'{{"name":"x{s}","dim":2}}')
        assert status == 400 and reply["error"]["code"] == "bad_request"
        # msgpack cannot carry a lone surrogate, but NUL it can: over the WebSocket.
        nul_docs: list[dict[str, Any]] = [
            {"id": "a\x00", "vector": [1.0, 0.0]},
            {"id": "a", "text": "x\x00", "vector": [1.0, 0.0]},
            {"id": "a", "vector": [1.0, 0.0], "metadata": {"k\x00": 1}},
            {"id": "a", "vector": [1.0, 0.0], "metadata": {"k": "v\x00"}},
        ]
        for doc in nul_docs:
            with pytest.raises(ce.BadRequest, match="NUL"):
                await c.upsert(name, [doc])
        with pytest.raises(ce.BadRequest, match=r"where\.k"):
            await c.query(name, vector=[1.0, 0.0], where={"k": "v\x00"})
        with pytest.raises(ce.BadRequest, match="where_text"):
            await c.request("delete", collection=name, where_text={"$contains": "\x00"})
        # Nothing was written, and the collection serves.
        assert (await c.upsert(name, [{"id": "ok", "vector": [1.0, 0.0]}])).count == 1
        assert (await c.request("count", collection=name))["count"] == 1


async def test_bad_documents_never_fail_other_clients_writes(server: ServerProcess) -> None:
    """Several connections upsert valid documents while bad ones arrive in between, over both
    transports: each valid upsert acks and is found, each bad one gets bad_request."""
    name = unique("mix")
    writers, per_writer = 6, 40
    async with ShoalClient.connect(server.ws_url) as admin:
        await admin.create_collection(name, dim=2)
    outcomes: dict[str, str] = {}

    async def ws_writer(w: int) -> None:
        async with ShoalClient.connect(server.ws_url) as c:
            for i in range(per_writer):
                ident = f"w{w}-{i}"
                if i % 7 == 3:
                    try:
                        await c.upsert(name, [{"id": ident, "vector": [1.0, 0.5], "metadata": {"k": "bad\x00"}}])
                        outcomes[ident] = "ok"
                    except ce.ShoalError as exc:
                        outcomes[ident] = exc.code
                else:
                    await c.upsert(name, [{"id": ident, "vector": [1.0, float(i)], "metadata": {"w": w}}])
                    outcomes[ident] = "ok"

    async def http_writer(w: int) -> None:
        async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
            for i in range(per_writer):
                ident = f"h{w}-{i}"
                bad = i % 5 == 2
                text = f"bad{SURROGATE}" if bad else "fine"
                body = f'{{"docs":[{{"id":"{ident}","text":"{text}","vector":[0.5,{i}]}}]}}'
                status, reply = await post_json(http, f"/v1/collections/{name}/upsert", body)
                outcomes[ident] = "ok" if status == 200 else reply["error"]["code"]

    await asyncio.gather(*(ws_writer(w) for w in range(writers)), *(http_writer(w) for w in range(2)))
    bad = {
        i
        for i in outcomes
        if (i.startswith("w") and int(i.split("-")[1]) % 7 == 3)
        or (i.startswith("h") and int(i.split("-")[1]) % 5 == 2)
    }
    assert {i: c for i, c in outcomes.items() if i in bad and c != "bad_request"} == {}
    assert {i: c for i, c in outcomes.items() if i not in bad and c != "ok"} == {}
    valid = sorted(set(outcomes) - bad)
    async with ShoalClient.connect(server.ws_url) as c:
        found = await c.request("get", collection=name, ids=valid, include=[])
        assert sorted(d["id"] for d in found["docs"]) == valid
        assert (await c.request("count", collection=name))["count"] == len(valid)


async def test_committer_isolates_a_job_the_database_refuses() -> None:
    """Actor level, real PostgreSQL: documents built past the parser (a lone surrogate, which
    asyncpg cannot encode for COPY) share one coalesced batch with valid jobs of other callers.
    Only the bad jobs fail; every other job commits in order, acks and is visible."""
    config = EngineConfig(ingest_linger_ms=300.0)  # long enough to coalesce every job below
    with tempfile.TemporaryDirectory(prefix="shoal-test-isolate-", dir="/tmp") as tmp:
        async with open_database(Path(tmp), None) as dsn, Engine.running(dsn, config, Limits()) as engine:
            await engine.create_collection(rq.CreateCollection("iso", 2, Metric.COSINE, False))

            def docs(job: int, bad: bool) -> list[Document]:
                text = "bad \udfff" if bad else f"job {job}"
                return [
                    Document(DocId(f"j{job}-{n}"), text, np.array([1.0, job + n], np.float32), {"job": job})
                    for n in range(3)
                ]

            bad_jobs = {4, 11}
            results: dict[int, tuple[int, int] | BaseException] = {}

            async def one(job: int) -> None:
                try:
                    results[job] = await engine.ingest.upsert("iso", docs(job, job in bad_jobs))
                except Exception as exc:
                    results[job] = exc

            async with asyncio.timeout(60):
                await asyncio.gather(*(one(job) for job in range(16)))
            failed = {job for job, r in results.items() if isinstance(r, BaseException)}
            assert failed == bad_jobs, results
            seqs = sorted(r for r in results.values() if isinstance(r, tuple))
            assert all(count == 3 for count, _ in seqs)
            # Each acked job took three consecutive seqs; none was given twice.
            last_seqs = [seq for _, seq in seqs]
            assert len(set(last_seqs)) == len(last_seqs) and min(last_seqs) >= 3
            assert await engine.count(rq.Count("iso")) == 3 * (16 - len(bad_jobs))
            ids = tuple(DocId(f"j{job}-{n}") for job in range(16) for n in range(3))
            stored = await engine.get(rq.Get("iso", ids, frozenset()))
            assert {d.id.split("-")[0] for d in stored} == {f"j{job}" for job in range(16) if job not in bad_jobs}
            assert await engine.persistence.last_seq("iso") == 3 * (16 - len(bad_jobs))


async def test_a_shared_batch_still_fails_fast_when_the_database_is_down() -> None:
    """Isolation is for jobs at fault, not for outages: with PostgreSQL stopped, every job of a
    coalesced batch gets `unavailable` at once (no retry of halves against a dead database)."""
    config = EngineConfig(ingest_linger_ms=300.0)
    with tempfile.TemporaryDirectory(prefix="shoal-test-isolate-", dir="/tmp") as tmp:
        async with open_database(Path(tmp), None) as dsn, Engine.running(dsn, config, Limits()) as engine:
            await engine.create_collection(rq.CreateCollection("down", 2, Metric.COSINE, False))
            with open(Path(tmp) / "pg" / "postmaster.pid") as f:
                os.kill(int(f.readline()), signal.SIGINT)  # the server this test started
            for _ in range(100):
                if not await engine.persistence.ping():
                    break
                await asyncio.sleep(0.1)
            vector = np.array([1.0, 0.0], np.float32)

            async def one(job: int) -> BaseException | None:
                try:
                    await engine.ingest.upsert("down", [Document(DocId(f"d{job}"), None, vector, {})])
                except Exception as exc:
                    return exc
                return None

            started = time.monotonic()
            async with asyncio.timeout(60):
                outcomes = await asyncio.gather(*(one(job) for job in range(8)))
            assert all(isinstance(exc, Unavailable) for exc in outcomes), outcomes
            assert time.monotonic() - started < 10


# --- 2. vectors whose float32 arithmetic overflows -------------------------------------------------


async def test_huge_vectors_are_invalid_on_every_transport(
    server: ServerProcess, raw: ClientConnection, http: httpx.AsyncClient
) -> None:
    name = unique("huge")
    assert (await call(raw, {"id": 1, "op": "create_collection", "name": name, "dim": 2}))["ok"]
    huge_bin = struct.pack("<2f", 3e38, 3e38)
    for vector in (huge_bin, [3e38, 3e38], [2**64 - 1, 1], [BOUND, BOUND]):
        up = {"id": 2, "op": "upsert", "collection": name, "docs": [{"id": "h", "vector": vector}]}
        assert error_of(await call(raw, up))[0] == "invalid_vector"
        q = {"id": 3, "op": "query", "collection": name, "vector": vector}
        assert error_of(await call(raw, q))[0] == "invalid_vector"
        sub = {"id": 4, "op": "subscribe", "collection": name, "vector": vector, "threshold": 0.0}
        assert error_of(await call(raw, sub))[0] == "invalid_vector"
    for body in ('{"docs":[{"id":"h","vector":[3e38,3e38]}]}', '{"docs":[{"id":"h","vector":[1e39,1]}]}'):
        status, reply = await post_json(http, f"/v1/collections/{name}/upsert", body)
        assert (status, reply["error"]["code"]) == (422, "invalid_vector")
        assert "norm" in reply["error"]["message"] or "infinity" in reply["error"]["message"]
    status, reply = await post_json(http, f"/v1/collections/{name}/query", '{"vector":[3e38,1]}')
    assert (status, reply["error"]["code"]) == (422, "invalid_vector")
    packed = msgpack.packb({"docs": [{"id": "h", "vector": huge_bin}]}, use_bin_type=True)
    response = await http.post(
        f"/v1/collections/{name}/upsert", content=packed, headers={"content-type": "application/msgpack"}
    )
    assert response.status_code == 422 and msgpack.unpackb(response.content)["error"]["code"] == "invalid_vector"
    response = await http.get(f"/v1/collections/{name}/subscribe", params={"vector": "3e38,3e38", "threshold": "0"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_vector"
    response = await http.get(f"/v1/collections/{name}/subscribe", params={"vector": "inf,1", "threshold": "0"})
    assert response.status_code == 422 and response.json()["error"]["code"] == "invalid_vector"
    # Nothing was stored.
    assert (await call(raw, {"id": 5, "op": "count", "collection": name}))["count"] == 0


@pytest.mark.parametrize("metric", ["l2", "ip", "cosine"])
async def test_vectors_at_the_bound_give_finite_scores_everywhere(
    server: ServerProcess, http: httpx.AsyncClient, metric: str
) -> None:
    """The largest vectors allowed, under every metric: JSON, msgpack and SSE all carry finite
    scores, and an SSE stream survives a reconnect that replays them."""
    name = unique(f"bound_{metric}")
    big = BOUND / 2.0
    async with ShoalClient.connect(server.ws_url) as c:
        await c.create_collection(name, dim=2, metric=metric)
        threshold = -1e38  # every document matches
        params = {"vector": f"{big},{big}", "threshold": repr(threshold)}
        seen: list[dict[str, Any]] = []

        async def read_events(headers: dict[str, str], want: int) -> str:
            last = ""
            async with http.stream("GET", f"/v1/collections/{name}/subscribe", params=params, headers=headers) as r:
                assert r.status_code == 200
                async for line in r.aiter_lines():
                    if line.startswith("id: "):
                        last = line[4:]
                    if line.startswith("data: "):
                        seen.append(json.loads(line[6:], parse_constant=_refuse_constant))
                        if len(seen) >= want:
                            return last
            raise AssertionError("the stream ended")

        reader = asyncio.create_task(read_events({}, 2))
        await asyncio.sleep(0.5)
        await c.upsert(name, [{"id": "far", "vector": [-big, -big]}, {"id": "near", "vector": [big, big * 0.5]}])
        last_id = await asyncio.wait_for(reader, 30)
        # Reconnect from before both events: the replay must encode too.
        await asyncio.wait_for(read_events({"last-event-id": "0"}, 4), 30)
        assert len(seen) == 4 and all(math.isfinite(e["hit"]["score"]) for e in seen), seen
        assert last_id
        hits = (await c.request("query", collection=name, vector=[big, big], k=5))["hits"]
        assert len(hits) == 2
        assert_finite_hits(hits)
    status, reply = await post_json(http, f"/v1/collections/{name}/query", f'{{"vector":[{big},{-big}],"k":5}}')
    assert status == 200 and len(reply["hits"]) == 2
    assert_finite_hits(reply["hits"])


def test_hits_never_carry_a_non_finite_number_to_msgpack() -> None:
    """Scores from data stored before vectors were bounded: both ways hits become wire maps
    (ids and scores only, and with side scores and vectors) clamp them, so msgpack, which would
    pass inf and NaN on, never meets one."""
    vector = np.array([1.0, 2.0], dtype=np.float32)
    worst = [
        Hit("a", math.inf, -math.inf, scores=SideScores(math.nan, math.inf), vector=vector),
        Hit("b", math.nan, math.nan, scores=SideScores(-math.inf, None)),
    ]
    plain = [h._replace(scores=None, vector=None) for h in worst]
    for hits, include in ((plain, frozenset()), (worst, frozenset({Include.VECTOR}))):
        wire = msgpack.unpackb(msgpack.packb({"hits": Hit.many_to_wire(hits, include, True)}), raw=False)
        numbers = [
            value
            for hit in wire["hits"]
            for value in (hit["score"], hit["distance"], *(hit.get("scores") or {}).values())
            if value is not None
        ]
        assert numbers and all(math.isfinite(n) and abs(n) <= FLOAT32_MAX for n in numbers), wire
    # NaN reads as the worst: the lowest score, the largest distance.
    assert Hit.many_to_wire(plain, frozenset(), True)[1] == {"id": "b", "score": -FLOAT32_MAX, "distance": FLOAT32_MAX}


# --- 3. big filters -------------------------------------------------------------------------------


async def test_filter_size_limits_and_a_full_filter_leaves_others_responsive(
    server: ServerProcess, raw: ClientConnection
) -> None:
    name = unique("flt")
    limits = Limits()
    assert (await call(raw, {"id": 1, "op": "create_collection", "name": name, "dim": 2}))["ok"]
    docs = [{"id": f"d{i}", "vector": [1.0, float(i)], "metadata": {"k": i}} for i in range(50)]
    assert (await call(raw, {"id": 2, "op": "upsert", "collection": name, "docs": docs}))["ok"]
    full = list(range(limits.max_filter_values))
    query = {"op": "query", "collection": name, "vector": [1.0, 1.0], "k": 100}
    pauses: list[float] = []
    stop = asyncio.Event()

    async def pinger() -> None:
        async with websockets.connect(server.ws_url, subprotocols=["shoal.v1"]) as ws:  # type: ignore[list-item]
            n = 0
            while not stop.is_set():
                started = time.perf_counter()
                assert (await call(ws, {"id": n, "op": "ping"}))["ok"]
                pauses.append(time.perf_counter() - started)
                n += 1
                await asyncio.sleep(0.01)

    task = asyncio.create_task(pinger())
    await asyncio.sleep(0.3)
    try:
        for i in range(4):
            reply = await call(raw, {**query, "id": 10 + i, "where": {"k": {"$in": full}}})
            assert reply["ok"] and len(reply["hits"]) == 50
            reply = await call(raw, {**query, "id": 20 + i, "where": {"k": {"$nin": full[:-1]}}})
            assert reply["ok"] and len(reply["hits"]) == 0
            # A million values are refused before they are unpacked, with the request's id.
            reply = await call(raw, {**query, "id": 30 + i, "where": {"k": {"$in": list(range(10**6))}}})
            code, message = error_of(reply)
            assert code == "too_large" and str(frame_items(limits)) in message and reply["id"] == 30 + i
            over = list(range(limits.max_filter_values + 1))
            code, message = error_of(await call(raw, {**query, "id": 50 + i, "where": {"k": {"$in": over}}}))
            assert code == "too_large" and str(limits.max_filter_values) in message
        many = {"$or": [{"k": i} for i in range(limits.max_filter_nodes)]}
        assert error_of(await call(raw, {**query, "id": 40, "where": many}))[0] == "too_large"
        assert (await call(raw, {**query, "id": 41, "where": {"$or": [{"k": i} for i in range(500)]}}))["ok"]
        await asyncio.sleep(0.1)
    finally:
        stop.set()
        await task
    # Before the bounds, one $in of 10**6 values held the event loop for most of a second.
    assert len(pauses) > 10 and max(pauses) < 0.4, sorted(pauses)[-5:]


# --- 4. the small ones ----------------------------------------------------------------------------


async def test_binary_keys_huge_integers_long_names_and_empty_text(
    server: ServerProcess, raw: ClientConnection, http: httpx.AsyncClient
) -> None:
    name = unique("small")
    text_name = unique("smallt")
    assert (await call(raw, {"id": 1, "op": "create_collection", "name": name, "dim": 2}))["ok"]
    assert (await call(raw, {"id": 1, "op": "create_collection", "name": text_name}))["ok"]
    # msgpack bin map keys: in the frame, in a document, in metadata, in a filter.
    frames: list[dict[Any, Any]] = [
        {"id": 2, "op": "ping", b"x": 1},
        {"id": 3, "op": "count", "collection": name, b"collection": name},
        {"id": 4, "op": "upsert", "collection": name, "docs": [{"id": "a", b"vector": [1.0, 0.0]}]},
        {
            "id": 5,
            "op": "upsert",
            "collection": name,
            "docs": [{"id": "a", "vector": [1.0, 0.0], "metadata": {b"k": 1}}],
        },
        {"id": 6, "op": "query", "collection": name, "vector": [1.0, 0.0], "where": {b"k": 1}},
        {"id": 7, "op": "query", "collection": name, "vector": [1.0, 0.0], "where": {"k": {b"$gt": 1}}},
    ]
    for frame in frames:
        reply = await call(raw, frame)
        assert reply["id"] == frame["id"] and error_of(reply)[0] == "bad_request", reply
    packed = msgpack.packb({b"vector": [1.0, 0.0]}, use_bin_type=True)
    response = await http.post(
        f"/v1/collections/{name}/query", content=packed, headers={"content-type": "application/msgpack"}
    )
    assert response.status_code == 400 and msgpack.unpackb(response.content)["error"]["code"] == "bad_request"
    # A msgpack body's arrays are bounded as a frame's are, before the body is unpacked.
    packed = msgpack.packb({"vector": [1.0, 0.0], "where": {"k": {"$in": list(range(10**6))}}})
    response = await http.post(
        f"/v1/collections/{name}/query", content=packed, headers={"content-type": "application/msgpack"}
    )
    assert response.status_code == 413 and msgpack.unpackb(response.content)["error"]["code"] == "too_large"
    # Huge integers: JSON has no bound; msgpack carries 64-bit ones.
    big = "1" + "0" * 400
    for body in (
        f'{{"vector":[{big},1]}}',
        f'{{"vector":[1,1],"alpha":{big}}}',
        f'{{"vector":[1,1],"k":{big}}}',
        f'{{"vector":[1,1],"ef":{big}}}',
        f'{{"vector":[1,1],"k":-{big}}}',
    ):
        status, reply = await post_json(http, f"/v1/collections/{name}/query", body)
        assert (status, reply["error"]["code"]) == (400, "bad_request"), (body, reply)
    status, reply = await post_json(
        http, f"/v1/collections/{name}/upsert", f'{{"docs":[{{"id":"a","vector":[1,{big}]}}]}}'
    )
    assert (status, reply["error"]["code"]) == (400, "bad_request")
    status, reply = await post_json(http, "/v1/collections", f'{{"name":"{unique("n")}","dim":{big}}}')
    assert (status, reply["error"]["code"]) == (400, "bad_request")
    for args in ({"k": 2**64 - 1}, {"ef": 2**63}, {"alpha": 2**64 - 1}):
        reply = await call(raw, {"id": 8, "op": "query", "collection": name, "vector": [1.0, 1.0], **args})
        assert error_of(reply)[0] == "bad_request", (args, reply)
    reply = await call(
        raw,
        {
            "id": 9,
            "op": "subscribe",
            "collection": name,
            "vector": [1.0, 1.0],
            "threshold": 0.5,
            "after_seq": 2**64 - 1,
        },
    )
    assert error_of(reply)[0] == "bad_request"
    # Echoed input is cut short: a 10 MB argument name does not come back.
    long_name = "x" * 10_000_000
    for frame in (
        {"id": 10, "op": "ping", long_name: 1},
        {"id": 11, "op": long_name},
        {"id": 12, "op": "unsubscribe", "sub": long_name},
    ):
        code, message = error_of(await call(raw, frame))
        assert code in ("bad_request", "unknown_op") and len(message) < 200, (code, len(message))
    status, reply = await post_json(http, f"/v1/collections/{name}/count", json.dumps({long_name[:100_000]: 1}))
    assert status == 400 and len(reply["error"]["message"]) < 200
    # Empty query text, on every transport.
    assert error_of(await call(raw, {"id": 13, "op": "query", "collection": text_name, "text": ""})) == (
        "bad_request",
        "'text' must not be empty",
    )
    reply = await call(raw, {"id": 14, "op": "subscribe", "collection": text_name, "text": "", "threshold": 0.5})
    assert error_of(reply)[0] == "bad_request"
    status, reply = await post_json(http, f"/v1/collections/{text_name}/query", '{"text":""}')
    assert (status, reply["error"]["code"]) == (400, "bad_request")
    response = await http.get(f"/v1/collections/{text_name}/subscribe", params={"text": "", "threshold": "0.5"})
    assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    # Resume points: digits only, and within 64 bits (Python's int() refuses 5,000 digits).
    for resume in ("1" * 5000, "9" * 19, "\u0663"):
        response = await http.get(
            f"/v1/collections/{name}/subscribe", params={"vector": "1,1", "threshold": "0.5", "last_event_id": resume}
        )
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request", response.text
    for resume in ("7" * 5000, "9" * 19):
        response = await http.get(f"/v1/collections/{name}/changes", headers={"last-event-id": resume})
        assert response.status_code == 400 and response.json()["error"]["code"] == "bad_request"
    # The connection is still fine.
    assert await call(raw, {"id": 99, "op": "ping"}) == {"id": 99, "ok": True}
