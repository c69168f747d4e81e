"""`GET /openapi.json` (built from the request specs, `models.op_schema`, under the server's own
limits) and `GET /docs`, a page that lists its operations with no script from elsewhere."""

from __future__ import annotations

import json
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

from starlette.requests import Request
from starlette.responses import FileResponse, Response

from models.op_schema import openapi
from server import sources
from server.state import AppState

PAGE = Path(__file__).resolve().parent / "docs.html"


def _version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:
        return "unknown"


async def openapi_json(request: Request) -> Response:
    """The OpenAPI 3.1 document; its bounds are this server's configured limits."""
    state: AppState = request.app.state.shoal
    document = openapi(state.settings.limits, _version())
    document["paths"]["/v1/sources"] = sources.OPENAPI_PATH
    body = json.dumps(document, separators=(",", ":"))
    return Response(body, media_type="application/json", headers={"cache-control": "no-cache"})


async def docs(request: Request) -> Response:
    return FileResponse(PAGE, headers={"cache-control": "no-cache"})
