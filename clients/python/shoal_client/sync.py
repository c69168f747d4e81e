"""Blocking wrappers of the Shoal clients, for scripts and notebooks.

    from shoal_client.sync import ShoalClient

    with ShoalClient("ws://127.0.0.1:8080/v1/ws") as db:
        db.create_collection("notes", if_not_exists=True)
        db.upsert("notes", [{"id": "a", "text": "the cat sat on the mat"}])
        print(db.query("notes", text="kitten", k=3).hits)
        with db.subscribe("notes", text="kitten", threshold=0.5) as sub:
            for event in sub:            # blocks until the next match
                ...

Each wrapper runs the async client on a private event loop in a daemon thread and blocks the
calling thread until the answer is there. The caller's own event loop, if any, is never touched,
so the wrappers also work inside Jupyter, where a loop is already running in the main thread.
Every method has the signature, the result types and the exceptions of its async counterpart
(`shoal_client.ShoalClient`, `shoal_client.ShoalHTTP`); an interrupted call (Ctrl-C, a timeout)
cancels the request on the private loop before the exception reaches the caller.

`run(fn)` / `arun(fn)` call `fn(async_client)` on the private loop, blocking or awaited from any
other loop: that is how the LangChain and LlamaIndex stores offer their async variants.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Coroutine, Iterable, Mapping, Sequence
from typing import Any, Generic, TypeVar

import httpx

from shoal_client.errors import ClientError, ShoalError
from shoal_client.http import ShoalHTTP
from shoal_client.ops import ShoalOps
from shoal_client.sse import DEFAULT_READ_TIMEOUT, changes_sse, subscribe_sse
from shoal_client.types import (
    CollectionInfo,
    DeleteResult,
    Page,
    QueryResult,
    SSEEvent,
    SubscriptionEvent,
    UpsertResult,
)
from shoal_client.ws import ShoalClient as AsyncShoalClient
from shoal_client.ws import Subscription

T = TypeVar("T")
OpsT = TypeVar("OpsT", bound=ShoalOps)


class EventLoopThread:
    """A private asyncio event loop running in a daemon thread until `close()`.

    `run(coro)` blocks the calling thread for the coroutine's result; `arun(coro)` awaits it from
    another event loop. Both re-raise the coroutine's exception, and cancel it when the caller
    gives up (timeout, KeyboardInterrupt, cancellation).
    """

    def __init__(self, name: str = "shoal-client") -> None:
        self._loop = asyncio.new_event_loop()
        started = threading.Event()
        self._thread = threading.Thread(target=_serve_loop, args=(self._loop, started), name=name, daemon=True)
        self._thread.start()
        started.wait()
        # Stops the loop even when the owner is garbage-collected without close().
        self._finalizer = weakref.finalize(self, _stop_loop, self._loop, self._thread)

    @property
    def closed(self) -> bool:
        return not self._finalizer.alive

    def _submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        if self.closed:
            coro.close()
            raise ClientError("the client is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            # Blocking the loop's own thread on the loop would never return.
            raise RuntimeError("a blocking Shoal call was made from inside the client's own event loop")
        return asyncio.run_coroutine_threadsafe(coro, self._loop)

    def run(self, coro: Coroutine[Any, Any, T], timeout: float | None = None) -> T:
        """The coroutine's result, run on the private loop. Raises what it raises; `TimeoutError`
        (the coroutine cancelled) after `timeout` seconds; `ClientError` once closed."""
        future = self._submit(coro)
        try:
            return future.result(timeout)
        except BaseException:
            future.cancel()
            raise

    async def arun(self, coro: Coroutine[Any, Any, T]) -> T:
        """Await the coroutine's result from any event loop (it runs on the private one);
        cancelling the awaiting task cancels the coroutine."""
        return await asyncio.wrap_future(self._submit(coro))

    def close(self) -> None:
        """Cancel what still runs on the loop and stop its thread (idempotent)."""
        if threading.current_thread() is self._thread:
            raise RuntimeError("close() called from inside the client's own event loop")
        self._finalizer()


def _serve_loop(loop: asyncio.AbstractEventLoop, started: threading.Event) -> None:
    asyncio.set_event_loop(loop)
    loop.call_soon(started.set)
    try:
        loop.run_forever()
    finally:
        tasks = asyncio.all_tasks(loop)
        for task in tasks:
            task.cancel()
        if tasks:
            loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
        loop.run_until_complete(loop.shutdown_asyncgens())
        loop.close()


def _stop_loop(loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
    with contextlib.suppress(RuntimeError):  # the loop is already closed
        loop.call_soon_threadsafe(loop.stop)
    if thread is not threading.current_thread():
        thread.join()


class SyncIterator(Generic[T]):
    """A blocking iterator over an async iterator that lives on an `EventLoopThread`.

    `close()` (or leaving `with`) ends it; after the last item, iteration stops.
    """

    def __init__(self, portal: EventLoopThread, source: AsyncIterator[T]) -> None:
        self._portal = portal
        self._source = source
        self._done = False

    def __iter__(self) -> SyncIterator[T]:
        return self

    def __next__(self) -> T:
        if self._done:
            raise StopIteration
        try:
            return self._portal.run(_anext(self._source))
        except StopAsyncIteration:
            self._done = True
            raise StopIteration from None

    def close(self) -> None:
        """End the iteration and release what the source holds (idempotent)."""
        if self._done:
            return
        self._done = True
        aclose = getattr(self._source, "aclose", None)
        if aclose is not None and not self._portal.closed:
            self._portal.run(aclose())

    def __enter__(self) -> SyncIterator[T]:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


async def _anext(source: AsyncIterator[T]) -> T:
    return await source.__anext__()


class SyncSubscription(SyncIterator[SubscriptionEvent]):
    """A standing query as a blocking iterator of `MatchEvent` / `LaggedEvent`, in seq order.

    Same semantics as the async `Subscription`: `close()` unsubscribes; a lost connection raises
    `ConnectionClosed` after the events already received.
    """

    def __init__(self, portal: EventLoopThread, subscription: Subscription) -> None:
        super().__init__(portal, subscription)
        self._subscription = subscription
        self.sub = subscription.sub
        self.collection = subscription.collection

    @property
    def dropped(self) -> int:
        """Matches dropped because the consumer fell `queue_size` events behind."""
        return self._subscription.dropped

    @property
    def pending(self) -> int:
        """Events received and not yet consumed."""
        return self._subscription.pending

    def next_event(self, timeout: float | None = None) -> SubscriptionEvent:
        """The next event, waiting at most `timeout` seconds. Raises `TimeoutError` when none came
        (the subscription stays usable), `StopIteration` once it has ended."""
        return self._portal.run(_anext(self._subscription), timeout)

    def close(self) -> None:
        """Unsubscribe (idempotent; never raises for a closed connection)."""
        if self._done:
            return
        self._done = True
        if not self._portal.closed:
            self._portal.run(self._subscription.close())

    def __enter__(self) -> SyncSubscription:
        return self

    def __repr__(self) -> str:
        return f"<SyncSubscription {self.sub} on {self.collection!r}, {self.pending} pending>"


class _SyncOps(Generic[OpsT]):
    """The typed Shoal operations of `ShoalOps`, blocking, over an async client on a private loop."""

    _portal: EventLoopThread
    _async: OpsT

    def run(self, fn: Callable[[OpsT], Coroutine[Any, Any, T]], timeout: float | None = None) -> T:
        """`fn(async_client)` run on the private loop; blocks for its result."""
        return self._portal.run(_apply(fn, self._async), timeout)

    async def arun(self, fn: Callable[[OpsT], Coroutine[Any, Any, T]]) -> T:
        """`fn(async_client)` run on the private loop, awaited from the caller's loop."""
        return await self._portal.arun(_apply(fn, self._async))

    @property
    def closed(self) -> bool:
        return self._portal.closed

    def close(self) -> None:
        """Close the connection and stop the private loop (idempotent)."""
        if self._portal.closed:
            return
        try:
            self._portal.run(self._async_close())
        finally:
            self._portal.close()

    async def _async_close(self) -> None:
        raise NotImplementedError

    def __enter__(self: _SelfT) -> _SelfT:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def request(self, op: str, **args: Any) -> dict[str, Any]:
        """Send one request; the reply map without `id`/`ok`, or its error raised."""
        return self._portal.run(self._async.request(op, **args))

    def ping(self) -> None:
        self._portal.run(self._async.ping())

    def create_collection(
        self,
        name: str,
        dim: int | None = None,
        metric: str | None = None,
        if_not_exists: bool = False,
        *,
        index: Mapping[str, Any] | None = None,
    ) -> CollectionInfo:
        """Create a collection (default dim: the embedding model's). Raises `Exists` unless
        `if_not_exists`, in which case the existing collection is returned."""
        return self._portal.run(self._async.create_collection(name, dim, metric, if_not_exists, index=index))

    def list_collections(self) -> list[CollectionInfo]:
        return self._portal.run(self._async.list_collections())

    def drop_collection(self, name: str) -> None:
        self._portal.run(self._async.drop_collection(name))

    def upsert(self, collection: str, docs: Sequence[Mapping[str, Any]]) -> UpsertResult:
        """Insert or replace `docs`; returns once the batch is durable and visible."""
        return self._portal.run(self._async.upsert(collection, docs))

    def delete(
        self, collection: str, ids: Sequence[str] | None = None, where: Mapping[str, Any] | None = None
    ) -> DeleteResult:
        return self._portal.run(self._async.delete(collection, ids, where))

    def get(
        self, collection: str, ids: Sequence[str], include: Iterable[str] | str | None = None
    ) -> list[dict[str, Any]]:
        """The documents among `ids` that exist, vectors as float32 numpy."""
        return self._portal.run(self._async.get(collection, ids, include))

    def get_page(
        self,
        collection: str,
        *,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        limit: int | None = None,
        cursor: str | None = None,
        include: Iterable[str] | str | None = None,
    ) -> Page:
        """One page of the live documents passing the filters, in id order, after the page
        whose `next_cursor` is `cursor` (None: the first); only `next_cursor is None` ends."""
        return self._portal.run(
            self._async.get_page(
                collection, where=where, where_text=where_text, limit=limit, cursor=cursor, include=include
            )
        )

    def scan(
        self,
        collection: str,
        *,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        page: int | None = None,
        include: Iterable[str] | str | None = None,
        cursor: str | None = None,
    ) -> SyncIterator[Page]:
        """Every live document passing the filters, a page at a time, in id order (a blocking
        iterator over `get_page`; close it, or use it as a context manager, to stop early)."""
        pages = self._async.scan(
            collection, where=where, where_text=where_text, page=page, include=include, cursor=cursor
        )
        return SyncIterator(self._portal, pages)

    def count(self, collection: str) -> int:
        return self._portal.run(self._async.count(collection))

    def query(
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
        nprobe: int | None = None,
        like: str | None = None,
    ) -> QueryResult:
        """The `k` best hits for `vector`, `text` or `like` (a stored document's id, left out
        of the hits)."""
        return self._portal.run(
            self._async.query(
                collection,
                vector,
                text,
                k,
                where=where,
                where_text=where_text,
                include=include,
                ef=ef,
                mode=mode,
                fusion=fusion,
                alpha=alpha,
                nprobe=nprobe,
                like=like,
            )
        )

    def query_batch(self, collection: str, queries: Iterable[Mapping[str, Any]]) -> list[QueryResult | ShoalError]:
        """Several queries in one request: each query's result, or the error it alone met."""
        return self._portal.run(self._async.query_batch(collection, list(queries)))


