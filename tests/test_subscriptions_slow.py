"""Slow consumers, heartbeats, CORS and limits, on a server of our own with tight settings: a
16-event buffer per subscriber, a 0.3 s heartbeat, a 1 s grace for stalled SSE readers, and room
for one applied batch in the subscriptions actor's mailbox (the overflow path itself is tested
deterministically in test_subscriptions_actor.py)."""

from __future__ import annotations

import asyncio
import contextlib
import json
import shutil
import socket
import statistics
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from typing import Any

import httpx
import msgpack
import pytest
import websockets

from shoal_client import ShoalClient, subscribe_sse
from shoal_client.errors import Overloaded, TooLarge
from shoal_client.types import MatchEvent
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(240)

BUFFER = 16
ORIGIN = "http://page.test"
PAYLOAD = "x" * 16_000  # a large push fills socket buffers with fewer documents


@pytest.fixture(scope="module")
def tight() -> Iterator[ServerProcess]:
    data_dir = temp_data_dir("shoal-tight-")
    proc = ServerProcess(
        data_dir,
        env={
            "SHOAL_SUB_BUFFER": str(BUFFER),
            "SHOAL_HEARTBEAT_S": "0.3",
            "SHOAL_SSE_SEND_GRACE_S": "1",
            "SHOAL_CORS_ORIGINS": ORIGIN,
            "SHOAL_MAX_SUBSCRIPTIONS": "40",
            "SHOAL_MAX_SUBSCRIPTIONS_PER_CONNECTION": "30",
            "SHOAL_SUB_MAILBOX": "1",
        },
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def metrics(server: ServerProcess) -> dict[str, float]:
    async with httpx.AsyncClient(timeout=20.0) as http:
        text = (await http.get(f"{server.url}/metrics")).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        if line.startswith("shoal_s") and " " in line:
            key, value = line.rsplit(" ", 1)
            out[key] = float(value)
    return out


def tiny_socket() -> socket.socket:
    """A client socket with a small receive buffer: once its owner stops reading, the server's
    writes back up within a few kilobytes."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    return sock


class Writer:
    """Upserts matching documents in batches and records each batch's ack latency."""

    def __init__(self, client: ShoalClient, name: str) -> None:
        self.client = client
        self.name = name
        self.seqs: list[int] = []
        self.latencies: list[float] = []
        self.done = asyncio.Event()

    async def write(self, batches: int, size: int = 4) -> None:
        for _ in range(batches):
            n = len(self.seqs)
            docs = [{"id": f"d{n + k}", "vector": [1.0, 0.0], "text": PAYLOAD} for k in range(size)]
            started = time.perf_counter()
            ack = await self.client.upsert(self.name, docs)
            self.latencies.append(time.perf_counter() - started)
            self.seqs.extend(range(ack.seq - size + 1, ack.seq + 1))

    def summary(self) -> str:
        ms = sorted(x * 1000 for x in self.latencies)
        return f"{len(self.seqs)} docs, ack p50 {statistics.median(ms):.1f} ms, max {ms[-1]:.1f} ms"


async def write_until(writer: Writer, server: ServerProcess, counter: str, limit: int = 150) -> None:
    """Write until the server's `counter` has moved (bounded), then a little more."""
    before = (await metrics(server)).get(counter, 0.0)
    for _ in range(limit):
        await writer.write(10)
        if (await metrics(server)).get(counter, 0.0) > before:
            await writer.write(5)
            writer.done.set()
            return
    raise AssertionError(f"{counter} never moved after {len(writer.seqs)} documents")


@contextlib.asynccontextmanager
async def fast_subscriber(server: ServerProcess, name: str) -> AsyncIterator[tuple[ShoalClient, Any]]:
    async with ShoalClient.connect(server.ws_url) as c:
        yield c, await c.subscribe(name, vector=[1.0, 0.0], threshold=0.5, include=["metadata"])


async def drain(sub: Any, writer: Writer) -> list[int]:
    """Every event of a subscriber that keeps up, until the writer is done and all arrived."""
    got: list[int] = []
    async with asyncio.timeout(120):
        async for event in sub:
            assert isinstance(event, MatchEvent), f"the fast subscriber lagged: {event}"
            got.append(event.seq)
            if writer.done.is_set() and len(got) == len(writer.seqs):
                return got
    raise AssertionError("fast subscription ended")


async def test_stalled_websocket_reader_gets_lagged_and_slows_nobody(tight: ServerProcess) -> None:
    name = unique("slowws")
    async with ShoalClient.connect(tight.ws_url) as c:
        await c.create_collection(name, dim=2)
        writer = Writer(c, name)
        async with fast_subscriber(tight, name) as (_, fast):
            sock = tiny_socket()
            sock.connect((tight.url.split("//")[1].split(":")[0], int(tight.url.rsplit(":", 1)[1])))
            async with websockets.connect(
                tight.ws_url, sock=sock, subprotocols=[websockets.Subprotocol("shoal.v1")], max_queue=1
            ) as slow:
                await slow.send(
                    msgpack.packb(
                        {
                            "id": 1,
                            "op": "subscribe",
                            "collection": name,
                            "vector": [1.0, 0.0],
                            "threshold": 0.5,
                            "include": ["text"],
                        }
                    )
                )
                reply = msgpack.unpackb(await slow.recv())
                assert reply["ok"] is True
                # The slow client reads nothing more; the writer goes on until the server drops.
                fast_task = asyncio.create_task(drain(fast, writer))
                await write_until(writer, tight, "shoal_subscription_dropped_total")
                fast_seqs = await fast_task
                assert fast_seqs == writer.seqs, "the fast subscriber got every match, in order"
                # Now the slow client reads: matches in order, a lagged push where each gap is,
                # until every match is accounted for.
                frames: list[dict[str, Any]] = []
                accounted = 0
                async with asyncio.timeout(60):
                    while accounted < len(writer.seqs):
                        frame = msgpack.unpackb(await slow.recv())
                        frames.append(frame)
                        accounted += frame["dropped"] if frame["event"] == "lagged" else 1
        print("writer:", writer.summary())
    lagged = [f for f in frames if f["event"] == "lagged"]
    matches = [f["seq"] for f in frames if f["event"] == "match"]
    assert lagged and all(f["sub"] == reply["sub"] and f["dropped"] > 0 for f in lagged)
    assert matches == sorted(matches) and len(set(matches)) == len(matches)
    assert len(matches) + sum(f["dropped"] for f in lagged) == len(writer.seqs), "every match sent or counted"


async def test_stalled_sse_reader_is_closed_and_resumes_exactly(tight: ServerProcess) -> None:
    name = unique("slowsse")
    host, port = tight.url.split("//")[1].split(":")
    async with ShoalClient.connect(tight.ws_url) as c:
        await c.create_collection(name, dim=2)
        first = await c.upsert(name, [{"id": "start", "vector": [0.0, 1.0]}])
        writer = Writer(c, name)
        base = await metrics(tight)
        async with fast_subscriber(tight, name) as (_, fast):
            reader, stream_writer = await asyncio.open_connection(sock=_connected(host, int(port)))
            path = f"/v1/collections/{name}/subscribe?vector=1,0&threshold=0.5&last_event_id={first.seq}"
            stream_writer.write(f"GET {path} HTTP/1.1\r\nHost: {host}\r\n\r\n".encode())
            await stream_writer.drain()
            head = await reader.readuntil(b"\r\n\r\n")
            assert b" 200 " in head.split(b"\r\n")[0]
            fast_task = asyncio.create_task(drain(fast, writer))
            await write_until(writer, tight, "shoal_subscription_lagged_closes_total")
            assert await fast_task == writer.seqs
            # The stalled stream's task is gone (closed, then dropped after the grace period).
            async with asyncio.timeout(20):
                while (await metrics(tight))["shoal_sse_streams"] > base["shoal_sse_streams"]:
                    await asyncio.sleep(0.1)
            body = await asyncio.wait_for(reader.read(), 30)  # what reached us, up to the close
            stream_writer.close()
        print("writer:", writer.summary())
    seen = [int(m) for m in _ids(body)]
    assert seen == sorted(seen) and seen[0] == writer.seqs[0] and len(seen) < len(writer.seqs)
    # Resume from the last id received: exactly the rest, once each.
    rest: list[int] = []
    stream = subscribe_sse(tight.url, name, vector=[1.0, 0.0], threshold=0.5, last_event_id=seen[-1])
    async with asyncio.timeout(60):
        async for event in stream:
            assert event.event == "match" and event.seq is not None
            rest.append(event.seq)
            if event.seq == writer.seqs[-1]:
                break
    await stream.aclose()  # type: ignore[attr-defined]
    assert seen + rest == writer.seqs


def _connected(host: str, port: int) -> socket.socket:
    sock = tiny_socket()
    sock.connect((host, port))
    sock.setblocking(False)
    return sock


def _ids(body: bytes) -> list[str]:
    """The `id:` of every complete event block of a chunked SSE body (chunk framing ignored)."""
    ids = []
    for block in body.split(b"\n\n"):
        lines = block.split(b"\n")
        if any(line.startswith(b"id: ") for line in lines) and any(line.startswith(b"data: ") for line in lines):
            data = next(line for line in lines if line.startswith(b"data: "))
            with contextlib.suppress(ValueError):
                json.loads(data[6:])  # a block cut by the close is not an event
                ids.append(next(line for line in lines if line.startswith(b"id: "))[4:].decode())
    return ids


async def test_heartbeat_comments_and_cors(tight: ServerProcess) -> None:
    name = unique("beat")
    async with ShoalClient.connect(tight.ws_url) as c:
        await c.create_collection(name, dim=2)
    url = f"{tight.url}/v1/collections/{name}/changes"
    pings = 0
    started = time.monotonic()
    async with (
        httpx.AsyncClient(timeout=20.0) as http,
        http.stream("GET", url, headers={"Origin": ORIGIN}) as response,
    ):
        assert response.headers["access-control-allow-origin"] == ORIGIN
        assert response.headers["content-type"] == "text/event-stream"
        async for line in response.aiter_lines():
            pings += line == ": ping"
            if pings == 4:
                break
    elapsed = time.monotonic() - started
    assert elapsed < 10, f"4 heartbeats at 0.3 s took {elapsed:.1f} s"
    async with httpx.AsyncClient(timeout=20.0) as http:
        refused = await http.get(url + "?last_event_id=x", headers={"Origin": ORIGIN})
    assert refused.status_code == 400 and refused.headers["access-control-allow-origin"] == ORIGIN


async def test_subscription_limits(tight: ServerProcess) -> None:
    name = unique("limits")
    async with ShoalClient.connect(tight.ws_url) as a, ShoalClient.connect(tight.ws_url) as b:
        await a.create_collection(name, dim=2)
        async with asyncio.timeout(20):  # earlier tests' subscribers are gone
            while True:
                now = await metrics(tight)
                if now['shoal_subscriptions{kind="match"}'] + now['shoal_subscriptions{kind="changes"}'] == 0:
                    break
                await asyncio.sleep(0.1)
        subs = [await a.subscribe(name, vector=[1.0, 0.0], threshold=0.0) for _ in range(30)]
        with pytest.raises(TooLarge):  # 30 per connection
            await a.subscribe(name, vector=[1.0, 0.0], threshold=0.0)
        subs += [await b.subscribe(name, vector=[1.0, 0.0], threshold=0.0) for _ in range(10)]
        with pytest.raises(Overloaded):  # 40 on the server
            await b.subscribe(name, vector=[1.0, 0.0], threshold=0.0)
        async with httpx.AsyncClient(timeout=20.0) as http:
            refused = await http.get(f"{tight.url}/v1/collections/{name}/changes")
        assert refused.status_code == 503 and refused.json()["error"]["code"] == "overloaded"
        await subs[0].close()
        extra = await b.subscribe(name, vector=[1.0, 0.0], threshold=0.0)
        assert extra.sub not in {s.sub for s in subs}
