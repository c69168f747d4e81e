"""Log compaction: the change log keeps what some node or resumable subscription may still need.

Every `compact_interval_s` each node (1) reports its applied seq per collection in one UPSERT
into `shoal_node_seqs` (the heartbeat; off the write path), then (2) for each collection deletes,
in steps of at most `compact_batch` rows, the log rows at or below

    horizon = min(every node seen within node_expiry_s: its applied seq,
                  the collection's last seq - log_retention_changes)

and raises the collection's `log_floor` to the horizon in the same transaction. Every node runs
this; the DELETE is idempotent and the floor only rises, so two nodes compacting at once agree.
A resume (`after_seq`, `Last-Event-ID`) below the floor answers `gone`; a snapshot older than the
floor fails its log-tail check and the collection is rebuilt from the docs table; a node that
was away longer than the expiry (so its seq no longer held the log) finds a gap and reloads the
collection from the docs table (see `Follower`).
"""

from __future__ import annotations

import logging
import uuid

import anyio
from anyio.abc import TaskStatus

from actors.catalog import Catalog
from actors.persistence import Persistence
from models.config import EngineConfig
from models.errors import ShoalError

log = logging.getLogger("shoal.compactor")

# Log rows this process has compacted away (all collections), for /metrics.
_compacted = {"rows": 0}


def compacted_rows() -> int:
    """Log rows this process has deleted by compaction since it started."""
    return _compacted["rows"]


class Compactor:
    """Heartbeat and log compaction of one node. Start `run()` in a task group; `close()`."""

    def __init__(self, catalog: Catalog, persistence: Persistence, config: EngineConfig) -> None:
        self._catalog = catalog
        self._persistence = persistence
        self._config = config
        # A new id per process start: a restarted node reports afresh, its old rows expire.
        self.node = uuid.uuid4().hex
        self.deleted = 0  # log rows this node has compacted away
        self._stop = anyio.Event()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Report (and compact) every interval until `close()`."""
        task_status.started()
        while not self._stop.is_set():
            try:
                await self.step()
            except ShoalError as exc:  # the database is unreachable: try again next interval
                log.warning("log compaction skipped: %s", exc)
            except Exception:  # never fatal: the log only grows until the next pass
                log.exception("log compaction failed; trying again after the interval")
            with anyio.move_on_after(self._config.compact_interval_s):
                await self._stop.wait()

    def close(self) -> None:
        self._stop.set()

    async def step(self) -> None:
        """One heartbeat, then compaction of every collection (when enabled). Raises Unavailable."""
        collections = [c for c in self._catalog.all() if c.cid]
        expiry = self._config.node_expiry_s
        await self._persistence.heartbeat(self.node, [(c.cid, c.last_seq) for c in collections], expiry)
        if not self._config.log_compaction:
            return
        for collection in collections:
            while not self._stop.is_set():
                n = await self._persistence.compact_log(
                    collection.cid, self._config.log_retention_changes, expiry, self._config.compact_batch
                )
                if n == 0:
                    break
                self.deleted += n
                _compacted["rows"] += n
                log.debug("collection %s: %d log rows compacted", collection.name, n)