_SelfT = TypeVar("_SelfT", bound=_SyncOps[Any])


async def _apply(fn: Callable[[OpsT], Coroutine[Any, Any, T]], client: OpsT) -> T:
    return await fn(client)


class SyncShoalClient(_SyncOps[AsyncShoalClient]):
    """A blocking WebSocket client: `with SyncShoalClient(url) as db: db.count("docs")`.

    Connects on construction, with the options of `shoal_client.ShoalClient.connect` (`key`,
    `queue_size`, `open_timeout`, `ping_interval`, ...), and raises what it raises (`Unauthorized`,
    `ConnectionClosed`, ...). `close()` it, or use it as a context manager.
    """

    def __init__(self, url: str, key: str | None = None, **options: Any) -> None:
        self._portal = EventLoopThread("shoal-ws")
        try:
            self._async = self._portal.run(_open_ws(url, key, options))
        except BaseException:
            self._portal.close()
            raise

    async def _async_close(self) -> None:
        await self._async.close()

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return self._async.in_flight

    @property
    def connection_closed(self) -> bool:
        """True once the WebSocket connection has ended (closed here, or lost)."""
        return self._async.closed

    def subscribe(
        self,
        collection: str,
        vector: Any = None,
        text: str | None = None,
        *,
        threshold: float | None = None,
        k: int | None = None,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        include: Iterable[str] | str | None = None,
        after_seq: int | None = None,
        like: str | None = None,
    ) -> SyncSubscription:
        """Start a standing query (or, with `k`, a live top-k list); iterate the result to block
        for its events."""
        subscription = self._portal.run(
            self._async.subscribe(
                collection,
                vector,
                text,
                threshold=threshold,
                k=k,
                where=where,
                where_text=where_text,
                include=include,
                after_seq=after_seq,
                like=like,
            )
        )
        return SyncSubscription(self._portal, subscription)

    def __repr__(self) -> str:
        state = "closed" if self.closed or self._async.closed else "open"
        return f"<SyncShoalClient {state}>"


