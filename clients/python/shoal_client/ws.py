"""The asyncio WebSocket client of Shoal.

One connection (`client.transport`: bytes on the socket <-> WebSocket messages). Each received
message is handled as it arrives, in the transport's `data_received`, with no reader task: it goes
to the sans-I/O `ClientProtocol`, and the I/O code here acts on what comes back — a reply resolves
the future of its request id, a push lands in its subscription's bounded buffer and wakes that
consumer. Callers write their own frames (synchronously, awaiting only while the socket's write
buffer is full), so any number of requests can be in flight (pipelining) and replies may come back
in any order.

Receiving never waits for anybody: a subscription whose consumer is slow loses the newest matches
once its buffer (`queue_size` events, default 10,000) is full, and the consumer then receives a
`LaggedEvent` with the number lost, where the gap is. When the connection ends, every request in
flight raises `ConnectionClosed`, and every subscription raises it once its buffered events are read.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Generator, Iterable, Mapping
from ssl import SSLContext
from types import TracebackType
from typing import Any

import websockets
from websockets.typing import Subprotocol

from shoal_client.errors import ClientError, ConnectionClosed, NotFound, ProtocolError, TooLarge
from shoal_client.http import error_from_body
from shoal_client.ops import ShoalOps, auth_headers, search_args, ws_url
from shoal_client.protocol import (
    DEFAULT_QUEUE_SIZE,
    ClientProtocol,
    Failure,
    Happening,
    Reply,
    SubscriptionBuffer,
    Unrouted,
)
from shoal_client.transport import DEFAULT_CLOSE_TIMEOUT, DEFAULT_PING_TIMEOUT, WebSocketTransport, open_websocket
from shoal_client.types import SubscriptionEvent

logger = logging.getLogger("shoal.client")

SUBPROTOCOL = Subprotocol("shoal.v1")
# The server's default frame limit. Larger requests are refused here, because the server would
# answer one with close code 1009 and so fail every other request in flight on the connection.
DEFAULT_MAX_REQUEST_SIZE = 16 * 1024 * 1024
# Replies are not limited by the server's frame limit (a `get` of many vectors can exceed it).
DEFAULT_MAX_SIZE = 64 * 1024 * 1024


class Subscription:
    """A standing query: an async iterator of `MatchEvent` / `LeaveEvent` / `TopkEvent` /
    `LaggedEvent`, in seq order.

    `close()` (or leaving `async with`) unsubscribes and ends the iteration. If the connection is
    lost, iteration raises `ConnectionClosed` after the events already received; reconnect and
    subscribe again with `after_seq=<last seq seen>` to miss nothing. If the server ends the
    subscription (an `ended` push), iteration raises its error after the buffered events:
    `NotFound` when the collection was dropped, `Unavailable` when the server is stopping.
    """

    def __init__(self, client: ShoalClient, buffer: SubscriptionBuffer, collection: str) -> None:
        self.sub = buffer.sub
        self.collection = collection
        self._client = client
        self._buffer = buffer
        self._wakeup = asyncio.Event()
        buffer.waker = self._wakeup.set
        self._closed = False

    @property
    def dropped(self) -> int:
        """Matches this client dropped because the consumer fell `queue_size` events behind."""
        return self._buffer.dropped_total

    @property
    def pending(self) -> int:
        """Events received and not yet consumed."""
        return len(self._buffer)

    def __aiter__(self) -> Subscription:
        return self

    async def __anext__(self) -> SubscriptionEvent:
        while True:
            event = self._buffer.pop()
            if event is not None:
                return event
            if self._buffer.closed:
                error = self._buffer.error
                if error is not None:
                    raise error.again() if isinstance(error, ConnectionClosed) else error
                raise StopAsyncIteration
            self._wakeup.clear()
            await self._wakeup.wait()

    async def close(self) -> None:
        """Unsubscribe. Idempotent; never raises for a subscription the server already forgot or
        a connection already closed."""
        if self._closed:
            return
        self._closed = True
        await self._client._unsubscribe(self.sub)
        self._buffer.close()

    async def __aenter__(self) -> Subscription:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    def __repr__(self) -> str:
        return f"<Subscription {self.sub} on {self.collection!r}, {self.pending} pending>"


class ShoalClient(ShoalOps):
    """A WebSocket connection to a Shoal server. Open it with `async with ShoalClient.connect(url)`
    or `await ShoalClient.open(url)` (then `await client.close()`)."""

    def __init__(
        self,
        connection: WebSocketTransport,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_request_size: int | None = DEFAULT_MAX_REQUEST_SIZE,
    ) -> None:
        """Wrap an open connection; prefer `connect` / `open`."""
        self._ws = connection
        self._proto = ClientProtocol(queue_size)
        self._max_request_size = max_request_size
        self._futures: dict[int, asyncio.Future[Reply]] = {}
        self._background: set[asyncio.Task[None]] = set()
        connection.attach(self._received, self._connection_lost)

    @classmethod
    def connect(
        cls,
        url: str,
        key: str | None = None,
        *,
        queue_size: int = DEFAULT_QUEUE_SIZE,
        max_size: int | None = DEFAULT_MAX_SIZE,
        max_request_size: int | None = DEFAULT_MAX_REQUEST_SIZE,
        open_timeout: float | None = 10.0,
        ping_interval: float | None = 20.0,
        ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
        close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
        ssl: SSLContext | None = None,
    ) -> _Connect:
        """`async with ShoalClient.connect(url) as client:` (or `client = await ...connect(url)`).

        `url` is `ws://host:port/v1/ws`, or any `http(s)://` / `ws(s)://` base URL. `key` is sent
        as `Authorization: Bearer KEY`. `max_size` limits received messages (a larger one closes
        the connection with 1009); `open_timeout` bounds connecting plus the handshake. Every
        `ping_interval` seconds (None: never) a ping is sent, and the connection is closed, failing
        every request in flight, when its pong has not come back within `ping_timeout`.
        `close()` waits up to `close_timeout` for the server to end the connection. `ssl` is the
        TLS context of a `wss://` URL (default: the system's trusted CAs).
        Raises `Unauthorized` / `Forbidden` (or another `ShoalError`) if the server refuses the
        handshake, `ConnectionClosed` if it cannot be reached.
        """
        options: dict[str, Any] = {
            "subprotocols": [SUBPROTOCOL],
            "headers": auth_headers(key),
            "max_size": max_size,
            "open_timeout": open_timeout,
            "ping_interval": ping_interval,
            "ping_timeout": ping_timeout,
            "close_timeout": close_timeout,
            "ssl": ssl,
        }
        return _Connect(cls, ws_url(url), options, queue_size, max_request_size)

    @classmethod
    async def open(cls, url: str, key: str | None = None, **options: Any) -> ShoalClient:
        """Connect and return the client; the caller must `await client.close()`. Same options
        and errors as `connect`."""
        return await cls.connect(url, key, **options)

    @property
    def closed(self) -> bool:
        return self._proto.closed is not None

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return self._proto.in_flight

    async def close(self) -> None:
        """Close the connection (idempotent). Requests in flight raise `ConnectionClosed`."""
        await self._ws.close()
        for task in list(self._background):
            task.cancel()

    async def __aenter__(self) -> ShoalClient:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    # --- requests --------------------------------------------------------------------------

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send `{"op": op, **args}` and return the reply map (without `id`/`ok`).

        Vectors (numpy arrays, lists) are sent as float32 `bin`. Raises the `ShoalError` subclass
        for the reply's error code, `ConnectionClosed` if the connection ends first, `TooLarge` if
        the frame exceeds `max_request_size` (checked here, nothing is sent), and `ClientError`
        for args that cannot be encoded.
        """
        return (await self._call(op, args)).result

    async def _call(self, op: str, args: Mapping[str, Any]) -> Reply:
        request_id, data = self._proto.request(op, args)
        if self._max_request_size is not None and len(data) > self._max_request_size:
            self._proto.forget(request_id)
            raise TooLarge(
                "too_large",
                f"request frame of {len(data)} bytes exceeds max_request_size={self._max_request_size}"
                " (checked by the client; split the batch)",
                {"size": len(data)},
            )
        ws = self._ws
        try:
            if ws.writing_paused:  # the socket's buffer is full: wait, rather than grow it
                await ws.drain()
            ws.send(data)
        except BaseException:  # closed, or the caller gave up while waiting: nothing was sent
            self._proto.forget(request_id)
            raise
        # Registered only once sent: no reply can be read before this task yields, and a request
        # that was never sent then leaves no future behind for `_connection_lost` to fail.
        future: asyncio.Future[Reply] = asyncio.get_running_loop().create_future()
        self._futures[request_id] = future
        try:
            return await future
        finally:
            self._futures.pop(request_id, None)

    async def subscribe(
        self,
        collection: str,
        vector: Any = None,
        text: str | None = None,
        *,
        threshold: float | None = None,
        k: int | None = None,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        include: Iterable[str] | str | None = None,
        after_seq: int | None = None,
        like: str | None = None,
    ) -> Subscription:
        """Start a standing query: every document upserted from now on (after `after_seq` first,
        replayed from the durable log, when given) whose score is >= `threshold` and that passes
        the filters (`MatchEvent`), and every one that stops matching (`LeaveEvent`). `like` (a
        stored document's id) takes that document's vector now as the query; it never matches
        itself.

        With `k` (1..100) it is a live top-k list instead: `TopkEvent`s, the first being the
        current list, then the whole new list after every change that alters it (`threshold`,
        optional, is then a minimum score). Pushes that arrive before this returns are kept."""
        if threshold is None and k is None:
            raise ValueError("subscribe needs a threshold, or k for a top-k list")
        args = search_args(
            vector=vector, text=text, where=where, where_text=where_text, include=include, like=like
        )
        args["collection"] = collection
        if threshold is not None:
            args["threshold"] = threshold
        if k is not None:
            args["k"] = k
        if after_seq is not None:
            args["after_seq"] = after_seq
        reply = await self._call("subscribe", args)
        if reply.buffer is None:
            raise ProtocolError(f"subscribe reply without a sub id: {reply.result!r}")
        return Subscription(self, reply.buffer, collection)

    async def _unsubscribe(self, sub: str) -> None:
        if self.closed:
            self._proto.release(sub)
            return
        # request("unsubscribe") releases the sub locally before anything is sent.
        with contextlib.suppress(NotFound, ConnectionClosed):
            await self.request("unsubscribe", sub=sub)

    # --- what the connection delivers ------------------------------------------------------

    def _received(self, message: bytes | str) -> None:
        for happening in self._proto.receive(message):
            self._dispatch(happening)

    def _connection_lost(self, error: ConnectionClosed) -> None:
        self._proto.connection_lost(error)
        # Every request still waiting gets its own copy.
        for future in self._futures.values():
            if not future.done():
                future.set_exception(error.again())

    def _dispatch(self, happening: Happening) -> None:
        if isinstance(happening, Reply):
            future = self._futures.get(happening.id)
            if future is not None and not future.done():
                future.set_result(happening)
            elif happening.buffer is not None:
                # The caller of subscribe() gave up before the reply: nobody will read it.
                self._spawn(self._unsubscribe(happening.buffer.sub))
        elif isinstance(happening, Failure):
            future = self._futures.get(happening.id)
            if future is not None and not future.done():
                future.set_exception(happening.error)
        elif isinstance(happening, Unrouted):
            logger.warning("shoal client: unrouted frame: %s", happening.error)
        # Pushed: the buffer already woke its consumer.

    def _spawn(self, coro: Any) -> None:
        task: asyncio.Task[None] = asyncio.get_running_loop().create_task(coro)
        self._background.add(task)
        task.add_done_callback(self._background.discard)


class _Connect:
    """What `ShoalClient.connect` returns: an async context manager, and awaitable."""

    def __init__(
        self,
        cls: type[ShoalClient],
        url: str,
        options: dict[str, Any],
        queue_size: int,
        max_request_size: int | None,
    ) -> None:
        self._cls = cls
        self._url = url
        self._options = options
        self._queue_size = queue_size
        self._max_request_size = max_request_size
        self._client: ShoalClient | None = None

    async def _open(self) -> ShoalClient:
        try:
            connection = await open_websocket(self._url, **self._options)
        except websockets.InvalidStatus as exc:
            raise _handshake_error(exc) from None
        except TimeoutError as exc:
            raise ConnectionClosed(f"cannot connect to {self._url}: timed out") from exc
        except (OSError, websockets.InvalidHandshake, websockets.InvalidURI) as exc:
            raise ConnectionClosed(f"cannot connect to {self._url}: {exc}") from exc
        if connection.subprotocol != SUBPROTOCOL:
            await connection.close()
            raise ClientError(f"server did not accept subprotocol {SUBPROTOCOL!r}")
        return self._cls(connection, queue_size=self._queue_size, max_request_size=self._max_request_size)

    def __await__(self) -> Generator[Any, None, ShoalClient]:
        return self._open().__await__()

    async def __aenter__(self) -> ShoalClient:
        self._client = await self._open()
        return self._client

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._client is not None:
            await self._client.close()


def _handshake_error(exc: websockets.InvalidStatus) -> Exception:
    """A refused handshake as the `ShoalError` of its JSON error body, or of its status."""
    response = exc.response
    return error_from_body(response.status_code, bytes(response.body or b""), response.headers.get("Content-Type", ""))
