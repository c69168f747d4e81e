"""Durable storage of collections in PostgreSQL + pgvector: the change log is the source of truth.

Schema (DDL in `actors/schema.py`)
----------------------------------
- `shoal_collections`: one catalog row per collection: name, dim, metric, `last_seq` (the last
  seq handed out) and `doc_count` (live documents, kept exact in the write transactions so that
  listing collections never scans a table).
- Per collection, two tables named from the catalog's integer id, never from user text:
  `shoal_log_<id>` (seq PK, op, doc_id, text, vector, metadata) holds every change with the full
  content of each upsert; `shoal_docs_<id>` (id PK, seq, text, vector, metadata) is the live
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

Measured with `python -m load.persist_bench` (2 cores, virtual disk; 500 docs a batch, 384-d,
~300 characters of text, 4 metadata fields; durable commits; variants interleaved batch by
batch): COPY + fold 19-26k docs/s for new ids (batch p50 15-22 ms), 12-18k docs/s for replaced
ids; the single-statement INSERT ... SELECT FROM unnest(...) alternative 18-23k and 11-16k, i.e.
5-20% slower in every run. With 1,000-character texts: COPY 17k, INSERT 14k, and 12k with the
default toast_tuple_target (vectors moved to TOAST). Two writers on two collections: ~23k docs/s
together (cores and disk, not the row lock, are the limit). `load_collection` reads 30-60k docs/s (row
decoding in Python).

Errors
------
A database that cannot be reached (refused or missing socket, dropped connection, server
shutting down, pool timeout) raises `Unavailable("database unavailable")`, so writes fail fast.
A document PostgreSQL rejects as data (sqlstate class 22, e.g. a NUL character in text) raises
`BadRequest`. Calls racing a close of the pool get `Unavailable` too. Otherwise asyncpg's
`InterfaceError` (misuse of the client) and any other `PostgresError` propagate unchanged: they
are bugs, not conditions.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncGenerator, AsyncIterator, Sequence
from contextlib import asynccontextmanager
from types import TracebackType
from typing import Any

import anyio
import anyio.abc
import asyncpg
from pgvector.asyncpg import register_vector

from actors.pg_codecs import (
    ENCODE_INLINE_MAX,
    decode_vector,
    encode_batch,
    encode_vector,
    row_to_change,
    row_to_info,
    row_to_stored,
)
from actors.pg_server import DatabaseSetupError
from actors.schema import CATALOG_DDL, LOG_COLUMNS, SCHEMA_LOCK_KEY, SCHEMA_VERSION, Tables
from models.errors import BadRequest, DimensionMismatch, Exists, NotFound, Unavailable
from models.filters import Filter, TextFilter, text_to_sql, to_sql
from models.records import Change, CollectionInfo, Document, Metric, StoredDoc

log = logging.getLogger(__name__)

MIN_PGVECTOR = (0, 7)

# Conditions that mean "the database cannot be reached right now", as opposed to a bug.
_UNAVAILABLE: tuple[type[BaseException], ...] = (
    OSError,  # refused / missing socket, reset, and TimeoutError from connect or pool acquire
    asyncpg.exceptions.PostgresConnectionError,  # class 08, incl. ConnectionDoesNotExistError
    asyncpg.exceptions.CannotConnectNowError,  # 57P03: starting up or shutting down
    asyncpg.exceptions.AdminShutdownError,  # 57P01
    asyncpg.exceptions.CrashShutdownError,  # 57P02
    asyncpg.exceptions.TooManyConnectionsError,  # 53300
)


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


def _bad_data(exc: BaseException) -> BadRequest:
    message = getattr(exc, "message", None) or "invalid data"
    return BadRequest(f"document rejected by the database: {message}")


_LOOKUP = "SELECT id, dim, last_seq FROM shoal_collections WHERE name = $1"
_LOCK = "SELECT id, dim, last_seq FROM shoal_collections WHERE name = $1 FOR UPDATE"
_ALLOCATE = (
    "UPDATE shoal_collections SET last_seq = last_seq + $2 WHERE name = $1 RETURNING id, dim, last_seq"
)
_ALLOCATE_DELETES = (
    "UPDATE shoal_collections SET last_seq = last_seq + $2, doc_count = doc_count - $2 "
    "WHERE id = $1 RETURNING last_seq"
)


class Persistence:
    """The one owner of the asyncpg pool. Use as `async with Persistence(dsn) as db:`, or start
    `run()` in a task group (it reports started once the schema is ready) and call `close()`.

    Methods are safe to call concurrently; the pool bounds the parallelism (`pool_size`).
    Every method may raise `Unavailable` when the database cannot be reached.
    """

    def __init__(
        self,
        dsn: str,
        pool_size: int = 8,
        *,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 10.0,
        close_timeout: float = 10.0,
    ) -> None:
        self._dsn = dsn
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._close_timeout = close_timeout
        self._pool: Any = None
        self._vector_schema = "public"
        self._stop: anyio.Event | None = None
        self._stop_requested = False

    # --- life cycle ----------------------------------------------------------------------------

    async def open(self) -> None:
        """Check pgvector, create the schema, open the pool. Raises DatabaseSetupError or Unavailable."""
        if self._pool is not None:
            return
        try:
            conn = await asyncpg.connect(self._dsn, timeout=self._connect_timeout)
        except _UNAVAILABLE as exc:
            raise Unavailable("database unavailable") from exc
        try:
            await self._setup_schema(conn)
        except _UNAVAILABLE as exc:
            raise Unavailable("database unavailable") from exc
        finally:
            await conn.close()
        try:
            self._pool = await asyncpg.create_pool(
                self._dsn,
                min_size=min(2, self._pool_size),
                max_size=self._pool_size,
                init=self._init_connection,
                timeout=self._connect_timeout,
                max_inactive_connection_lifetime=300.0,
                server_settings={
                    "application_name": "shoal",
                    # Acked writes must be durable, whatever the role's or server's default.
                    "synchronous_commit": "on",
                    "jit": "off",
                    # A stalled client must not hold a collection's row lock forever.
                    "idle_in_transaction_session_timeout": "300s",
                },
            )
        except _UNAVAILABLE as exc:
            raise Unavailable("database unavailable") from exc

    async def aclose(self) -> None:
        """Close the pool: in-flight calls finish (up to close_timeout), then connections drop."""
        pool, self._pool = self._pool, None
        if pool is None:
            return
        with anyio.CancelScope(shield=True):
            with anyio.move_on_after(self._close_timeout) as scope:
                await pool.close()
            if scope.cancelled_caught:
                log.warning("database pool did not close in %.0fs; terminating", self._close_timeout)
                pool.terminate()

    async def run(
        self, *, task_status: anyio.abc.TaskStatus[Persistence] = anyio.TASK_STATUS_IGNORED
    ) -> None:
        """Open, report started, serve until `close()`, then close the pool."""
        self._stop = anyio.Event()
        if self._stop_requested:
            self._stop.set()
        await self.open()
        try:
            task_status.started(self)
            await self._stop.wait()
        finally:
            await self.aclose()

    def close(self) -> None:
        """Ask `run()` to finish (idempotent)."""
        self._stop_requested = True
        if self._stop is not None:
            self._stop.set()

    async def __aenter__(self) -> Persistence:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()

    async def _setup_schema(self, conn: Any) -> None:
        async with conn.transaction():
            # Several processes may start at once on one database.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            await self._ensure_pgvector(conn)
            for ddl in CATALOG_DDL:
                await conn.execute(ddl)
            version = await conn.fetchval("SELECT max(version) FROM shoal_schema")
            if version is None:
                await conn.execute("INSERT INTO shoal_schema (version) VALUES ($1)", SCHEMA_VERSION)
            elif version > SCHEMA_VERSION:
                raise DatabaseSetupError(
                    f"the database holds Shoal schema version {version}; this build knows {SCHEMA_VERSION}"
                )
            self._vector_schema = await conn.fetchval(
                "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                "WHERE e.extname = 'vector'"
            )

    @staticmethod
    async def _ensure_pgvector(conn: Any) -> None:
        installed = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        if installed is None:
            available = await conn.fetchval(
                "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
            )
            if available is None:
                raise DatabaseSetupError(
                    "pgvector >= 0.7 required: the 'vector' extension is not available on this server"
                )
            try:
                async with conn.transaction():
                    await conn.execute("CREATE EXTENSION IF NOT EXISTS vector")
            except asyncpg.exceptions.InsufficientPrivilegeError as exc:
                raise DatabaseSetupError(
                    "pgvector >= 0.7 required: the 'vector' extension is not installed in this "
                    "database and this role may not create it (run CREATE EXTENSION vector as an owner)"
                ) from exc
            installed = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
        if _version_tuple(str(installed)) < MIN_PGVECTOR:
            raise DatabaseSetupError(f"pgvector >= 0.7 required; this database has {installed}")

    async def _init_connection(self, conn: Any) -> None:
        # pgvector's codecs (halfvec, sparsevec), then our own for `vector`: pgvector-python
        # decodes to its Vector class, the engine wants float32 numpy arrays.
        await register_vector(conn, schema=self._vector_schema)
        await conn.set_type_codec(
            "vector",
            schema=self._vector_schema,
            encoder=encode_vector,
            decoder=decode_vector,
            format="binary",
        )

    @asynccontextmanager
    async def _connection(self) -> AsyncIterator[Any]:
        """A pooled connection; connection trouble inside the block becomes Unavailable."""
        pool = self._pool
        if pool is None:
            raise Unavailable("database unavailable")
        try:
            async with pool.acquire(timeout=self._acquire_timeout) as conn:
                yield conn
        except _UNAVAILABLE as exc:
            raise Unavailable("database unavailable") from exc
        except asyncpg.exceptions.InterfaceError as exc:
            if self._pool is not pool:  # the pool was closed under this call: shutting down
                raise Unavailable("database unavailable") from exc
            raise

    # --- collections ---------------------------------------------------------------------------

    async def create_collection(self, name: str, dim: int, metric: Metric) -> CollectionInfo:
        """Create the catalog row and the collection's tables. Raises Exists, BadRequest."""
        metric = Metric(metric)
        if not 1 <= dim <= 16_000:
            raise BadRequest("dim must be between 1 and 16000")
        async with self._connection() as conn, conn.transaction():
            cid = await conn.fetchval(
                "INSERT INTO shoal_collections (name, dim, metric) VALUES ($1, $2, $3) "
                "ON CONFLICT (name) DO NOTHING RETURNING id",
                name,
                dim,
                metric.value,
            )
            if cid is None:
                raise Exists(f"collection {name!r} already exists")
            for ddl in Tables(cid).create_ddl(dim):
                await conn.execute(ddl)
        return CollectionInfo(name, dim, metric, 0)

    async def drop_collection(self, name: str) -> None:
        """Drop the catalog row and the tables; waits for in-flight writes. Raises NotFound."""
        async with self._connection() as conn, conn.transaction():
            cid = await conn.fetchval("DELETE FROM shoal_collections WHERE name = $1 RETURNING id", name)
            if cid is None:
                raise NotFound(f"no collection {name!r}")
            await conn.execute(Tables(cid).drop_ddl())

    async def list_collections(self) -> list[CollectionInfo]:
        async with self._connection() as conn:
            rows = await conn.fetch(
                "SELECT name, dim, metric, doc_count FROM shoal_collections ORDER BY name"
            )
        return [row_to_info(row) for row in rows]

    async def get_collection(self, name: str) -> CollectionInfo:
        """Raises NotFound."""
        async with self._connection() as conn:
            row = await conn.fetchrow(
                "SELECT name, dim, metric, doc_count FROM shoal_collections WHERE name = $1", name
            )
        if row is None:
            raise NotFound(f"no collection {name!r}")
        return row_to_info(row)

    async def last_seq(self, name: str) -> int:
        """The collection's last committed seq (0 before the first change). Raises NotFound."""
        async with self._connection() as conn:
            row = await conn.fetchrow(_LOOKUP, name)
        if row is None:
            raise NotFound(f"no collection {name!r}")
        return int(row["last_seq"])

    def pool_stats(self) -> tuple[int, int, int, int] | None:
        """(connections in use, idle, the pool's bound, callers waiting for one), or None while
        the pool is not open. asyncpg reports no waiters; they are the getters parked on its
        connection queue, read defensively (0 if its internals change)."""
        pool = self._pool
        if pool is None:
            return None
        size, idle = pool.get_size(), pool.get_idle_size()
        getters = getattr(getattr(pool, "_queue", None), "_getters", None) or ()
        waiting = sum(1 for getter in getters if not getter.done())
        return size - idle, idle, pool.get_max_size(), waiting

    async def ping(self) -> bool:
        """True if the database answers a query now."""
        try:
            async with self._connection() as conn:
                await conn.fetchval("SELECT 1")
        except Unavailable:
            return False
        return True

    # --- writes --------------------------------------------------------------------------------

    async def commit_upserts(self, name: str, docs: Sequence[Document]) -> tuple[int, int]:
        """Commit a batch in one transaction; doc i gets seq first + i. Returns (first, last).

        Every document must carry a vector of the collection's dim (else DimensionMismatch). An
        empty batch changes nothing and returns the empty range (last_seq + 1, last_seq).
        Raises NotFound, DimensionMismatch, BadRequest, Unavailable.
        """
        n = len(docs)
        if n == 0:
            last = await self.last_seq(name)
            return last + 1, last
        if n > ENCODE_INLINE_MAX:
            vectors, metas, widths = await anyio.to_thread.run_sync(encode_batch, docs)
        else:
            vectors, metas, widths = encode_batch(docs)
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(_ALLOCATE, name, n)
                    if row is None:
                        raise NotFound(f"no collection {name!r}")
                    if widths != {row["dim"]}:
                        raise DimensionMismatch(f"collection {name!r} has dim {row['dim']}")
                    last = int(row["last_seq"])
                    first = last - n + 1
                    tables = Tables(row["id"])
                    records = [
                        (first + i, "upsert", doc.id, doc.text, vectors[i], metas[i])
                        for i, doc in enumerate(docs)
                    ]
                    await conn.copy_records_to_table(tables.log, records=records, columns=LOG_COLUMNS)
                    await conn.execute(tables.upsert_docs_from_log(), first, last, row["id"])
            except asyncpg.exceptions.DataError as exc:
                raise _bad_data(exc) from exc
        return first, last

    async def commit_delete_ids(self, name: str, ids: Sequence[str]) -> tuple[list[str], int]:
        """Delete the given ids that exist, one logged change each (in the order given).

        Returns (deleted ids, last seq); nothing deleted -> ([], the current last_seq).
        Raises NotFound, Unavailable.
        """
        wanted = list(dict.fromkeys(ids))
        async with self._connection() as conn, conn.transaction():
            row = await conn.fetchrow(_LOCK, name)
            if row is None:
                raise NotFound(f"no collection {name!r}")
            tables = Tables(row["id"])
            rows = await conn.fetch(
                f"DELETE FROM {tables.docs} WHERE id = ANY($1::text[]) RETURNING id", wanted
            )
            gone = {r["id"] for r in rows}
            deleted = [i for i in wanted if i in gone]
            return deleted, await self._log_deletes(conn, row, deleted)

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
        async with self._connection() as conn:
            try:
                async with conn.transaction():
                    row = await conn.fetchrow(_LOCK, name)
                    if row is None:
                        raise NotFound(f"no collection {name!r}")
                    tables = Tables(row["id"])
                    rows = await conn.fetch(
                        f"DELETE FROM {tables.docs} WHERE {' AND '.join(clauses)} RETURNING id", *params
                    )
                    deleted = sorted(r["id"] for r in rows)
                    return deleted, await self._log_deletes(conn, row, deleted)
            except asyncpg.exceptions.DataError as exc:
                raise _bad_data(exc) from exc

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
        return [row_to_change(r) for r in rows]

    async def _snapshot_batches(self, snap: CollectionSnapshot) -> AsyncGenerator[list[StoredDoc], None]:
        async with self._connection() as conn, conn.transaction(isolation="repeatable_read", readonly=True):
            row = await conn.fetchrow(_LOOKUP, snap.name)
            if row is None:
                raise NotFound(f"no collection {snap.name!r}")
            snap.last_seq = int(row["last_seq"])
            try:
                cursor = await conn.cursor(
                    f"SELECT id, seq, text, vector, metadata FROM {Tables(row['id']).docs}"
                )
            except asyncpg.exceptions.UndefinedTableError as exc:  # dropped meanwhile
                raise NotFound(f"no collection {snap.name!r}") from exc
            while True:
                rows = await cursor.fetch(snap.batch)
                if not rows:
                    return
                yield [row_to_stored(r) for r in rows]


class CollectionSnapshot:
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

    def __aiter__(self) -> CollectionSnapshot:
        return self

    async def __anext__(self) -> list[StoredDoc]:
        return await anext(self._batches)

    async def aclose(self) -> None:
        await self._batches.aclose()

    async def __aenter__(self) -> CollectionSnapshot:
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.aclose()
