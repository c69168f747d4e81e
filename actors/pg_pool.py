"""The connection pool to PostgreSQL and what happens when the database fails under it.

`DatabasePool` owns the asyncpg pool and the node's `DatabaseHealth` (see `actors/db_health.py`).
`Persistence` runs all of its SQL through two doors:

- `connection(timeout)`: a pooled connection for one operation, which must finish within
  `command_timeout`. Connection trouble or the deadline becomes `Unavailable`, marks the database
  down, and the connection is terminated rather than given back (its state is unknown, and on a
  stalled server even a ROLLBACK would wait). While the background probe runs, calls fail fast
  with `Unavailable` until a probe has seen the database answer again.
- `write(body)`: one transaction that is committed, whose outcome is never left unknown. A commit
  whose connection fails while COMMIT is in flight is *in doubt*: the server may have committed
  it. Each write transaction records its transaction id first, so the writer then asks the
  database (`txid_status`, on fresh connections, until it answers): "committed" -> the call
  returns as if nothing had happened; "aborted" -> `Unavailable`. So a write reaches the shards
  exactly when it is durable, and never twice. The wait ends early only when the node shuts down
  (`begin_shutdown()`), with `Unavailable`; the shards are rebuilt from PostgreSQL at the next
  start.

A write that answered `unavailable` may therefore still have committed (if its outcome was
learnt after its caller's deadline): clients retry upserts and deletes, which are idempotent by id.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import Any, TypedDict, TypeVar

import anyio
import asyncpg
from pgvector.asyncpg import register_vector

from actors.db_health import UNAVAILABLE_ERRORS, DatabaseHealth, describe, probe_forever
from actors.pg_codecs import decode_vector, encode_vector
from actors.schema import setup_schema
from models.errors import StartupError, Unavailable

log = logging.getLogger("shoal.database")

T = TypeVar("T")

# How many server pids of past and present pool connections are remembered (see own_backends).
OWN_BACKENDS_KEPT = 1_024

_UNAVAILABLE = UNAVAILABLE_ERRORS


class PoolTimeouts(TypedDict, total=False):
    """DatabasePool's keyword arguments, seconds each (for callers that pass them through)."""

    connect_timeout: float
    acquire_timeout: float
    close_timeout: float
    command_timeout: float
    probe_interval: float
    probe_timeout: float

# Problems of the dsn or the login that no retry fixes: reported at start-up as what to fix.
# (28000 no such role or no pg_hba entry, 28P01 bad password, 3D000 no such database, 42501 no
# CONNECT privilege, ...; checked after the "cannot reach" conditions, some of which are
# PostgresErrors too.)
_LOGIN_ERRORS: tuple[type[BaseException], ...] = (
    asyncpg.PostgresError,
    asyncpg.exceptions.ClientConfigurationError,
    asyncpg.exceptions.InterfaceError,  # e.g. the server demands TLS the dsn did not ask for
    ValueError,  # a malformed dsn
)


def redact(dsn: str) -> str:
    """The dsn without its password, to name the database in messages."""
    scheme, sep, rest = dsn.partition("://")
    if not sep or "@" not in rest.split("/", 1)[0]:
        return dsn
    credentials, _, host = rest.partition("@")
    return f"{scheme}://{credentials.split(':', 1)[0]}@{host}"


def _is_lost(conn: Any) -> bool:
    """True if a pooled connection was closed under us (asyncpg then detaches its proxy)."""
    try:
        return bool(conn.is_closed())
    except asyncpg.exceptions.InterfaceError:
        return True


def _terminate(conn: Any) -> None:
    with contextlib.suppress(asyncpg.exceptions.InterfaceError):  # released by asyncpg: closed
        conn.terminate()


