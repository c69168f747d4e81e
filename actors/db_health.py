"""What the node currently believes about its database: up, or down since when and why.

One `DatabaseHealth` per `Persistence`. It is written by two sources: the background probe
(`probe_forever`, one dedicated connection, a `SELECT 1` every interval, each bounded by a
timeout) and the pool, whose connection failures mark it down at once. Only a probe that
succeeds marks it up again. Readers (`/readyz`, the write path's fail-fast check, request
deadlines that want to say why) read the state and never wait on the database.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import anyio
import asyncpg

log = logging.getLogger("shoal.database")

# Conditions that mean "the database cannot be reached right now", as opposed to a bug.
UNAVAILABLE_ERRORS: tuple[type[BaseException], ...] = (
    OSError,  # refused / missing socket, reset, and TimeoutError from connect or pool acquire
    asyncpg.exceptions.PostgresConnectionError,  # class 08, incl. ConnectionDoesNotExistError
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # 57P01
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
)


def describe(exc: BaseException) -> str:
    """A short, secret-free description of a connection failure, for logs and health."""
    if isinstance(exc, TimeoutError):
        return "no answer in time"
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror.lower()
    message = getattr(exc, "message", None) or str(exc) or type(exc).__name__
    return str(message).splitlines()[0][:200]


class DatabaseHealth:
    """Up or down, with the reason and the monotonic time of the last change.

    `mark_down` and `mark_up` log each transition once; `changed` is set on every transition and
    replaced by a fresh event, so waiters can `await health.changed.wait()` for the next one.
    """

    def __init__(self) -> None:
        self.up = True
        self.reason = ""
        self.since = time.monotonic()
        self.changed = anyio.Event()

    def mark_down(self, reason: str) -> None:
        if not self.up:
            return
        self.up, self.reason, self.since = False, reason, time.monotonic()
        log.warning("database unavailable: %s", reason)
        self._notify()

    def mark_up(self) -> None:
        if self.up:
            return
        down_for = time.monotonic() - self.since
        self.up, self.reason, self.since = True, "", time.monotonic()
        log.warning("database available again after %.1f s", down_for)
        self._notify()

    def _notify(self) -> None:
        changed, self.changed = self.changed, anyio.Event()
        changed.set()

    def to_wire(self) -> dict[str, Any]:
        """`{"up": bool, "reason": str, "for_s": float}` for `/readyz`."""
        return {"up": self.up, "reason": self.reason, "for_s": round(time.monotonic() - self.since, 3)}


async def probe_forever(
    dsn: str,
    health: DatabaseHealth,
    *,
    interval: float,
    timeout: float,
    on_recovered: Callable[[], Awaitable[None]] | None = None,
) -> None:
    """Probe the database until cancelled, keeping `health` current.

    Each probe (connect if needed, then `SELECT 1`) must finish within `timeout`, so a stalled
    server counts as down. While down, probes run four times as often, so that recovery is seen
    quickly; `on_recovered` runs after each down -> up transition (e.g. to refresh a pool).
    """
    conn: Any = None
    try:
        while True:
            failure = ""
            with anyio.move_on_after(timeout) as scope:
                try:
                    if conn is None or conn.is_closed():
                        conn = await asyncpg.connect(dsn, timeout=timeout)
                    await conn.fetchval("SELECT 1")
                except UNAVAILABLE_ERRORS as exc:
                    failure = describe(exc)
                except asyncpg.PostgresError as exc:  # e.g. the role was dropped: not a stall
                    failure = describe(exc)
                except (asyncpg.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
                    # The probe's own connection is in a state asyncpg refuses (its server went
                    # away mid-query): drop it; the next probe reconnects and decides.
                    failure = describe(exc)
            if scope.cancelled_caught:
                failure = f"no answer within {timeout:g} s"
            if failure:
                if conn is not None:
                    conn.terminate()  # its state is unknown; never wait on it
                    conn = None
                health.mark_down(failure)
            elif not health.up:
                health.mark_up()
                if on_recovered is not None:
                    await on_recovered()
            pause = interval if health.up else interval / 4
            with anyio.move_on_after(pause):
                # A failure seen by the pool wakes the probe, which then confirms or clears it.
                await health.changed.wait()
    finally:
        if conn is not None:
            conn.terminate()
