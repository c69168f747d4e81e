"""The PostgreSQL schema of Shoal: DDL, table names and the SQL of the write paths.

See `actors/persistence.py` for why the schema looks like this and what was measured.
Identifiers spliced into SQL text come only from `Tables`, which builds them from the integer id
of a catalog row; every value travels as a parameter.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import asyncpg

from actors.pg_server import DatabaseSetupError

SCHEMA_VERSION = 1

MIN_PGVECTOR = (0, 7)

# pg_advisory_xact_lock key that serialises schema set-up between Shoal processes.
SCHEMA_LOCK_KEY = 0x53484F414C  # "SHOAL" in ASCII

# pgvector's own limit on vector(n).
MAX_VECTOR_DIM = 16_000

# PostgreSQL moves wide values out of line (TOAST) once a row passes ~2 KB; a 384-d vector alone
# is 1,544 bytes, so documents with a few hundred characters of text would pay an extra TOAST heap
# and index write per row. Up to this size rows stay inline and uncompressed; beyond it the text is
# compressed first. 4080 wrote faster than the default with 1,000-character texts; 8160 was no
# faster and keeps long texts uncompressed at one row a page (README, "Persistence figures").
TOAST_TUPLE_TARGET = 4080

# The LISTEN/NOTIFY channel on which every commit announces `<last seq>:<collection>` (seq 0: a
# collection was created or dropped). A hint that wakes the other nodes' followers, never the truth.
CHANGES_CHANNEL = "shoal_changes"

# The columns of a log table in the order COPY sends them.
LOG_COLUMNS: tuple[str, ...] = ("seq", "op", "doc_id", "text", "vector", "metadata")

CATALOG_DDL: tuple[str, ...] = (
    """
    CREATE TABLE IF NOT EXISTS shoal_schema (
        version integer NOT NULL
    )
    """,
    """
    CREATE TABLE IF NOT EXISTS shoal_collections (
        id         serial PRIMARY KEY,
        name       text NOT NULL UNIQUE,
        dim        integer NOT NULL CHECK (dim BETWEEN 1 AND 16000),
        metric     text NOT NULL,
        last_seq   bigint NOT NULL DEFAULT 0,
        doc_count  bigint NOT NULL DEFAULT 0,
        created_at timestamptz NOT NULL DEFAULT now()
    )
    """,
    # compaction: the highest seq removed from the collection's log (0: none); a resume must
    # start at or after it.
    # (ALTER only when missing: even a no-op ALTER TABLE would queue behind every writer's lock.)
    """
    DO $$
    BEGIN
        IF NOT EXISTS (
            SELECT 1 FROM pg_attribute
            WHERE attrelid = 'shoal_collections'::regclass AND attname = 'log_floor' AND NOT attisdropped
        ) THEN
            ALTER TABLE shoal_collections ADD COLUMN log_floor bigint NOT NULL DEFAULT 0;
        END IF;
    END
    $$
    """,
    # index kinds: the collection's index spec as JSON (NULL: a collection from before them,
    # which keeps the default hnsw). Added only when missing, as above.
    """
    DO $$
    BEGIN
        IF NOT EXISTS (
            SELECT 1 FROM pg_attribute
            WHERE attrelid = 'shoal_collections'::regclass AND attname = 'index_spec' AND NOT attisdropped
        ) THEN
            ALTER TABLE shoal_collections ADD COLUMN index_spec text;
        END IF;
    END
    $$
    """,
    # compaction: every running node's applied seq per collection, refreshed by its heartbeat;
    # the log a live node has not applied is never compacted.
    """
    CREATE TABLE IF NOT EXISTS shoal_node_seqs (
        node          text NOT NULL,
        collection_id integer NOT NULL,
        applied_seq   bigint NOT NULL,
        seen          timestamptz NOT NULL DEFAULT now(),
        PRIMARY KEY (node, collection_id)
    )
    """,
    # broker sources (actors/sources): each source's position, the last entry whose change (or
    # rejection) is committed, written in the same transaction as the changes it produced.
    """
    CREATE TABLE IF NOT EXISTS shoal_source_positions (
        source_key text PRIMARY KEY,
        last_entry text NOT NULL,
        updated_at timestamptz NOT NULL DEFAULT now()
    )
    """,
)

# Broker sources: create a position row if missing; advance it only from the position the
# writer last saw (a chain: a job whose predecessor did not commit cannot commit either).
SOURCE_POSITION_INIT = (
    "INSERT INTO shoal_source_positions (source_key, last_entry) VALUES ($1, $2) "
    "ON CONFLICT (source_key) DO NOTHING"
)
SOURCE_POSITION_READ = "SELECT last_entry FROM shoal_source_positions WHERE source_key = $1"
SOURCE_POSITION_ADVANCE = (
    "UPDATE shoal_source_positions SET last_entry = $3, updated_at = now() "
    "WHERE source_key = $1 AND last_entry = $2"
)


@dataclass(frozen=True, slots=True)
class Tables:
    """The names of one collection's tables, derived from its numeric catalog id only."""

    collection_id: int

    @property
    def docs(self) -> str:
        return f"shoal_docs_{int(self.collection_id)}"

    @property
    def log(self) -> str:
        return f"shoal_log_{int(self.collection_id)}"

    def create_ddl(self, dim: int) -> tuple[str, ...]:
        dim = int(dim)
        if not 1 <= dim <= MAX_VECTOR_DIM:
            raise ValueError(f"dim out of range: {dim}")
        return (
            f"""
            CREATE TABLE {self.docs} (
                id       text PRIMARY KEY,
                seq      bigint NOT NULL,
                text     text,
                vector   vector({dim}) NOT NULL,
                metadata jsonb NOT NULL DEFAULT '{{}}'
            ) WITH (toast_tuple_target = {TOAST_TUPLE_TARGET})
            """,
            f"""
            CREATE TABLE {self.log} (
                seq      bigint PRIMARY KEY,
                op       text NOT NULL CHECK (op IN ('upsert', 'delete')),
                doc_id   text NOT NULL,
                text     text,
                vector   vector({dim}),
                metadata jsonb
            ) WITH (toast_tuple_target = {TOAST_TUPLE_TARGET})
            """,
        )

    def drop_ddl(self) -> str:
        return f"DROP TABLE IF EXISTS {self.docs}, {self.log}"

    # --- write paths -------------------------------------------------------------------------

    def upsert_docs_from_log(self) -> str:
        """Apply log rows $1..$2 to the docs table (the last change of an id wins) and add the
        number of newly inserted ids to the catalog's doc_count. Params: first, last, collection id.

        `xmax = 0` tells an inserted row from one updated by ON CONFLICT: the update stamps the
        old version's xmax with our transaction id.
        """
        return "WITH " + self._fold(f"{self.log} WHERE seq BETWEEN $1 AND $2", "$3")

    def upsert_via_unnest(self) -> str:
        """The multi-row INSERT alternative to COPY, in one statement: write the log rows from
        arrays, apply them to the docs table, count new ids. Params: first seq, ids, texts,
        vectors (pre-encoded), metadata, collection id."""
        return f"""
            WITH logged AS (
                INSERT INTO {self.log} (seq, op, doc_id, text, vector, metadata)
                SELECT $1 + n - 1, 'upsert', i, t, v, m
                FROM unnest($2::text[], $3::text[], $4::vector[], $5::jsonb[])
                     WITH ORDINALITY AS u(i, t, v, m, n)
                RETURNING seq, doc_id, text, vector, metadata
            ), """ + self._fold("logged", "$6")

    def _fold(self, source: str, collection_param: str) -> str:
        """`applied AS (...)` folding the change rows of `source` into the docs table (the last
        change of an id wins), then the catalog update adding the new ids to doc_count."""
        return f"""
            applied AS (
                INSERT INTO {self.docs} AS d (id, seq, text, vector, metadata)
                SELECT DISTINCT ON (doc_id) doc_id, seq, text, vector, metadata
                FROM {source}
                ORDER BY doc_id, seq DESC
                ON CONFLICT (id) DO UPDATE
                SET seq = EXCLUDED.seq, text = EXCLUDED.text,
                    vector = EXCLUDED.vector, metadata = EXCLUDED.metadata
                RETURNING (d.xmax = 0) AS inserted
            )
            UPDATE shoal_collections
            SET doc_count = doc_count + (SELECT count(*) FROM applied WHERE inserted)
            WHERE id = {collection_param}
        """

    def log_deletes(self) -> str:
        """Log one 'delete' change per id, seqs $1, $1+1, ... in array order. Params: first, ids."""
        return f"""
            INSERT INTO {self.log} (seq, op, doc_id)
            SELECT $1 + n - 1, 'delete', i FROM unnest($2::text[]) WITH ORDINALITY AS u(i, n)
        """


