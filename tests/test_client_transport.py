"""The client's WebSocket transport (`client.transport`): keepalive, closing, close codes, the open
timeout, handshake refusals and fragmented messages.

Against the session's real server where it can show the behaviour, and otherwise against tiny
hand-rolled servers on 127.0.0.1 port 0 (websockets' sans-I/O `ServerProtocol` over asyncio
streams) that do what a real server would not: stay silent, ignore pings, fragment a reply,
refuse the handshake.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable

import msgpack
import pytest
from websockets.frames import Frame, Opcode
from websockets.http11 import Request
from websockets.server import ServerProtocol
from websockets.typing import Subprotocol

from shoal_client import ShoalClient
from shoal_client import errors as ce
from shoal_client.transport import WebSocketTransport
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(60)


# --- a tiny hand-rolled server -------------------------------------------------------------------


class Peer:
    """The server end of one connection, driven by websockets' sans-I/O `ServerProtocol`."""

    def __init__(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, subprotocols: list[Subprotocol] | None
    ) -> None:
        self.reader = reader
        self.writer = writer
        self.ws = ServerProtocol(subprotocols=subprotocols, max_size=None)
        self.events: list[Request | Frame] = []

    def flush(self) -> None:
        for data in self.ws.data_to_send():
            if data:
                self.writer.write(data)
            elif self.writer.can_write_eof():
                self.writer.write_eof()

    async def _more(self) -> bool:
        """Feed the next chunk from the socket to the protocol; False at EOF."""
        chunk = await self.reader.read(65536)
        if chunk:
            self.ws.receive_data(chunk)
        else:
            self.ws.receive_eof()
        self.flush()  # pongs, the echo of a close frame, the EOF that follows it
        self.events.extend(e for e in self.ws.events_received() if isinstance(e, Request | Frame))
        return bool(chunk)

    async def accept(self) -> None:
        while not self.events:
            assert await self._more(), "client left before its handshake"
        request = self.events.pop(0)
        assert isinstance(request, Request)
        self.ws.send_response(self.ws.accept(request))
        self.flush()

    async def next_message(self) -> bytes | None:
        """The next binary message from the client (sent unfragmented), None once it closed."""
        while True:
            while self.events:
                event = self.events.pop(0)
                if isinstance(event, Frame) and event.opcode is Opcode.BINARY:
                    return bytes(event.data)
            if not await self._more():
                return None


Behaviour = Callable[[Peer], Awaitable[None]]


@contextlib.asynccontextmanager
async def tiny_server(
    behaviour: Behaviour, subprotocols: list[Subprotocol] | None = None
) -> AsyncIterator[tuple[str, list[asyncio.Task[None]]]]:
    """Serve `behaviour` on each connection; yields the ws:// URL and the connection tasks."""
    tasks: list[asyncio.Task[None]] = []

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        tasks.append(asyncio.current_task())  # type: ignore[arg-type]
        try:
            await behaviour(Peer(reader, writer, [Subprotocol("shoal.v1")] if subprotocols is None else subprotocols))
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        yield f"ws://127.0.0.1:{port}/v1/ws", tasks
    finally:
        server.close()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        await server.wait_closed()


async def never_replies(peer: Peer) -> None:
    """Accept, read requests and answer none; the sans-I/O layer still echoes a close."""
    await peer.accept()
    while await peer.next_message() is not None:
        pass


def transport_of(client: ShoalClient) -> WebSocketTransport:
    ws = client._ws
    assert isinstance(ws, WebSocketTransport)
    return ws


# --- keepalive ------------------------------------------------------------------------------------


async def test_keepalive_pings_are_answered_and_the_connection_stays_usable(server: ServerProcess) -> None:
    async with ShoalClient.connect(server.ws_url, ping_interval=0.05, ping_timeout=5.0) as c:
        transport = transport_of(c)
        async with asyncio.timeout(10):
            while transport.latency == 0.0:  # set when a pong answers our ping
                await c.ping()
                await asyncio.sleep(0.02)
        # Several more intervals, with requests in between: pings and replies share the socket.
        for _ in range(10):
            await c.ping()
            await asyncio.sleep(0.03)
        assert not c.closed and c.in_flight == 0
        assert 0.0 < transport.latency < 5.0


async def test_an_unanswered_keepalive_ping_closes_the_connection() -> None:
    async def deaf(peer: Peer) -> None:
        await peer.accept()
        while await peer.reader.read(65536):  # read, but never feed the protocol: no pongs
            pass

    async with tiny_server(deaf) as (url, _):
        c = await ShoalClient.open(url, ping_interval=0.1, ping_timeout=0.2)
        started = time.monotonic()
        with pytest.raises(ce.ConnectionClosed) as closed:
            await asyncio.wait_for(c.ping(), 10)
        assert closed.value.code == 1011 and "keepalive" in closed.value.reason
        assert time.monotonic() - started < 3
        assert c.closed
        await c.close()


