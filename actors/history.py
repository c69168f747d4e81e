"""Changes with the version each one replaced: what `leave` events are computed from.

Live, the applier reads the replaced versions from the shards before applying a run and carries
them in `Applied.previous`. From the durable log (a resume's replay, or a gap the subscriptions
actor fills) the version an id had before a page of changes is its last logged change at or
below the page's start (`Persistence.versions_at`); within the page, each change replaces the one
before it. When that change was compacted away the version is unknown, and the page raises
`Gone`, as a resume before the log's floor does.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from models.errors import Gone
from models.records import Change, DocId, Seq, StoredDoc


@dataclass(frozen=True, slots=True)
class LiveChange:
    """One applied change: `new` is the upserted version (None: deleted), `old` the version it
    replaced (None: the id did not exist)."""

    seq: int
    id: DocId
    new: StoredDoc | None
    old: StoredDoc | None


class VersionReader(Protocol):
    async def versions_at(self, name: str, ids: Sequence[str], seq: int) -> tuple[dict[str, Change], int]: ...


def as_doc(change: Change) -> StoredDoc | None:
    """The version a logged change leaves (None for a delete)."""
    if change.op != "upsert" or change.vector is None:
        return None
    return StoredDoc(change.doc_id, change.text, change.vector, change.metadata or {}, Seq(change.seq))


def pair_up(
    changes: Sequence[tuple[int, DocId, StoredDoc | None]], before: dict[DocId, StoredDoc | None]
) -> list[LiveChange]:
    """(seq, id, new) in seq order as LiveChanges, given each id's version before the first."""
    current = dict(before)
    out: list[LiveChange] = []
    for seq, doc_id, new in changes:
        out.append(LiveChange(seq, doc_id, new, current.get(doc_id)))
        current[doc_id] = new
    return out


async def with_previous(reader: VersionReader, name: str, changes: Sequence[Change], after: int) -> list[LiveChange]:
    """A log page (seqs > `after`, in order) as LiveChanges. Raises Gone when the version some id
    had at `after` was compacted away, NotFound and Unavailable."""
    if not changes:
        return []
    ids = list(dict.fromkeys(c.doc_id for c in changes))
    found, floor = await reader.versions_at(name, ids, after)
    if floor > after:
        raise Gone(
            f"collection {name!r}: the changes after seq {after} were compacted (the log starts after seq {floor})"
        )
    before: dict[DocId, StoredDoc | None] = {}
    for doc_id in ids:
        last = found.get(doc_id)
        if last is None and floor > 0:
            raise Gone(
                f"collection {name!r}: the version of {doc_id!r} before seq {after + 1} was compacted away; "
                "subscribe again without after_seq / Last-Event-ID and reload what you need"
            )
        before[DocId(doc_id)] = None if last is None else as_doc(last)
    return pair_up([(int(c.seq), c.doc_id, as_doc(c)) for c in changes], before)
