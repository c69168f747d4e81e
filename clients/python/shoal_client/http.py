"""`ShoalHTTP`: the same typed operations as `ShoalClient`, over the HTTP JSON API (httpx).

Each op maps to one route of PROTOCOL.md; JSON bodies carry vectors as arrays of numbers (or,
with `use_msgpack=True`, msgpack bodies carry them as float32 `bin`). Error bodies
`{"error": {"code", "message"}}` raise the same exception classes as the WebSocket client.
"""

from __future__ import annotations

import json
from typing import Any
from urllib.parse import quote

import httpx

from shoal_client.codec import decode_frame, encode_frame, json_args, pack_args
from shoal_client.errors import (
    ClientError,
    ConnectionClosed,
    ProtocolError,
    ShoalError,
    error_from_status,
    error_from_wire,
)
from shoal_client.ops import ShoalOps, auth_headers, http_base

MSGPACK = "application/msgpack"

# op -> (method, path template); `{collection}` / `{name}` come out of the args.
_ROUTES: dict[str, tuple[str, str]] = {
    "ping": ("GET", "/healthz"),
    "create_collection": ("POST", "/v1/collections"),
    "list_collections": ("GET", "/v1/collections"),
    "drop_collection": ("DELETE", "/v1/collections/{name}"),
    "upsert": ("POST", "/v1/collections/{collection}/upsert"),
    "delete": ("POST", "/v1/collections/{collection}/delete"),
    "get": ("POST", "/v1/collections/{collection}/get"),
    "query": ("POST", "/v1/collections/{collection}/query"),
    "count": ("POST", "/v1/collections/{collection}/count"),
}


def error_from_body(status: int, body: bytes, content_type: str) -> ShoalError:
    """The exception for an HTTP error response: from its `{"error": {...}}` body when it has one
    (JSON or msgpack), else the class that matches `status`."""
    parsed: Any = None
    try:
        parsed = decode_frame(body) if content_type.startswith(MSGPACK) else json.loads(body)
    except (ValueError, ProtocolError):
        parsed = None
    if isinstance(parsed, dict) and isinstance(parsed.get("error"), dict):
        return error_from_wire(parsed["error"], status)
    text = body[:200].decode("utf-8", "replace").strip()
    return error_from_status(status, f"HTTP {status}" + (f": {text}" if text else ""))


class ShoalHTTP(ShoalOps):
    """HTTP client: `async with ShoalHTTP("http://127.0.0.1:8080") as db: await db.count("docs")`.

    Pass `client=` to share an `httpx.AsyncClient` (it is then not closed here). Transport
    failures raise `ConnectionClosed`; server errors raise the `ShoalError` of their code.
    """

    def __init__(
        self,
        base_url: str,
        key: str | None = None,
        *,
        client: httpx.AsyncClient | None = None,
        timeout: float | httpx.Timeout = 30.0,
        use_msgpack: bool = False,
    ) -> None:
        self.base_url = http_base(base_url)
        self._headers = auth_headers(key)
        self._owned = client is None
        self._client = client if client is not None else httpx.AsyncClient(timeout=timeout)
        self._msgpack = use_msgpack

    async def close(self) -> None:
        if self._owned:
            await self._client.aclose()

    async def __aenter__(self) -> ShoalHTTP:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.close()

    async def ready(self) -> bool:
        """`GET /readyz`: True when PostgreSQL is reachable and shards are loaded."""
        try:
            response = await self._client.get(self.base_url + "/readyz", headers=self._headers)
        except httpx.TransportError as exc:
            raise ConnectionClosed(f"cannot reach {self.base_url}: {exc}") from exc
        return response.status_code == 200

    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send `op` to its route and return the reply map. Raises `ClientError` for an op that
        has no HTTP route (e.g. subscribe: use `client.sse.subscribe_sse`)."""
        route = _ROUTES.get(op)
        if route is None:
            raise ClientError(f"op {op!r} has no HTTP route")
        method, template = route
        path_args = {
            k: quote(str(args.pop(k)), safe="") for k in ("name", "collection") if "{" + k + "}" in template
        }
        if len(path_args) != template.count("{"):
            raise ClientError(f"op {op!r} needs {template!r} arguments")
        url = self.base_url + template.format(**path_args)
        headers = dict(self._headers)
        content: bytes | None = None
        if method == "POST":
            if self._msgpack:
                content = encode_frame(pack_args(args))
                headers["Content-Type"] = MSGPACK
            else:
                content = json.dumps(json_args(args), allow_nan=True).encode()
                headers["Content-Type"] = "application/json"
        if self._msgpack:
            headers["Accept"] = MSGPACK
        try:
            response = await self._client.request(method, url, content=content, headers=headers)
        except httpx.TransportError as exc:
            raise ConnectionClosed(f"{method} {url} failed: {exc}") from exc
        content_type = response.headers.get("content-type", "")
        if response.status_code >= 400:
            raise error_from_body(response.status_code, response.content, content_type)
        if op == "ping":
            return {}  # /healthz answers a plain body; the status is the answer
        return _parse_body(response.content, content_type)


def _parse_body(body: bytes, content_type: str) -> dict[str, Any]:
    if not body.strip():
        return {}
    try:
        parsed = decode_frame(body) if content_type.startswith(MSGPACK) else json.loads(body)
    except ValueError as exc:
        raise ProtocolError(f"reply body is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError(f"reply body is not an object: {type(parsed).__name__}")
    return parsed
