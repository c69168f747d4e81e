"""Request deadlines: every request served at the edge is answered within its deadline.

A scope around serving one request (`with request_deadline(state, op): ...`): when the deadline
passes, the work under it is cancelled and `Unavailable` is raised with a message naming the
deadline and, when the database is known to be down, why. Writes (`upsert`, `delete`,
`create_collection`, `drop_collection`) get `Limits.write_deadline_s` (`SHOAL_WRITE_DEADLINE_S`);
everything else `Limits.read_deadline_s` (`SHOAL_READ_DEADLINE_S`). While the database is known
to be down (`Persistence.health`), writes answer `unavailable` at once instead of queueing.

A write whose deadline passed may still be committed afterwards, if its batch had already
reached the database (the committer finds out whether it did; see `actors/pg_pool.py`); one that
was still queued when its caller gave up is not. Retrying an upsert or delete is safe: both are
idempotent by id.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import anyio

from models.config import Limits
from models.errors import Unavailable
from server.state import AppState

WRITE_OPS = frozenset({"upsert", "delete", "create_collection", "drop_collection"})


def deadline_of(limits: Limits, op: object) -> tuple[float, str]:
    """(seconds, the setting that controls it) for a request of `op`."""
    if op in WRITE_OPS:
        return limits.write_deadline_s, "SHOAL_WRITE_DEADLINE_S"
    return limits.read_deadline_s, "SHOAL_READ_DEADLINE_S"


@contextmanager
def request_deadline(state: AppState, op: object) -> Iterator[None]:
    """Cancel the block at the request's deadline and raise Unavailable instead. A write while
    the database is known to be down raises Unavailable at once, without queueing."""
    seconds, setting = deadline_of(state.settings.limits, op)
    health = state.engine.persistence.health
    if op in WRITE_OPS and not health.up:
        raise Unavailable(f"database unavailable ({health.reason}): {op} not attempted, retry later")
    with anyio.move_on_after(seconds) as scope:
        yield
    if scope.cancelled_caught:
        why = f"the database is unavailable ({health.reason})" if not health.up else "the server is busy"
        raise Unavailable(f"{op} did not complete within {seconds:g} s ({setting}): {why}")
