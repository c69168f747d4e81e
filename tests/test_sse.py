"""Server-Sent Events end to end: wire format, errors before the stream, resume, change feed,
disconnects — with httpx-sse (the client's helpers), raw httpx and `curl -N`."""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import uuid
from collections.abc import AsyncIterator
from typing import Any

import httpx
import numpy as np
import pytest
from httpx_sse import aconnect_sse

from shoal_client import ShoalClient, changes_sse, subscribe_sse
from shoal_client.errors import BadRequest, NotFound
from shoal_client.types import SSEEvent
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def unit(v: np.ndarray) -> np.ndarray:
    return (v / np.linalg.norm(v)).astype(np.float32)


async def sse_streams(server: ServerProcess) -> float:
    async with httpx.AsyncClient() as http:
        for line in (await http.get(f"{server.url}/metrics")).text.splitlines():
            if line.startswith("shoal_sse_streams "):
                return float(line.split()[1])
    raise AssertionError("no shoal_sse_streams gauge")


async def next_event(events: AsyncIterator[SSEEvent], timeout: float = 20.0) -> SSEEvent:
    async with asyncio.timeout(timeout):
        return await anext(events)


async def test_wire_format_with_raw_httpx(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("ssefmt")
    await client.create_collection(name, dim=3)
    url = f"{server.url}/v1/collections/{name}/subscribe"
    params = {"vector": "1,0,0", "threshold": "0.5", "include": "metadata,vector", "where": '{"k": {"$ne": "x"}}'}
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as http,
        http.stream("GET", url, params=params) as response,
    ):
        assert response.status_code == 200
        assert response.headers["content-type"] == "text/event-stream"
        assert response.headers["cache-control"] == "no-cache"
        lines = response.aiter_lines()
        async with asyncio.timeout(20):
            assert await anext(lines) == "retry: 2000"
            assert await anext(lines) == ""
            ack = await client.upsert(
                name,
                [
                    {"id": "no", "vector": [0.0, 1.0, 0.0]},
                    {"id": "filtered", "vector": [1.0, 0.0, 0.0], "metadata": {"k": "x"}},
                    {"id": "yes", "vector": [1.0, 0.5, 0.0], "metadata": {"k": "y", "n": 2}, "text": "a\nb"},
                ],
            )
            block = []
            while True:
                line = await anext(lines)
                if line.startswith(":"):
                    continue  # a heartbeat may come first on a slow machine
                if line == "":
                    break
                block.append(line)
    assert block[:2] == [f"id: {ack.seq}", "event: match"]
    assert len(block) == 3 and block[2].startswith("data: ")
    data = json.loads(block[2].removeprefix("data: "))
    assert data["seq"] == ack.seq and data["op"] == "upsert"
    hit = data["hit"]
    assert hit["id"] == "yes" and "text" not in hit  # include without text
    assert hit["metadata"] == {"k": "y", "n": 2}
    assert hit["vector"] == [1.0, 0.5, 0.0]
    assert hit["score"] == pytest.approx(1 / np.sqrt(1.25), abs=1e-6)
    assert hit["distance"] == pytest.approx(1 - hit["score"], abs=1e-6)


