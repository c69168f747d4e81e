"""Start-up mistakes about the database: each stops `shoal serve` with one message saying what to
fix, raised as `StartupError` by the code that detects it.

End to end through a real `shoal serve` process (it must exit non-zero, soon, with the message on
stderr as its only line, `shoal: <message>`, with no traceback), and at unit level against the
detecting functions.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from actors.pg_pool import DatabasePool, redact
from actors.pg_server import DatabaseServer, DatabaseSetupError, _make_data_dir
from actors.schema import ensure_pgvector
from models.errors import StartupError
from tests.server_process import ROOT

pytestmark = pytest.mark.timeout(120)

EXIT_WITHIN_S = 30.0


def serve(*args: str, env: dict[str, str] | None = None) -> tuple[int, str, float]:
    """Run `shoal serve --port 0 ARGS` to its end: (exit code, stderr, seconds taken)."""
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-m", "server.cli", "serve", "--port", "0", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=EXIT_WITHIN_S + 30,
        env=env,
    )
    return done.returncode, done.stderr, time.monotonic() - started


def only_line(err: str) -> str:
    """The one line a failed start prints; fails the test on anything more (a traceback, a log)."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("shoal: "), err
    return lines[0]


@pytest.fixture(scope="module")
def root() -> Iterator[Path]:
    path = Path(tempfile.mkdtemp(prefix="shoal-test-startup-", dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
async def no_extension_url(root: Path) -> AsyncIterator[str]:
    """A URL whose connection works but where `CREATE EXTENSION vector` is refused: a role that
    owns its database but is no superuser, which pgvector (not a trusted extension) requires."""
    server = DatabaseServer(root / "pg-owner", None, check_interval=3600)
    dsn = await server.start()
    try:
        conn = await asyncpg.connect(dsn)
        try:
            await conn.execute("CREATE ROLE shoal_plain LOGIN NOSUPERUSER")
            await conn.execute("CREATE DATABASE shoal_plain OWNER shoal_plain")
        finally:
            await conn.close()
        yield f"postgresql://shoal_plain@/shoal_plain?host={root / 'pg-owner' / 'pg'}"
    finally:
        await server.stop()


def test_unreachable_database_url(root: Path) -> None:
    code, err, took = serve(
        "--data-dir", str(root / "unused"), "--database-url", "postgresql://postgres:hunter2@127.0.0.1:1/postgres"
    )
    assert code != 0 and took < EXIT_WITHIN_S
    assert "cannot reach the database postgresql://postgres@127.0.0.1:1/postgres: connection refused" in only_line(err)
    assert "hunter2" not in err  # the password is never printed


def test_database_without_pgvector(no_extension_url: str, root: Path) -> None:
    code, err, took = serve("--data-dir", str(root / "unused"), "--database-url", no_extension_url)
    assert code != 0 and took < EXIT_WITHIN_S
    assert "'vector' extension is not installed in this database and this role may not create it" in only_line(err)


def test_refused_data_directory(root: Path) -> None:
    regular_file = root / "a-file"
    regular_file.write_text("not a directory")
    code, err, took = serve("--data-dir", str(regular_file / "data"))
    assert code != 0 and took < EXIT_WITHIN_S
    assert f"data directory {regular_file / 'data'} cannot be used: not a directory" in only_line(err)


# --- unit level ----------------------------------------------------------------------------------


def test_make_data_dir_refuses_what_cannot_be_a_directory(root: Path) -> None:
    regular_file = root / "b-file"
    regular_file.write_text("x")
    for bad in (regular_file / "data", regular_file):
        with pytest.raises(DatabaseSetupError, match="cannot be used") as refused:
            _make_data_dir(bad / "pg")
        assert isinstance(refused.value, StartupError)
    _make_data_dir(root / "fine" / "deeper" / "pg")
    assert (root / "fine" / "deeper").is_dir()


async def test_unreachable_and_refused_logins_are_startup_errors(root: Path, no_extension_url: str) -> None:
    with pytest.raises(StartupError, match="cannot reach the database"):
        await DatabasePool(f"postgresql://postgres@/postgres?host={root / 'nowhere'}", connect_timeout=2).open()
    missing_db = no_extension_url.replace("/shoal_plain?", "/no_such_database?")
    with pytest.raises(StartupError, match="refused the connection: database \"no_such_database\" does not exist"):
        await DatabasePool(missing_db, connect_timeout=2).open()


async def test_ensure_pgvector_without_permission(no_extension_url: str) -> None:
    conn = await asyncpg.connect(no_extension_url)
    try:
        with pytest.raises(DatabaseSetupError, match="may not create it"):
            await ensure_pgvector(conn)
    finally:
        await conn.close()


def test_redact_drops_the_password_only() -> None:
    assert redact("postgresql://u:pw@h:5432/db?sslmode=require") == "postgresql://u@h:5432/db?sslmode=require"
    assert redact("postgresql://u@h/db") == "postgresql://u@h/db"
    assert redact("postgresql:///db?host=/tmp/x") == "postgresql:///db?host=/tmp/x"
