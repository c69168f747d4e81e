"""What the broker-source tests share: a test-owned PostgreSQL, Shoal servers consuming real
Redis servers, entry writers and the checks that read the change log itself."""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import redis

from actors.pg_server import DatabaseServer
from tests.server_process import ServerProcess

# Fast retries, small batches (many transactions, so a kill lands between and inside them).
SOURCE_ENV = {
    "SHOAL_SOURCE_READ_BATCH": "200",
    "SHOAL_SOURCE_MAX_IN_FLIGHT": "1000",
    "SHOAL_SOURCE_RETRY_INITIAL_S": "0.05",
    "SHOAL_SOURCE_RETRY_MAX_S": "0.5",
    "SHOAL_SOURCE_BLOCK_MS": "200",
    "SHOAL_SOURCE_CLAIM_IDLE_MS": "1000",
    "SHOAL_SOURCE_TIMEOUT_S": "2",
    "SHOAL_MAX_TEXT_CHARS": "2000",
    "SHOAL_SNAPSHOTS": "0",
}


def remove_tree(path: Path) -> None:
    for _ in range(5):  # PostgreSQL may still be removing its last files
        shutil.rmtree(path, ignore_errors=True)
        if not path.exists():
            return
        time.sleep(0.5)


class OwnDatabase:
    """A PostgreSQL of the test's own (not supervised by any Shoal), one database per use."""

    def __init__(self) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="shoal-test-srcdb-", dir="/tmp"))
        self.server = DatabaseServer(self.root / "db", None, check_interval=3600)
        self.dsn = ""

    @property
    def pgdata(self) -> Path:
        return self.root / "db" / "pg"

    async def start(self) -> None:
        self.dsn = await self.server.start()

    async def create(self, name: str) -> str:
        """A fresh database `name` on this server; returns its dsn."""
        conn = await asyncpg.connect(self.dsn)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()
        parts = urlsplit(self.dsn)
        return parts._replace(path=f"/{name}").geturl()

    async def stop(self) -> None:
        await self.server.stop()
        remove_tree(self.root)


def postmaster_pid(pgdata: Path) -> int:
    return int((pgdata / "postmaster.pid").read_text().splitlines()[0])


def shoal(data_dir: Path, dsn: str, sources: list[str], **env: str) -> ServerProcess:
    data_dir.mkdir(parents=True, exist_ok=True)
    return ServerProcess(
        data_dir, env={**SOURCE_ENV, "SHOAL_DATABASE_URL": dsn, "SHOAL_SOURCES": " ".join(sources), **env}
    )


def vector_doc(doc_id: str, i: int, dim: int) -> str:
    return json.dumps({"id": doc_id, "vector": [1.0 + (i % 7)] + [float((i * 7 + j) % 11) for j in range(dim - 1)]})


def xadd_all(r: redis.Redis, stream: str, entries: list[dict[str, str]], chunk: int = 1000) -> list[str]:
    """XADD every entry (pipelined); returns their ids in order."""
    ids: list[str] = []
    for start in range(0, len(entries), chunk):
        pipe = r.pipeline(transaction=False)
        for fields in entries[start : start + chunk]:
            pipe.xadd(stream, fields)  # type: ignore[arg-type]
        ids.extend(x.decode() for x in pipe.execute())
    return ids


def events(r: redis.Redis, notify: str) -> list[dict[str, str]]:
    """Every completion event in the notify stream, decoded."""
    entries: Any = r.xrange(notify)
    return [{k.decode(): v.decode() for k, v in fields.items()} for _, fields in entries]


def by_entry(r: redis.Redis, notify: str) -> dict[str, dict[str, str]]:
    """The last completion event of each source entry."""
    return {event["entry"]: event for event in events(r, notify)}


def group_info(r: redis.Redis, stream: str, group: str = "shoal") -> dict[str, Any]:
    for info in r.xinfo_groups(stream):
        if info["name"].decode() == group:
            return dict(info)
    raise AssertionError(f"no group {group} on {stream}")


async def sources(http: httpx.AsyncClient) -> list[dict[str, Any]]:
    reply = await http.get("/v1/sources")
    assert reply.status_code == 200, reply.text
    return list(reply.json()["sources"])


async def source(http: httpx.AsyncClient, stream: str) -> dict[str, Any]:
    for item in await sources(http):
        if item["stream"] == stream:
            return item
    raise AssertionError(f"no source of stream {stream}")


async def wait_for(check: Callable[[], Any], within: float, what: str, every: float = 0.1) -> Any:
    """Poll `check` (sync or async) until it returns something truthy; fail after `within` s."""
    deadline = time.monotonic() + within
    last: Any = None
    while time.monotonic() < deadline:
        last = check()
        if asyncio.iscoroutine(last):
            last = await last
        if last:
            return last
        await asyncio.sleep(every)
    raise AssertionError(f"timed out waiting for {what} (last: {last!r})")


@dataclass
class LogFigures:
    """What the collection's change log says: rows, distinct ids, the last seq, and the ids
    that took more than one seq."""

    changes: int
    distinct_ids: int
    last_seq: int
    twice: list[str]


async def log_figures(dsn: str, collection: str) -> LogFigures:
    conn = await asyncpg.connect(dsn)
    try:
        cid, last_seq = await conn.fetchrow("SELECT id, last_seq FROM shoal_collections WHERE name = $1", collection)
        rows = await conn.fetch(f"SELECT doc_id, count(*) AS n FROM shoal_log_{int(cid)} GROUP BY doc_id")
    finally:
        await conn.close()
    return LogFigures(
        changes=sum(int(r["n"]) for r in rows),
        distinct_ids=len(rows),
        last_seq=int(last_seq),
        twice=sorted(r["doc_id"] for r in rows if r["n"] > 1),
    )


async def committed_position(dsn: str, stream: str, group: str = "shoal") -> str | None:
    conn = await asyncpg.connect(dsn)
    try:
        value = await conn.fetchval(
            "SELECT last_entry FROM shoal_source_positions WHERE source_key = $1", f"redis:{stream}:{group}"
        )
    finally:
        await conn.close()
    return None if value is None else str(value)


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def kill_postmaster(pgdata: Path) -> None:
    os.kill(postmaster_pid(pgdata), signal.SIGKILL)