# --- closing --------------------------------------------------------------------------------------


async def test_closing_with_requests_in_flight_fails_them() -> None:
    async with tiny_server(never_replies) as (url, _):
        c = await ShoalClient.open(url)
        calls = [asyncio.create_task(c.request("ping")) for _ in range(20)]
        async with asyncio.timeout(5):
            while c.in_flight < 20:
                await asyncio.sleep(0.01)
        started = time.monotonic()
        await c.close()
        assert time.monotonic() - started < 2  # the closing handshake, not the close timeout
        results = await asyncio.gather(*calls, return_exceptions=True)
        assert all(isinstance(r, ce.ConnectionClosed) for r in results), results
        assert all(r.code is None for r in results if isinstance(r, ce.ConnectionClosed))
        assert c.closed and c.in_flight == 0
        with pytest.raises(ce.ConnectionClosed):
            await c.ping()
        await c.close()  # idempotent


async def test_closing_against_the_real_server_ends_every_request(server: ServerProcess) -> None:
    """A request in flight when the client closes is answered or fails; none is left waiting."""
    c = await ShoalClient.open(server.ws_url)
    calls = [asyncio.create_task(c.ping()) for _ in range(50)]
    await asyncio.sleep(0)  # every call has written its frame
    assert c.in_flight == 50
    await asyncio.wait_for(c.close(), 5)
    results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 5)
    assert all(r is None or isinstance(r, ce.ConnectionClosed) for r in results), results
    assert c.closed and c.in_flight == 0
    with pytest.raises(ce.ConnectionClosed):
        await c.ping()


async def test_a_server_close_code_reaches_the_requests(server: ServerProcess) -> None:
    """A frame over the server's 16 MiB limit: the server closes with 1009, and that code is on
    the exception of the request, and of any request made on the connection afterwards."""
    async with ShoalClient.connect(server.ws_url, max_request_size=None) as c:
        with pytest.raises(ce.ConnectionClosed) as closed:
            await asyncio.wait_for(c.request("ping", pad=b"\0" * (16 * 1024 * 1024 + 10)), 30)
        assert closed.value.code == 1009
        assert c.closed
        with pytest.raises(ce.ConnectionClosed) as later:
            await c.ping()
        assert later.value.code == 1009 and later.value is not closed.value
    async with ShoalClient.connect(server.ws_url) as c:
        await c.ping()


async def test_a_reply_over_max_size_closes_with_1009(client: ShoalClient, server: ServerProcess) -> None:
    name = f"big_reply_{time.monotonic_ns()}"
    await client.create_collection(name, dim=512)
    await client.upsert(name, [{"id": "a", "vector": [1.0] * 512}])
    async with ShoalClient.connect(server.ws_url, max_size=1024) as small:
        with pytest.raises(ce.ConnectionClosed) as closed:
            await asyncio.wait_for(small.get(name, ["a"], include=["vector"]), 15)
        assert closed.value.code == 1009
    await client.drop_collection(name)


# --- backpressure ---------------------------------------------------------------------------------


def stalled_then(go: asyncio.Event, then: Behaviour) -> Behaviour:
    """Accept, read nothing until `go` is set (the client's writes back up), then `then`."""

    async def behaviour(peer: Peer) -> None:
        await peer.accept()
        await go.wait()
        await then(peer)

    return behaviour


async def replies(peer: Peer) -> None:
    while (message := await peer.next_message()) is not None:
        peer.ws.send_binary(msgpack.packb({"id": msgpack.unpackb(message, raw=False)["id"], "ok": True}))
        peer.flush()


async def drops(peer: Peer) -> None:
    assert peer.writer.transport is not None
    peer.writer.transport.abort()


async def _back_up(c: ShoalClient, n: int) -> list[asyncio.Task[dict[str, object]]]:
    """Start `n` requests of 1 MiB each against a server that reads nothing, until writing pauses."""
    calls = [asyncio.create_task(c.request("ping", pad=b"\0" * (1 << 20))) for _ in range(n)]
    async with asyncio.timeout(10):
        while not transport_of(c).writing_paused:
            await asyncio.sleep(0.01)
    await asyncio.sleep(0.1)
    assert not any(call.done() for call in calls)
    return calls


async def test_requests_wait_while_writing_is_paused_and_go_on_after() -> None:
    go = asyncio.Event()
    async with tiny_server(stalled_then(go, replies)) as (url, _), ShoalClient.connect(url) as c:
        calls = await _back_up(c, 32)
        go.set()
        assert await asyncio.wait_for(asyncio.gather(*calls), 30) == [{}] * 32
        assert not transport_of(c).writing_paused and c.in_flight == 0