# --- set-up at start ---------------------------------------------------------------------------


def _version_tuple(version: str) -> tuple[int, ...]:
    parts: list[int] = []
    for piece in version.split("."):
        digits = "".join(ch for ch in piece if ch.isdigit())
        parts.append(int(digits) if digits else 0)
    return tuple(parts)


async def setup_schema(conn: Any) -> str:
    """Check pgvector (creating the extension if allowed) and create the catalog tables.

    Returns the schema the `vector` type lives in. Raises DatabaseSetupError.
    """
    try:
        async with conn.transaction():
            # Several processes may start at once on one database.
            await conn.execute("SELECT pg_advisory_xact_lock($1)", SCHEMA_LOCK_KEY)
            await ensure_pgvector(conn)
            for ddl in CATALOG_DDL:
                await conn.execute(ddl)
            version = await conn.fetchval("SELECT max(version) FROM shoal_schema")
            if version is None:
                await conn.execute("INSERT INTO shoal_schema (version) VALUES ($1)", SCHEMA_VERSION)
            elif version > SCHEMA_VERSION:
                raise DatabaseSetupError(
                    f"the database holds Shoal schema version {version}; this build knows "
                    f"{SCHEMA_VERSION}: upgrade Shoal or use another database"
                )
            return str(
                await conn.fetchval(
                    "SELECT n.nspname FROM pg_extension e JOIN pg_namespace n ON n.oid = e.extnamespace "
                    "WHERE e.extname = 'vector'"
                )
            )
    except asyncpg.exceptions.InsufficientPrivilegeError as exc:
        raise DatabaseSetupError(
            f"the database role may not create Shoal's tables ({exc.message}): grant it CREATE on "
            "the database and its schema, or use a role that owns them"
        ) from exc


async def ensure_pgvector(conn: Any) -> None:
    """Raises DatabaseSetupError unless pgvector >= 0.7 is installed (or installable) here."""
    installed = await conn.fetchval("SELECT extversion FROM pg_extension WHERE extname = 'vector'")
    if installed is None:
        available = await conn.fetchval(
            "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
        )
        if available is None:
            raise DatabaseSetupError(
                "pgvector >= 0.7 required: the 'vector' extension is not available on this "
                "PostgreSQL server (install pgvector there)"
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
        raise DatabaseSetupError(f"pgvector >= 0.7 required; this database has {installed}: upgrade it")
