"""Request deadlines: every request served at the edge is answered within its deadline.

A scope around serving one request (`with RequestDeadline(state, op): ...`; the WebSocket
workers, which serve request after request, keep one scope for many: `SharedDeadlines`): when the
deadline passes, the work under it is cancelled and `Unavailable` is raised with a message naming the
deadline and, when the database is known to be down, why. Writes (`upsert`, `delete`,
`create_collection`, `drop_collection`) get `Limits.write_deadline_s` (`SHOAL_WRITE_DEADLINE_S`),
an upsert `Limits.embed_deadline_per_text_s` (`SHOAL_EMBED_DEADLINE_PER_TEXT_S`) more for each
document the server embeds; everything else `Limits.read_deadline_s` (`SHOAL_READ_DEADLINE_S`).
While the database is known to be down (`Persistence.health`), writes answer `unavailable` at
once instead of queueing.

A write whose deadline passed may still be committed afterwards, if its batch had already
reached the database (the committer finds out whether it did; see `actors/pg_pool.py`); one that
was still queued when its caller gave up is not. Retrying an upsert or delete is safe: both are
idempotent by id.
"""

from __future__ import annotations

import asyncio
import functools
from types import TracebackType

import anyio

from models.config import Limits
from models.errors import Unavailable
from models.requests import Upsert
from server.state import AppState

WRITE_OPS = frozenset({"upsert", "delete", "create_collection", "drop_collection"})
# How late a request's deadline may fire: deadlines are seconds long, this a small part of one.
WATCH_TICK_S = 0.02


def deadline_of(limits: Limits, op: object, request: object = None) -> tuple[float, str]:
    """(seconds, the setting that controls it) for a request of `op` (`request`: the parsed
    request, whose texts to embed extend an upsert's deadline)."""
    if op in WRITE_OPS:
        texts = texts_to_embed(request)
        if texts:
            seconds = limits.write_deadline_s + texts * limits.embed_deadline_per_text_s
            return seconds, "SHOAL_WRITE_DEADLINE_S + SHOAL_EMBED_DEADLINE_PER_TEXT_S per text"
        return limits.write_deadline_s, "SHOAL_WRITE_DEADLINE_S"
    return limits.read_deadline_s, "SHOAL_READ_DEADLINE_S"


def texts_to_embed(request: object) -> int:
    """Documents of an upsert that the server embeds: those without a vector, as ingest picks
    them (validation gave each of them a text)."""
    if not isinstance(request, Upsert):
        return 0
    return sum(1 for doc in request.docs if doc.vector is None)


def refuse_write_while_down(state: AppState, op: object) -> None:
    """Raise Unavailable for a write while the database is known to be down: it would only queue."""
    health = state.engine.database_health
    if op in WRITE_OPS and not health.up:
        raise Unavailable(f"database unavailable ({health.reason}): {op} not attempted, retry later")


def deadline_missed(state: AppState, op: object, seconds: float, setting: str) -> Unavailable:
    """The error a request answers once its deadline has cancelled it."""
    health = state.engine.database_health
    why = f"the database is unavailable ({health.reason})" if not health.up else "the server is busy"
    return Unavailable(f"{op} did not complete within {seconds:g} s ({setting}): {why}")


class RequestDeadline:
    """`with RequestDeadline(state, op, request):` cancels the block at the request's deadline and
    raises Unavailable instead. A write while the database is known to be down raises
    Unavailable at once, without queueing.

    A class rather than a generator, and the event loop's cancel scope made directly: it runs
    for every request, and `anyio.move_on_after` looks the running backend up twice per call.
    The scope has no deadline of its own: `DeadlineWatch` cancels it when its time has come, so
    a request adds a dict entry rather than a timer, which cost more to arm and cancel than the
    rest of the scope (timeit). A task that serves request after request keeps one scope for
    all of them instead: `SharedDeadlines`."""

    __slots__ = ("_op", "_scope", "_seconds", "_setting", "_state", "_watch")

    def __init__(self, state: AppState, op: object, request: object = None) -> None:
        self._state, self._op = state, op
        self._seconds, self._setting = deadline_of(state.settings.limits, op, request)
        self._scope: anyio.CancelScope | None = None
        self._watch: DeadlineWatch | None = None

    def __enter__(self) -> None:
        refuse_write_while_down(self._state, self._op)
        scope = self._scope = _scope_type()()
        scope.__enter__()
        watch = self._watch = _watch()
        watch.add(scope, self._seconds)

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> bool:
        scope, watch = self._scope, self._watch
        assert scope is not None and watch is not None
        watch.discard(scope)
        swallowed = bool(scope.__exit__(kind, error, tb))
        if scope.cancelled_caught:
            raise deadline_missed(self._state, self._op, self._seconds, self._setting)
        return swallowed


