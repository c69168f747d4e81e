"""Server-Sent Events helpers: standing queries and change feeds over plain HTTP (httpx + httpx-sse).

Both helpers are async generators of `SSEEvent(id, event, data)`. `id` is the event's seq as the
server sent it: pass the last one seen as `last_event_id` to resume after a disconnect with no match
lost or duplicated. With `reconnect=True` the generator does that itself on transport failures and
stream ends, waiting the server's `retry:` interval (2 s by default) in between.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Iterable, Mapping
from typing import Any
from urllib.parse import quote

import httpx
from httpx_sse import SSEError, aconnect_sse

from shoal_client.codec import vector_to_query_param
from shoal_client.errors import ConnectionClosed, ProtocolError
from shoal_client.http import error_from_body
from shoal_client.ops import auth_headers, http_base, include_list
from shoal_client.types import SSEEvent

DEFAULT_RETRY_MS = 2000
# The server sends a comment at least every 15 s; a read silent for much longer means a dead peer.
DEFAULT_READ_TIMEOUT = 45.0


def subscribe_params(
    *,
    text: str | None,
    vector: Any,
    threshold: float | None,
    where: Mapping[str, Any] | None,
    where_text: Mapping[str, Any] | None,
    include: Iterable[str] | str | None,
    like: str | None = None,
    k: int | None = None,
) -> dict[str, str]:
    """The query parameters of `GET /v1/collections/{name}/subscribe`."""
    if threshold is None and k is None:
        raise ValueError("subscribe needs a threshold, or k for a top-k list")
    params: dict[str, str] = {}
    if threshold is not None:
        params["threshold"] = repr(float(threshold))
    if k is not None:
        params["k"] = str(int(k))
    if text is not None:
        params["text"] = text
    if like is not None:
        params["like"] = like
    if vector is not None:
        params["vector"] = vector_to_query_param(vector)
    if where is not None:
        params["where"] = json.dumps(dict(where), separators=(",", ":"))
    if where_text is not None:
        params["where_text"] = json.dumps(dict(where_text), separators=(",", ":"))
    fields = include_list(include)
    if fields is not None:
        params["include"] = ",".join(fields)
    return params


async def subscribe_sse(
    base_url: str,
    collection: str,
    *,
    text: str | None = None,
    vector: Any = None,
    threshold: float | None = None,
    where: Mapping[str, Any] | None = None,
    where_text: Mapping[str, Any] | None = None,
    include: Iterable[str] | str | None = None,
    last_event_id: str | int | None = None,
    key: str | None = None,
    client: httpx.AsyncClient | None = None,
    reconnect: bool = False,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
    like: str | None = None,
    k: int | None = None,
) -> AsyncIterator[SSEEvent]:
    """Events of a standing query for `text`, `vector` or `like` (a stored document's id: query
    by example): `match` (`data == {"seq", "op", "hit"}`) and `leave` (`{"seq", "id"}`); with
    `k`, a live top-k list: `topk` (`{"seq", "hits"}`), the current list first.

    Raises the `ShoalError` of the server's 400/404 answer (e.g. `BadRequest` for a bad filter)
    before any event, `ConnectionClosed` on a transport failure unless `reconnect`, and
    `ProtocolError` if the response is not an event stream.
    """
    params = subscribe_params(
        text=text,
        vector=vector,
        threshold=threshold,
        where=where,
        where_text=where_text,
        include=include,
        like=like,
        k=k,
    )
    url = f"{http_base(base_url)}/v1/collections/{quote(collection, safe='')}/subscribe"
    async for event in _stream(url, params, last_event_id, key, client, reconnect, read_timeout):
        yield event


async def changes_sse(
    base_url: str,
    collection: str,
    last_event_id: str | int | None = None,
    *,
    key: str | None = None,
    client: httpx.AsyncClient | None = None,
    reconnect: bool = False,
    read_timeout: float = DEFAULT_READ_TIMEOUT,
) -> AsyncIterator[SSEEvent]:
    """Every applied change of `collection` (`event` is `upsert` or `delete`, `data` holds the
    ids and seq). Same resume rules and errors as `subscribe_sse`."""
    url = f"{http_base(base_url)}/v1/collections/{quote(collection, safe='')}/changes"
    async for event in _stream(url, {}, last_event_id, key, client, reconnect, read_timeout):
        yield event


async def _stream(
    url: str,
    params: dict[str, str],
    last_event_id: str | int | None,
    key: str | None,
    client: httpx.AsyncClient | None,
    reconnect: bool,
    read_timeout: float,
) -> AsyncIterator[SSEEvent]:
    http = client if client is not None else httpx.AsyncClient(timeout=httpx.Timeout(10.0, read=read_timeout))
    last_id = str(last_event_id) if last_event_id is not None else None
    retry_ms = DEFAULT_RETRY_MS
    try:
        while True:
            headers = auth_headers(key)
            if last_id:
                headers["Last-Event-ID"] = last_id
            try:
                async with aconnect_sse(http, "GET", url, params=params, headers=headers) as source:
                    response = source.response
                    if response.status_code != 200:
                        body = await response.aread()
                        raise error_from_body(
                            response.status_code, body, response.headers.get("content-type", "")
                        )
                    async for sse in source.aiter_sse():
                        if sse.retry is not None:
                            retry_ms = sse.retry
                        if not sse.data:
                            continue  # a block without data dispatches nothing (the SSE rules)
                        event = _event(sse.id, sse.event, sse.data)
                        if event.id:
                            last_id = event.id
                        yield event
            except SSEError as exc:  # raised before any event when the body is not an event stream
                raise ProtocolError(str(exc)) from None
            except httpx.TransportError as exc:
                if not reconnect:
                    raise ConnectionClosed(f"event stream {url} failed: {exc}") from exc
            else:
                if not reconnect:
                    return
            await asyncio.sleep(retry_ms / 1000)
    finally:
        if client is None:
            await http.aclose()


def _event(event_id: str, kind: str, data: str) -> SSEEvent:
    try:
        parsed = json.loads(data)
    except ValueError as exc:
        raise ProtocolError(f"event data is not JSON: {exc}") from None
    if not isinstance(parsed, dict):
        raise ProtocolError(f"event data is not an object: {data[:200]!r}")
    return SSEEvent(id=event_id or None, event=kind, data=parsed)
