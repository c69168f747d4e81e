"""Durable storage of collections in PostgreSQL + pgvector: the change log is the source of truth.

Schema (DDL in `actors/schema.py`)
----------------------------------
- `shoal_collections`: one catalog row per collection: name, dim, metric, `last_seq` (the last
  seq handed out) and `doc_count` (live documents, kept exact in the write transactions so that
  listing collections never scans a table), and `log_floor` (the highest seq compacted away).
- `shoal_node_seqs`: each running node's applied seq per collection (see `actors/compactor.py`).
- Per collection, two tables named from the catalog's integer id, never from user text:
  `shoal_log_<id>` (seq PK, op, doc_id, text, vector, metadata) holds every change after
  `log_floor` with the full content of each upsert; `shoal_docs_<id>` (id PK, seq, text, vector, metadata) is the live
  state, the log folded by id. Subscriptions replay old changes from the log with documents as
  they were at that seq; start-up and delete-by-filter read the docs table.
  One table pair per collection (rather than shared tables keyed by collection) keeps every index
  small and per-collection, makes drop a cheap DROP TABLE, and lets `vector(dim)` check the width.
- `toast_tuple_target = 4080` on both tables: by default PostgreSQL moves wide values to TOAST
  once a row passes ~2 KB, and a 384-d vector alone is 1,544 bytes; rows up to 4 KB now stay
  inline (an extra TOAST heap + index write per row saved), longer texts are still compressed.

Write path
----------
One transaction per batch. `UPDATE shoal_collections SET last_seq = last_seq + n ... RETURNING`
allocates n consecutive seqs; the row lock it takes is held to commit, so writers of a collection
are serialised and seq order is commit order (across processes too). The log rows go in with a
binary COPY, then one `INSERT ... SELECT DISTINCT ON (doc_id) ... ON CONFLICT DO UPDATE` folds
them into the docs table (the last change of an id within the batch wins). Deletes lock the same
catalog row first, so every writer takes locks in the same order and none can deadlock another.
Vectors and metadata are encoded before the lock is taken, to keep the critical section short.

`python -m load.persist_bench` compares this with the single-statement `INSERT ... SELECT FROM
unnest(...)` alternative, which was slower in every run (README, "Persistence figures").

Errors and faults
-----------------
All SQL runs through `DatabasePool` (`actors/pg_pool.py`): a database that cannot be reached or
does not answer within `command_timeout` raises `Unavailable` (writes fail fast while the
database is known to be down), and a commit cut off mid-COMMIT is resolved, never left in doubt.
A document PostgreSQL rejects as data (sqlstate class 22, e.g. a NUL character in text) raises
`BadRequest`. Otherwise asyncpg's `InterfaceError` (misuse of the client) and any other
`PostgresError` propagate unchanged: they are bugs, not conditions.
"""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncGenerator, Sequence
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Generic, Self, TypeVar, Unpack

import anyio
import anyio.abc
import asyncpg

from actors.db_health import DatabaseHealth
from actors.pg_codecs import (
    ENCODE_INLINE_MAX,
    encode_batch,
    row_to_change,
    row_to_info,
    row_to_stored,
    stored_spec,
)
from actors.pg_pool import DatabasePool, PoolTimeouts, redact
from actors.schema import (
    CHANGES_CHANNEL,
    LOG_COLUMNS,
    SOURCE_POSITION_ADVANCE,
    SOURCE_POSITION_INIT,
    SOURCE_POSITION_READ,
    Tables,
)
from actors.sources.base import PositionMoved, SourcePosition
from models.errors import BadRequest, DimensionMismatch, Exists, Gone, NotFound
from models.filters import Filter, TextFilter, text_to_sql, to_sql
from models.index_spec import IndexSpec, default_spec
from models.records import Change, CollectionInfo, Document, Metric, StoredDoc

B = TypeVar("B")  # what one batch of a _Batches iterator holds

log = logging.getLogger(__name__)


def _gone(name: str, after_seq: int, floor: int) -> Gone:
    return Gone(
        f"collection {name!r}: the changes after seq {after_seq} were compacted (the log starts after"
        f" seq {floor}); subscribe again without after_seq / Last-Event-ID and reload what you need"
    )