class DatabasePool:
    """The asyncpg pool with deadlines, health and in-doubt commit resolution (module docstring).

    `open()` then `connection()` / `write()` / `ping()`; `probe()` runs the health probe until
    cancelled; `begin_shutdown()` then `aclose()` at the end.
    """

    def __init__(
        self,
        dsn: str,
        pool_size: int = 8,
        *,
        connect_timeout: float = 5.0,
        acquire_timeout: float = 10.0,
        close_timeout: float = 10.0,
        command_timeout: float = 10.0,
        probe_interval: float = 1.0,
        probe_timeout: float = 2.0,
    ) -> None:
        self.dsn = dsn
        self._pool_size = pool_size
        self._connect_timeout = connect_timeout
        self._acquire_timeout = acquire_timeout
        self._close_timeout = close_timeout
        self._command_timeout = command_timeout
        self._probe_interval = probe_interval
        self._probe_timeout = probe_timeout
        self._pool: Any = None
        self._vector_schema = "public"
        self._shutting_down = anyio.Event()
        self._probing = False
        self.health = DatabaseHealth()
        # Server pids of this pool's connections, newest last (bounded): the change notifications
        # they send are this node's own commits, which its committer applies itself.
        self.own_backends: dict[int, None] = {}

    @property
    def is_open(self) -> bool:
        return self._pool is not None

    async def open(self) -> None:
        """Check pgvector, create the schema, open the pool.

        Raises StartupError (DatabaseSetupError among them) when the database cannot be reached
        or used: at start-up that is a configuration mistake to report, not a condition to retry.
        """
        if self._pool is not None:
            return
        where = redact(self.dsn)
        try:
            conn = await asyncpg.connect(self.dsn, timeout=self._connect_timeout)
        except _UNAVAILABLE as exc:
            raise StartupError(
                f"cannot reach the database {where}: {describe(exc)}; check --database-url / "
                "SHOAL_DATABASE_URL and that PostgreSQL is running"
            ) from exc
        except _LOGIN_ERRORS as exc:
            raise StartupError(
                f"the database {where} refused the connection: {describe(exc)}; check the role, "
                "password and database name in --database-url / SHOAL_DATABASE_URL"
            ) from exc
        try:
            self._vector_schema = await setup_schema(conn)
        except _UNAVAILABLE as exc:
            raise StartupError(f"the database {where} went away during set-up: {describe(exc)}") from exc
        finally:
            try:
                await conn.close(timeout=self._connect_timeout)
            except Exception:
                conn.terminate()
        try:
            self._pool = await asyncpg.create_pool(
                self.dsn,
                # No floor: asyncpg would keep reconnecting (and logging) through an outage.
                min_size=0,
                max_size=self._pool_size,
                init=self._init_connection,
                timeout=self._connect_timeout,
                # A backstop per statement; every operation also runs under one deadline.
                command_timeout=self._command_timeout,
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
            raise StartupError(f"the database {where} went away during set-up: {describe(exc)}") from exc
        self.health.mark_up()

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

    def stats(self) -> tuple[int, int, int, int] | None:
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

    async def probe(self) -> None:
        """Keep `health` current until cancelled; while it runs, calls fail fast when down."""
        self._probing = True
        try:
            await probe_forever(
                self.dsn,
                self.health,
                interval=self._probe_interval,
                timeout=self._probe_timeout,
                on_recovered=self._refresh_pool,
            )
        finally:
            self._probing = False

    async def _refresh_pool(self) -> None:
        # Connections opened before the outage may be half-dead: replace each at its next use.
        if self._pool is not None:
            await self._pool.expire_connections()

    def begin_shutdown(self) -> None:
        """The node is stopping: a writer waiting to learn an in-doubt commit's outcome gives up."""
        self._shutting_down.set()

    async def _init_connection(self, conn: Any) -> None:
        self.own_backends[conn.get_server_pid()] = None
        while len(self.own_backends) > OWN_BACKENDS_KEPT:
            del self.own_backends[next(iter(self.own_backends))]
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
    async def connection(self, timeout: float | None = -1.0, *, fail_fast: bool = True) -> AsyncIterator[Any]:
        """A pooled connection; the block must finish within `timeout` (default
        `command_timeout`; None: no deadline, for cursors a caller iterates at its own pace).
        With `fail_fast`, raises Unavailable at once while the probe runs and says down.

        Connection trouble or the deadline inside the block becomes Unavailable and marks the
        database down; the connection is then terminated, not given back: its state is unknown
        and a stalled server would make even a ROLLBACK wait.
        """
        pool = self._pool
        if pool is None:
            raise Unavailable("database unavailable")
        if fail_fast and self._probing and not self.health.up:
            raise Unavailable(f"database unavailable: {self.health.reason}")
        deadline = self._command_timeout if timeout is not None and timeout < 0 else timeout
        # No scope at all without a deadline: a cursor's generator yields inside this block.
        scope = anyio.fail_after(deadline) if deadline is not None else contextlib.nullcontext()
        lost = False
        try:
            with scope:
                async with pool.acquire(timeout=self._acquire_timeout) as conn:
                    try:
                        yield conn
                    except BaseException as exc:
                        gone = (anyio.get_cancelled_exc_class(), asyncpg.exceptions.InternalClientError, *_UNAVAILABLE)
                        if isinstance(exc, gone) or _is_lost(conn):
                            lost = True
                            _terminate(conn)
                        raise
        except _UNAVAILABLE as exc:
            reason = f"no answer within {deadline:g} s" if isinstance(exc, TimeoutError) else describe(exc)
            self.health.mark_down(reason)
            raise Unavailable(f"database unavailable: {reason}") from exc
        except (asyncpg.exceptions.InterfaceError, asyncpg.exceptions.InternalClientError) as exc:
            # InternalClientError: asyncpg refuses a connection whose server went away in the
            # middle of an operation ("cannot switch to state ..."): as lost as a reset socket,
            # also when it comes from the pool's reset on release, after the block succeeded
            # (the pool terminates that connection itself).
            if lost or isinstance(exc, asyncpg.exceptions.InternalClientError):
                self.health.mark_down("connection lost")
                raise Unavailable("database unavailable: connection lost") from exc
            if self._pool is not pool:  # the pool was closed under this call: shutting down
                raise Unavailable("database unavailable") from exc
            raise

    async def write(self, body: Callable[[Any], Awaitable[T]]) -> T:
        """Run `body(conn)` in one transaction and commit it; returns what `body` returned.

        If the connection fails while COMMIT is in flight, waits for the database to say whether
        the transaction committed (see the module docstring): the result is returned if it did,
        Unavailable raised if it did not. Raises what `body` raises, and Unavailable.
        """
        xid: int | None = None
        backend = 0
        committing = committed = False
        results: list[T] = []
        try:
            async with self.connection() as conn:
                async with conn.transaction():
                    xid = int(await conn.fetchval("SELECT txid_current()"))
                    backend = conn.get_server_pid()
                    results.append(await body(conn))
                    committing = True  # what fails from here on fails during COMMIT
                committed = True  # COMMIT answered: only giving the connection back can fail now
            return results[0]
        except Unavailable:
            if committed:
                return results[0]
            if not committing or xid is None:
                raise
            log.warning("commit of transaction %d is in doubt; asking the database", xid)
            if await self._committed(xid, backend):
                log.warning("transaction %d did commit", xid)
                return results[0]
            log.warning("transaction %d did not commit", xid)
            raise

    async def _committed(self, xid: int, backend: int) -> bool:
        """Whether transaction `xid` committed, asked on fresh connections until the database
        answers. A backend still running it after `command_timeout` is terminated, so the
        answer cannot wait on a stuck session forever. Raises Unavailable once shutting down."""
        started = time.monotonic()
        while not self._shutting_down.is_set():
            status: str | None = None
            with anyio.move_on_after(self._connect_timeout + self._command_timeout):
                try:
                    conn = await asyncpg.connect(self.dsn, timeout=self._connect_timeout)
                    try:
                        status = await conn.fetchval("SELECT txid_status($1)", xid)
                        stuck = time.monotonic() - started >= self._command_timeout
                        if status == "in progress" and stuck:
                            await conn.fetchval("SELECT pg_terminate_backend($1)", backend)
                    finally:
                        conn.terminate()
                except (*_UNAVAILABLE, asyncpg.PostgresError) as exc:
                    log.info("transaction %d: outcome not known yet (%s)", xid, describe(exc))
            if status == "committed":
                return True
            if status == "aborted":
                return False
            with anyio.move_on_after(self._probe_interval / 4):
                await self._shutting_down.wait()
        raise Unavailable("database unavailable: the outcome of a commit is unknown (shutting down)")

    async def ping(self) -> bool:
        """True if the database answers a query now (within `command_timeout`); updates `health`.

        Asks even while `health` says down: this is how a caller without `run()` learns of
        recovery. `/readyz` reads `health` instead, which never waits.
        """
        try:
            async with self.connection(fail_fast=False) as conn:
                await conn.fetchval("SELECT 1")
        except Unavailable:
            return False
        self.health.mark_up()
        return True
