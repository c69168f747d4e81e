"""The typed operations shared by the WebSocket and HTTP clients, and URL helpers.

`ShoalOps` defines every typed method once, on top of one abstract `request(op, **args)`; each
transport implements only `request`. Optional arguments left as None are not sent, so the server's
defaults apply.
"""

from __future__ import annotations

import abc
from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit, urlunsplit

from shoal_client.errors import ClientError, ProtocolError, ShoalError
from shoal_client.types import (
    CollectionInfo,
    DeleteResult,
    Page,
    QueryResult,
    UpsertResult,
    parse_collection,
    parse_delete,
    parse_doc,
    parse_query,
    parse_query_batch,
    parse_upsert,
)

WS_PATH = "/v1/ws"


def ws_url(url: str) -> str:
    """The WebSocket endpoint for `url`: `ws://h:p/v1/ws` as is; `http(s)://h:p[/prefix]` and
    `ws(s)://h:p[/prefix]` get `ws(s)` and `/v1/ws` appended. Raises `ClientError` for other schemes."""
    parts = urlsplit(url)
    scheme = {"ws": "ws", "wss": "wss", "http": "ws", "https": "wss"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ClientError(f"not a ws://, wss://, http:// or https:// URL: {url!r}")
    path = parts.path.rstrip("/")
    if not path.endswith(WS_PATH):
        path = path.removesuffix("/v1") + WS_PATH
    return urlunsplit((scheme, parts.netloc, path, parts.query, ""))


def http_base(url: str) -> str:
    """The HTTP base URL (no trailing slash, no `/v1`) for any URL `ws_url` accepts."""
    parts = urlsplit(url)
    scheme = {"ws": "http", "wss": "https", "http": "http", "https": "https"}.get(parts.scheme.lower())
    if scheme is None or not parts.netloc:
        raise ClientError(f"not a ws://, wss://, http:// or https:// URL: {url!r}")
    path = parts.path.rstrip("/").removesuffix(WS_PATH).removesuffix("/v1").rstrip("/")
    return urlunsplit((scheme, parts.netloc, path, "", ""))


def auth_headers(key: str | None) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"} if key else {}


def include_list(include: Iterable[str] | str | None) -> list[str] | None:
    """`include` as the wire list; a single string is one field, not its characters."""
    if include is None:
        return None
    if isinstance(include, str):
        return [include]
    return [str(getattr(field, "value", field)) for field in include]


def compact(**args: Any) -> dict[str, Any]:
    """The args that were given (not None)."""
    return {k: v for k, v in args.items() if v is not None}


def search_args(
    *,
    vector: Any,
    text: str | None,
    where: Mapping[str, Any] | None,
    where_text: Mapping[str, Any] | None,
    include: Iterable[str] | str | None,
    like: str | None = None,
) -> dict[str, Any]:
    return compact(
        vector=vector,
        text=text,
        like=like,
        where=dict(where) if where is not None else None,
        where_text=dict(where_text) if where_text is not None else None,
        include=include_list(include),
    )


class ShoalOps(abc.ABC):
    """The typed Shoal operations. Every method raises the `ShoalError` subclass of the server's
    error code (e.g. `NotFound`), or `ConnectionClosed` when no answer can come."""

    @abc.abstractmethod
    async def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; return the reply map without `id`/`ok`, or raise its error."""

    async def ping(self) -> None:
        await self.request("ping")

    async def create_collection(
        self,
        name: str,
        dim: int | None = None,
        metric: str | None = None,
        if_not_exists: bool = False,
        *,
        index: Mapping[str, Any] | None = None,
    ) -> CollectionInfo:
        """Create a collection (default dim: the embedding model's, 384). Raises `Exists` unless
        `if_not_exists`, in which case the existing collection is returned. `index`: the index
        kind and its parameters, e.g. `{"kind": "ivf", "quantization": "int8"}`."""
        args = compact(name=name, dim=dim, metric=getattr(metric, "value", metric), index=index)
        if if_not_exists:
            args["if_not_exists"] = True
        reply = await self.request("create_collection", **args)
        return parse_collection(reply.get("collection"))

    async def list_collections(self) -> list[CollectionInfo]:
        reply = await self.request("list_collections")
        collections = reply.get("collections")
        if not isinstance(collections, list):
            raise ProtocolError(f"list_collections reply without a list: {reply!r}")
        return [parse_collection(c) for c in collections]

    async def drop_collection(self, name: str) -> None:
        await self.request("drop_collection", name=name)

    async def upsert(self, collection: str, docs: Sequence[Mapping[str, Any]]) -> UpsertResult:
        """Insert or replace `docs` (`{"id", "text"?, "vector"?, "metadata"?}`; vectors as numpy
        arrays, lists or float32 LE bytes). Returns once the batch is durable and visible."""
        reply = await self.request("upsert", collection=collection, docs=[dict(d) for d in docs])
        return parse_upsert(reply)

    async def delete(
        self,
        collection: str,
        ids: Sequence[str] | None = None,
        where: Mapping[str, Any] | None = None,
    ) -> DeleteResult:
        args = compact(
            ids=list(ids) if ids is not None else None, where=dict(where) if where is not None else None
        )
        reply = await self.request("delete", collection=collection, **args)
        return parse_delete(reply)

    async def get(
        self, collection: str, ids: Sequence[str], include: Iterable[str] | str | None = None
    ) -> list[dict[str, Any]]:
        """The documents among `ids` that exist (missing ids are left out), vectors as float32 numpy."""
        reply = await self.request(
            "get", collection=collection, ids=list(ids), **compact(include=include_list(include))
        )
        docs = reply.get("docs")
        if not isinstance(docs, list):
            raise ProtocolError(f"get reply without a docs list: {reply!r}")
        return [parse_doc(d) for d in docs if isinstance(d, Mapping)]

    async def get_page(
        self,
        collection: str,
        *,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        include: Iterable[str] | str | None = None,
    ) -> Page:
        """One page of the live documents passing the filters, in id order: up to `limit`
        (server default 100, at most 10,000), after the page whose `next_cursor` is `cursor`
        (None: the first page). A page may hold fewer than `limit` documents and still not be
        the last (the server cuts a page to fit in one frame); only `next_cursor is None` ends."""
        args = search_args(vector=None, text=None, where=where, where_text=where_text, include=include)
        args.update(compact(limit=limit, cursor=cursor))
        reply = await self.request("get", collection=collection, **args)
        docs = reply.get("docs")
        next_cursor = reply.get("next_cursor")
        if not isinstance(docs, list) or not (next_cursor is None or isinstance(next_cursor, str)):
            raise ProtocolError(f"get reply without a docs list and a next_cursor: {reply!r}")
        return Page([parse_doc(d) for d in docs if isinstance(d, Mapping)], next_cursor)

    async def scan(
        self,
        collection: str,
        *,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        page: int | None = None,
        include: Iterable[str] | str | None = None,
        cursor: str | None = None,
    ) -> AsyncIterator[Page]:
        """Every live document passing the filters, a page (`page` documents at most) at a time,
        in id order; start after `cursor` to resume. A document live for the whole scan is seen
        exactly once; one written or deleted meanwhile may or may not be."""
        while True:
            got = await self.get_page(
                collection, where=where, where_text=where_text, limit=page, cursor=cursor, include=include
            )
            yield got
            if got.next_cursor is None:
                return
            cursor = got.next_cursor

    async def count(self, collection: str) -> int:
        reply = await self.request("count", collection=collection)
        count = reply.get("count")
        if not isinstance(count, int):
            raise ProtocolError(f"count reply without an integer count: {reply!r}")
        return count

    async def query(
        self,
        collection: str,
        vector: Any = None,
        text: str | None = None,
        k: int = 10,
        *,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        include: Iterable[str] | str | None = None,
        ef: int | None = None,
        mode: str | None = None,
        fusion: str | None = None,
        alpha: float | None = None,
        rrf_k: int | None = None,
        vector_candidates: int | None = None,
        keyword_candidates: int | None = None,
        nprobe: int | None = None,
        like: str | None = None,
    ) -> QueryResult:
        """The `k` best hits for `vector`, `text` or `like` (`mode`: vector | keyword | hybrid).
        `ef` applies to hnsw collections, `nprobe` to ivf ones.

        `like` (query by example) is a stored document's id: its vector is the query (its text
        too, for keyword and hybrid) and the document itself is left out of the hits.

        Hybrid takes `text` (and optionally `vector` for its vector side), `fusion` (`rrf` with
        `rrf_k`, or `weighted` with `alpha`, the vector side's weight) and each side's candidate
        depth (>= k). Keyword and hybrid hits carry `scores`; `cached` says whether the server
        answered from its results cache."""
        args = search_args(
            vector=vector, text=text, where=where, where_text=where_text, include=include, like=like
        )
        args.update(
            compact(
                ef=ef,
                mode=mode,
                fusion=fusion,
                alpha=alpha,
                rrf_k=rrf_k,
                vector_candidates=vector_candidates,
                keyword_candidates=keyword_candidates,
                nprobe=nprobe,
            )
        )
        reply = await self.request("query", collection=collection, k=k, **args)
        return parse_query(reply)

    async def query_batch(
        self, collection: str, queries: Iterable[Mapping[str, Any]]
    ) -> list[QueryResult | ShoalError]:
        """Several queries of `collection` in one request. Each map takes `query`'s keyword
        arguments (`vector`, `text` or `like`, `k`, `where`, `include`, `ef`, `mode`, ...;
        None means absent). Returns, in order, each query's result or the `ShoalError` it alone
        met (an unknown `like` id, a vector of the wrong width); an argument the server refuses
        fails the whole call, naming the query (`queries[3]: ...`)."""
        items = []
        for query in queries:
            item = compact(**query)
            if "include" in item:
                item["include"] = include_list(item["include"])
            for key in ("where", "where_text"):
                if key in item:
                    item[key] = dict(item[key])
            items.append(item)
        reply = await self.request("query_batch", collection=collection, queries=items)
        return parse_query_batch(reply)
