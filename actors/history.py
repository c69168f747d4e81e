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
    # False when the replaced version was compacted out of the log: `old` is then None, and
    # whether the document matched before is unknown.
    old_known: bool = True


class VersionReader(Protocol):
    async def versions_at(self, name: str, ids: Sequence[str], seq: int) -> tuple[dict[str, Change], int]: ...


def as_doc(change: Change) -> StoredDoc | None:
    """The version a logged change leaves (None for a delete)."""
    if change.op != "upsert" or change.vector is None:
        return None
    return StoredDoc(change.doc_id, change.text, change.vector, change.metadata or {}, Seq(change.seq))


def pair_up(
    changes: Sequence[tuple[int, DocId, StoredDoc | None]],
    before: dict[DocId, StoredDoc | None],
    unknown: frozenset[DocId] = frozenset(),
) -> list[LiveChange]:
    """(seq, id, new) in seq order as LiveChanges, given each id's version before the first
    (`unknown`: ids whose version before the first is not known)."""
    current = dict(before)
    seen: set[DocId] = set()
    out: list[LiveChange] = []
    for seq, doc_id, new in changes:
        known = doc_id in seen or doc_id not in unknown
        out.append(LiveChange(seq, doc_id, new, current.get(doc_id), known))
        current[doc_id] = new
        seen.add(doc_id)
    return out


async def with_previous(reader: VersionReader, name: str, changes: Sequence[Change], after: int) -> list[LiveChange]:
    """A log page (seqs > `after`, in order) as LiveChanges. An id with no logged change at or
    below `after` above a raised log floor may have last changed before the floor: its first
    change here has `old_known` False (the caller decides whether that matters). Raises Gone
    when the page itself starts before the floor, NotFound and Unavailable."""
    if not changes:
        return []
    ids = list(dict.fromkeys(c.doc_id for c in changes))
    found, floor = await reader.versions_at(name, ids, after)
    if floor > after:
        raise Gone(
            f"collection {name!r}: the changes after seq {after} were compacted (the log starts after seq {floor})"
        )
    before: dict[DocId, StoredDoc | None] = {}
    unknown: set[DocId] = set()
    for doc_id in ids:
        last = found.get(doc_id)
        if last is None and floor > 0:
            unknown.add(DocId(doc_id))
        before[DocId(doc_id)] = None if last is None else as_doc(last)
    return pair_up([(int(c.seq), c.doc_id, as_doc(c)) for c in changes], before, frozenset(unknown))


def compacted_history(name: str, change: LiveChange) -> Gone:
    """The error of a replay whose leave at `change` depends on a compacted version."""
    return Gone(
        f"collection {name!r}: whether {change.id!r} matched before seq {change.seq} is in the compacted "
        "part of the log; subscribe again without after_seq / Last-Event-ID and reload what you need"
    )
