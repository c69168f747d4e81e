"""The ASGI application: routes, and a lifespan that owns the database and the engine.

lifespan: open database (embedded PostgreSQL or URL) -> Engine.running -> serve -> reverse

`/` is the browser page (server/static: search over the WebSocket with msgpack, live matches
over SSE); its files, and the vendored msgpack library, are served from `/static`.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import FileResponse, Response
from starlette.routing import Mount, Route
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp

from actors.pg_server import open_database
from actors.supervisor import Engine
from server import http_api, sse
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


def create_app(settings: Settings) -> ASGIApp:
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
    subscriptions = sse.subscription_config()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_database(settings.data_dir, settings.database_url) as dsn,
            Engine.running(dsn, settings.engine, settings.limits, subscriptions) as engine,
            anyio.create_task_group() as tasks,
        ):
            metrics = Metrics()
            metrics.registry.register(sse.SubscriptionCollector(engine, app.state.sse))
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
        Route("/v1/collections", http_api.MethodNotAllowed("GET, HEAD, POST")),
        Route("/v1/collections/{name}", http_api.drop_collection, methods=["DELETE"]),
        Route("/v1/collections/{name}", http_api.MethodNotAllowed("DELETE")),
        Route("/v1/collections/{name}/subscribe", sse.subscribe, methods=["GET"]),
        Route("/v1/collections/{name}/changes", sse.changes, methods=["GET"]),
        Route("/v1/collections/{name}/{op}", http_api.collection_op, methods=["POST"]),
        Route("/v1/collections/{name}/{op}", http_api.MethodNotAllowed("POST")),
        Route("/healthz", http_api.healthz, methods=["GET"]),
        Route("/readyz", http_api.readyz, methods=["GET"]),
        Route("/metrics", http_api.metrics, methods=["GET"]),
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
    app = Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
    app.state.sse = sse.SSEState(settings.heartbeat_s)
    return Edge(app, guard_policy(settings))
