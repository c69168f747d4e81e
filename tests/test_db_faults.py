"""The database as a backend that dies or stalls under a running server.

End to end (a real `shoal serve` with its embedded PostgreSQL, or with `--database-url`):
- SIGKILL of the embedded postmaster: Shoal restarts it; `/readyz` is 503 meanwhile and always
  answers at once; writes work again; nothing acked is lost, nothing is applied twice.
- SIGSTOP of every PostgreSQL process: writes answer `unavailable` within their deadline, reads
  keep serving from memory, `/readyz` answers 503 at once; after SIGCONT writes work again and
  the shard agrees with PostgreSQL.
- An external database (`--database-url`) that is killed is not restarted by Shoal, which
  reconnects once it is back.
And at unit level, against a real PostgreSQL: a commit cut off mid-COMMIT is resolved to what the
database did, and a statement cut off before COMMIT never commits.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import signal
import tempfile
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import anyio
import asyncpg
import httpx
import pytest

from actors.persistence import Persistence
from actors.pg_server import DatabaseServer, _restart, crashed
from models.errors import Unavailable
from shoal_client import ShoalClient
from shoal_client import errors as ce
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(240)

DIM = 4
WRITE_DEADLINE_S = 5.0  # the default of SHOAL_WRITE_DEADLINE_S


def remove_tree(path: Path) -> None:
    for _ in range(5):  # PostgreSQL may still be removing its last files
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.5)


def docs_of(prefix: str, n: int) -> list[dict[str, Any]]:
    return [{"id": f"{prefix}{i}", "vector": [1.0 + i, 1.0, float(i % 3), 0.5]} for i in range(n)]


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def children_of(pid: int) -> list[int]:
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        if int(stat[stat.rfind(")") + 2 :].split()[1]) == pid:
            out.append(int(entry.name))
    return out


def alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat[stat.rfind(")") + 2] != "Z"


@contextlib.contextmanager
def stopped(pids: list[int]) -> Iterator[None]:
    """SIGSTOP `pids` (this test's own PostgreSQL) and always SIGCONT them on the way out."""
    try:
        for pid in pids:
            os.kill(pid, signal.SIGSTOP)
        yield
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)


async def readyz(http: httpx.AsyncClient) -> int:
    """The status of /readyz, which must answer within a second whatever the database does."""
    started = time.monotonic()
    status = (await http.get("/readyz", timeout=5.0)).status_code
    assert time.monotonic() - started < 1.0
    return status


async def write_until_ok(c: ShoalClient, collection: str, prefix: str, attempted: list[str], within: float) -> float:
    """Upsert fresh documents until one upsert is acked; returns the monotonic time of the ack."""
    deadline = time.monotonic() + within
    n = 0
    while time.monotonic() < deadline:
        batch = docs_of(f"{prefix}{n}-", 5)
        n += 1
        attempted.extend(d["id"] for d in batch)
        try:
            await c.upsert(collection, batch)
            return time.monotonic()
        except ce.Unavailable:
            await asyncio.sleep(0.1)
    raise AssertionError(f"no write succeeded within {within} s")


async def check_agrees_with_postgres(
    c: ShoalClient, pg_host: str, collection: str, acked: list[str], attempted: list[str]
) -> None:
    """Every acked id is there, the shard holds exactly what PostgreSQL holds, and every id that
    was written once has exactly one change in the log (nothing applied twice)."""
    found = {d["id"] for d in await c.get(collection, attempted, include=[])}
    assert set(acked) <= found
    conn = await asyncpg.connect(host=pg_host, user="postgres", database="postgres")
    try:
        cid, doc_count = await conn.fetchrow(
            "SELECT id, doc_count FROM shoal_collections WHERE name = $1", collection
        )
        in_pg = {r["id"] for r in await conn.fetch(f"SELECT id FROM shoal_docs_{int(cid)}")}
        log_rows, log_ids = await conn.fetchrow(
            f"SELECT count(*), count(DISTINCT doc_id) FROM shoal_log_{int(cid)}"
        )
    finally:
        await conn.close()
    assert in_pg == found and doc_count == len(found)
    assert await c.count(collection) == len(found)
    assert log_rows == log_ids == len(found)