class DeadlinePassed(BaseException):
    """A request served under `SharedDeadlines` ran past its deadline: leave the shared scope
    (before anything else awaits: it stays cancelled) and answer `error`. A BaseException, so
    that the `except Exception` turning a request's errors into its reply lets it through."""

    def __init__(self, error: Unavailable) -> None:
        super().__init__(error.message)
        self.error = error


class SharedDeadlines:
    """One cancel scope for the requests a task serves one after another, each under its own
    deadline: `with SharedDeadlines(state) as deadlines:` around the task's loop, and
    `deadlines.arm(op, request)` / `deadlines.disarm()` (in a `finally`) around serving one.

    Entering and leaving an anyio cancel scope costs several times what arming and disarming a
    shared one does (README, "Query path"), and a WebSocket worker serves thousands of requests
    a second; so it keeps one scope until a deadline cancels it. `disarm` raises
    `DeadlinePassed` for a request whose deadline passed, even one that completed meanwhile
    (its result came back after the deadline, from a shielded wait): the scope is cancelled for
    good then, so the caller leaves it, answers the error, and enters a new one."""

    __slots__ = ("_armed", "_scope", "_state", "_watch")

    def __init__(self, state: AppState) -> None:
        self._state = state
        self._scope = _scope_type()()
        self._watch = _watch()
        self._armed: tuple[object, float, str] = ("-", 0.0, "")

    def __enter__(self) -> SharedDeadlines:
        self._scope.__enter__()
        return self

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, tb: TracebackType | None) -> bool:
        self._watch.discard(self._scope)
        return bool(self._scope.__exit__(kind, error, tb))

    def arm(self, op: object, request: object = None) -> None:
        """Start serving one request under its deadline. Raises Unavailable (a write while the
        database is known to be down)."""
        refuse_write_while_down(self._state, op)
        seconds, setting = deadline_of(self._state.settings.limits, op, request)
        self._armed = (op, seconds, setting)
        self._watch.add(self._scope, seconds)

    def disarm(self) -> None:
        """The request is over, however it ended. Raises DeadlinePassed when its deadline
        cancelled it (in a `finally`: in place of whatever the cancellation interrupted)."""
        self._watch.discard(self._scope)
        if self._scope.cancel_called:
            op, seconds, setting = self._armed
            raise DeadlinePassed(deadline_missed(self._state, op, seconds, setting)) from None


class DeadlineWatch:
    """The cancel scopes of the requests being served and when each is due, looked over every
    `tick_s` while any is held: a due scope is cancelled then, at most `tick_s` late."""

    def __init__(self, loop: asyncio.AbstractEventLoop, tick_s: float = WATCH_TICK_S) -> None:
        self._loop = loop
        self._tick = tick_s
        self._due: dict[anyio.CancelScope, float] = {}
        self._timer: asyncio.TimerHandle | None = None

    def add(self, scope: anyio.CancelScope, seconds: float) -> None:
        self._due[scope] = self._loop.time() + seconds
        if self._timer is None:
            self._timer = self._loop.call_later(self._tick, self._sweep)

    def discard(self, scope: anyio.CancelScope) -> None:
        self._due.pop(scope, None)

    def __len__(self) -> int:
        return len(self._due)

    def _sweep(self) -> None:
        self._timer = None
        now = self._loop.time()
        for scope in [scope for scope, due in self._due.items() if due <= now]:
            del self._due[scope]
            scope.cancel()
        if self._due:
            self._timer = self._loop.call_later(self._tick, self._sweep)


_watches: dict[asyncio.AbstractEventLoop, DeadlineWatch] = {}


def _watch() -> DeadlineWatch:
    """The running event loop's watch (the server runs one loop; tests may run several)."""
    loop = asyncio.get_running_loop()
    watch = _watches.get(loop)
    if watch is None:
        for old in [old for old in _watches if old.is_closed()]:
            del _watches[old]
        watch = _watches[loop] = DeadlineWatch(loop)
    return watch


@functools.cache
def _scope_type() -> type[anyio.CancelScope]:
    """The running backend's cancel scope class (the server runs one backend, asyncio), whose
    deadlines are on the event loop's clock."""
    return type(anyio.CancelScope())
