"""Start-up failures and the orderly stop of a serving process.

Start-up: `LifespanGuard` wraps the ASGI app handed to uvicorn. When the lifespan start-up fails
with a `StartupError`, uvicorn would log the whole traceback; the guard records the error and
blanks the traceback, so `shoal serve` can print the one line after uvicorn returns.

Stop (`drain`), run on SIGINT/SIGTERM before uvicorn closes any connection:
    1. every subscription is closed with `unavailable`: each SSE stream writes its
       `event: error` block and ends, each WebSocket subscriber gets its `ended` push;
    2. wait until no SSE stream is open and no write is in flight (`writes_in_flight`), so acks
       and pushes are on the sockets before uvicorn closes the WebSockets (1012);
    3. uvicorn then closes idle connections, waits for the rest and runs the lifespan shutdown,
       where the engine commits what is still queued.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Iterator
from typing import TYPE_CHECKING

import anyio
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from actors.supervisor import Engine
from models.errors import StartupError

if TYPE_CHECKING:  # server.sse imports server.ops, which counts its writes here
    from server.sse import SSEState

log = logging.getLogger("shoal.lifecycle")

# After the last write returned: time for its reply (and any push) to reach the socket.
SETTLE_S = 0.05
POLL_S = 0.01


class InFlight:
    """A count of operations under way."""

    __slots__ = ("count",)

    def __init__(self) -> None:
        self.count = 0

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        self.count += 1
        try:
            yield
        finally:
            self.count -= 1


_WRITES: weakref.WeakKeyDictionary[Engine, InFlight] = weakref.WeakKeyDictionary()


def writes_in_flight(engine: Engine) -> InFlight:
    """The writes (upsert, delete, create, drop) that `engine` is serving right now."""
    writes = _WRITES.get(engine)
    if writes is None:
        writes = _WRITES[engine] = InFlight()
    return writes


async def drain(engine: Engine, sse: SSEState, within: float) -> None:
    """Steps 1 and 2 of the stop (see the module docstring), in at most `within` seconds."""
    engine.close_subscriptions()
    writes = writes_in_flight(engine)
    with anyio.move_on_after(within) as scope:
        while sse.open_streams or writes.count:
            await anyio.sleep(POLL_S)
        await anyio.sleep(SETTLE_S)
    if scope.cancelled_caught:
        log.warning(
            "stopping with %d SSE stream(s) and %d write(s) still open after %.1fs",
            sse.open_streams,
            writes.count,
            within,
        )


def _startup_error(exc: BaseException | None) -> StartupError | None:
    """The StartupError in `exc`, its exception groups, causes or contexts."""
    seen: set[int] = set()
    stack = [exc]
    while stack:
        current = stack.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, StartupError):
            return current
        if isinstance(current, BaseExceptionGroup):
            stack.extend(current.exceptions)
        stack.extend((current.__cause__, current.__context__))
    return None


class LifespanGuard:
    """The app uvicorn runs: `app` itself, with a StartupError of its lifespan start-up recorded
    in `startup_error` instead of logged as a traceback."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app
        self.startup_error: StartupError | None = None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "lifespan":
            await self.app(scope, receive, send)
            return

        async def guarded_send(message: Message) -> None:
            if message["type"] == "lifespan.startup.failed":
                # Sent from inside the app's `except` block: the failure is the exception being
                # handled.
                error = _startup_error(sys.exc_info()[1])
                if error is not None:
                    self.startup_error = error
                    message = {**message, "message": ""}
            await send(message)

        await self.app(scope, receive, guarded_send)
