"""The HTTP API: the WebSocket ops as JSON (or msgpack) requests, plus health and metrics.

Body format follows `Content-Type` (`application/msgpack`, anything else is read as JSON); the
reply is msgpack when the request was msgpack or `Accept` asks for it. Errors are
`{"error": {"code", "message"}}` with the HTTP status of their code.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

import anyio
import msgpack
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.types import Receive, Scope, Send

from models.codec import MIN_FRAME_ITEMS, frame_items, unpack_bounded
from models.config import Limits
from models.errors import BadRequest, MethodNotAllowed, ShoalError, TooLarge, UnknownOp, as_shoal_error
from models.reply_size import reply_too_large
from server.auth import bearer
from server.deadlines import RequestDeadline
from server.ops import execute, parse
from server.state import AppState

MSGPACK = "application/msgpack"
COLLECTION_OPS = frozenset({"upsert", "delete", "get", "query", "query_batch", "count"})

log = logging.getLogger("shoal.http")


def wants_msgpack(request: Request) -> bool:
    """True when the reply should be msgpack (the request was msgpack, or `Accept` asks)."""
    content_type = request.headers.get("content-type", "")
    return content_type.startswith(MSGPACK) or MSGPACK in request.headers.get("accept", "")


def error_reply(error: ShoalError, msgpack_reply: bool) -> Response:
    """`{"error": {"code", "message"}}` with the HTTP status of the error's code."""
    return _respond({"error": error.to_wire()}, error.http_status, msgpack_reply)


def _respond(body: dict[str, Any], status: int, msgpack_reply: bool) -> Response:
    if msgpack_reply:
        return Response(msgpack.packb(body, use_bin_type=True), status_code=status, media_type=MSGPACK)
    return Response(
        json.dumps(body, separators=(",", ":"), allow_nan=False),
        status_code=status,
        media_type="application/json",
    )


def _decode_body(raw: bytes, as_msgpack: bool, max_items: int = MIN_FRAME_ITEMS) -> dict[str, Any]:
    """The body as a map. Raises BadRequest: any decoding failure (bad syntax, nesting deep
    enough to exhaust the recursion limit, an integer of more digits than Python converts);
    TooLarge: a msgpack array or map of more than `max_items` items (as for WebSocket frames)."""
    try:
        body = unpack_bounded(raw, max_items) if as_msgpack else json.loads(raw)
    except TooLarge:
        raise
    except Exception as exc:
        raise BadRequest("request body is not valid JSON or msgpack") from exc
    if not isinstance(body, dict):
        raise BadRequest("request body must be a JSON object / msgpack map")
    return body


async def _read_body(request: Request, limits: Limits) -> tuple[dict[str, Any], int]:
    """The body as a map and its size in bytes; a big one is decoded in a worker thread."""
    limit = limits.max_frame_bytes
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in request.stream():
            size += len(chunk)
            if size > limit:
                raise TooLarge(f"request body is larger than {limit} bytes")
            chunks.append(chunk)
    except ClientDisconnect:  # the client left, or its body stalled (SHOAL_BODY_TIMEOUT_S)
        raise BadRequest("the request body did not arrive") from None
    raw = b"".join(chunks)
    if not raw.strip():
        return {}, 0
    as_msgpack = request.headers.get("content-type", "").startswith(MSGPACK)
    if len(raw) < limits.parse_in_thread_bytes:
        return _decode_body(raw, as_msgpack, frame_items(limits)), len(raw)
    return await anyio.to_thread.run_sync(_decode_body, raw, as_msgpack, frame_items(limits)), len(raw)


async def _serve(request: Request, op: str, path_args: dict[str, Any]) -> Response:
    state: AppState = request.app.state.shoal
    msgpack_reply = wants_msgpack(request)
    started = time.perf_counter()
    try:
        caller = request.client.host if request.client else "-"
        grant = state.auth.lookup(bearer(request.headers.get("authorization")), caller)
        args, size = (
            await _read_body(request, state.settings.limits) if request.method not in ("GET", "HEAD") else ({}, 0)
        )
        for key, value in path_args.items():
            if key in args and args[key] != value:
                raise BadRequest(f"'{key}' in the body differs from the path")
            args[key] = value
        parsed = await parse(op, args, state.settings.limits, size)
        state.auth.check(grant, caller, parsed)
        visible = None if grant is None else grant.collections
        with RequestDeadline(state, op, parsed):
            result = await execute(state.engine, parsed, compact=msgpack_reply, visible=visible)
        response, code = _respond(result, 200, msgpack_reply), "ok"
        if len(response.body) > state.settings.limits.max_frame_bytes:  # the same bound as a frame
            raise reply_too_large(len(response.body), state.settings.limits.max_frame_bytes)
    except Exception as exc:
        error = as_shoal_error(exc)
        if not isinstance(exc, ShoalError):
            log.exception("HTTP %s failed", op)
        response, code = _respond({"error": error.to_wire()}, error.http_status, msgpack_reply), error.code
    state.metrics.served("http", op, code, time.perf_counter() - started)
    return response


async def list_collections(request: Request) -> Response:
    return await _serve(request, "list_collections", {})


async def create_collection(request: Request) -> Response:
    return await _serve(request, "create_collection", {})


async def drop_collection(request: Request) -> Response:
    return await _serve(request, "drop_collection", {"name": request.path_params["name"]})


class WrongMethod:
    """The ASGI app behind a route's own methods (a Route of an ASGI app takes every method):
    405 `method_not_allowed` with `Allow: allow`, so that a HEAD, GET or any other method never
    reaches a write."""

    def __init__(self, allow: str) -> None:
        self.allow = allow

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        request = Request(scope, receive)
        error = MethodNotAllowed(f"{request.method[:16]} is not allowed here; use {self.allow}")
        response = error_reply(error, wants_msgpack(request))
        response.headers["allow"] = self.allow
        await response(scope, receive, send)


async def collection_op(request: Request) -> Response:
    op = request.path_params["op"]
    if op not in COLLECTION_OPS:
        error = UnknownOp(f"no such op: {op[:64]!r}")
        return _respond({"error": error.to_wire()}, error.http_status, wants_msgpack(request))
    return await _serve(request, op, {"collection": request.path_params["name"]})


async def healthz(request: Request) -> Response:
    return JSONResponse({"status": "ok"})


async def readyz(request: Request) -> Response:
    """200 once the engine is up and the database answers; 503 otherwise. Never waits on the
    database: it reads the health state the background probe and the pool keep current."""
    state: AppState | None = getattr(request.app.state, "shoal", None)
    if state is None or not state.engine.ready:
        return JSONResponse({"status": "starting"}, status_code=503)
    health = state.engine.database_health
    if not health.up:
        return JSONResponse({"status": "database unavailable", "database": health.to_wire()}, status_code=503)
    return JSONResponse({"status": "ready"})


async def metrics(request: Request) -> Response:
    """Prometheus text. It names every collection, so with auth on it needs a key that may read
    it (admin, or `"metrics": true`): 401 without a valid key, 403 with another."""
    state: AppState = request.app.state.shoal
    if state.auth.enabled:
        try:
            caller = request.client.host if request.client else "-"
            state.auth.check_metrics(state.auth.lookup(bearer(request.headers.get("authorization")), caller))
        except ShoalError as exc:
            return _respond({"error": exc.to_wire()}, exc.http_status, False)
    return PlainTextResponse(state.metrics.render(), media_type="text/plain; version=0.0.4")
