"""The outermost ASGI app: the WebSocket endpoint ahead of Starlette, everything else behind it."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.types import Receive, Scope, Send

from server.ws import serve_websocket

WS_PATH = "/v1/ws"
# Scope key holding the server's own `send` (see `Edge.__call__`).
RAW_SEND = "shoal.raw_send"


class Edge:
    """The outermost ASGI app: `/v1/ws` goes straight to `server.ws`, everything else (and the
    lifespan) to Starlette. The WebSocket endpoint is the hot path and needs none of Starlette's
    per-message wrappers; see `server.ws`."""

    def __init__(self, app: Starlette) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            await serve_websocket(self.app.state.shoal, scope, receive, send)
        else:
            # The server's own send, for what streams after the response has started (SSE
            # events): Starlette's wrappers only track the start, and cost a few calls per event.
            scope[RAW_SEND] = send
            await self.app(scope, receive, send)
