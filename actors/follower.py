"""The log follower: brings every change committed by any node to this node's appliers.

    LISTEN shoal_changes (dedicated connection) --hint--> wake --> sync: read the shared catalog
        (one query: every collection's id and last committed seq) --> create / drop collections
        here to match --> each collection behind: applier.catch_up(last committed seq)

The notifications are only a wake-up hint. Several are coalesced into one step; one sent by this
node's own pooled connections (its committer applies those itself) or for a seq applied already
wakes nothing; one for a known collection is followed by reading that collection's log alone. A
lost one costs latency, never data: a full sync also runs every `poll_s` seconds, and the catalog
query, not the notification, says what is committed. The listening connection is re-established
after it is lost (an outage, a restart of the database); each new one starts with a full sync,
which covers what was missed meanwhile. Create and drop are followed through the catalog rows
themselves: a row id names one incarnation of a collection and is never reused.

`sync()` is also the start-up catch-up: `run()` reports started only after a first sync, so the
node is not ready before it has applied what was committed while it was down.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import anyio
import asyncpg
from anyio.abc import TaskStatus

from actors.catalog import Catalog, Collection
from actors.db_health import UNAVAILABLE_ERRORS, describe
from actors.persistence import CatalogRow, Persistence
from actors.schema import CHANGES_CHANNEL
from models.errors import Gone, NotFound, ShoalError

log = logging.getLogger("shoal.follower")

# A wake-up waits this long for more notifications before it syncs, so that a burst of commits
# (a batch a millisecond under load) costs one sync.
COALESCE_S = 0.002

Loader = Callable[[CatalogRow], Awaitable[Collection]]


@dataclass(frozen=True, slots=True)
class FollowerStats:
    """What `/metrics` shows of the follower. `lag` is, per collection, the highest seq known to
    be committed (by the last catalog read or a notification since) minus the seq applied here."""

    listening: bool
    syncs: int
    catch_ups: int
    reconnects: int
    seconds_since_sync: float | None
    lag: dict[str, int]


class Follower:
    """Follows the shared change log for this node. Start `run()` in a task group; `close()`."""

    def __init__(
        self,
        dsn: str,
        persistence: Persistence,
        catalog: Catalog,
        create: Loader,
        *,
        poll_s: float = 1.0,
        connect_timeout: float = 5.0,
    ) -> None:
        self._dsn = dsn
        self._persistence = persistence
        self._catalog = catalog
        self._create = create
        self._poll_s = max(0.01, poll_s)
        self._connect_timeout = connect_timeout
        self._wake = anyio.Event()
        self._hinted: dict[str, int] = {}  # collection -> highest seq announced, not yet synced
        self._full = True  # the next sync looks at every collection whatever the hints say
        self._closed = False
        self.listening = False
        self.syncs = 0
        self.catch_ups = 0  # collections brought up to a seq committed elsewhere
        self.reconnects = 0  # LISTEN connections lost and opened again
        self.last_sync = 0.0  # monotonic time of the last successful sync
        self._committed: dict[str, int] = {}  # collection -> highest seq known committed

    # -- life cycle ---------------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Listen, catch up once (then report started), then follow until `close()`."""
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._listen)
            await self.sync()
            task_status.started()
            while not self._closed:
                with anyio.move_on_after(self._poll_s) as poll:
                    await self._wake.wait()
                if self._closed:
                    break
                if poll.cancelled_caught:
                    self._full = True
                else:
                    await anyio.sleep(COALESCE_S)
                self._wake = anyio.Event()
                if not self._full and not self._behind():
                    continue
                try:
                    if not self._full and await self._follow_hints():
                        continue
                    await self.sync()
                except ShoalError as exc:  # the database is unreachable: the next round retries
                    log.info("following the log: %s", exc)
                    self._full = True
                except Exception:  # a bug must not stop the node: log it, retry at the next poll
                    log.exception("following the log failed")
                    self._full = True
                    await anyio.sleep(self._poll_s)
            tg.cancel_scope.cancel()

    def close(self) -> None:
        self._closed = True
        self._wake.set()

    def wake(self, name: str | None = None) -> None:
        """Sync soon (a reader waits for a seq this node has not applied: don't wait for the poll)."""
        if name is None:
            self._full = True
        else:
            self._hinted.setdefault(name, 0)
            self._full = True
        self._wake.set()

    def stats(self) -> FollowerStats:
        lag = {}
        for collection in self._catalog.all():
            committed = self._committed.get(collection.name, 0)
            lag[collection.name] = max(0, committed - collection.last_seq)
        since = time.monotonic() - self.last_sync if self.syncs else None
        return FollowerStats(self.listening, self.syncs, self.catch_ups, self.reconnects, since, lag)

    # -- following ----------------------------------------------------------------------------

    async def sync(self) -> None:
        """Make this node's collections match the shared catalog and apply every change committed
        through its last seqs. Raises Unavailable."""
        self._full = False
        self._hinted.clear()
        # Only collections listed before the read can have been dropped: one this node creates
        # meanwhile is missing from the rows because they were read before its commit.
        listed = self._catalog.all()
        rows = await self._persistence.catalog_rows()
        by_name = {row.name: row for row in rows}
        self._committed = {row.name: max(row.last_seq, self._committed.get(row.name, 0)) for row in rows}
        for collection in listed:
            row = by_name.get(collection.name)
            if row is None or (collection.cid and row.cid != collection.cid):
                log.info("collection %s was dropped on another node", collection.name)
                await self._catalog.remove(collection.name, collection.cid)
        for row in rows:
            here = self._catalog.find(row.name)
            try:
                if here is None or (here.cid and here.cid != row.cid):
                    here = await self._create(row)
                    log.info("collection %s followed: created on another node", row.name)
                if here.last_seq < row.last_seq:
                    self.catch_ups += 1
                    try:
                        await here.applier.catch_up(row.last_seq)
                    except Gone:
                        # Away longer than the node expiry: the log it needs was compacted.
                        log.warning(
                            "collection %s: the log after seq %d was compacted; reloading it from the database",
                            row.name,
                            here.last_seq,
                        )
                        await self._catalog.remove(here.name, here.cid)
                        await self._create(row)
            except NotFound:
                self._full = True  # dropped while we read it: the next sync removes it
        self.syncs += 1
        self.last_sync = time.monotonic()

    async def _follow_hints(self) -> bool:
        """Catch up the collections the notifications named, through the seqs they announced,
        without reading the catalog. False if a hint needs a full sync (a create or drop, or a
        collection not known here)."""
        hints, self._hinted = self._hinted, {}
        targets: list[tuple[Collection, int]] = []
        for name, seq in hints.items():
            collection = self._catalog.find(name)
            if seq <= 0 or collection is None:
                return False
            targets.append((collection, seq))
        try:
            for collection, seq in targets:
                self.catch_ups += 1
                await collection.applier.catch_up(seq)
        except (NotFound, Gone):  # a full sync removes it, or reloads it past the compacted log
            return False
        return True

    def _behind(self) -> bool:
        """True if a hinted seq is beyond what this node has applied."""
        for name, seq in self._hinted.items():
            collection = self._catalog.find(name)
            if seq == 0 or collection is None or collection.last_seq < seq:
                return True
        self._hinted.clear()
        return False

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        seq_text, _, name = payload.partition(":")
        try:
            seq = int(seq_text)
        except ValueError:
            return
        if seq > 0 and self._persistence.is_own_backend(pid):
            return  # this node's own commit: its committer hands it to the applier
        collection = self._catalog.find(name)
        if seq > 0 and collection is not None and collection.last_seq >= seq:
            return  # applied here already (this node's own commit, mostly)
        if seq > self._committed.get(name, 0):
            self._committed[name] = seq
        if seq > self._hinted.get(name, -1):
            self._hinted[name] = seq
        self._wake.set()

    async def _listen(self) -> None:
        """Keep a LISTEN connection open; after every (re)connect, ask for a full sync."""
        pause = 0.1
        while not self._closed:
            conn: Any = None
            lost = anyio.Event()
            try:
                conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
                conn.add_termination_listener(lambda _c, ended=lost: ended.set())
                await conn.add_listener(CHANGES_CHANNEL, self._on_notify)
                self.listening = True
                pause = 0.1
                self.wake()  # whatever was committed while not listening
                while not lost.is_set() and not conn.is_closed():
                    with anyio.move_on_after(max(self._poll_s, 1.0) * 5):
                        await lost.wait()
                    if not lost.is_set():
                        # A connection to a stalled or vanished server may never say it is gone.
                        with anyio.fail_after(self._connect_timeout):
                            await conn.fetchval("SELECT 1")
            except (*UNAVAILABLE_ERRORS, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
                log.info("change notifications lost (%s); reconnecting", describe(exc))
                self.reconnects += 1
            finally:
                self.listening = False
                if conn is not None:
                    conn.terminate()
            if self._closed:
                return
            with anyio.move_on_after(pause):
                await self._persistence.health.changed.wait()  # back up: try at once
            pause = min(pause * 2, 2.0)