async def test_retry_and_events_with_httpx_sse(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("ssehx")
    await client.create_collection(name, dim=2)
    url = f"{server.url}/v1/collections/{name}/subscribe"
    async with (
        httpx.AsyncClient(timeout=httpx.Timeout(20.0)) as http,
        aconnect_sse(http, "GET", url, params={"vector": "0,1", "threshold": "0.9"}) as source,
    ):
        events = source.aiter_sse()
        first = await next_event(events)  # type: ignore[arg-type]
        assert first.retry == 2000 and first.data == ""
        ack = await client.upsert(name, [{"id": "a", "vector": [0.0, 2.0]}])
        match = await next_event(events)  # type: ignore[arg-type]
        assert (match.event, match.id) == ("match", str(ack.seq))
        assert match.json()["hit"]["id"] == "a"


async def test_curl_sees_the_stream(server: ServerProcess, client: ShoalClient) -> None:
    curl = shutil.which("curl")
    assert curl is not None, "curl is required (Debian package curl)"
    name = unique("ssecurl")
    await client.create_collection(name, dim=2)
    url = f"{server.url}/v1/collections/{name}/subscribe?vector=1,0&threshold=0.5"
    proc = await asyncio.create_subprocess_exec(curl, "-sN", "--max-time", "60", url, stdout=asyncio.subprocess.PIPE)
    assert proc.stdout is not None
    try:
        async with asyncio.timeout(30):
            assert await proc.stdout.readline() == b"retry: 2000\n"
            assert await proc.stdout.readline() == b"\n"
            ack = await client.upsert(name, [{"id": "c1", "vector": [3.0, 0.0]}])
            block = []
            while (line := await proc.stdout.readline()) != b"\n" or not block:
                if line.strip() and not line.startswith(b":"):
                    block.append(line.decode().rstrip("\n"))
    finally:
        proc.kill()
        await proc.wait()
    assert block[0] == f"id: {ack.seq}" and block[1] == "event: match"
    assert json.loads(block[2].removeprefix("data: "))["hit"]["id"] == "c1"


@pytest.mark.parametrize(
    ("query", "status", "code"),
    [
        ("vector=1,0", 400, "bad_request"),  # no threshold
        ("vector=1,0&threshold=high", 400, "bad_request"),
        ("vector=1,zero&threshold=0.5", 400, "bad_request"),
        ("threshold=0.5", 400, "bad_request"),  # neither text nor vector
        ("vector=1,0&text=x&threshold=0.5", 400, "bad_request"),
        ("vector=1,0&threshold=0.5&where={oops", 400, "bad_request"),
        ("vector=1,0&threshold=0.5&where=" + '{"a":{"$regex":"x"}}', 400, "bad_request"),
        ("vector=1,0&threshold=0.5&include=text,score", 400, "bad_request"),
        ("vector=1,0&threshold=0.5&last_event_id=-3", 400, "bad_request"),
        ("vector=1,0&threshold=0.5&colour=red", 400, "bad_request"),
        ("vector=1,0&threshold=0.5&threshold=0.6", 400, "bad_request"),
        ("vector=1,0,0&threshold=0.5", 422, "dimension_mismatch"),
    ],
)
async def test_bad_parameters_answer_json_before_any_stream(
    server: ServerProcess, client: ShoalClient, query: str, status: int, code: str
) -> None:
    name = "ssebad"
    await client.create_collection(name, dim=2, if_not_exists=True)
    async with httpx.AsyncClient(timeout=20.0) as http:
        reply = await http.get(f"{server.url}/v1/collections/{name}/subscribe?{query}")
    assert reply.status_code == status
    assert reply.headers["content-type"] == "application/json"
    assert reply.json()["error"]["code"] == code


async def test_unknown_collection_is_404_on_both_streams(server: ServerProcess) -> None:
    async with httpx.AsyncClient(timeout=20.0) as http:
        sub = await http.get(f"{server.url}/v1/collections/nosuch/subscribe?vector=1&threshold=0")
        feed = await http.get(f"{server.url}/v1/collections/nosuch/changes")
        bad = await http.get(f"{server.url}/v1/collections/nosuch/changes", headers={"Last-Event-ID": "x"})
    assert (sub.status_code, sub.json()["error"]["code"]) == (404, "not_found")
    assert (feed.status_code, feed.json()["error"]["code"]) == (404, "not_found")
    assert bad.status_code == 400
    with pytest.raises(BadRequest):
        async for _ in subscribe_sse(server.url, "nosuch", vector=[1.0], threshold=2.0, where={"$bad": 1}):
            pass
    with pytest.raises(NotFound):
        async for _ in changes_sse(server.url, "nosuch"):
            pass


async def test_last_event_id_header_wins_over_the_parameter(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("ssehdr")
    await client.create_collection(name, dim=2)
    ack = await client.upsert(name, [{"id": f"d{i}", "vector": [1.0, 0.0]} for i in range(5)])
    url = f"{server.url}/v1/collections/{name}/subscribe"
    params = {"vector": "1,0", "threshold": "0.5", "last_event_id": "0"}
    async with (
        httpx.AsyncClient(timeout=20.0) as http,
        aconnect_sse(http, "GET", url, params=params, headers={"Last-Event-ID": "3"}) as source,
    ):
        events = source.aiter_sse()
        seqs = []
        while len(seqs) < 2:
            event = await next_event(events)  # type: ignore[arg-type]
            if event.data:
                seqs.append(int(event.id))
    assert seqs == [4, 5] and ack.seq == 5


async def test_disconnect_ends_the_stream_task_promptly(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("ssedisc")
    await client.create_collection(name, dim=2)
    base = await sse_streams(server)
    url = f"{server.url}/v1/collections/{name}/subscribe"
    async with (
        httpx.AsyncClient(timeout=20.0) as http,
        http.stream("GET", url, params={"vector": "1,0", "threshold": "0"}) as response,
    ):
        lines = response.aiter_lines()  # kept: a dropped iterator closes the connection when collected
        assert await anext(lines) == "retry: 2000"
        assert await sse_streams(server) == base + 1
    # The client is gone: the server-side task ends without waiting for a write or a heartbeat.
    async with asyncio.timeout(5):
        while await sse_streams(server) != base:
            await asyncio.sleep(0.05)


async def test_sse_resume_under_concurrent_writes_is_exact(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("sseresume")
    dim = 8
    await client.create_collection(name, dim=dim)
    rng = np.random.default_rng(9)
    target = unit(np.ones(dim, np.float32))
    start = await client.upsert(name, [{"id": "before", "vector": target}])
    written: list[tuple[int, str, float]] = []
    done = asyncio.Event()

    async def writer() -> None:
        async with ShoalClient.connect(server.ws_url) as w:
            for i in range(120):
                n = int(rng.integers(1, 4))
                vectors = [unit(target + 0.5 * rng.normal(size=dim).astype(np.float32)) for _ in range(n)]
                ack = await w.upsert(name, [{"id": f"w{i}_{k}", "vector": v} for k, v in enumerate(vectors)])
                for k, v in enumerate(vectors):
                    written.append((ack.seq - n + 1 + k, f"w{i}_{k}", float(np.dot(v, target))))
                await asyncio.sleep(0.005)
        done.set()

    received: list[tuple[int, str]] = []
    reconnects = 0

    async def reader() -> None:
        nonlocal reconnects
        last = start.seq
        while True:
            stream = subscribe_sse(server.url, name, vector=target, threshold=0.7, last_event_id=last)
            budget = random.Random(reconnects).randint(3, 20)
            try:
                while True:
                    if done.is_set() and last >= max(s for s, _, c in written if c >= 0.7):
                        return
                    try:
                        event = await next_event(stream, timeout=0.5)
                    except TimeoutError:
                        continue
                    assert event.event == "match" and event.seq is not None and event.seq > last
                    received.append((event.seq, event.data["hit"]["id"]))
                    last = event.seq
                    budget -= 1
                    if budget == 0 and not done.is_set():
                        break  # drop the connection mid-stream
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            reconnects += 1

    async with asyncio.timeout(150):
        await asyncio.gather(writer(), reader())
    expected = [(s, i) for s, i, c in written if c >= 0.7]
    assert reconnects >= 2
    assert len(received) == len(set(received)), "no duplicates"
    assert sorted(received) == sorted(expected), "no loss"


async def test_changes_stream_with_deletes_resumes_exactly(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("ssechg")
    await client.create_collection(name, dim=2)
    start = await client.upsert(name, [{"id": "old", "vector": [1.0, 0.0]}])
    log: dict[int, tuple[str, str]] = {}
    done = asyncio.Event()
    rng = random.Random(4)

    async def writer() -> None:
        live: list[str] = ["old"]
        async with ShoalClient.connect(server.ws_url) as w:
            for i in range(150):
                if live and rng.random() < 0.35:
                    victim = live.pop(rng.randrange(len(live)))
                    result = await w.delete(name, ids=[victim])
                    assert result.deleted == 1
                    log[result.seq] = ("delete", victim)
                else:
                    ids = [f"u{i}_{k}" for k in range(rng.randint(1, 3))]
                    ack = await w.upsert(name, [{"id": d, "vector": [1.0, float(i)]} for d in ids])
                    for k, d in enumerate(ids):
                        log[ack.seq - len(ids) + 1 + k] = ("upsert", d)
                    live.extend(ids)
                await asyncio.sleep(0.004)
        done.set()

    received: list[tuple[int, str, str]] = []
    reconnects = 0

    async def reader() -> None:
        nonlocal reconnects
        last = start.seq
        while True:
            stream = changes_sse(server.url, name, last_event_id=last)
            budget = rng.randint(2, 12)
            try:
                while True:
                    if done.is_set() and last >= max(log):
                        return
                    try:
                        event = await next_event(stream, timeout=0.5)
                    except TimeoutError:
                        continue
                    data = event.data
                    assert event.event == data["op"] and event.seq == data["seq"] > last
                    assert data["seq"] - data["first_seq"] + 1 == len(data["ids"])
                    for k, doc_id in enumerate(data["ids"]):
                        received.append((data["first_seq"] + k, data["op"], doc_id))
                    last = data["seq"]
                    budget -= 1
                    if budget == 0 and not done.is_set():
                        break
            finally:
                await stream.aclose()  # type: ignore[attr-defined]
            reconnects += 1

    async with asyncio.timeout(150):
        await asyncio.gather(writer(), reader())
    assert reconnects >= 2
    assert any(op == "delete" for _, op, _ in received)
    assert len(received) == len({seq for seq, _, _ in received}), "no duplicates"
    assert sorted(received) == sorted((seq, op, doc_id) for seq, (op, doc_id) in log.items()), "no loss"


async def test_sse_stream_ends_with_an_error_when_the_collection_is_dropped(
    server: ServerProcess, client: ShoalClient
) -> None:
    name = unique("ssedrop")
    await client.create_collection(name, dim=2)
    events: list[Any] = []
    ack = await client.upsert(name, [{"id": "a", "vector": [1.0, 0.0]}])
    stream = subscribe_sse(server.url, name, vector=[1.0, 0.0], threshold=0.0, last_event_id=0)
    events.append(await next_event(stream))  # replayed: the stream is registered from here
    await client.drop_collection(name)
    events.append(await next_event(stream))
    with pytest.raises(StopAsyncIteration):
        await next_event(stream)
    assert (events[0].event, events[0].seq) == ("match", ack.seq)
    assert events[1].event == "error" and events[1].data["error"]["code"] == "not_found"
