"""A client that never reads its replies hurts nobody but itself, end to end on a real server.

The flooding client is a raw TCP socket with a tiny receive buffer and a hand-made WebSocket
handshake, so it truly reads nothing while it sends k=1000 `include: ["vector"]` queries (each
reply is about 1.6 MB). Meanwhile a normal client queries in a loop. The server must stop reading
the flooder once its pending replies pass `MAX_PENDING_REPLY_BYTES`, keep its own memory near
where it was, keep answering the other client fast, and close the stuck connection with 1013
once its socket made no progress for `STUCK_CLOSE_S`.
"""

from __future__ import annotations

import asyncio
import base64
import os
import shutil
import socket
import statistics
import struct
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import httpx
import msgpack
import numpy as np
import pytest

from server.outbox import Outbox
from server.reply_budget import ReplyBudget, vector_bytes_floor
from shoal_client import ShoalClient
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(240)

DIM = 384
DOCS = 2_000
FLOOD = 2_000
STUCK_S = 3.0
PENDING_BYTES = 8 * 1024 * 1024
RSS_BOUND = 300 * 1024 * 1024
P99_BOUND_S = 0.250
STEADY_STUCK_S = 1.0


@pytest.fixture(scope="module")
def guarded() -> Iterator[ServerProcess]:
    data_dir = temp_data_dir("shoal-slow-")
    proc = ServerProcess(
        data_dir,
        env={"SHOAL_STUCK_CLOSE_S": str(STUCK_S), "SHOAL_MAX_PENDING_REPLY_BYTES": str(PENDING_BYTES)},
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


# -- the parts, alone ---------------------------------------------------------------------------


class _Socket:
    """An ASGI `send` that takes a frame after `delay` seconds, or never while `held`."""

    def __init__(self, delay: float = 0.0) -> None:
        self.delay = delay
        self.held = False
        self.frames: list[bytes] = []
        self.buffered = 0

    async def __call__(self, message: Any) -> None:
        while self.held:
            await asyncio.sleep(0.01)
        await asyncio.sleep(self.delay)
        self.frames.append(message["bytes"])


async def test_outbox_calls_a_socket_that_takes_nothing_stuck_once() -> None:
    socket = _Socket()
    stuck: list[float] = []
    outbox = Outbox(socket, 64, lambda data: None, stuck_after_s=0.3, on_stuck=lambda: stuck.append(time.monotonic()))
    await outbox.put(b"a")
    socket.held = True
    started = time.monotonic()
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.put, b"b")  # the sender, waiting on the socket
        await asyncio.sleep(0.05)
        await outbox.put(b"c")  # queued behind it
        await asyncio.sleep(0.6)
        tg.cancel_scope.cancel()
    assert len(stuck) == 1 and 0.3 <= stuck[0] - started < 0.5
    assert outbox.closed
    socket.held = False
    await outbox.put(b"d")  # dropped: the connection is being closed
    assert socket.frames == [b"a"]


async def test_outbox_does_not_call_a_slow_but_moving_socket_stuck() -> None:
    socket = _Socket(delay=0.1)  # each frame takes a third of the stuck time
    stuck: list[bool] = []
    outbox = Outbox(socket, 64, lambda data: None, stuck_after_s=0.3, on_stuck=lambda: stuck.append(True))
    async with anyio.create_task_group() as tg:
        for i in range(10):
            tg.start_soon(outbox.put, b"%d" % i)
    assert not stuck and len(socket.frames) == 10


async def test_outbox_counts_a_shrinking_transport_buffer_as_progress() -> None:
    socket = _Socket()
    socket.held = True  # no frame goes out, but the transport's buffer drains slowly
    socket.buffered = 10_000
    stuck: list[float] = []
    outbox = Outbox(
        socket,
        64,
        lambda data: None,
        stuck_after_s=0.2,
        on_stuck=lambda: stuck.append(time.monotonic()),
        buffered=lambda: socket.buffered,
    )
    async with anyio.create_task_group() as tg:
        tg.start_soon(outbox.put, b"big")
        for _ in range(8):  # 0.8 s of slow draining
            await asyncio.sleep(0.1)
            socket.buffered -= 1_000
        assert not stuck
        drained = time.monotonic()
        await asyncio.sleep(0.7)  # no more draining
        tg.cancel_scope.cancel()
    assert len(stuck) == 1 and stuck[0] - drained < 0.5


