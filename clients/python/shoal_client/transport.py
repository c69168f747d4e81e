"""Bytes on a socket <-> WebSocket messages: an `asyncio.Protocol` driving websockets' sans-I/O core.

websockets' own asyncio layer (`websockets.asyncio`) costs far more CPU per message than its
sans-I/O core: every send goes through a lock and an async context manager, every received frame
through an assembler and a reader task. A request/reply client needs none of that, so this module
integrates the sans-I/O `websockets.client.ClientProtocol` directly, as websockets documents it:
feed received bytes with `receive_data`, act on `events_received()`, write `data_to_send()` after
every call (an empty bytes there means half-close), and close the socket after a timeout when
`close_expected()` says the peer should close it.

What that buys: received messages are handed to the owner right in `data_received`, with no task
in between; `send` is a synchronous `transport.write`, and only a caller that finds writing
paused (the socket buffer is full) awaits `drain()`. Pings from the server are answered by the
sans-I/O layer; keepalive pings, fragment assembly and the closing handshake are done here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl as ssl_module
from collections.abc import Callable, Mapping, Sequence
from typing import cast

from websockets.client import ClientProtocol as WsClientProtocol
from websockets.exceptions import InvalidMessage
from websockets.frames import CloseCode, Frame, Opcode
from websockets.http11 import USER_AGENT
from websockets.protocol import Event, State
from websockets.typing import Subprotocol
from websockets.uri import parse_uri

from shoal_client.errors import ConnectionClosed

logger = logging.getLogger("shoal.client")

DEFAULT_PING_TIMEOUT = 20.0
DEFAULT_CLOSE_TIMEOUT = 10.0
# Close codes of a closing handshake that went as planned (websockets counts 1005 among them).
_CLEAN_CLOSE_CODES = frozenset({CloseCode.NORMAL_CLOSURE, CloseCode.GOING_AWAY, CloseCode.NO_STATUS_RCVD})

OnMessage = Callable[[bytes | str], None]
OnClosed = Callable[[ConnectionClosed], None]


async def open_websocket(
    url: str,
    *,
    subprotocols: Sequence[Subprotocol],
    headers: Mapping[str, str],
    max_size: int | None,
    open_timeout: float | None,
    ping_interval: float | None,
    ping_timeout: float | None = DEFAULT_PING_TIMEOUT,
    close_timeout: float | None = DEFAULT_CLOSE_TIMEOUT,
    ssl: ssl_module.SSLContext | None = None,
) -> WebSocketTransport:
    """Connect to a `ws://` or `wss://` URL and complete the opening handshake.

    `open_timeout` bounds the TCP (and TLS) connect and the handshake together. A `wss://` URL
    uses `ssl` (default: the system's trusted CAs, host name checked). Raises
    `websockets.InvalidURI`, `OSError`, `TimeoutError`, or `websockets.InvalidHandshake`
    (`InvalidStatus` carries the refusing response, body included).
    """
    uri = parse_uri(url)
    if ssl is not None and not uri.secure:
        raise ValueError(f"ssl given for a ws:// URL ({url}); use wss:// for TLS")
    tls: ssl_module.SSLContext | bool | None = (ssl or True) if uri.secure else None
    # No `extensions`: permessage-deflate is not offered. Vectors are float32 noise to deflate,
    # so compression would cost CPU on both ends for nearly nothing.
    ws = WsClientProtocol(uri, subprotocols=subprotocols, max_size=max_size)
    request = ws.connect()
    request.headers["User-Agent"] = USER_AGENT
    request.headers.update(headers)
    loop = asyncio.get_running_loop()
    transport: WebSocketTransport | None = None
    try:
        async with asyncio.timeout(open_timeout):
            _, transport = await loop.create_connection(
                lambda: WebSocketTransport(ws, ping_interval, ping_timeout, close_timeout),
                uri.host,
                uri.port,
                ssl=tls,
                server_hostname=uri.host if tls else None,
            )
            ws.send_request(request)
            transport._flush()
            await transport._handshake
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    return transport


class WebSocketTransport(asyncio.Protocol):
    """One open WebSocket connection: binary messages out with `send`, whole messages in through
    the `on_message` callback given to `attach`, and one `on_closed(ConnectionClosed)` call when
    the connection ends (for any reason: `close()`, the server, a lost socket, a protocol error,
    a keepalive ping left unanswered). Open it with `open_websocket`."""

    def __init__(
        self, ws: WsClientProtocol, ping_interval: float | None, ping_timeout: float | None, close_timeout: float | None
    ) -> None:
        self._ws = ws
        self._loop = asyncio.get_running_loop()
        self._transport: asyncio.Transport | None = None
        self._handshake: asyncio.Future[None] = self._loop.create_future()
        self._opening = True  # until the handshake is decided
        self._lost: asyncio.Future[None] = self._loop.create_future()
        # Until `attach`, messages wait here (the server may speak right after its 101 response).
        self._early: list[bytes | str] = []
        self._on_message: OnMessage = self._early.append
        self._on_closed: OnClosed | None = None
        self._fragments: list[bytes] = []
        self._fragments_text = False
        self.error: ConnectionClosed | None = None
        self._closed_by_client = False
        self._paused = False
        self._drain_waiters: list[asyncio.Future[None]] = []
        self._ping_interval = ping_interval
        self._ping_timeout = ping_timeout
        self._close_timeout = close_timeout
        self._ping_payload: bytes | None = None
        self._ping_sent_at = 0.0
        self.latency = 0.0
        """Round trip of the last keepalive ping, in seconds (0 until a pong came back)."""
        self._ping_timer: asyncio.TimerHandle | None = None
        self._pong_timer: asyncio.TimerHandle | None = None
        self._abort_timer: asyncio.TimerHandle | None = None

    # --- the owner's side ------------------------------------------------------------------

    @property
    def subprotocol(self) -> Subprotocol | None:
        return self._ws.subprotocol

    @property
    def writing_paused(self) -> bool:
        """The socket's write buffer is full: `await drain()` before sending more."""
        return self._paused

    def attach(self, on_message: OnMessage, on_closed: OnClosed) -> None:
        """Start delivering: messages received so far first, then each one as it arrives."""
        early, self._early = self._early, []
        self._on_message = on_message
        self._on_closed = on_closed
        for message in early:
            on_message(message)
        if self.error is not None:
            on_closed(self.error)

    def send(self, data: bytes) -> None:
        """Send one binary message now (it is queued in the transport if the socket is busy).
        Raises `ConnectionClosed` once the closing handshake has started or the connection is gone."""
        ws = self._ws
        if ws.state is not State.OPEN:
            # While closing, the close frames already say why; once closed, `error` does.
            raise self._closed_error(None) if self.error is None else self.error.again()
        ws.send_binary(data)
        self._flush()

    async def drain(self) -> None:
        """Wait until the socket accepts writes again. Raises `ConnectionClosed` if the connection
        ends first."""
        while self._paused and self.error is None:
            waiter = self._loop.create_future()
            self._drain_waiters.append(waiter)
            await waiter
        if self.error is not None:
            raise self.error.again()

    async def close(self) -> None:
        """Start the closing handshake (if nobody has) and wait for the connection to end; the
        socket is aborted if the server has not closed it within `close_timeout`."""
        if self._ws.state is State.OPEN:
            self._closed_by_client = True
            self._ws.send_close(CloseCode.NORMAL_CLOSURE)
            self._flush()
            self._expect_close()
        # Shielded: a caller cancelled while closing must not cancel the connection's own future.
        await asyncio.shield(self._lost)

    def abort(self) -> None:
        """Drop the socket at once, without a closing handshake."""
        if self._transport is not None:
            self._transport.abort()

    # --- asyncio.Protocol ------------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # A cast, not an isinstance check: uvloop's transports do not subclass asyncio.Transport.
        self._transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ws = self._ws
        ws.receive_data(data)
        events = ws.events_received()
        # Pongs to the server's pings, the echo of a close frame: whatever the protocol wants sent.
        self._flush()
        if ws.close_expected():
            self._expect_close()
        if self._opening:
            self._check_handshake()
        self._process(events)

    def eof_received(self) -> bool | None:
        ws = self._ws
        ws.receive_eof()
        # Only a handshake response without Content-Length can complete at EOF.
        events = ws.events_received()
        self._flush()
        if self._opening:
            self._check_handshake()
        self._process(events)
        return None  # the transport closes itself: nothing is ever written after the peer's EOF

    def connection_lost(self, exc: Exception | None) -> None:
        ws = self._ws
        ws.receive_eof()  # idempotent; the protocol state is now CLOSED
        ws.data_to_send()  # nothing can be written any more
        for timer in (self._ping_timer, self._pong_timer, self._abort_timer):
            if timer is not None:
                timer.cancel()
        self._transport = None
        error = self.error = self._closed_error(exc)
        if not self._handshake.done():
            reason = ws.handshake_exc or InvalidMessage("connection lost during the opening handshake")
            self._handshake.set_exception(reason)
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_exception(error.again())
        self._drain_waiters.clear()
        self._lost.set_result(None)
        if self._on_closed is not None:
            self._on_closed(error)

    def pause_writing(self) -> None:
        self._paused = True

    def resume_writing(self) -> None:
        self._paused = False
        for waiter in self._drain_waiters:
            if not waiter.done():
                waiter.set_result(None)
        self._drain_waiters.clear()

    # --- internals ---------------------------------------------------------------------------

    def _flush(self) -> None:
        transport = self._transport
        if transport is None:
            return
        for data in self._ws.data_to_send():
            if data:
                transport.write(data)
            elif transport.can_write_eof():  # the protocol's half-close
                # uvloop raises RuntimeError when the transport is already closing.
                with contextlib.suppress(OSError, RuntimeError):
                    transport.write_eof()
            else:  # TLS cannot half-close
                transport.close()

    def _process(self, events: list[Event]) -> None:
        try:
            for event in events:
                if not isinstance(event, Frame):
                    continue  # the handshake response, already settled by `_check_handshake`
                opcode = event.opcode
                if opcode is Opcode.BINARY or opcode is Opcode.TEXT:
                    if event.fin:
                        self._deliver(bytes(event.data), opcode is Opcode.TEXT)
                    else:
                        self._fragments = [bytes(event.data)]
                        self._fragments_text = opcode is Opcode.TEXT
                elif opcode is Opcode.CONT:
                    # The sans-I/O layer checks the frame sequence and counts the whole message
                    # against `max_size`; only the joining is left to do.
                    self._fragments.append(bytes(event.data))
                    if event.fin:
                        data, self._fragments = b"".join(self._fragments), []
                        self._deliver(data, self._fragments_text)
                elif opcode is Opcode.PONG:
                    self._pong(bytes(event.data))
                # PING is answered and CLOSE echoed by the sans-I/O layer itself.
        except Exception:
            # A bug in the owner must not leave its callers waiting on a connection that reads
            # nothing: fail the connection, so that they all learn it ended.
            logger.exception("shoal client: message handler failed; closing the connection")
            self._fail(CloseCode.INTERNAL_ERROR, "client message handler failed")

    def _deliver(self, data: bytes, text: bool) -> None:
        # A text message reaches the owner as str, for it to refuse. "replace": the sans-I/O layer
        # does not validate UTF-8, and bad bytes from the server must not crash the handler.
        self._on_message(data.decode("utf-8", "replace") if text else data)

    def _check_handshake(self) -> None:
        """Settle the opening handshake once the protocol has decided it."""
        ws = self._ws
        handshake = self._handshake
        if ws.handshake_exc is not None:
            self._opening = False
            if not handshake.done():  # done = cancelled by the open timeout
                handshake.set_exception(ws.handshake_exc)
        elif ws.state is State.OPEN:
            self._opening = False
            if not handshake.done():
                handshake.set_result(None)
            if self._ping_interval is not None:
                self._ping_timer = self._loop.call_later(self._ping_interval, self._keepalive)

    def _expect_close(self) -> None:
        """The server should now close the socket; abort it ourselves if it does not in time."""
        if self._abort_timer is None and self._close_timeout is not None:
            self._abort_timer = self._loop.call_later(self._close_timeout, self.abort)

    def _fail(self, code: int, reason: str) -> None:
        """Fail the connection (RFC 6455 7.1.7): send a close frame, stop reading, expect the close."""
        if self._ws.state is State.OPEN or self._ws.state is State.CLOSING:
            self._ws.fail(code, reason)
            self._flush()
            self._expect_close()
        else:
            self.abort()

    def _keepalive(self) -> None:
        interval = self._ping_interval
        assert interval is not None
        self._ping_timer = self._loop.call_later(interval, self._keepalive)
        # While a pong is awaited, no new ping: an unanswered one is the pong timer's business.
        if self._ws.state is not State.OPEN or (self._ping_payload is not None and self._ping_timeout is not None):
            return
        self._ping_payload = os.urandom(4)
        self._ping_sent_at = self._loop.time()
        self._ws.send_ping(self._ping_payload)
        self._flush()
        if self._ping_timeout is not None:
            self._pong_timer = self._loop.call_later(self._ping_timeout, self._pong_missing)

    def _pong(self, data: bytes) -> None:
        if data == self._ping_payload:
            self.latency = self._loop.time() - self._ping_sent_at
            self._ping_payload = None
            if self._pong_timer is not None:
                self._pong_timer.cancel()
                self._pong_timer = None

    def _pong_missing(self) -> None:
        self._pong_timer = None
        if self._ws.state is State.OPEN:
            self._fail(CloseCode.INTERNAL_ERROR, "keepalive ping timeout")
        # A peer that does not answer pings will not finish a closing handshake either.
        self.abort()

    def _closed_error(self, exc: BaseException | None) -> ConnectionClosed:
        """What the owner's callers see: who closed, and the close code and reason when known."""
        if self._closed_by_client:
            return ConnectionClosed("connection closed by the client")
        ws = self._ws
        rcvd, sent = ws.close_rcvd, ws.close_sent
        if rcvd is not None and sent is not None and {rcvd.code, sent.code} <= _CLEAN_CLOSE_CODES:
            return ConnectionClosed("connection closed by the server", rcvd.code, rcvd.reason)
        frame = rcvd or sent
        if frame is not None:
            return ConnectionClosed("connection closed", frame.code, frame.reason)
        return ConnectionClosed(f"connection lost: {exc}" if exc else "connection lost")
