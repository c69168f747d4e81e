"""SIGINT / SIGTERM with streams open: a real `shoal serve` with 100 SSE streams and WebSocket
subscribers (and, on SIGINT, writes in flight) stops in order and fast.

Every SSE stream ends with `event: error` carrying `unavailable`, every WebSocket subscription
with an `ended` push (`Unavailable` in the client), every write in flight is acked, and the
process exits 0 (within 3 s when no write is in flight) with no traceback in its log.
"""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import numpy as np
import pytest

from shoal_client import ShoalClient
from shoal_client.errors import Unavailable
from tests.server_process import ServerProcess, temp_data_dir

SSE_STREAMS = 100
EXIT_WITHIN_S = 3.0


async def _open_stream(port: int, path: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A raw SSE stream, read up to its first block (`retry:`): from there it is live."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAccept: text/event-stream\r\n\r\n".encode())
    await writer.drain()
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 30)
    assert head.startswith(b"HTTP/1.1 200"), head
    await asyncio.wait_for(reader.readuntil(b"retry: 2000"), 30)
    return reader, writer


async def _rest_of(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
    try:
        return await asyncio.wait_for(reader.read(), 20)
    finally:
        writer.close()


@asynccontextmanager
async def _server() -> AsyncIterator[ServerProcess]:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir)
    proc.start()
    try:
        yield proc
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)


def _port(proc: ServerProcess) -> int:
    return int(proc.url.rsplit(":", 1)[1])


async def _stop_with_streams_open(sig: signal.Signals, writes: bool, within: float = EXIT_WITHIN_S) -> float:
    async with _server() as proc:
        port = _port(proc)
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as http:
            response = await http.post("/v1/collections", json={"name": "live", "dim": 4})
            assert response.status_code == 200, response.text
        client = await ShoalClient.connect(proc.ws_url).__aenter__()
        subs = [await client.subscribe("live", [1.0, 0.0, 0.0, 0.0], threshold=-1.0) for _ in range(3)]
        paths = [
            "/v1/collections/live/subscribe?vector=1,0,0,0&threshold=-1"
            if i % 2
            else "/v1/collections/live/changes"
            for i in range(SSE_STREAMS)
        ]
        streams = await asyncio.gather(*(_open_stream(port, p) for p in paths))
        pending: list[asyncio.Task[object]] = []
        if writes:
            rng = np.random.default_rng(1)

            async def upsert(batch: int) -> object:
                docs = [{"id": f"{batch}-{i}", "vector": rng.normal(size=4).tolist()} for i in range(200)]
                return await client.upsert("live", docs)

            await upsert(-1)  # the pipeline is warm: the next ones are in flight at the signal
            pending = [asyncio.create_task(upsert(b)) for b in range(20)]
            await asyncio.sleep(0.05)
        assert proc.proc is not None
        # The cluster was created seconds ago: its files are still dirty in the page cache, and
        # the shutdown checkpoint's fsync would write them back first. A server that has run
        # for longer than the kernel's writeback delay has none; flush them to measure that one.
        await asyncio.to_thread(os.sync)
        started = time.monotonic()
        proc.proc.send_signal(sig)
        code = await asyncio.to_thread(proc.proc.wait, 30)
        elapsed = time.monotonic() - started

        bodies = await asyncio.gather(*(_rest_of(r, w) for r, w in streams))
        for path, body in zip(paths, bodies, strict=True):
            assert b"event: error" in body, (path, body)
            assert b'"code":"unavailable"' in body.split(b"event: error", 1)[1], (path, body)
        for sub in subs:
            with pytest.raises(Unavailable):
                async for _ in sub:
                    pass
        for task in pending:
            result = await task  # acked: the write committed before the server went away
            assert result is not None
        await client.close()

        log = proc.log_tail(400)
        assert code == 0, f"exit {code}\n{log}"
        assert "Traceback" not in log, log
        assert "engine stopped" in log, log
        assert elapsed < within, f"exit took {elapsed:.2f}s\n{log}"
        print(f"{sig.name} -> exit with {SSE_STREAMS} SSE streams open: {elapsed:.2f}s")
        return elapsed


async def test_sigint_ends_every_stream_and_exits_fast() -> None:
    await _stop_with_streams_open(signal.SIGINT, writes=False)


async def test_sigterm_ends_every_stream_and_exits_fast() -> None:
    await _stop_with_streams_open(signal.SIGTERM, writes=False)


async def test_writes_in_flight_at_sigint_are_acked_before_the_connection_closes() -> None:
    # Committing the 4,000 documents in flight is what takes the time here, so the bound is looser.
    await _stop_with_streams_open(signal.SIGINT, writes=True, within=15.0)
