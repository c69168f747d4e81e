"""Every row of the error table, produced by sending that bad input through a real server.

After each bad input the connection (or the server) must stay usable.
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import shutil
import signal
import struct
import uuid
from collections.abc import AsyncIterator, Iterator

import asyncpg
import httpx
import msgpack
import numpy as np
import pytest
import websockets
from websockets.asyncio.client import ClientConnection

from shoal_client import ShoalClient, ShoalHTTP
from shoal_client import errors as ce
from shoal_client.sse import changes_sse, subscribe_sse
from tests.server_process import ServerProcess, local_server, temp_data_dir

pytestmark = pytest.mark.timeout(180)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


@pytest.fixture
async def raw(server: ServerProcess) -> AsyncIterator[ClientConnection]:
    """A plain `websockets` client: the bytes on the wire, nothing of our client in between."""
    async with websockets.connect(server.ws_url, subprotocols=["shoal.v1"], max_size=None) as ws:  # type: ignore[list-item]
        assert ws.subprotocol == "shoal.v1"
        yield ws


async def call(ws: ClientConnection, frame: dict[str, object] | bytes) -> dict[str, object]:
    await ws.send(frame if isinstance(frame, bytes) else msgpack.packb(frame, use_bin_type=True))
    reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), 30), raw=False)
    assert isinstance(reply, dict)
    return reply


def code_of(reply: dict[str, object]) -> str:
    assert reply["ok"] is False, reply
    error = reply["error"]
    assert isinstance(error, dict) and isinstance(error["message"], str) and error["message"]
    return str(error["code"])


async def test_bad_frame_text_and_non_map(raw: ClientConnection) -> None:
    await raw.send("not binary")
    reply = msgpack.unpackb(await raw.recv(), raw=False)
    assert reply["id"] is None and code_of(reply) == "bad_frame"
    for junk in (msgpack.packb([1, 2, 3]), b"\xc1\xc1\xc1", msgpack.packb("a string")):
        reply = await call(raw, junk)
        assert reply["id"] is None and code_of(reply) == "bad_frame"
    # The connection is still usable.
    assert await call(raw, {"id": 7, "op": "ping"}) == {"id": 7, "ok": True}


async def test_bad_request_unknown_op_and_not_found(raw: ClientConnection) -> None:
    assert code_of(await call(raw, {"id": 1, "op": "query"})) == "bad_request"
    assert code_of(await call(raw, {"op": "ping"})) == "bad_request"  # no id
    assert code_of(await call(raw, {"id": 2, "op": "frobnicate"})) == "unknown_op"
    reply = await call(raw, {"id": 3, "op": "query", "collection": "nope_missing", "vector": [1.0]})
    assert reply["id"] == 3 and code_of(reply) == "not_found"
    name = unique("br")
    assert (await call(raw, {"id": 4, "op": "create_collection", "name": name, "dim": 2}))["ok"] is True
    bad_args: list[dict[str, object]] = [
        {"collection": name, "vector": [1.0, 0.0], "where": {"a": {"$regex": "x"}}},  # unknown operator
        {"collection": name, "vector": [1.0, 0.0], "where": {"a": {"$gt": "text"}}},  # wrong type
        {"collection": name, "vector": [1.0, 0.0], "were": {"a": 1}},  # unknown argument
        {"collection": name, "vector": [1.0, 0.0], "text": "both"},
        {"collection": name, "vector": [1.0, 0.0], "k": 0},
        {"collection": name, "vector": [1.0, 0.0], "where_text": {"$like": "x"}},
        {"collection": name, "vector": [1.0, 0.0], "include": ["everything"]},
        {"collection": "bad name!", "vector": [1.0, 0.0]},
    ]
    deep: object = {"a": 1}
    for _ in range(8):
        deep = {"$and": [deep]}
    bad_args.append({"collection": name, "vector": [1.0, 0.0], "where": deep})  # depth 9
    for i, args in enumerate(bad_args):
        assert code_of(await call(raw, {"id": 10 + i, "op": "query", **args})) == "bad_request", args
    assert code_of(await call(raw, {"id": 30, "op": "create_collection", "name": name})) == "exists"
    assert code_of(await call(raw, {"id": 31, "op": "upsert", "collection": name, "docs": [{"id": "x"}]})) == (
        "bad_request"
    )
    assert (await call(raw, {"id": 32, "op": "drop_collection", "name": name}))["ok"] is True


async def test_dimension_mismatch_and_invalid_vector(raw: ClientConnection) -> None:
    name = unique("vec")
    await call(raw, {"id": 1, "op": "create_collection", "name": name, "dim": 3})
    upsert = {"id": 2, "op": "upsert", "collection": name}
    assert code_of(await call(raw, {**upsert, "docs": [{"id": "a", "vector": [1.0, 2.0]}]})) == "dimension_mismatch"
    # A text-only document embeds to 384 dimensions, not 3.
    assert code_of(await call(raw, {**upsert, "docs": [{"id": "a", "text": "hello"}]})) == "dimension_mismatch"
    nan = struct.pack("<3f", 1.0, math.nan, 0.0)
    assert code_of(await call(raw, {**upsert, "docs": [{"id": "a", "vector": nan}]})) == "invalid_vector"
    inf = struct.pack("<3f", 1.0, math.inf, 0.0)
    assert code_of(await call(raw, {"id": 3, "op": "query", "collection": name, "vector": inf})) == "invalid_vector"
    zero = [0.0, 0.0, 0.0]
    assert code_of(await call(raw, {**upsert, "docs": [{"id": "a", "vector": zero}]})) == "invalid_vector"
    assert code_of(await call(raw, {"id": 4, "op": "query", "collection": name, "vector": zero})) == "invalid_vector"
    # Nothing bad was stored, and good input still works.
    assert (await call(raw, {"id": 5, "op": "count", "collection": name}))["count"] == 0
    ok = await call(raw, {**upsert, "docs": [{"id": "a", "vector": struct.pack("<3f", 1, 2, 3)}]})
    assert ok["ok"] is True and ok["seq"] == 1


async def test_too_large_inside_a_frame(raw: ClientConnection) -> None:
    name = unique("big")
    await call(raw, {"id": 1, "op": "create_collection", "name": name, "dim": 2})
    q = {"op": "query", "collection": name, "vector": [1.0, 0.0]}
    assert code_of(await call(raw, {"id": 2, **q, "k": 1001})) == "too_large"
    docs = [{"id": str(i), "vector": [1.0, 0.0]} for i in range(10_001)]
    assert code_of(await call(raw, {"id": 3, "op": "upsert", "collection": name, "docs": docs})) == "too_large"
    long_text = [{"id": "t", "text": "x" * 100_001}]
    assert code_of(await call(raw, {"id": 4, "op": "upsert", "collection": name, "docs": long_text})) == "too_large"
    assert code_of(await call(raw, {"id": 5, "op": "get", "collection": name, "ids": ["i" * 257]})) == "too_large"
    assert (await call(raw, {"id": 6, "op": "count", "collection": name}))["count"] == 0


async def test_oversized_frame_closes_1009_and_server_carries_on(server: ServerProcess) -> None:
    async with websockets.connect(server.ws_url, subprotocols=["shoal.v1"], max_size=None) as ws:  # type: ignore[list-item]
        frame = msgpack.packb({"id": 1, "op": "ping", "pad": b"\0" * (16 * 1024 * 1024 + 10)})
        with pytest.raises(websockets.ConnectionClosed) as closed:
            # The server may close while the frame is still being sent.
            await ws.send(frame)
            await asyncio.wait_for(ws.recv(), 30)
        assert closed.value.rcvd is not None and closed.value.rcvd.code == 1009
    async with ShoalClient.connect(server.ws_url) as c:
        await c.ping()


async def test_http_errors_have_status_and_body(server: ServerProcess) -> None:
    async with httpx.AsyncClient(base_url=server.url) as http:
        r = await http.post("/v1/collections/nope_missing/query", json={"vector": [1.0]})
        assert r.status_code == 404 and r.json()["error"]["code"] == "not_found"
        r = await http.post("/v1/collections", content=b"{not json", headers={"content-type": "application/json"})
        assert r.status_code == 400 and r.json()["error"]["code"] == "bad_request"
        r = await http.post("/v1/collections/x/frobnicate", json={})
        assert r.status_code == 400 and r.json()["error"]["code"] == "unknown_op"
        name = unique("hx")
        assert (await http.post("/v1/collections", json={"name": name, "dim": 2})).status_code == 200
        r = await http.post("/v1/collections", json={"name": name, "dim": 2})
        assert r.status_code == 409 and r.json()["error"]["code"] == "exists"
        r = await http.post(f"/v1/collections/{name}/upsert", json={"docs": [{"id": "a", "vector": [1, 2, 3]}]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "dimension_mismatch"
        r = await http.post(f"/v1/collections/{name}/query", json={"vector": [0, 0]})
        assert r.status_code == 422 and r.json()["error"]["code"] == "invalid_vector"
        r = await http.post(f"/v1/collections/{name}/query", json={"vector": [1, 0], "k": 5000})
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        r = await http.post(
            f"/v1/collections/{name}/upsert",
            content=b"[" + b" " * (16 * 1024 * 1024) + b"]",
            headers={"content-type": "application/json"},
        )
        assert r.status_code == 413 and r.json()["error"]["code"] == "too_large"
        assert (await http.get("/healthz")).status_code == 200
        assert (await http.get("/readyz")).json() == {"status": "ready"}
        metrics = (await http.get("/metrics")).text
        assert 'shoal_requests_total{code="not_found",op="query",transport="http"}' in metrics
        assert "shoal_request_seconds_bucket" in metrics


# -- servers with their own settings ----------------------------------------------------------


@pytest.fixture(scope="module")
def guarded_server() -> Iterator[ServerProcess]:
    keys = [
        {"key": "admin-key", "collections": "*", "access": "admin"},
        {"key": "reader-key", "collections": ["open_docs"], "access": "read"},
        {"key": "slow-key", "collections": "*", "access": "read"},
    ]
    env = {"SHOAL_API_KEYS": json.dumps(keys), "SHOAL_RATE_LIMIT": "20", "SHOAL_RATE_BURST": "20"}
    with local_server(env, quiet=True) as proc:
        yield proc


async def test_unauthorized_forbidden_and_rate_limited(guarded_server: ServerProcess) -> None:
    url = guarded_server.ws_url
    async with websockets.connect(url, subprotocols=["shoal.v1"]) as ws:  # type: ignore[list-item]
        assert code_of(await call(ws, {"id": 1, "op": "list_collections"})) == "unauthorized"
        assert code_of(await call(ws, {"id": 2, "op": "auth", "key": "wrong"})) == "unauthorized"
        assert code_of(await call(ws, {"id": 3, "op": "count", "collection": "open_docs"})) == "unauthorized"
        assert (await call(ws, {"id": 4, "op": "auth", "key": "admin-key"}))["ok"] is True
        assert (await call(ws, {"id": 5, "op": "create_collection", "name": "open_docs", "dim": 2}))["ok"]
        assert (await call(ws, {"id": 6, "op": "create_collection", "name": "secret", "dim": 2}))["ok"]
    async with ShoalClient.connect(url, key="reader-key") as reader:
        assert await reader.count("open_docs") == 0
        assert [c.name for c in await reader.list_collections()] == ["open_docs"]
        with pytest.raises(ce.Forbidden):
            await reader.count("secret")
        with pytest.raises(ce.Forbidden):
            await reader.upsert("open_docs", [{"id": "a", "vector": [1.0, 0.0]}])
    async with ShoalHTTP(guarded_server.url) as anonymous:
        with pytest.raises(ce.Unauthorized):
            await anonymous.count("open_docs")
    async with ShoalClient.connect(url, key="slow-key") as slow:
        results = await asyncio.gather(*(slow.count("open_docs") for _ in range(60)), return_exceptions=True)
        limited = [r for r in results if isinstance(r, ce.RateLimited)]
        assert limited, "60 requests at once must exceed a burst of 20"
        assert all(r.retry_after_ms is not None and r.retry_after_ms > 0 for r in limited)
        assert sum(isinstance(r, int) for r in results) >= 20
    async with httpx.AsyncClient(base_url=guarded_server.url) as http:
        r = await http.get("/v1/collections", headers={"authorization": "Bearer nope"})
        assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"


async def test_sse_streams_check_keys_and_scopes(guarded_server: ServerProcess) -> None:
    """The SSE endpoints authenticate like every other: a bearer header or, for EventSource,
    the `key` query parameter; a key scoped to other collections gets 403 before any stream."""
    base = guarded_server.url
    async with ShoalClient.connect(guarded_server.ws_url, key="admin-key") as admin:
        await admin.create_collection("open_docs", dim=2, if_not_exists=True)
        await admin.create_collection("secret", dim=2, if_not_exists=True)
        await admin.upsert("open_docs", [{"id": "east", "vector": [1.0, 0.0]}])
    with pytest.raises(ce.Unauthorized):
        async for _ in subscribe_sse(base, "open_docs", vector=[1.0, 0.0], threshold=0.9):
            pass
    with pytest.raises(ce.Unauthorized):
        async for _ in changes_sse(base, "open_docs", key="wrong"):
            pass
    with pytest.raises(ce.Forbidden):
        async for _ in subscribe_sse(base, "secret", vector=[1.0, 0.0], threshold=0.9, key="reader-key"):
            pass
    # Bearer header (the client): the replay from seq 0 brings the document written above.
    stream = subscribe_sse(base, "open_docs", vector=[1.0, 0.0], threshold=0.9, key="reader-key", last_event_id=0)
    async with asyncio.timeout(20):
        event = await anext(stream)
    await stream.aclose()
    assert event.event == "match" and event.data["hit"]["id"] == "east"
    # The key as a query parameter, as a browser's EventSource sends it.
    async with httpx.AsyncClient(timeout=20.0) as http:
        denied = await http.get(f"{base}/v1/collections/secret/changes?key=reader-key")
        assert (denied.status_code, denied.json()["error"]["code"]) == (403, "forbidden")
        url = f"{base}/v1/collections/open_docs/changes?key=reader-key&last_event_id=0"
        async with http.stream("GET", url) as response:
            assert response.status_code == 200
            assert response.headers["content-type"].startswith("text/event-stream")
            lines = []
            async for line in response.aiter_lines():
                lines.append(line)
                if line.startswith("data:"):
                    break
    assert "event: upsert" in lines and '"east"' in lines[-1]


async def test_overloaded_when_a_query_queue_is_full() -> None:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir, {"SHOAL_SHARD_MAILBOX": "2", "SHOAL_EXACT_MAX_ROWS": "100000"})
    proc.start()
    try:
        async with ShoalClient.connect(proc.ws_url) as c:
            await c.create_collection("busy", dim=64)
            rng = np.random.default_rng(0)
            vectors = rng.normal(size=(20_000, 64)).astype(np.float32)
            for start in range(0, 20_000, 5_000):
                await c.upsert("busy", [{"id": str(i), "vector": vectors[i]} for i in range(start, start + 5_000)])
            where = {"$or": [{"a": 1}, {"a": {"$ne": 1}}]}  # matches everything; forces exact search
            results = await asyncio.gather(
                *(c.query("busy", vector=vectors[i], k=5, where=where) for i in range(300)), return_exceptions=True
            )
            overloaded = [r for r in results if isinstance(r, ce.Overloaded)]
            assert overloaded, "300 queries at once must overflow a mailbox of 2"
            assert not [r for r in results if isinstance(r, BaseException) and not isinstance(r, ce.Overloaded)]
            # The server recovers as soon as the queue drains.
            assert (await c.query("busy", vector=vectors[0], k=1)).hits[0].id == "0"
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def _postmaster_pid(data_dir: object) -> int:
    with open(os.path.join(str(data_dir), "pg", "postmaster.pid")) as f:
        return int(f.readline())


async def test_internal_and_unavailable_when_the_database_breaks() -> None:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir)
    proc.start()
    try:
        async with ShoalClient.connect(proc.ws_url) as c:
            await c.create_collection("fragile", dim=2)
            await c.create_collection("gone", dim=2)
            await c.upsert("fragile", [{"id": "a", "vector": [1.0, 0.0]}])
            # Tamper with the schema behind the server's back: an unexpected database error must
            # come back as `internal`, with no details.
            db = await asyncpg.connect(host=str(data_dir / "pg"), user="postgres", database="postgres")
            table_id = await db.fetchval("SELECT id FROM shoal_collections WHERE name = 'gone'")
            await db.execute(f"DROP TABLE shoal_log_{int(table_id)} CASCADE")
            await db.close()
            with pytest.raises(ce.Internal) as internal:
                await c.upsert("gone", [{"id": "x", "vector": [1.0, 0.0]}])
            assert internal.value.message == "internal error"
            # Stop PostgreSQL: writes fail fast with `unavailable`, reads keep serving.
            os.kill(_postmaster_pid(data_dir), signal.SIGINT)
            await asyncio.sleep(1.0)
            started = asyncio.get_running_loop().time()
            with pytest.raises(ce.Unavailable):
                await c.upsert("fragile", [{"id": "b", "vector": [0.0, 1.0]}])
            assert asyncio.get_running_loop().time() - started < 15
            hits = (await c.query("fragile", vector=[1.0, 0.0], k=1)).hits
            assert [h.id for h in hits] == ["a"]
        async with httpx.AsyncClient(base_url=proc.url) as http:
            assert (await http.get("/readyz")).status_code == 503
            assert (await http.get("/healthz")).status_code == 200
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
