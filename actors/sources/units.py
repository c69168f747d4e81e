"""The pieces a source actor's pipeline moves: units of entries, the in-flight window, and how
entries join a job."""

from __future__ import annotations

import contextlib
from dataclasses import dataclass, field

import anyio

from actors.mailbox import Reply
from actors.sources.base import Completion, Entry, SourcePosition
from models import requests as rq
from models.errors import ShoalError


@dataclass(slots=True)
class Unit:
    """Entries committed as one ingest job (same op and collection), or, with no `position`,
    entries already done (rejected or skipped) whose completions only need publishing."""

    entries: list[Entry]
    completions: list[Completion] = field(default_factory=list)
    position: SourcePosition | None = None
    reply: Reply[tuple[int, int]] | None = None


class Isolate(Exception):
    """A job failed for a reason of its own: retry its entries one by one up to `through`."""

    def __init__(self, through: str, cause: ShoalError) -> None:
        super().__init__(cause.message)
        self.through = through
        self.cause = cause


class Window:
    """Entries between their read and their acknowledgement, bounded."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._freed = anyio.Event()

    async def wait_room(self) -> int:
        while self.used >= self.limit:
            await self._freed.wait()
        return self.limit - self.used

    def take(self, n: int) -> None:
        self.used += n

    def release(self, n: int) -> None:
        self.used -= n
        self._freed.set()
        self._freed = anyio.Event()


def unit_size(unit: Unit) -> int:
    """The entries a unit accounts for in the in-flight window."""
    return len(unit.entries) if unit.position is not None else len(unit.completions)


def fits(job: Unit, entry: Entry, most: int) -> bool:
    first = job.entries[0].request
    request = entry.request
    if len(job.entries) >= most or first is None or request is None:
        return False
    if type(first) is not type(request) or first.collection != request.collection:
        return False
    if isinstance(request, rq.Delete):
        return all(e.doc_id != entry.doc_id for e in job.entries)  # one seq per deleted id
    return True


async def settle(unit: Unit) -> None:
    """Wait for a unit's job to finish without acting on it (a session is ending)."""
    if unit.reply is not None:
        with contextlib.suppress(Exception):  # the next session starts from the committed position
            await unit.reply.wait()
