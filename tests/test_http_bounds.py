"""Slow and excess connections against a real server with small bounds, over raw sockets.

SHOAL_HEADER_TIMEOUT_S: partial headers are answered 408 and closed; a silent connection is
closed. SHOAL_BODY_TIMEOUT_S: a stalled body is answered 408 and closed, and the server logs no
traceback. SHOAL_MAX_CONNECTIONS: past it, HTTP requests and WebSocket handshakes get 503
`overloaded`; once connections close, requests are served again.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import time
from collections.abc import AsyncIterator

import httpx
import pytest
from websockets.asyncio.client import connect
from websockets.exceptions import InvalidStatus
from websockets.typing import Subprotocol

from tests.server_process import ServerProcess, temp_data_dir

HEADER_TIMEOUT_S = 0.6
BODY_TIMEOUT_S = 0.6
MAX_CONNECTIONS = 6


@pytest.fixture(scope="module")
async def bounded() -> AsyncIterator[ServerProcess]:
    data_dir = temp_data_dir()
    proc = ServerProcess(
        data_dir,
        {
            "SHOAL_HEADER_TIMEOUT_S": str(HEADER_TIMEOUT_S),
            "SHOAL_BODY_TIMEOUT_S": str(BODY_TIMEOUT_S),
            "SHOAL_MAX_CONNECTIONS": str(MAX_CONNECTIONS),
        },
    )
    proc.start()
    try:
        async with httpx.AsyncClient(base_url=proc.url) as http:
            assert (await http.post("/v1/collections", json={"name": "b", "dim": 2})).status_code == 200
        yield proc
    finally:
        code = proc.stop()
        log = proc.log_tail(400)
        shutil.rmtree(data_dir, ignore_errors=True)
        assert code == 0, log
        assert "Traceback" not in log, log


def _port(proc: ServerProcess) -> int:
    return int(proc.url.rsplit(":", 1)[1])


async def _raw(proc: ServerProcess, data: bytes) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", _port(proc))
    if data:
        writer.write(data)
        await writer.drain()
    return reader, writer


async def _until_closed(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> tuple[bytes, float]:
    """Everything the server sends until it closes, and how long that took."""
    started = time.monotonic()
    try:
        data = await asyncio.wait_for(reader.read(), 10)
    finally:
        writer.close()
    return data, time.monotonic() - started


def _status_and_error(response: bytes) -> tuple[int, dict[str, str]]:
    head, _, body = response.partition(b"\r\n\r\n")
    status = int(head.split(b" ", 2)[1])
    return status, json.loads(body)["error"]


async def test_partial_headers_are_answered_408_and_closed(bounded: ServerProcess) -> None:
    reader, writer = await _raw(bounded, b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nX-Slow: ")
    response, took = await _until_closed(reader, writer)
    status, error = _status_and_error(response)
    assert status == 408 and error["code"] == "bad_request", response
    assert "headers" in error["message"]
    assert HEADER_TIMEOUT_S * 0.8 < took < HEADER_TIMEOUT_S + 2


async def test_a_silent_connection_is_closed(bounded: ServerProcess) -> None:
    reader, writer = await _raw(bounded, b"")
    response, took = await _until_closed(reader, writer)
    assert response == b""
    assert took < HEADER_TIMEOUT_S + 2


async def test_a_stalled_body_is_answered_408_and_closed(bounded: ServerProcess) -> None:
    head = b"POST /v1/collections/b/upsert HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
    reader, writer = await _raw(bounded, head + b"Content-Length: 200\r\n\r\n" + b'{"docs": [')
    response, took = await _until_closed(reader, writer)
    status, error = _status_and_error(response)
    assert status == 408 and error["code"] == "bad_request", response
    assert "body" in error["message"]
    assert BODY_TIMEOUT_S * 0.8 < took < BODY_TIMEOUT_S + 2
    await asyncio.sleep(0.2)
    assert "Traceback" not in bounded.log_tail(200)


async def test_requests_within_the_bounds_are_served(bounded: ServerProcess) -> None:
    # Headers in two parts and a body in two parts, each well within its timeout.
    body = json.dumps({"docs": [{"id": "a", "vector": [1.0, 0.0]}]}).encode()
    reader, writer = await _raw(bounded, b"POST /v1/collections/b/upsert HTTP/1.1\r\nHost: 127.0.0.1\r\n")
    await asyncio.sleep(HEADER_TIMEOUT_S / 3)
    writer.write(b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n" % len(body) + body[:5])
    await asyncio.sleep(BODY_TIMEOUT_S / 3)
    writer.write(body[5:])
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    writer.close()
    assert head.startswith(b"HTTP/1.1 200"), head


async def test_past_max_connections_requests_get_503_overloaded(bounded: ServerProcess) -> None:
    port = _port(bounded)
    streams = []
    try:
        # Long-lived connections past their headers: SSE streams.
        for _ in range(MAX_CONNECTIONS):
            reader, writer = await asyncio.open_connection("127.0.0.1", port)
            writer.write(b"GET /v1/collections/b/changes HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            await asyncio.wait_for(reader.readuntil(b"retry: 2000"), 10)
            streams.append((reader, writer))
        async with httpx.AsyncClient(base_url=bounded.url) as http:
            response = await http.get("/healthz")
        assert response.status_code == 503, response.text
        assert response.json()["error"]["code"] == "overloaded"
        with pytest.raises(InvalidStatus) as refused:
            async with connect(bounded.ws_url, subprotocols=[Subprotocol("shoal.v1")]):
                pass
        assert refused.value.response.status_code == 503
        assert json.loads(refused.value.response.body or b"{}")["error"]["code"] == "overloaded"
    finally:
        for _, writer in streams:
            writer.close()
    await asyncio.sleep(0.3)
    async with httpx.AsyncClient(base_url=bounded.url) as http:
        assert (await http.get("/healthz")).status_code == 200
