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
from server.auth import Authenticator, parse_api_keys
from server.edge import Edge
from server.metrics import Metrics
from server.settings import Settings
from server.state import AppState

log = logging.getLogger("shoal.app")

STATIC_DIR = Path(__file__).resolve().parent / "static"


async def index(request: Request) -> Response:
    return FileResponse(STATIC_DIR / "index.html", headers={"cache-control": "no-cache"})


def create_app(settings: Settings) -> ASGIApp:
    authenticator = Authenticator(parse_api_keys(settings.api_keys), settings.rate_limit, settings.rate_burst)
    subscriptions = sse.subscription_config()

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_database(
                settings.data_dir, settings.database_url, check_interval=settings.engine.db_restart_check_s
            ) as dsn,
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

    routes = [
        Route("/v1/collections", http_api.collections, methods=["GET", "POST"]),
        Route("/v1/collections/{name}", http_api.collection, methods=["DELETE"]),
        Route("/v1/collections/{name}/subscribe", sse.subscribe, methods=["GET"]),
        Route("/v1/collections/{name}/changes", sse.changes, methods=["GET"]),
        Route("/v1/collections/{name}/{op}", http_api.collection_op, methods=["GET", "POST"]),
        Route("/healthz", http_api.healthz),
        Route("/readyz", http_api.readyz),
        Route("/metrics", http_api.metrics),
        Route("/", index),
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
    return Edge(app)