async def test_killed_embedded_postgres_is_restarted_and_nothing_acked_is_lost() -> None:
    data_dir = temp_data_dir()
    pgdata = data_dir / "pg"
    proc = ServerProcess(data_dir)
    proc.start()
    try:
        async with ShoalClient.connect(proc.ws_url) as c, httpx.AsyncClient(base_url=proc.url) as http:
            await c.create_collection("k", dim=DIM, metric="l2")
            acked: list[str] = []
            for b in range(10):
                batch = docs_of(f"a{b}-", 20)
                await c.upsert("k", batch)
                acked.extend(d["id"] for d in batch)
            old = postmaster_pid(pgdata)
            os.kill(old, signal.SIGKILL)  # the postmaster of this test's own server
            killed = time.monotonic()

            attempted = list(acked)
            statuses = []
            deadline = killed + 60
            recovered_at = None
            n = 0
            while time.monotonic() < deadline:
                statuses.append(await readyz(http))
                batch = docs_of(f"r{n}-", 5)
                n += 1
                attempted.extend(d["id"] for d in batch)
                try:
                    await c.upsert("k", batch)
                except ce.Unavailable as exc:
                    assert time.monotonic() - killed < 60, exc
                    await asyncio.sleep(0.1)
                    continue
                acked.extend(d["id"] for d in batch)
                if recovered_at is None and 503 in statuses:
                    recovered_at = time.monotonic()
                    break
            assert recovered_at is not None, f"no write after the restart; /readyz said {statuses}"
            print(f"\nrecovery after SIGKILL of the postmaster: {recovered_at - killed:.2f} s")
            assert 503 in statuses
            new = postmaster_pid(pgdata)
            assert new != old and alive(new)  # Shoal started a new postmaster by itself
            for _ in range(50):
                if await readyz(http) == 200:
                    break
                await asyncio.sleep(0.1)
            assert await readyz(http) == 200
            await check_agrees_with_postgres(c, str(pgdata), "k", acked, attempted)
        # The restart is logged by the supervising thread once the new server is up, which can be
        # just after the pool has already reconnected to it.
        for _ in range(50):
            if "embedded PostgreSQL restarted" in proc.log_tail(400):
                break
            await asyncio.sleep(0.1)
        assert "embedded PostgreSQL restarted" in proc.log_tail(400)
    finally:
        code = proc.stop()
        log = proc.log_tail(200)
        print(log)  # shown when the test fails
        remove_tree(data_dir)
    assert code in (0, -signal.SIGTERM), log


async def test_stalled_postgres_writes_answer_within_the_deadline_and_reads_keep_serving() -> None:
    data_dir = temp_data_dir()
    pgdata = data_dir / "pg"
    proc = ServerProcess(data_dir)
    proc.start()
    try:
        async with ShoalClient.connect(proc.ws_url) as c, httpx.AsyncClient(base_url=proc.url) as http:
            await c.create_collection("s", dim=DIM, metric="l2")
            acked: list[str] = []
            batch = docs_of("before-", 50)
            await c.upsert("s", batch)
            acked.extend(d["id"] for d in batch)
            attempted = list(acked)
            postmaster = postmaster_pid(pgdata)
            with stopped([postmaster, *children_of(postmaster)]):
                started = time.monotonic()
                attempted.extend(d["id"] for d in docs_of("stalled-", 5))
                with pytest.raises(ce.Unavailable) as first:
                    await c.upsert("s", docs_of("stalled-", 5))
                answered = time.monotonic() - started
                print(f"\nupsert while PostgreSQL is stopped answered in {answered:.2f} s: {first.value.message}")
                assert answered < WRITE_DEADLINE_S + 1.0
                # Reads are served from memory.
                started = time.monotonic()
                hits = (await c.query("s", vector=[1.0, 1.0, 0.0, 0.5], k=3)).hits
                assert hits and hits[0].id == "before-0"
                assert await c.count("s") == 50
                assert [d["id"] for d in await c.get("s", ["before-7"], include=[])] == ["before-7"]
                assert time.monotonic() - started < 2.0
                assert await readyz(http) == 503
                body = (await http.get("/readyz")).json()
                assert body["status"] == "database unavailable" and not body["database"]["up"]
                # Over HTTP too, and the database being known down, now at once.
                started = time.monotonic()
                attempted.extend(d["id"] for d in docs_of("http-", 2))
                response = await http.post("/v1/collections/s/upsert", json={"docs": docs_of("http-", 2)}, timeout=30)
                assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"
                answered = time.monotonic() - started
                print(f"HTTP upsert with the database known down answered in {answered:.3f} s")
                assert answered < WRITE_DEADLINE_S + 1.0
            resumed = time.monotonic()
            ok_at = await write_until_ok(c, "s", "after-", attempted, within=30)
            print(f"first write after SIGCONT acked after {ok_at - resumed:.2f} s")
            acked.extend(attempted[-5:])
            for _ in range(50):
                if await readyz(http) == 200:
                    break
                await asyncio.sleep(0.1)
            assert await readyz(http) == 200
            await check_agrees_with_postgres(c, str(pgdata), "s", acked, attempted)
    finally:
        code = proc.stop()
        log = proc.log_tail(200)
        print(log)  # shown when the test fails
        remove_tree(data_dir)
    assert code in (0, -signal.SIGTERM), log