def _bad_data(exc: BaseException) -> BadRequest:
    message = getattr(exc, "message", None) or "invalid data"
    return BadRequest(f"document rejected by the database: {message}")


_LOOKUP = "SELECT id, dim, last_seq FROM shoal_collections WHERE name = $1"
_LOCK = "SELECT id, dim, last_seq FROM shoal_collections WHERE name = $1 FOR UPDATE"
# Each seq allocation also queues the change-log notification (`<last seq>:<name>` on
# CHANGES_CHANNEL) in the same statement: PostgreSQL delivers it at commit, and only then, so the
# hint to the other nodes costs no extra round trip on the write path.
_NOTIFY_ROW = f"pg_notify('{CHANGES_CHANNEL}', last_seq::text || ':' || name)"
_ALLOCATE = (
    f"UPDATE shoal_collections SET last_seq = last_seq + $2 WHERE name = $1 RETURNING id, dim, last_seq, {_NOTIFY_ROW}"
)
_ALLOCATE_DELETES = (
    "UPDATE shoal_collections SET last_seq = last_seq + $2, doc_count = doc_count - $2 "
    f"WHERE id = $1 RETURNING last_seq, {_NOTIFY_ROW}"
)
# Create and drop: seq 0 in the payload says "the catalog changed".
_NOTIFY_CATALOG = f"SELECT pg_notify('{CHANGES_CHANNEL}', '0:' || $1::text)"
_FLOOR = "SELECT log_floor FROM shoal_collections WHERE id = $1"
_CATALOG_ROWS = "SELECT name, id, dim, metric, last_seq, index_spec FROM shoal_collections ORDER BY name"


@dataclass(frozen=True, slots=True)
class CatalogRow:
    """A collection as the shared catalog has it: `cid` names one incarnation (ids are never
    reused), `last_seq` is its last committed seq."""

    name: str
    cid: int
    dim: int
    metric: Metric
    last_seq: int
    # The collection's index; a row from before index kinds reads as its metric's default.
    index: IndexSpec | None = None


