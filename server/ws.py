"""The WebSocket endpoint `/v1/ws`: one connection, many requests in flight.

Per connection, one reader task owns the incoming frames and one writer task owns the outgoing
ones; each request is served by its own task in the connection's task group. Bounds: at most
`max_in_flight_per_connection` requests are served at once (the reader stops reading beyond
that, so a flooding client is slowed by TCP back-pressure), and the outgoing queue holds at most
`OUTGOING_FRAMES` frames. Frames larger than the frame limit are closed with 1009 by the server
before they reach us.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import anyio
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskGroup
from starlette.websockets import WebSocket, WebSocketDisconnect

from models.codec import Frame, FrameError, decode_frame, encode_error, encode_reply
from models.errors import BadFrame, ShoalError, Unauthorized, as_shoal_error
from models.requests import Auth, parse_request
from server.auth import ApiKey, bearer
from server.ops import execute
from server.state import AppState

SUBPROTOCOL = "shoal.v1"
OUTGOING_FRAMES = 1024

log = logging.getLogger("shoal.ws")


async def websocket_endpoint(websocket: WebSocket) -> None:
    state: AppState = websocket.app.state.shoal
    offered = websocket.scope.get("subprotocols") or []
    await websocket.accept(subprotocol=SUBPROTOCOL if SUBPROTOCOL in offered else None)
    state.metrics.ws_connections.inc()
    try:
        await Connection(websocket, state).serve()
    finally:
        state.metrics.ws_connections.dec()


class Connection:
    def __init__(self, websocket: WebSocket, state: AppState) -> None:
        self.websocket = websocket
        self.state = state
        self.in_flight = anyio.Semaphore(state.settings.limits.max_in_flight_per_connection)
        client = websocket.client
        self.caller = client.host if client else "-"
        self.grant: ApiKey | None = None
        self.authenticated = not state.auth.enabled
        key = bearer(websocket.headers.get("authorization"))
        if key is not None and state.auth.enabled:
            try:
                self.grant = state.auth.lookup(key)
                self.authenticated = True
            except Unauthorized:
                pass  # every op but `auth` answers unauthorized until a good key arrives

    async def serve(self) -> None:
        send, receive = anyio.create_memory_object_stream[bytes](OUTGOING_FRAMES)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._writer, receive)
            try:
                await self._reader(tg, send)
            finally:
                tg.cancel_scope.cancel()

    async def _writer(self, outgoing: ObjectReceiveStream[bytes]) -> None:
        async with outgoing:
            async for data in outgoing:
                try:
                    await self.websocket.send_bytes(data)
                except (WebSocketDisconnect, RuntimeError, OSError):
                    return

    async def _reader(self, tg: TaskGroup, out: ObjectSendStream[bytes]) -> None:
        while True:
            message = await self.websocket.receive()
            if message["type"] == "websocket.disconnect":
                return
            data = message.get("bytes")
            if data is None:
                self.state.metrics.requests.labels("ws", "-", "bad_frame").inc()
                await out.send(encode_error(None, BadFrame("send binary frames holding one msgpack map")))
                continue
            try:
                frame = decode_frame(data)
            except FrameError as exc:
                self.state.metrics.requests.labels("ws", "-", exc.error.code).inc()
                await out.send(encode_error(exc.request_id, exc.error))
                continue
            await self.in_flight.acquire()
            tg.start_soon(self._handle, frame, out)

    async def _handle(self, frame: Frame, out: ObjectSendStream[bytes]) -> None:
        op = frame.op if isinstance(frame.op, str) else "-"
        started = time.perf_counter()
        try:
            data, code = await self._serve(frame)
            await out.send(data)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError):
            return
        finally:
            self.in_flight.release()
        metrics = self.state.metrics
        label = op if op in self.state.known_ops else "-"
        metrics.requests.labels("ws", label, code).inc()
        metrics.latency.labels(label).observe(time.perf_counter() - started)

    async def _serve(self, frame: Frame) -> tuple[bytes, str]:
        try:
            if not self.authenticated and frame.op != "auth":
                raise Unauthorized("authenticate first: send {op: auth, key} or an Authorization header")
            request = parse_request(frame.op, frame.args, self.state.settings.limits)
            auth = self.state.auth
            if isinstance(request, Auth):
                self.grant = auth.lookup(request.key)
                self.authenticated = True
            auth.check(self.grant, self.caller, request)
            visible = None if self.grant is None else self.grant.collections
            result: dict[str, Any] = await execute(self.state.engine, request, compact=True, visible=visible)
            return encode_reply(frame.request_id, result), "ok"
        except Exception as exc:
            error = as_shoal_error(exc)
            if not isinstance(exc, ShoalError):
                log.exception("request %r failed", frame.op)
            return encode_error(frame.request_id, error), error.code