async def test_external_database_is_not_restarted_but_reconnected() -> None:
    root = Path(tempfile.mkdtemp(prefix="shoal-test-extdb-", dir="/tmp"))
    # The test's own PostgreSQL, not supervised here (an hour between crash checks).
    database = DatabaseServer(root / "db", None, check_interval=3600)
    dsn = await database.start()
    pgdata = root / "db" / "pg"
    proc = ServerProcess(root / "shoal", env={"SHOAL_DATABASE_URL": dsn})
    (root / "shoal").mkdir()
    try:
        proc.start()
        async with ShoalClient.connect(proc.ws_url) as c, httpx.AsyncClient(base_url=proc.url) as http:
            await c.create_collection("x", dim=DIM, metric="l2")
            acked = [d["id"] for d in docs_of("x", 30)]
            await c.upsert("x", docs_of("x", 30))
            os.kill(postmaster_pid(pgdata), signal.SIGKILL)
            await asyncio.sleep(0.5)  # the old backends notice their postmaster is gone
            attempted = list(acked)
            for i in range(25):  # seconds of writes that cannot succeed
                attempted.extend(d["id"] for d in docs_of(f"down{i}-", 1))
                with pytest.raises(ce.Unavailable):
                    await c.upsert("x", docs_of(f"down{i}-", 1))
                await asyncio.sleep(0.1)
            assert crashed(pgdata)  # nobody restarted it
            assert await readyz(http) == 503
            assert await c.count("x") == 30  # reads keep serving
            assert await anyio.to_thread.run_sync(_restart, pgdata)  # the operator brings it back
            ok_at = await write_until_ok(c, "x", "back-", attempted, within=30)
            assert ok_at
            acked.extend(attempted[-5:])
            await check_agrees_with_postgres(c, str(pgdata), "x", acked, attempted)
        assert "embedded PostgreSQL" not in proc.log_tail(400)
    finally:
        if proc.proc is not None:
            proc.stop()
        await database.stop()
        remove_tree(root)


# --- unit level: in-doubt commits against a real PostgreSQL ----------------------------------


@pytest.fixture(scope="module")
async def database() -> Any:
    root = Path(tempfile.mkdtemp(prefix="shoal-test-indoubt-", dir="/tmp"))
    server = DatabaseServer(root, None, check_interval=3600)
    dsn = await server.start()
    try:
        conn = await asyncpg.connect(dsn)
        await conn.execute("CREATE TABLE IF NOT EXISTS probe_rows (k text PRIMARY KEY)")
        await conn.close()
        yield dsn
    finally:
        await server.stop()
        remove_tree(root)


async def row_exists(dsn: str, key: str) -> bool:
    conn = await asyncpg.connect(dsn)
    try:
        return bool(await conn.fetchval("SELECT count(*) FROM probe_rows WHERE k = $1", key))
    finally:
        await conn.close()


async def test_commit_cut_off_mid_commit_is_resolved_to_committed(database: str) -> None:
    async with Persistence(database, command_timeout=1.0, probe_interval=0.2) as db:

        async def body(conn: Any) -> str:
            await conn.execute("INSERT INTO probe_rows VALUES ('in-doubt')")
            backend = conn.get_server_pid()
            os.kill(backend, signal.SIGSTOP)  # COMMIT goes to a stopped backend: no answer
            threading.Timer(1.5, os.kill, (backend, signal.SIGCONT)).start()
            return "done"

        started = time.monotonic()
        with anyio.fail_after(30):
            assert await db._db.write(body) == "done"
        assert time.monotonic() - started >= 1.0  # it did time out and asked
        assert await row_exists(database, "in-doubt")
        assert not db.health.up  # the failure was seen ...
        assert await db.ping() and db.health.up  # ... and the recovery too


async def test_statement_cut_off_before_commit_never_commits(database: str) -> None:
    async with Persistence(database, command_timeout=1.0, probe_interval=0.2) as db:
        backends: list[int] = []

        async def body(conn: Any) -> None:
            await conn.execute("INSERT INTO probe_rows VALUES ('cut-off')")
            backends.append(conn.get_server_pid())
            os.kill(backends[0], signal.SIGSTOP)
            await conn.execute("SELECT 1")  # no answer: the deadline fires before COMMIT

        try:
            started = time.monotonic()
            with anyio.fail_after(10), pytest.raises(Unavailable, match="no answer within 1 s"):
                await db._db.write(body)
            assert time.monotonic() - started < 2.5
        finally:
            for pid in backends:
                os.kill(pid, signal.SIGCONT)
        for _ in range(50):  # the backend sees the closed socket and rolls back
            if alive(backends[0]):
                await anyio.sleep(0.1)
        assert not await row_exists(database, "cut-off")


async def test_probe_marks_the_database_down_and_up_again() -> None:
    root = Path(tempfile.mkdtemp(prefix="shoal-test-probe-", dir="/tmp"))
    server = DatabaseServer(root, None, check_interval=3600)
    dsn = await server.start()
    try:
        db = Persistence(dsn, probe_interval=0.2, probe_timeout=1.0)
        async with anyio.create_task_group() as tg:
            await tg.start(db.run)
            assert db.health.up
            await server.stop()  # a clean stop: not restarted, the probe notices
            with anyio.fail_after(5):
                while db.health.up:
                    await db.health.changed.wait()
            assert db.health.to_wire()["up"] is False and db.health.reason
            started = time.monotonic()
            with pytest.raises(Unavailable):  # fails fast while known down
                await db.list_collections()
            assert time.monotonic() - started < 0.1
            assert await server.start() == dsn
            with anyio.fail_after(10):
                while not db.health.up:
                    await db.health.changed.wait()
            assert await db.list_collections() == []
            db.close()
    finally:
        await server.stop()
        remove_tree(root)
