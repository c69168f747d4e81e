"""One owner per embedded data directory, and `shoal postgres` as a database for several nodes."""

from __future__ import annotations

import asyncio
import shutil
import subprocess
import sys

import asyncpg
import pytest

from tests.server_process import ROOT, ServerProcess, temp_data_dir
from tests.test_cluster import Postgres

pytestmark = pytest.mark.timeout(180)


def test_a_second_server_on_a_served_data_directory_refuses_naming_the_first() -> None:
    data_dir = temp_data_dir("shoal-owner-")
    first = ServerProcess(data_dir)
    try:
        first.start()
        second = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--data-dir", str(data_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert second.returncode == 2, second.stderr
        lines = second.stderr.strip().splitlines()
        assert len(lines) == 1, second.stderr
        assert f"pid {first.pid}" in lines[0] and "already served by another process" in lines[0]
        assert "--database-url" in lines[0]
        assert first.proc is not None and first.proc.poll() is None  # the first one is untouched
    finally:
        if first.proc is not None:
            first.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def test_shoal_postgres_serves_loopback_and_refuses_a_server_on_its_directory() -> None:
    data_dir = temp_data_dir("shoal-pgtool-")
    pg = Postgres(data_dir)
    try:
        assert pg.url.startswith("postgresql://") and "@127.0.0.1:" in pg.url

        async def ask() -> str:
            conn = await asyncpg.connect(pg.url)
            try:
                sql = "SELECT default_version FROM pg_available_extensions WHERE name = 'vector'"
                return str(await conn.fetchval(sql))
            finally:
                await conn.close()

        assert asyncio.run(ask())
        refused = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--data-dir", str(data_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=90,
        )
        assert refused.returncode == 2 and f"pid {pg.proc.pid}" in refused.stderr, refused.stderr
    finally:
        assert pg.stop() == 0, "".join(pg.lines)
        shutil.rmtree(data_dir, ignore_errors=True)
