"""The subscriptions actor through its own interface, against a real (embedded) PostgreSQL log:
a full mailbox recovered from the log, and the replay -> live switch, deterministically."""

from __future__ import annotations

import tempfile
from collections.abc import AsyncIterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from actors.catalog import Collection
from actors.ingest import Applied
from actors.matching import StandingQuery
from actors.persistence import Persistence
from actors.pg_server import open_database
from actors.subscriber import ChangeEvent, LeaveEvent, MatchEvent, Subscriber
from actors.subscriptions import SubscriptionConfig, Subscriptions
from models.records import DocId, Document, Metric, Seq, StoredDoc

pytestmark = pytest.mark.timeout(120)

DIM = 4
HOT = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
COLD = np.array([0.0, 1.0, 0.0, 0.0], np.float32)


@pytest.fixture(scope="module")
async def db() -> AsyncIterator[Persistence]:
    with tempfile.TemporaryDirectory(prefix="shoal-test-subs-", dir="/tmp") as tmp:
        async with open_database(Path(tmp), None) as dsn, Persistence(dsn) as persistence:
            yield persistence


class Harness:
    """A collection in PostgreSQL, the actor, and a committer stand-in that publishes like ingest."""

    def __init__(self, db: Persistence, actor: Subscriptions, name: str) -> None:
        self.db = db
        self.actor = actor
        self.collection = Collection(name, DIM, Metric.COSINE, shards=())
        self.matching: list[int] = []
        self.all: list[int] = []

    async def upsert(self, hot: list[bool], publish: bool = True) -> Applied:
        docs = [Document(DocId(f"d{len(self.all) + i}"), None, HOT if h else COLD, {}) for i, h in enumerate(hot)]
        first, last = await self.db.commit_upserts(self.collection.name, docs)
        stored = tuple(
            StoredDoc(d.id, d.text, d.vector, d.metadata, Seq(first + i))  # type: ignore[arg-type]
            for i, d in enumerate(docs)
        )
        self.all.extend(range(first, last + 1))
        self.matching.extend(first + i for i, h in enumerate(hot) if h)
        self.collection.last_seq = last  # set before publishing, as the committer does
        applied = Applied(self.collection.name, stored, ())
        if publish:
            await self.actor.publish(applied)
        return applied

    async def delete(self, ids: list[str]) -> Applied:
        deleted, last = await self.db.commit_delete_ids(self.collection.name, ids)
        first = last - len(deleted) + 1
        self.all.extend(range(first, last + 1))
        self.collection.last_seq = last
        return Applied(self.collection.name, (), tuple((DocId(d), first + i) for i, d in enumerate(deleted)))


async def collect(actor: Subscriptions, sub: Subscriber, count: int) -> list[int]:
    """Seqs of `count` items (ids of change events expanded), consuming as a consumer would."""
    seqs: list[int] = []
    with anyio.fail_after(30):
        while sub.replaying:
            for event in await actor.replay_page(sub):
                if not isinstance(event, LeaveEvent):  # leaves are checked in test_live_leave.py
                    seqs.extend(_seqs(event))
        sub.go_live()
        while len(seqs) < count:
            await sub.wait()
            for item in sub.take(100):
                if isinstance(item, LeaveEvent):
                    continue
                assert isinstance(item, MatchEvent | ChangeEvent), item
                seqs.extend(_seqs(item))
    return seqs


def _seqs(event: MatchEvent | ChangeEvent) -> list[int]:
    if isinstance(event, MatchEvent):
        return [event.seq]
    return list(range(event.first_seq, event.seq + 1))


async def test_a_full_mailbox_is_recovered_from_the_log(db: Persistence) -> None:
    name = "mailbox"
    await db.create_collection(name, DIM, Metric.COSINE)
    actor = Subscriptions(db, SubscriptionConfig(sub_mailbox=1, replay_page=7))
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        h = Harness(db, actor, name)
        await h.upsert([True])  # before anyone listens: not delivered
        match = actor.register(h.collection, StandingQuery(HOT, 0.9, None, None))
        feed = actor.register(h.collection, None, close_on_overflow=True)
        applied = [await h.upsert([True, False, n % 2 == 0, True], publish=False) for n in range(6)]
        applied.append(await h.delete(["d1", "d2"]))
        applied += [await h.upsert([n == 1, True], publish=False) for n in range(3)]
        # Published back to back with nothing in between that lets the actor run: the first is
        # queued, the rest find the mailbox full and are left for the actor to read from the log.
        for batch in applied:
            await actor.publish(batch)
        # (one may go straight to the waiting actor, one into the mailbox)
        assert actor.stats().mailbox_overflows >= len(applied) - 2
        expected_matches = h.matching[1:]
        expected_all = h.all[1:]
        got_matches = await collect(actor, match, len(expected_matches))
        got_all = await collect(actor, feed, len(expected_all))
        assert got_matches == expected_matches
        assert got_all == expected_all
        assert actor.stats().catch_ups >= 1
        actor.close()


async def test_replay_then_live_has_no_gap_and_no_duplicate(db: Persistence) -> None:
    name = "switch"
    await db.create_collection(name, DIM, Metric.COSINE)
    actor = Subscriptions(db, SubscriptionConfig(replay_page=3))
    async with anyio.create_task_group() as tg:
        await tg.start(actor.run)
        h = Harness(db, actor, name)
        for _ in range(4):
            await h.upsert([True, False, True])
        # A batch committed and published but not yet handled by the actor when the resuming
        # subscriber registers: its seqs are <= S, so it must come from the replay, not live.
        pending = await h.upsert([True, True], publish=False)
        sub = actor.register(h.collection, StandingQuery(HOT, 0.9, None, None), after_seq=2)
        await actor.publish(pending)
        assert sub.replaying and sub.replay_until == h.collection.last_seq
        for _ in range(3):  # live while the consumer has not even started replaying
            await h.upsert([True, False])
        await anyio.sleep(0.1)
        expected = [s for s in h.matching if s > 2]
        got = await collect(actor, sub, len(expected))
        assert got == expected
        await anyio.sleep(0.1)
        assert sub.take(10) == []
        actor.close()