async def test_reply_budget_reads_while_a_typical_reply_fits() -> None:
    budget = ReplyBudget(1_000)
    assert budget.typical == 1_000 // 32
    big = budget.reserve(900)  # the request's shape promises 900 bytes
    assert budget.pending == 900 and budget.has_room()  # 900 + a typical 31 fit
    budget.replace(big, 950)  # larger than thought: the typical size follows it at once
    assert budget.typical == 950 and budget.pending == 950 and not budget.has_room()
    woke: list[bool] = []

    async def reader() -> None:
        await budget.wait_for_room()
        woke.append(True)

    async with anyio.create_task_group() as tg:
        tg.start_soon(reader)
        await asyncio.sleep(0.01)
        budget.add(60)  # a push queued behind it
        budget.release(950)
        await asyncio.sleep(0.01)
        assert not woke, "60 bytes pending and a typical 950-byte reply do not fit in 1,000"
        assert budget.fits(900) and not budget.fits(980)
        budget.release(60)
    assert woke and budget.pending == 0
    # Nothing pending: one more request is always read, however large its reply may be.
    assert budget.has_room() and budget.fits(10_000)
    # A smaller reply talks the typical size down by an eighth of the difference only.
    budget.replace(budget.reserve(0), 10)
    assert budget.typical == 950 - (950 - 10) // 8


def test_vector_bytes_floor_counts_rows_times_vector_bytes() -> None:
    def dims(name: str) -> int | None:
        return {"c": 384}.get(name)

    assert vector_bytes_floor("query", {"collection": "c", "k": 1000, "include": ["vector"]}, dims) == 1000 * 384 * 4
    assert vector_bytes_floor("query", {"collection": "c", "include": ["vector"]}, dims) == 10 * 384 * 4
    assert vector_bytes_floor("get", {"collection": "c", "ids": ["a", "b"], "include": ["vector"]}, dims) == 2 * 1536
    assert vector_bytes_floor("query", {"collection": "c", "k": 1000}, dims) == 0
    assert vector_bytes_floor("query", {"collection": "nope", "k": 5, "include": ["vector"]}, dims) == 0
    assert vector_bytes_floor("query", {"collection": "c", "k": "x", "include": ["vector"]}, dims) == 0
    assert vector_bytes_floor("upsert", {"collection": "c", "include": ["vector"]}, dims) == 0