async def _open_ws(url: str, key: str | None, options: dict[str, Any]) -> AsyncShoalClient:
    return await AsyncShoalClient.connect(url, key, **options)


async def _make_http(base_url: str, key: str | None, timeout: float | httpx.Timeout, use_msgpack: bool) -> ShoalHTTP:
    # Built on the private loop, so that its connection pool belongs to that loop.
    return ShoalHTTP(base_url, key, timeout=timeout, use_msgpack=use_msgpack)


class SyncShoalHTTP(_SyncOps[ShoalHTTP]):
    """A blocking HTTP client: `with SyncShoalHTTP("http://127.0.0.1:8080") as db: db.count("docs")`.

    Same methods as `shoal_client.ShoalHTTP` (no connection is opened until the first request),
    plus `subscribe_sse` / `changes_sse` as blocking iterators of `SSEEvent`.
    """

    def __init__(
        self,
        base_url: str,
        key: str | None = None,
        *,
        timeout: float | httpx.Timeout = 30.0,
        use_msgpack: bool = False,
    ) -> None:
        self._portal = EventLoopThread("shoal-http")
        self._key = key
        try:
            self._async = self._portal.run(_make_http(base_url, key, timeout, use_msgpack))
        except BaseException:
            self._portal.close()
            raise
        self.base_url = self._async.base_url

    async def _async_close(self) -> None:
        await self._async.close()

    def ready(self) -> bool:
        """`GET /readyz`: True when the server is ready to answer."""
        return self._portal.run(self._async.ready())

    def subscribe_sse(
        self,
        collection: str,
        *,
        text: str | None = None,
        vector: Any = None,
        threshold: float | None = None,
        k: int | None = None,
        where: Mapping[str, Any] | None = None,
        where_text: Mapping[str, Any] | None = None,
        include: Iterable[str] | str | None = None,
        last_event_id: str | int | None = None,
        reconnect: bool = False,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
        like: str | None = None,
    ) -> SyncIterator[SSEEvent]:
        """A standing query over Server-Sent Events, as a blocking iterator (see
        `shoal_client.subscribe_sse`); `close()` it, or use it with `with`."""
        stream = subscribe_sse(
            self.base_url,
            collection,
            text=text,
            vector=vector,
            threshold=threshold,
            k=k,
            where=where,
            where_text=where_text,
            include=include,
            last_event_id=last_event_id,
            key=self._key,
            reconnect=reconnect,
            read_timeout=read_timeout,
            like=like,
        )
        return SyncIterator(self._portal, stream)

    def changes_sse(
        self,
        collection: str,
        last_event_id: str | int | None = None,
        *,
        reconnect: bool = False,
        read_timeout: float = DEFAULT_READ_TIMEOUT,
    ) -> SyncIterator[SSEEvent]:
        """The collection's change feed over Server-Sent Events, as a blocking iterator."""
        stream = changes_sse(
            self.base_url,
            collection,
            last_event_id,
            key=self._key,
            reconnect=reconnect,
            read_timeout=read_timeout,
        )
        return SyncIterator(self._portal, stream)

    def __repr__(self) -> str:
        return f"<SyncShoalHTTP {self.base_url}{' closed' if self.closed else ''}>"


# `from shoal_client.sync import ShoalClient` reads as the blocking twin of the async client.
ShoalClient = SyncShoalClient

__all__ = [
    "EventLoopThread",
    "ShoalClient",
    "SyncIterator",
    "SyncShoalClient",
    "SyncShoalHTTP",
    "SyncSubscription",
]
