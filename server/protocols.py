"""The connection protocols uvicorn runs: its own, with the bounds it lacks.

`http_protocol(settings)` is uvicorn's httptools protocol plus
- a header timeout: from connect (or the start of the next request on a kept-alive connection)
  the request's headers must be complete within `header_timeout_s`; a connection that sent part
  of them is answered 408, one that sent nothing is closed;
- a body timeout: the whole body must arrive within `body_timeout_s` after the headers, else
  the request is answered 408 (when its response has not started) and the connection closed;
  the app then sees a disconnect;
- a connection cap: a request (or WebSocket handshake) on a connection past `max_connections`
  open ones is answered 503 `overloaded` and the connection closed.
Errors carry the JSON error body of the HTTP API; 408 uses the code `bad_request`.

`WebSocketProtocol` is uvicorn's websockets protocol, logging the end of each accepted
connection in the format of uvicorn's `[accepted]` line (the library's own address-less
"connection open"/"connection closed" lines are dropped by `server.logs`).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from uvicorn._types import ASGIReceiveCallable, ASGISendCallable, ASGISendEvent, Scope
from uvicorn.protocols.http.httptools_impl import STATUS_LINE, HttpToolsProtocol
from uvicorn.protocols.utils import get_client_addr, get_path_with_query_string
from uvicorn.protocols.websockets.websockets_sansio_impl import WebSocketsSansIOProtocol

from server.settings import Settings


def _error_body(code: str, message: str) -> bytes:
    return json.dumps({"error": {"code": code, "message": message}}, separators=(",", ":")).encode()


class TimedHttpProtocol(HttpToolsProtocol):
    """See the module docstring; `http_protocol` sets the three bounds."""

    header_timeout: float = 10.0
    body_timeout: float = 30.0
    max_connections: int = 10_000

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._header_timer: asyncio.TimerHandle | None = None
        self._body_timer: asyncio.TimerHandle | None = None
        self._in_headers = False  # bytes of a request's head have arrived, not all of it
        self._refused = False

    # -- timers --------------------------------------------------------------------------------

    def _arm_header_timer(self) -> None:
        if self._header_timer is None:
            self._header_timer = self.loop.call_later(self.header_timeout, self._header_timed_out)

    def _cancel_timers(self) -> None:
        for timer in (self._header_timer, self._body_timer):
            if timer is not None:
                timer.cancel()
        self._header_timer = self._body_timer = None

    def _header_timed_out(self) -> None:
        self._header_timer = None
        if self.transport.is_closing():
            return
        if self.cycle is not None and not self.cycle.response_complete:
            # The previous request of a pipelined connection is still being answered.
            self._arm_header_timer()
            return
        if self._in_headers:
            self._answer(408, "bad_request", f"request headers not received within {self.header_timeout:g} s")
        else:
            self.transport.close()

    def _body_timed_out(self) -> None:
        self._body_timer = None
        cycle = self.cycle
        if cycle is None or cycle.response_complete or self.transport.is_closing():
            return
        if not cycle.response_started:
            self._answer(408, "bad_request", f"request body not received within {self.body_timeout:g} s")
        else:
            self.transport.close()
        # The app, waiting for the rest of the body, is told the client is gone; what it sends
        # from now on is dropped.
        cycle.disconnected = True
        cycle.message_event.set()

    def _answer(self, status: int, code: str, message: str) -> None:
        """Write a complete error response straight to the socket, then close it."""
        body = _error_body(code, message)
        head = [STATUS_LINE[status]]
        for name, value in self.server_state.default_headers:
            head.extend([name, b": ", value, b"\r\n"])
        head.extend(
            [
                b"content-type: application/json\r\n",
                b"content-length: %d\r\n" % len(body),
                b"connection: close\r\n\r\n",
                body,
            ]
        )
        self.transport.write(b"".join(head))
        self.transport.close()

    # -- uvicorn's protocol hooks -------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        self._arm_header_timer()

    def connection_lost(self, exc: Exception | None) -> None:
        self._cancel_timers()
        super().connection_lost(exc)

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._in_headers = True
        self._arm_header_timer()

    def on_headers_complete(self) -> None:
        self._in_headers = False
        if self._header_timer is not None:
            self._header_timer.cancel()
            self._header_timer = None
        self._refused = len(self.connections) > self.max_connections
        upgrade = self.parser.should_upgrade() and self._should_upgrade()
        if self._refused and not upgrade:
            # uvicorn's own path runs the request, with this app in place of ours.
            app, self.app = self.app, _overloaded(self.max_connections)
            try:
                super().on_headers_complete()
            finally:
                self.app = app
            return
        super().on_headers_complete()
        if not upgrade:
            self._body_timer = self.loop.call_later(self.body_timeout, self._body_timed_out)

    def on_message_complete(self) -> None:
        if self._body_timer is not None:
            self._body_timer.cancel()
            self._body_timer = None
        super().on_message_complete()

    def handle_websocket_upgrade(self) -> None:
        if self._refused:
            self._answer(503, "overloaded", _too_many(self.max_connections))
            return
        self._cancel_timers()
        super().handle_websocket_upgrade()


def _too_many(limit: int) -> str:
    return f"too many open connections (limit {limit}, SHOAL_MAX_CONNECTIONS)"


def _overloaded(limit: int) -> Any:
    body = _error_body("overloaded", _too_many(limit))

    async def app(scope: Scope, receive: ASGIReceiveCallable, send: ASGISendCallable) -> None:
        await send(
            {
                "type": "http.response.start",
                "status": 503,
                "headers": [
                    (b"content-type", b"application/json"),
                    (b"content-length", str(len(body)).encode()),
                    (b"connection", b"close"),
                ],
            }
        )
        await send({"type": "http.response.body", "body": body, "more_body": False})

    return app


def http_protocol(settings: Settings) -> type[TimedHttpProtocol]:
    """The HTTP protocol class for uvicorn's `http=`, with the bounds of `settings`."""
    return type(
        "ShoalHttpProtocol",
        (TimedHttpProtocol,),
        {
            "header_timeout": settings.header_timeout_s,
            "body_timeout": settings.body_timeout_s,
            "max_connections": settings.max_connections,
        },
    )


class WebSocketProtocol(WebSocketsSansIOProtocol):
    """uvicorn's WebSocket protocol, logging `<client> - "WebSocket <path>" [closed <code>]` once
    per accepted connection, to match its `[accepted]` line."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._accepted = False

    async def send(self, message: ASGISendEvent) -> None:
        accepting = message["type"] == "websocket.accept" and not self.handshake_complete
        await super().send(message)
        if accepting and self.handshake_complete:
            self._accepted = True

    def connection_lost(self, exc: Exception | None) -> None:
        if self._accepted:
            self._accepted = False
            frame = self.conn.close_rcvd or self.conn.close_sent
            code = frame.code if frame is not None else 1006
            self.logger.info(
                '%s - "WebSocket %s" [closed %d]',
                get_client_addr(self.scope),
                get_path_with_query_string(self.scope),
                code,
            )
        super().connection_lost(exc)
