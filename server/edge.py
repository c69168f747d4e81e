"""The outermost ASGI app: the origin/host guard, then the WebSocket endpoint ahead of Starlette,
everything else behind it."""

from __future__ import annotations

from starlette.applications import Starlette
from starlette.types import ASGIApp, Receive, Scope, Send

from server.guard import Guard, GuardPolicy
from server.ws import serve_websocket

WS_PATH = "/v1/ws"
# Scope key holding the server's own `send` (see `Edge._route`).
RAW_SEND = "shoal.raw_send"


class Edge:
    """The outermost ASGI app. Every HTTP request and WebSocket handshake passes `Guard` first
    (with `policy`; None: no guard), then `/v1/ws` goes straight to `server.ws`, everything else
    (and the lifespan) to Starlette. The WebSocket endpoint is the hot path and needs none of
    Starlette's per-message wrappers; see `server.ws`."""

    def __init__(self, app: Starlette, policy: GuardPolicy | None = None) -> None:
        self.app = app
        self._entry: ASGIApp = self._route if policy is None else Guard(self._route, policy)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        await self._entry(scope, receive, send)

    async def _route(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket" and scope["path"] == WS_PATH:
            await serve_websocket(self.app.state.shoal, scope, receive, send)
        else:
            # The server's own send, for what streams after the response has started (SSE
            # events): Starlette's wrappers only track the start, and cost a few calls per event.
            scope[RAW_SEND] = send
            await self.app(scope, receive, send)