class Persistence:
    """The collections' SQL over one `DatabasePool`. Use as `async with Persistence(dsn) as db:`,
    or start `run()` in a task group (it reports started once the schema is ready, then keeps
    `health` current with a background probe) and call `close()`.

    Methods are safe to call concurrently; the pool bounds the parallelism (`pool_size`).
    Every method may raise `Unavailable` when the database cannot be reached; `open()` raises
    `StartupError` when it cannot be reached or used at all.
    """

    def __init__(self, dsn: str, pool_size: int = 8, **timeouts: Unpack[PoolTimeouts]) -> None:
        self._db = DatabasePool(dsn, pool_size, **timeouts)
        self._dsn = dsn
        self._stop: anyio.Event | None = None
        self._stop_requested = False

    @property
    def health(self) -> DatabaseHealth:
        """What the node believes about the database now; reading it never waits."""
        return self._db.health

    def is_own_backend(self, pid: int) -> bool:
        """True if `pid` is the server process of one of this node's pooled connections."""
        return pid in self._db.own_backends

    @property
    def where(self) -> str:
        """The database's dsn without its password."""
        return redact(self._dsn)

    # --- life cycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Check pgvector, create the schema, open the pool. Raises StartupError."""
        await self._db.open()

    async def aclose(self) -> None:
        """Close the pool: in-flight calls finish (up to close_timeout), then connections drop."""
        await self._db.aclose()

    async def run(self, *, task_status: anyio.abc.TaskStatus[Persistence] = anyio.TASK_STATUS_IGNORED) -> None:
        """Open, report started, probe the database until `close()`, then close the pool."""
        self._stop = anyio.Event()
        if self._stop_requested:
            self._stop.set()
        await self.open()
        try:
            async with anyio.create_task_group() as tg:
                tg.start_soon(self._db.probe)
                task_status.started(self)
                await self._stop.wait()
                tg.cancel_scope.cancel()
        finally:
            await self.aclose()

    def close(self) -> None:
        """Ask `run()` to finish (idempotent)."""
        self._stop_requested = True
        self.begin_shutdown()
        if self._stop is not None:
            self._stop.set()

    def begin_shutdown(self) -> None:
        """The node is stopping: a writer waiting to learn an in-doubt commit's outcome gives up."""
        self._db.begin_shutdown()

    async def __aenter__(self) -> Persistence:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    def _connection(self, timeout: float | None = -1.0) -> AbstractAsyncContextManager[Any]:
        return self._db.connection(timeout)

    async def ping(self) -> bool:
        """True if the database answers a query now (within `command_timeout`); updates `health`."""
        return await self._db.ping()

    # --- collections ---------------------------------------------------------------------------

    async def create_collection(
        self, name: str, dim: int, metric: Metric, index: IndexSpec | None = None
    ) -> CollectionInfo:
        """Create the catalog row and the collection's tables. Raises Exists, BadRequest."""
        info, _ = await self.create_collection_row(name, dim, metric, index)
        return info

    async def create_collection_row(
        self, name: str, dim: int, metric: Metric, index: IndexSpec | None = None
    ) -> tuple[CollectionInfo, int]:
        """`create_collection`, also returning the new catalog row's id. Raises Exists, BadRequest."""
        metric = Metric(metric)
        if not 1 <= dim <= 16_000:
            raise BadRequest("dim must be between 1 and 16000")

        async def body(conn: Any) -> tuple[CollectionInfo, int]:
            cid = await conn.fetchval(
                "INSERT INTO shoal_collections (name, dim, metric, index_spec) VALUES ($1, $2, $3, $4) "
                "ON CONFLICT (name) DO NOTHING RETURNING id",
                name,
                dim,
                metric.value,
                None if index is None else json.dumps(index.to_wire(), sort_keys=True),
            )
            if cid is None:
                raise Exists(f"collection {name!r} already exists")
            for ddl in Tables(cid).create_ddl(dim):
                await conn.execute(ddl)
            await conn.execute(_NOTIFY_CATALOG, name)
            shown = (index if index is not None else default_spec(metric)).to_wire()
            return CollectionInfo(name, dim, metric, 0, shown), int(cid)

        return await self._db.write(body)

    async def drop_collection(self, name: str) -> None:
        """Drop the catalog row and the tables; waits for in-flight writes. Raises NotFound."""

        async def body(conn: Any) -> None:
            cid = await conn.fetchval("DELETE FROM shoal_collections WHERE name = $1 RETURNING id", name)
            if cid is None:
                raise NotFound(f"no collection {name!r}")
            await conn.execute(Tables(cid).drop_ddl())
            await conn.execute(_NOTIFY_CATALOG, name)

        await self._db.write(body)

    async def list_collections(self) -> list[CollectionInfo]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT name, dim, metric, doc_count, index_spec FROM shoal_collections ORDER BY name"
            )
        return [row_to_info(row) for row in rows]

    async def get_collection(self, name: str) -> CollectionInfo:
        """Raises NotFound."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT name, dim, metric, doc_count, index_spec FROM shoal_collections WHERE name = $1", name
            )
        if row is None:
            raise NotFound(f"no collection {name!r}")
        return row_to_info(row)

    async def catalog_rows(self) -> list[CatalogRow]:
        """Every collection of the shared catalog with its last committed seq (one query)."""
        async with self._connection() as conn:
            rows = await conn.fetch(_CATALOG_ROWS)
        return [
            CatalogRow(
                r["name"],
                int(r["id"]),
                int(r["dim"]),
                Metric(r["metric"]),
                int(r["last_seq"]),
                stored_spec(r) or default_spec(Metric(r["metric"])),
            )
            for r in rows
        ]

    async def last_seq(self, name: str) -> int:
        """The collection's last committed seq (0 before the first change). Raises NotFound."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_LOOKUP, name)
        if row is None:
            raise NotFound(f"no collection {name!r}")
        return int(row["last_seq"])

    def pool_stats(self) -> tuple[int, int, int, int] | None:
        """(connections in use, idle, the pool's bound, callers waiting for one), or None while
        the pool is not open (see `DatabasePool.stats`)."""
        return self._db.stats()

    # --- writes --------------------------------------------------------------------------------

    async def commit_upserts(
        self, name: str, docs: Sequence[Document], positions: Sequence[SourcePosition] = ()
    ) -> tuple[int, int]:
        """Commit a batch in one transaction; doc i gets seq first + i. Returns (first, last).

        Every document must carry a vector of the collection's dim (else DimensionMismatch). An
        empty batch changes nothing and returns the empty range (last_seq + 1, last_seq).
        `positions` (broker sources' positions) advance in the same transaction.
        Raises NotFound, DimensionMismatch, BadRequest, Unavailable, PositionMoved.
        """
        n = len(docs)
        if n == 0:
            last = await self.last_seq(name)
            return last + 1, last
        if n > ENCODE_INLINE_MAX:
            vectors, metas, widths = await anyio.to_thread.run_sync(encode_batch, docs)
        else:
            vectors, metas, widths = encode_batch(docs)

        async def body(conn: Any) -> tuple[int, int]:
            row = await conn.fetchrow(_ALLOCATE, name, n)
            if row is None:
                raise NotFound(f"no collection {name!r}")
            if widths != {row["dim"]}:
                raise DimensionMismatch(f"collection {name!r} has dim {row['dim']}")
            last = int(row["last_seq"])
            first = last - n + 1
            tables = Tables(row["id"])
            records = [(first + i, "upsert", doc.id, doc.text, vectors[i], metas[i]) for i, doc in enumerate(docs)]
            await conn.copy_records_to_table(tables.log, records=records, columns=LOG_COLUMNS)
            await conn.execute(tables.upsert_docs_from_log(), first, last, row["id"])
            await _advance(conn, positions)
            return first, last

        try:
            return await self._db.write(body)
        except asyncpg.exceptions.DataError as exc:
            raise _bad_data(exc) from exc

    async def commit_delete_ids(
        self, name: str, ids: Sequence[str], positions: Sequence[SourcePosition] = ()
    ) -> tuple[list[str], int]:
        """Delete the given ids that exist, one logged change each (in the order given);
        `positions` advance in the same transaction.

        Returns (deleted ids, last seq); nothing deleted -> ([], the current last_seq).
        Raises NotFound, Unavailable, PositionMoved.
        """
        wanted = list(dict.fromkeys(ids))

        async def body(conn: Any) -> tuple[list[str], int]:
            row = await conn.fetchrow(_LOCK, name)
            if row is None:
                raise NotFound(f"no collection {name!r}")
            tables = Tables(row["id"])
            rows = await conn.fetch(f"DELETE FROM {tables.docs} WHERE id = ANY($1::text[]) RETURNING id", wanted)
            gone = {r["id"] for r in rows}
            deleted = [i for i in wanted if i in gone]
            last = await self._log_deletes(conn, row, deleted)
            await _advance(conn, positions)
            return deleted, last

        return await self._db.write(body)

    async def commit_delete_where(
        self, name: str, where: Filter | None, where_text: TextFilter | None
    ) -> tuple[list[str], int]:
        """Delete every document that passes both filters (ids logged in sorted order).

        Returns (deleted ids, last seq); nothing deleted -> ([], the current last_seq).
        Raises BadRequest (no filter at all), NotFound, Unavailable.
        """
        clauses: list[str] = []
        params: list[object] = []
        if where is not None:
            sql, values = to_sql(where, len(params) + 1, column="metadata")
            clauses.append(f"({sql})")
            params.extend(values)
        if where_text is not None:
            sql, values = text_to_sql(where_text, len(params) + 1, column="text")
            clauses.append(f"({sql})")
            params.extend(values)
        if not clauses:
            raise BadRequest("delete needs ids or a filter")

        async def body(conn: Any) -> tuple[list[str], int]:
            row = await conn.fetchrow(_LOCK, name)
            if row is None:
                raise NotFound(f"no collection {name!r}")
            tables = Tables(row["id"])
            rows = await conn.fetch(f"DELETE FROM {tables.docs} WHERE {' AND '.join(clauses)} RETURNING id", *params)
            deleted = sorted(r["id"] for r in rows)
            return deleted, await self._log_deletes(conn, row, deleted)

        try:
            return await self._db.write(body)
        except asyncpg.exceptions.DataError as exc:
            raise _bad_data(exc) from exc

    # --- broker sources' positions (actors/sources/base.py) -------------------------------------

    async def source_position(self, key: str, initial: str) -> str:
        """The committed position of source `key` (its row is created at `initial` if missing).
        Raises Unavailable."""

        async def body(conn: Any) -> str:
            await conn.execute(SOURCE_POSITION_INIT, key, initial)
            return str(await conn.fetchval(SOURCE_POSITION_READ, key))

        return await self._db.write(body)

    async def commit_source_position(self, position: SourcePosition) -> None:
        """Advance a source's position alone (entries rejected at commit: no change of theirs to
        commit). Raises PositionMoved, Unavailable."""

        async def body(conn: Any) -> None:
            await _advance(conn, (position,))

        await self._db.write(body)

    @staticmethod
    async def _log_deletes(conn: Any, row: Any, deleted: list[str]) -> int:
        if not deleted:
            return int(row["last_seq"])
        n = len(deleted)
        last = int(await conn.fetchval(_ALLOCATE_DELETES, row["id"], n))
        await conn.execute(Tables(row["id"]).log_deletes(), last - n + 1, deleted)
        return last

    # --- reads ---------------------------------------------------------------------------------

    def load_collection(self, name: str, batch: int = 5000) -> CollectionSnapshot:
        """The live documents in batches, from one consistent snapshot (see CollectionSnapshot)."""
        return CollectionSnapshot(self, name, batch)

    async def changes_after(self, name: str, after_seq: int, limit: int) -> list[Change]:
        """Up to `limit` log entries with seq > after_seq, in seq order. Raises NotFound."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_LOOKUP, name)
            if row is None:
                raise NotFound(f"no collection {name!r}")
            try:
                rows = await conn.fetch(
                    f"SELECT seq, op, doc_id, text, vector, metadata FROM {Tables(row['id']).log} "
                    "WHERE seq > $1 ORDER BY seq LIMIT $2",
                    after_seq,
                    limit,
                )
            except asyncpg.exceptions.UndefinedTableError as exc:  # dropped meanwhile
                raise NotFound(f"no collection {name!r}") from exc
            # Read after the rows: compaction deletes and raises the floor in one transaction, so
            # rows missing from the read above show here as a floor above after_seq.
            floor = await conn.fetchval(_FLOOR, row["id"])
        if floor is not None and after_seq < floor:
            raise _gone(name, after_seq, int(floor))
        return [row_to_change(r) for r in rows]

    async def versions_at(self, name: str, ids: Sequence[str], seq: int) -> tuple[dict[str, Change], int]:
        """(the last logged change of each of `ids` with seq <= `seq`, the log floor): what each
        id was as of `seq` (an id left out has no change in the log at or below `seq` above the
        floor). Read in one snapshot, so the floor tells whether rows were compacted away.
        Raises NotFound, Unavailable."""
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(_LOOKUP, name)
            if row is None:
                raise NotFound(f"no collection {name!r}")
            try:
                rows = await conn.fetch(
                    f"SELECT DISTINCT ON (doc_id) seq, op, doc_id, text, vector, metadata "
                    f"FROM {Tables(row['id']).log} WHERE doc_id = ANY($1::text[]) AND seq <= $2 "
                    "ORDER BY doc_id, seq DESC",
                    list(ids),
                    seq,
                )
            except asyncpg.exceptions.UndefinedTableError as exc:  # dropped meanwhile
                raise NotFound(f"no collection {name!r}") from exc
            floor = await conn.fetchval(_FLOOR, row["id"])
        changes = (row_to_change(r) for r in rows)
        return {c.doc_id: c for c in changes}, int(floor or 0)

    async def log_floor(self, name: str) -> int:
        """The highest seq compacted away from the collection's log (0: none); a resume must start
        at or after it. Raises NotFound."""
        async with self._connection() as conn:
            floor = await conn.fetchval("SELECT log_floor FROM shoal_collections WHERE name = $1", name)
        if floor is None:
            raise NotFound(f"no collection {name!r}")
        return int(floor)

    async def check_resumable(self, name: str, after_seq: int | None) -> None:
        """Raises Gone if the changes after `after_seq` were compacted away (None: not a resume)."""
        if after_seq is not None:
            floor = await self.log_floor(name)
            if after_seq < floor:
                raise _gone(name, after_seq, floor)

    async def heartbeat(self, node: str, applied: Sequence[tuple[int, int]], expiry_s: float) -> None:
        """Record this node's applied seq per collection id (one statement) and forget the rows of
        nodes not seen for `expiry_s` seconds. Raises Unavailable."""
        ids = [cid for cid, _ in applied]
        seqs = [seq for _, seq in applied]
        async with self._connection() as conn, conn.transaction():
            await conn.execute(
                "INSERT INTO shoal_node_seqs (node, collection_id, applied_seq, seen) "
                "SELECT $1, c, s, now() FROM unnest($2::int[], $3::bigint[]) AS u(c, s) "
                "ON CONFLICT (node, collection_id) DO UPDATE SET applied_seq = EXCLUDED.applied_seq, seen = now()",
                node,
                ids,
                seqs,
            )
            await conn.execute(
                "DELETE FROM shoal_node_seqs WHERE seen < now() - make_interval(secs => $1) "
                "OR collection_id NOT IN (SELECT id FROM shoal_collections)",
                float(expiry_s),
            )

    async def compact_log(self, collection_id: int, keep_changes: int, expiry_s: float, batch: int) -> int:
        """Delete up to `batch` of the collection's oldest log rows that every node seen within
        `expiry_s` seconds has applied and that lie more than `keep_changes` before its last seq;
        the floor rises in the same transaction. Returns the rows deleted (0: nothing to do, or
        the collection was dropped). Raises Unavailable."""
        table = Tables(collection_id).log
        try:
            async with self._connection() as conn, conn.transaction():
                row = await conn.fetchrow(
                    "SELECT c.last_seq, c.log_floor, (SELECT min(n.applied_seq) FROM shoal_node_seqs n "
                    "WHERE n.collection_id = c.id AND n.seen >= now() - make_interval(secs => $2)) AS applied "
                    "FROM shoal_collections c WHERE c.id = $1",
                    collection_id,
                    float(expiry_s),
                )
                if row is None or row["applied"] is None:  # dropped, or no live node reports it
                    return 0
                floor = int(row["log_floor"])
                horizon = min(int(row["last_seq"]) - keep_changes, int(row["applied"]), floor + batch)
                if horizon <= floor:
                    return 0
                deleted = await conn.execute(f"DELETE FROM {table} WHERE seq <= $1", horizon)
                # greatest(): another node compacting at the same time never lowers the floor.
                await conn.execute(
                    "UPDATE shoal_collections SET log_floor = greatest(log_floor, $2) WHERE id = $1",
                    collection_id,
                    horizon,
                )
        except asyncpg.exceptions.UndefinedTableError:  # dropped meanwhile (the transaction rolled back)
            return 0
        return int(deleted.split()[-1])

    async def collection_marker(self, name: str) -> tuple[int, str]:
        """(catalog id, creation time in ISO format) of a collection: what tells it from a dropped
        and re-created one of the same name. Raises NotFound."""
        async with self._connection() as conn:
            row = await conn.fetchrow("SELECT id, created_at FROM shoal_collections WHERE name = $1", name)
        if row is None:
            raise NotFound(f"no collection {name!r}")
        return int(row["id"]), row["created_at"].isoformat()

    def log_after(self, name: str, after_seq: int, batch: int = 5000) -> LogTail:
        """The change log after `after_seq`, in seq order and batches, from one consistent
        snapshot together with the collection's marker, last seq and live count (see LogTail)."""
        return LogTail(self, name, after_seq, batch)

    async def _log_tail_batches(self, tail: LogTail) -> AsyncGenerator[list[Change], None]:
        async with (
            self._connection(timeout=None) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(
                "SELECT id, created_at, last_seq, doc_count FROM shoal_collections WHERE name = $1", tail.name
            )
            if row is None:
                raise NotFound(f"no collection {tail.name!r}")
            tail.marker = (int(row["id"]), row["created_at"].isoformat())
            tail.last_seq = int(row["last_seq"])
            tail.doc_count = int(row["doc_count"])
            yield []  # the header is known before the first row is read
            try:
                cursor = await conn.cursor(
                    f"SELECT seq, op, doc_id, text, vector, metadata FROM {Tables(row['id']).log} "
                    "WHERE seq > $1 ORDER BY seq",
                    tail.after_seq,
                )
            except asyncpg.exceptions.UndefinedTableError as exc:  # dropped meanwhile
                raise NotFound(f"no collection {tail.name!r}") from exc
            while True:
                rows = await cursor.fetch(tail.batch)
                if not rows:
                    return
                yield [row_to_change(r) for r in rows]

    async def _snapshot_batches(self, snap: CollectionSnapshot) -> AsyncGenerator[list[StoredDoc], None]:
        # No deadline around the whole scan (its consumer sets the pace); the pool's command
        # timeout still bounds each fetch.
        async with (
            self._connection(timeout=None) as conn,
            conn.transaction(isolation="repeatable_read", readonly=True),
        ):
            row = await conn.fetchrow(_LOOKUP, snap.name)
            if row is None:
                raise NotFound(f"no collection {snap.name!r}")
            snap.last_seq = int(row["last_seq"])
            try:
                cursor = await conn.cursor(f"SELECT id, seq, text, vector, metadata FROM {Tables(row['id']).docs}")
            except asyncpg.exceptions.UndefinedTableError as exc:  # dropped meanwhile
                raise NotFound(f"no collection {snap.name!r}") from exc
            while True:
                rows = await cursor.fetch(snap.batch)
                if not rows:
                    return
                yield [row_to_stored(r) for r in rows]


async def _advance(conn: Any, positions: Sequence[SourcePosition]) -> None:
    """Advance each position in order, inside the caller's transaction. Raises PositionMoved
    (rolling the whole transaction back) when a stored position is not the job's `prev`."""
    for position in positions:
        status = await conn.execute(SOURCE_POSITION_ADVANCE, position.key, position.prev, position.new)
        if status != "UPDATE 1":
            raise PositionMoved(
                f"source {position.key}: the committed position is not {position.prev} (an earlier"
                " entry did not commit); starting over from the committed position"
            )


class _Batches(Generic[B]):
    """The async-iterator shell shared by CollectionSnapshot and LogTail: batches come from one
    generator that holds a pooled connection until exhausted or closed (`async with`)."""

    _batches: AsyncGenerator[list[B], None]

    def __aiter__(self) -> Self:
        return self

    async def __anext__(self) -> list[B]:
        return await anext(self._batches)

    async def aclose(self) -> None:
        await self._batches.aclose()

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()


class CollectionSnapshot(_Batches[StoredDoc]):
    """An async iterator over a collection's live documents, `batch` at a time.

    All batches come from one REPEATABLE READ snapshot; `last_seq` is the collection's last seq
    in that snapshot (set once iteration has started), the point from which to follow the log.
    The snapshot holds a pooled connection until exhausted: iterate to the end, or use
    `async with` / `aclose()` when stopping early. Raises NotFound, Unavailable.
    """

    def __init__(self, db: Persistence, name: str, batch: int) -> None:
        if batch < 1:
            raise ValueError("batch must be positive")
        self.name = name
        self.batch = batch
        self.last_seq: int | None = None
        self._batches = db._snapshot_batches(self)


class LogTail(_Batches[Change]):
    """An async iterator over a collection's change log after `after_seq`, `batch` at a time.

    Everything comes from one REPEATABLE READ snapshot: `marker` (catalog id, creation time),
    `last_seq` and `doc_count` are set by `header()` (or the first batch) and agree with the rows.
    Holds a pooled connection until exhausted or closed: use `async with`. Raises NotFound,
    Unavailable.
    """

    def __init__(self, db: Persistence, name: str, after_seq: int, batch: int) -> None:
        if batch < 1:
            raise ValueError("batch must be positive")
        self.name = name
        self.after_seq = after_seq
        self.batch = batch
        self.marker: tuple[int, str] | None = None
        self.last_seq = 0
        self.doc_count = 0
        self._batches = db._log_tail_batches(self)

    async def header(self) -> None:
        """Read marker, last_seq and doc_count (once; iterating reads them too)."""
        if self.marker is None:
            await anext(self._batches)

    async def __anext__(self) -> list[Change]:
        await self.header()
        return await anext(self._batches)
