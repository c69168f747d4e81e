"""What every broker source shares: entries, completions, positions and the transport interface.

A source yields batches of `Entry`: an entry id and either a parsed request (`Upsert` or
`Delete` of one document) or the typed error that rejects it. The source actor
(actors/sources/actor.py) commits the requests through ingest, each job carrying a
`SourcePosition`; after the commit it hands the transport the `Completion` of every entry
(published as completion events) and then acknowledges the entries to the broker.

Exactly-once effect: a job's `SourcePosition` moves the source's committed position from `prev`
to `new` in the same PostgreSQL transaction as the job's changes, and only if the stored position
still is `prev` (else the transaction fails with `PositionMoved`). So a job commits only after
every job before it from the same source has committed: the stored position always means "every
entry up to here has its change committed (or was rejected)", whatever the coalescing, the
isolation of failing jobs, or the database outages in between. After a crash, entries the broker
delivers again at or below the stored position are acknowledged and skipped.

The transport (`Transport`) is all a broker needs to provide: Redis Streams ships
(actors/sources/redis_stream.py); a Kafka transport would map `read` to a consumer's poll,
`complete` to producing events and committing offsets, and `order` to (partition, offset).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from enum import StrEnum
from typing import Protocol

from models.errors import ShoalError
from models.requests import Delete, Upsert


class PositionMoved(ShoalError):
    """The stored position of a source is not the one a job was built on: an earlier job of the
    same source has not committed (or a second consumer moved it). The job's transaction is
    rolled back; the source starts over from the stored position. Not an `Unavailable`, so that
    ingest isolates it like any failing job instead of failing the other callers' jobs with it."""

    code, http_status = "unavailable", 503


@dataclass(frozen=True, slots=True)
class SourcePosition:
    """Move source `key`'s committed position from `prev` to `new` (entry ids) with a job."""

    key: str
    prev: str
    new: str


@dataclass(slots=True)  # not frozen: one per entry, and a frozen init costs four times as much
class RawEntry:
    """An entry as the broker delivered it: its id and its fields (names and values as bytes)."""

    id: str
    fields: dict[bytes, bytes]


@dataclass(slots=True)  # not frozen: one per entry, and a frozen init costs four times as much
class Entry:
    """One parsed entry: exactly one of `request` and `error` is set. `collection` and `doc_id`
    are what the entry named (best effort when it is rejected), for its completion event."""

    id: str
    collection: str
    doc_id: str
    request: Upsert | Delete | None
    error: ShoalError | None
    size: int


class Status(StrEnum):
    INDEXED = "indexed"
    REJECTED = "rejected"


@dataclass(slots=True)  # not frozen: one per entry, and a frozen init costs four times as much
class Completion:
    """The outcome of one entry, published after its commit: `seq` is the seq its change took
    (None when it took none), `error` is set when it was rejected."""

    entry: str
    collection: str
    doc_id: str
    status: Status
    seq: int | None = None
    error: ShoalError | None = None
    skipped: bool = False  # delivered again after its commit: nothing applied this time

    def to_fields(self) -> dict[str, str]:
        """The completion event's fields (see PROTOCOL.md, "Broker sources")."""
        event = self.event()
        return dict(zip(event[::2], event[1::2], strict=True))

    def event(self) -> list[str]:
        """The event's field names and values in turn, as XADD takes them."""
        seq = "" if self.seq is None else str(self.seq)
        event = ["entry", self.entry, "collection", self.collection, "id", self.doc_id, "seq", seq]
        event += ["status", self.status.value]
        if self.error is not None:
            event += ["code", self.error.code, "message", self.error.message]
        return event


@dataclass(frozen=True, slots=True)
class SourceInfo:
    """How a source describes itself to operators: `url` never carries credentials."""

    url: str
    stream: str
    group: str
    consumer: str
    notify: str
    default_collection: str | None


class Transport(Protocol):
    """One broker stream read by one consumer of a consumer group.

    Every method may raise `ConnectionError` or `TimeoutError` (or the broker client's own
    connection errors, which `is_outage` recognises): the actor then backs off and starts over.
    """

    key: str  # names the source's position row (stream + group)
    info: SourceInfo
    initial_position: str  # the position before any entry (every entry id is after it)

    def order(self, entry_id: str) -> tuple[int, ...]:
        """A sort key of entry ids in the broker's delivery order."""
        ...

    def is_outage(self, exc: BaseException) -> bool:
        """True when `exc` means the broker is unreachable (retry), not a bug."""
        ...

    async def connect(self) -> None:
        """Connect and make sure the stream and the consumer group exist."""
        ...

    async def claim(self, min_idle_ms: int) -> int:
        """Take over other consumers' pending entries idle for `min_idle_ms` or more; returns how
        many pending entries other consumers still hold (not idle long enough yet)."""
        ...

    async def read_pending(self, after: str, count: int) -> Sequence[RawEntry]:
        """Up to `count` entries delivered to this consumer before and not acknowledged, with ids
        after `after`, in order (empty: none left)."""
        ...

    async def read_new(self, count: int, block_ms: int) -> Sequence[RawEntry]:
        """Up to `count` entries never delivered to the group, waiting up to `block_ms` for one."""
        ...

    async def complete(self, completions: Sequence[Completion], ack: Sequence[str]) -> None:
        """Publish the completion events, then acknowledge the entries `ack`."""
        ...

    async def lag(self) -> int | None:
        """Entries of the stream the group has not read yet (None: unknown)."""
        ...

    async def aclose(self) -> None: ...
