"""The ASGI application: routes, and a lifespan that owns the database and the engine.

lifespan: open database (embedded PostgreSQL or URL) -> Engine.running -> serve -> reverse

`/` is the browser page (server/static: search over the WebSocket with msgpack, live matches
over SSE); its files, and the vendored msgpack library, are served from `/static`.

Every HTTP error has the JSON error body `{"error": {"code", "message"}}`: an unknown path is
`not_found` (404), a method the path does not answer `method_not_allowed` (405, with `Allow`),
and anything unexpected `internal` (500, no details: they go to the log).
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import anyio
from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles

from actors.pg_server import open_database
from actors.supervisor import Engine
from models.errors import (
    INTERNAL_MESSAGE,
    BadRequest,
    Forbidden,
    Internal,
    MethodNotAllowed,
    NotFound,
    RateLimited,
    ShoalError,
    TooLarge,
    Unauthorized,
    Unavailable,
)
from server import apidocs, http_api, sources, sse, ws
from server.auth import Authenticator, AuthFailures, parse_api_keys
from server.edge import Edge
from server.guard import guard_policy
from server.metrics import Metrics
from server.settings import Settings
from server.state import AppState

log = logging.getLogger("shoal.app")

STATIC_DIR = Path(__file__).resolve().parent / "static"


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})


# The error an HTTP-level status stands for (the router, static files, the request parser).
_STATUS_ERRORS: dict[int, type[ShoalError]] = {
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    413: TooLarge,
    429: RateLimited,
    503: Unavailable,
}


def error_response(request: Request, error: ShoalError, headers: dict[str, str] | None = None) -> Response:
    """The error body in the format the request asked for (JSON unless msgpack), with the HTTP
    status of the error's code."""
    response = http_api.error_reply(error, http_api.wants_msgpack(request))
    if headers:
        response.headers.update(headers)
    return response


async def http_error(request: Request, exc: Exception) -> Response:
    """A Starlette HTTPException (no route, wrong method, ...) as the JSON error of its status:
    404 `not_found`, 405 `method_not_allowed` keeping the `Allow` header; other 4xx answer
    `bad_request` (400), other 5xx `internal`."""
    assert isinstance(exc, HTTPException)
    status = exc.status_code
    error_class = _STATUS_ERRORS.get(status) or (BadRequest if status < 500 else Internal)
    if error_class is NotFound:
        message = f"no such path: {request.url.path[:200]}"
    elif error_class is MethodNotAllowed:
        message = f"{request.method[:16]} is not allowed on {request.url.path[:200]}"
    elif error_class is Internal:
        message = INTERNAL_MESSAGE
    else:
        message = str(exc.detail)[:200]
    headers = {k: v for k, v in (exc.headers or {}).items() if k.lower() == "allow"}
    return error_response(request, error_class(message), headers)


async def unexpected_error(request: Request, exc: Exception) -> Response:
    """Anything a route did not handle: 500 `internal`, no details. Starlette re-raises the
    exception after this response, so the server logs it with its traceback."""
    return error_response(request, Internal(INTERNAL_MESSAGE))


EXCEPTION_HANDLERS: dict[Any, Callable[[Request, Exception], Awaitable[Response]]] = {
    HTTPException: http_error,
    Exception: unexpected_error,
}


def snapshot_dir(settings: Settings) -> Path | None:
    """Where snapshots live (`<data-dir>/snapshots`, also with a database URL), None if off."""
    return settings.data_dir / "snapshots" if settings.engine.snapshots else None


def create_app(settings: Settings) -> Edge:
    failures = AuthFailures(
        settings.auth_failures_per_minute, settings.auth_failure_burst, settings.auth_failure_addresses
    )
    authenticator = Authenticator(
        parse_api_keys(settings.api_keys),
        settings.rate_limit,
        settings.rate_burst,
        failures,
        settings.ws_auth_failures_close,
    )

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_database(
                settings.data_dir, settings.database_url, check_interval=settings.engine.db_restart_check_s
            ) as dsn,
            Engine.running(
                dsn,
                settings.engine,
                settings.limits,
                settings.subscriptions,
                snapshot_dir(settings),
                settings.data_dir / "vectors",  # quantised collections' mapped vectors
                sources=settings.sources,
            ) as engine,
            anyio.create_task_group() as tasks,
        ):
            metrics = Metrics()
            metrics.watch(engine, ws.connection_caps(settings.limits))
            metrics.registry.register(sse.SubscriptionCollector(engine, app.state.sse))
            metrics.registry.register(sources.SourcesCollector(engine))
            app.state.shoal = AppState(settings, metrics, engine, authenticator)
            tasks.start_soon(app.state.sse.heartbeats)
            yield
            tasks.cancel_scope.cancel()
        log.info("engine stopped")

    # HEAD is answered where GET is (Starlette adds it) and nowhere else: a write route takes its
    # one method, and any other method gets a JSON 405 from the catch-all after it.
    routes = [
        Route("/v1/collections", http_api.list_collections, methods=["GET"]),
        Route("/v1/collections", http_api.create_collection, methods=["POST"]),
        Route("/v1/collections", http_api.WrongMethod("GET, HEAD, POST")),
        Route("/v1/collections/{name}", http_api.drop_collection, methods=["DELETE"]),
        Route("/v1/collections/{name}", http_api.WrongMethod("DELETE")),
        Route("/v1/collections/{name}/subscribe", sse.subscribe, methods=["GET"]),
        Route("/v1/collections/{name}/changes", sse.changes, methods=["GET"]),
        Route("/v1/collections/{name}/{op}", http_api.collection_op, methods=["POST"]),
        Route("/v1/collections/{name}/{op}", http_api.WrongMethod("POST")),
        Route("/v1/sources", sources.list_sources, methods=["GET"]),
        Route("/v1/sources", http_api.WrongMethod("GET, HEAD")),
        Route("/healthz", http_api.healthz, methods=["GET"]),
        Route("/readyz", http_api.readyz, methods=["GET"]),
        Route("/metrics", http_api.metrics, methods=["GET"]),
        Route("/openapi.json", apidocs.openapi_json, methods=["GET"]),
        Route("/docs", apidocs.docs, methods=["GET"]),
        Route("/", index, methods=["GET"]),
        Mount("/static", StaticFiles(directory=STATIC_DIR), name="static"),
    ]
    middleware = []
    if settings.cors_origins:
        middleware.append(
            Middleware(
                CORSMiddleware,
                allow_origins=list(settings.cors_origins),
                allow_methods=["GET", "POST", "DELETE"],
                allow_headers=["*"],
                expose_headers=["*"],
            )
        )
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan, exception_handlers=EXCEPTION_HANDLERS)
    app.state.sse = sse.SSEState(settings.heartbeat_s)
    return Edge(app, guard_policy(settings))