# -- end to end --------------------------------------------------------------------------------


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def memory(pid: int) -> dict[str, int]:
    """VmRSS / VmHWM of a process, in bytes."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("VmRSS", "VmHWM"):
            out[key] = int(value.split()[0]) * 1024
    return out


async def gauge(server: ServerProcess, name: str) -> float:
    async with httpx.AsyncClient(timeout=20.0) as http:
        text = (await http.get(f"{server.url}/metrics")).text
    for line in text.splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError(f"{name} not in /metrics")


class RawWebSocket:
    """A client WebSocket on a plain socket: it reads only when told to, so a test can make it
    a client that never reads. The receive buffer is tiny, so the server's writes back up at once."""

    def __init__(self, url: str) -> None:
        host, port = url.split("//")[1].split("/")[0].split(":")
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 16384)
        self.sock.connect((host, int(port)))
        key = base64.b64encode(os.urandom(16)).decode()
        self.sock.sendall(
            (
                f"GET /v1/ws HTTP/1.1\r\nHost: {host}:{port}\r\nUpgrade: websocket\r\n"
                f"Connection: Upgrade\r\nSec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n"
                "Sec-WebSocket-Protocol: shoal.v1\r\n\r\n"
            ).encode()
        )
        head = b""
        while b"\r\n\r\n" not in head:
            chunk = self.sock.recv(1)
            assert chunk, "the server closed during the handshake"
            head += chunk
        assert head.startswith(b"HTTP/1.1 101"), head
        self.buffer = b""

    @staticmethod
    def frame(payload: bytes) -> bytes:
        """A masked binary frame (clients must mask)."""
        mask = os.urandom(4)
        size = len(payload)
        if size < 126:
            head = struct.pack("!BB", 0x82, 0x80 | size)
        elif size < 1 << 16:
            head = struct.pack("!BBH", 0x82, 0x80 | 126, size)
        else:
            head = struct.pack("!BBQ", 0x82, 0x80 | 127, size)
        key = int.from_bytes((mask * (size // 4 + 1))[:size], "big")
        body = (int.from_bytes(payload, "big") ^ key).to_bytes(size, "big")
        return head + mask + body

    def read_frames(self, timeout: float) -> list[tuple[int, bytes]]:
        """Read frames up to the server's close frame (or the end of the stream); (opcode,
        payload) of every frame."""
        self.sock.settimeout(timeout)
        data = self.buffer
        frames: list[tuple[int, bytes]] = []
        pos = 0
        while True:
            frame = self._parse(data, pos)
            if frame is not None:
                opcode, payload, pos = frame
                frames.append((opcode, payload))
                if opcode == 0x8:
                    return frames
                continue
            try:
                chunk = self.sock.recv(1 << 20)
            except (ConnectionResetError, TimeoutError):
                return frames
            if not chunk:
                return frames
            data = data[pos:] + chunk
            pos = 0

    @classmethod
    def _frames_in(cls, data: bytes) -> list[tuple[int, bytes]]:
        """The whole frames at the start of `data`."""
        frames: list[tuple[int, bytes]] = []
        pos = 0
        while (frame := cls._parse(data, pos)) is not None:
            opcode, payload, pos = frame
            frames.append((opcode, payload))
        return frames

    @staticmethod
    def _parse(data: bytes, pos: int) -> tuple[int, bytes, int] | None:
        if pos + 2 > len(data):
            return None
        opcode, size = data[pos] & 0x0F, data[pos + 1] & 0x7F
        pos += 2
        if size == 126:
            if pos + 2 > len(data):
                return None
            (size,) = struct.unpack_from("!H", data, pos)
            pos += 2
        elif size == 127:
            if pos + 8 > len(data):
                return None
            (size,) = struct.unpack_from("!Q", data, pos)
            pos += 8
        if pos + size > len(data):
            return None
        return opcode, data[pos : pos + size], pos + size


def flood(ws: RawWebSocket, frames: list[bytes], blocked: threading.Event) -> int:
    """Send frames until the server stops reading (a send makes no progress for 2 s); how many
    were sent whole."""
    ws.sock.settimeout(2.0)
    sent = 0
    try:
        for data in frames:
            ws.sock.sendall(data)
            sent += 1
    except (TimeoutError, OSError):
        pass
    blocked.set()
    return sent


async def test_a_client_that_never_reads_is_held_back_and_closed(guarded: ServerProcess) -> None:
    name = unique("flood")
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(DOCS, DIM)).astype(np.float32)
    async with ShoalClient.connect(guarded.ws_url) as normal:
        await normal.create_collection(name, dim=DIM)
        for start in range(0, DOCS, 500):
            docs = [{"id": f"d{i}", "vector": vectors[i], "text": f"document {i}"} for i in range(start, start + 500)]
            await normal.upsert(name, docs)
        # Warm up both paths once, then measure the baseline.
        await normal.query(name, vector=vectors[0], k=1000, include=["vector"])
        for _ in range(20):
            await normal.query(name, vector=vectors[1], k=10)
        assert guarded.pid is not None
        baseline = memory(guarded.pid)["VmRSS"]
        assert await gauge(guarded, "shoal_ws_pending_reply_bytes_limit") == PENDING_BYTES

        requests = [
            RawWebSocket.frame(
                msgpack.packb(
                    {
                        "id": i,
                        "op": "query",
                        "collection": name,
                        "vector": vectors[i % DOCS].tobytes(),
                        "k": 1000,
                        "include": ["vector"],
                    }
                )
            )
            for i in range(FLOOD)
        ]
        raw = RawWebSocket(guarded.ws_url)
        blocked = threading.Event()
        started = time.monotonic()
        flooder = asyncio.create_task(asyncio.to_thread(flood, raw, requests, blocked))

        latencies: list[float] = []
        first_10s: list[float] = []  # those that began within 10 s of the flood's start
        peak = baseline

        async def query_loop() -> None:
            while True:
                t0 = time.perf_counter()
                result = await normal.query(name, vector=vectors[7], k=10)
                latencies.append(time.perf_counter() - t0)
                if time.monotonic() - started < 10.0:
                    first_10s.append(latencies[-1])
                assert len(result.hits) == 10

        loop = asyncio.create_task(query_loop())
        closed_after: float | None = None
        deadline = started + STUCK_S * 2 + 40
        try:
            while time.monotonic() < deadline:
                await asyncio.sleep(0.1)
                peak = max(peak, memory(guarded.pid)["VmRSS"])
                if loop.done():
                    loop.result()
                if blocked.is_set() and await gauge(guarded, "shoal_ws_connections") <= 1:
                    closed_after = time.monotonic() - started
                    break
        finally:
            loop.cancel()
        sent = await flooder
        hwm = memory(guarded.pid)["VmHWM"]
        p99 = statistics.quantiles(latencies, n=100)[98] if len(latencies) >= 100 else max(latencies)
        p99_10s = statistics.quantiles(first_10s, n=100)[98] if len(first_10s) >= 100 else max(first_10s)
        print(
            f"flood: {sent}/{FLOOD} requests taken before the server stopped reading; closed after "
            f"{closed_after} s; server RSS baseline {baseline / 2**20:.0f} MiB, peak "
            f"{peak / 2**20:.0f} MiB, VmHWM {hwm / 2**20:.0f} MiB; other client: "
            f"{len(latencies)} queries, p50 {statistics.median(latencies) * 1000:.1f} ms, "
            f"p99 {p99 * 1000:.1f} ms, max {max(latencies) * 1000:.1f} ms; in the flood's first 10 s: "
            f"{len(first_10s)} queries, p99 {p99_10s * 1000:.1f} ms"
        )
        # The server stopped reading the flooder (TCP back-pressure): what it took sits in socket
        # buffers, a few hundred kilobytes, where a server that read on took every request.
        assert sent < FLOOD // 2, "the server read on while the flooder read nothing"
        assert hwm - baseline < RSS_BOUND, f"server memory grew by {(hwm - baseline) / 2**20:.0f} MiB"
        assert p99 < P99_BOUND_S, f"the other client's p99 was {p99 * 1000:.0f} ms"
        # The flooder's socket was stuck from its first large reply on (its receive buffer is
        # tiny): closed about STUCK_S after the flood began.
        assert closed_after is not None and STUCK_S <= closed_after < 1.25 * STUCK_S + 3

        # What the flooder gets when it reads at last: some replies, then a close frame 1013.
        frames = await asyncio.to_thread(raw.read_frames, 10.0)
        raw.sock.close()
        closes = [payload for opcode, payload in frames if opcode == 0x8]
        assert closes, f"no close frame among {len(frames)} frames"
        code = struct.unpack("!H", closes[-1][:2])[0]
        assert code == 1013, closes[-1]
        replies = [msgpack.unpackb(payload) for opcode, payload in frames if opcode == 0x2]
        assert all(r["ok"] and len(r["hits"]) == 1000 for r in replies)
        print(f"the flooder read {len(replies)} replies, then close {code}")

        # The server is fine: the normal client still gets answers.
        result = await normal.query(name, vector=vectors[3], k=5)
        assert result.hits[0].id == "d3"
        await normal.drop_collection(name)


@pytest.fixture(scope="module")
def impatient() -> Iterator[ServerProcess]:
    """A server that calls a socket stuck after one second without progress."""
    data_dir = temp_data_dir("shoal-steady-")
    proc = ServerProcess(data_dir, env={"SHOAL_STUCK_CLOSE_S": str(STEADY_STUCK_S)})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_a_client_that_reads_slowly_but_steadily_is_not_closed(impatient: ServerProcess) -> None:
    """Two 4 MB replies read at about 1 MB/s: the second waits for the first to drain from the
    server's transport for longer than the stuck time, but bytes keep going, so the connection
    is not stuck."""
    guarded = impatient
    name = unique("steady")
    dim, docs = 1024, 1000
    rng = np.random.default_rng(8)
    vectors = rng.normal(size=(docs, dim)).astype(np.float32)
    async with ShoalClient.connect(guarded.ws_url) as c:
        await c.create_collection(name, dim=dim)
        for start in range(0, docs, 200):
            await c.upsert(name, [{"id": f"d{i}", "vector": vectors[i]} for i in range(start, start + 200)])
        raw = RawWebSocket(guarded.ws_url)
        for i in range(2):
            request = {"id": i, "op": "query", "collection": name, "vector": vectors[i].tobytes(), "k": docs}
            raw.sock.sendall(RawWebSocket.frame(msgpack.packb({**request, "include": ["vector"]})))

        def read_steadily() -> tuple[bytes, float]:
            raw.sock.setblocking(False)
            data = bytearray()
            started = time.monotonic()
            while time.monotonic() - started < 40 and len(raw._frames_in(bytes(data))) < 2:
                taken = 0
                while taken < 256 * 1024:  # about 1 MB/s in ticks of 0.25 s
                    try:
                        chunk = raw.sock.recv(min(65536, 256 * 1024 - taken))
                    except BlockingIOError:
                        break
                    if not chunk:
                        return bytes(data), time.monotonic() - started
                    data += chunk
                    taken += len(chunk)
                time.sleep(0.25)
            return bytes(data), time.monotonic() - started

        data, took = await asyncio.to_thread(read_steadily)
        raw.sock.close()
        frames = raw._frames_in(data)
        print(f"steady reader: {len(data)} bytes in {took:.1f} s")
        assert [opcode for opcode, _ in frames] == [0x2, 0x2], "both replies, and no close frame"
        assert all(len(msgpack.unpackb(payload)["hits"]) == docs for _, payload in frames)
        assert took > 4 * STEADY_STUCK_S, "the replies took much longer than the stuck time to read"
        await c.drop_collection(name)
