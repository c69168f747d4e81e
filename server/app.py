"""The ASGI application: routes, and a lifespan that owns the database and the engine.

lifespan: open database (embedded PostgreSQL or URL) -> Engine.running -> serve -> reverse
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.routing import Route, WebSocketRoute

from actors.pg_server import open_database
from actors.supervisor import Engine
from server import http_api
from server.auth import Authenticator, parse_api_keys
from server.metrics import Metrics
from server.settings import Settings
from server.state import AppState
from server.ws import websocket_endpoint

log = logging.getLogger("shoal.app")


def create_app(settings: Settings) -> Starlette:
    authenticator = Authenticator(parse_api_keys(settings.api_keys), settings.rate_limit, settings.rate_burst)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        async with (
            open_database(settings.data_dir, settings.database_url) as dsn,
            Engine.running(dsn, settings.engine, settings.limits) as engine,
        ):
            app.state.shoal = AppState(settings, Metrics(), engine, authenticator)
            yield
        log.info("engine stopped")

    routes = [
        WebSocketRoute("/v1/ws", websocket_endpoint),
        Route("/v1/collections", http_api.collections, methods=["GET", "POST"]),
        Route("/v1/collections/{name}", http_api.collection, methods=["DELETE"]),
        Route("/v1/collections/{name}/{op}", http_api.collection_op, methods=["GET", "POST"]),
        Route("/healthz", http_api.healthz),
        Route("/readyz", http_api.readyz),
        Route("/metrics", http_api.metrics),
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
    return Starlette(routes=routes, middleware=middleware, lifespan=lifespan)