async def test_a_lost_connection_wakes_requests_waiting_to_write() -> None:
    go = asyncio.Event()
    async with tiny_server(stalled_then(go, drops)) as (url, _):
        c = await ShoalClient.open(url)
        calls = await _back_up(c, 32)
        go.set()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 10)
        assert all(isinstance(r, ce.ConnectionClosed) for r in results), results
        assert c.closed and c.in_flight == 0
        await c.close()


# --- opening --------------------------------------------------------------------------------------


async def test_open_timeout_against_a_silent_listener() -> None:
    async def silent(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.read()  # accept, say nothing until the client goes away
        writer.close()

    server = await asyncio.start_server(silent, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        started = time.monotonic()
        with pytest.raises(ce.ConnectionClosed, match="cannot connect"):
            await ShoalClient.connect(f"ws://127.0.0.1:{port}/v1/ws", open_timeout=0.3)
        assert time.monotonic() - started < 2
    finally:
        server.close()
        await server.wait_closed()


async def test_unreachable_server_raises_connection_closed() -> None:
    server = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    server.close()
    await server.wait_closed()
    with pytest.raises(ce.ConnectionClosed, match="cannot connect"):
        await ShoalClient.connect(f"ws://127.0.0.1:{port}/v1/ws", open_timeout=5)


async def test_a_refused_handshake_raises_the_error_of_its_body() -> None:
    body = b'{"error": {"code": "forbidden", "message": "no entry"}}'

    async def refuse(peer: Peer) -> None:
        await peer.reader.readuntil(b"\r\n\r\n")
        peer.writer.write(
            b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
            + b"Content-Length: %d\r\nConnection: close\r\n\r\n" % len(body)
            + body
        )
        await peer.writer.drain()

    async with tiny_server(refuse) as (url, _):
        with pytest.raises(ce.Forbidden, match="no entry"):
            await ShoalClient.connect(url, key="k")


async def test_a_server_without_the_subprotocol_is_refused() -> None:
    async with tiny_server(never_replies, subprotocols=[]) as (url, _):
        with pytest.raises(ce.ClientError, match="subprotocol"):
            await ShoalClient.connect(url)


# --- messages -------------------------------------------------------------------------------------


async def test_a_fragmented_reply_is_assembled() -> None:
    pad = bytes(range(256)) * 40

    async def fragments(peer: Peer) -> None:
        await peer.accept()
        while (message := await peer.next_message()) is not None:
            request = msgpack.unpackb(message, raw=False)
            reply = msgpack.packb({"id": request["id"], "ok": True, "pad": pad, "op": request["op"]})
            if request["op"] == "two":
                peer.ws.send_binary(reply[:7], fin=False)
                peer.ws.send_continuation(reply[7:], fin=True)
            else:  # three frames, the middle one empty
                peer.ws.send_binary(reply[:100], fin=False)
                peer.ws.send_continuation(b"", fin=False)
                peer.ws.send_continuation(reply[100:], fin=True)
            peer.flush()

    async with tiny_server(fragments) as (url, _), ShoalClient.connect(url) as c:
        assert await c.request("two") == {"pad": pad, "op": "two"}
        assert await c.request("three") == {"pad": pad, "op": "three"}
        # Pipelined: the fragments of consecutive replies do not mix.
        results = await asyncio.gather(*(c.request("two" if i % 2 else "three") for i in range(20)))
        assert [r["op"] for r in results] == ["two" if i % 2 else "three" for i in range(20)]
        assert all(r["pad"] == pad for r in results)


async def test_a_text_frame_is_reported_and_the_connection_carries_on(caplog: pytest.LogCaptureFixture) -> None:
    async def chatty(peer: Peer) -> None:
        await peer.accept()
        while (message := await peer.next_message()) is not None:
            request = msgpack.unpackb(message, raw=False)
            peer.ws.send_text(b"\xff not utf-8, not binary")
            peer.ws.send_binary(msgpack.packb({"id": request["id"], "ok": True}))
            peer.flush()

    async with tiny_server(chatty) as (url, _), ShoalClient.connect(url) as c:
        with caplog.at_level("WARNING", logger="shoal.client"):
            assert await c.request("ping") == {}
        assert "text frame received" in caplog.text
        assert not c.closed


async def test_a_failing_message_handler_closes_the_connection(
    server: ServerProcess, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A bug while handling a received message must not leave requests waiting forever."""
    async with ShoalClient.connect(server.ws_url) as c:
        await c.ping()

        def broken(message: bytes | str) -> list[object]:
            raise RuntimeError("bug")

        monkeypatch.setattr(c._proto, "receive", broken)
        with caplog.at_level("ERROR", logger="shoal.client"), pytest.raises(ce.ConnectionClosed) as closed:
            await asyncio.wait_for(c.ping(), 10)
        assert closed.value.code == 1011
        assert "message handler failed" in caplog.text
