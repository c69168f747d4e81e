"""Several real `shoal serve` processes on one PostgreSQL (run by a real `shoal postgres`): every
node applies every node's changes, create/drop are followed, `min_seq` reads your writes on
another node, subscriptions on any node get writes made on any node, and a node killed under write
load catches up on restart with no subscriber missing or doubling a match."""

from __future__ import annotations

import shutil
import socket
import time
from collections.abc import Iterator
from pathlib import Path

import anyio
import httpx
import numpy as np
import pytest

from load.server import PostgresProcess as Postgres
from shoal_client import ShoalClient
from shoal_client.errors import NotFound, Unavailable
from shoal_client.types import MatchEvent
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(240)

DIM = 4
HOT = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
COLD = np.array([0.0, 1.0, 0.0, 0.0], np.float32)
NODE_ENV = {"SHOAL_FOLLOW_POLL_S": "0.5", "SHOAL_EMBED_WORKERS": "1", "SHOAL_SEARCH_THREADS": "1"}


@pytest.fixture(scope="module")
def database() -> Iterator[Postgres]:
    data_dir = temp_data_dir("shoal-cluster-pg-")
    pg = Postgres(data_dir)
    try:
        yield pg
    finally:
        code = pg.stop()
        for _ in range(5):
            shutil.rmtree(data_dir, ignore_errors=True)
            if not data_dir.exists():
                break
            time.sleep(0.5)
        assert code == 0, "".join(pg.lines[-40:])


def node(database: Postgres, data_dir: Path | None = None) -> ServerProcess:
    proc = ServerProcess(data_dir or temp_data_dir("shoal-node-"), {**NODE_ENV, "SHOAL_DATABASE_URL": database.url})
    proc.start()
    return proc


def running_nodes(database: Postgres, count: int) -> Iterator[list[ServerProcess]]:
    """`count` started nodes on `database`, stopped and their data dirs removed afterwards (the
    body of a fixture)."""
    procs = [node(database) for _ in range(count)]
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.proc is not None and proc.proc.poll() is None:
                proc.stop()
            shutil.rmtree(proc.data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def nodes(database: Postgres) -> Iterator[list[ServerProcess]]:
    yield from running_nodes(database, 3)


async def wait_ready(proc: ServerProcess, timeout: float = 60) -> None:
    async with httpx.AsyncClient() as http:
        with anyio.fail_after(timeout):
            while (await http.get(proc.url + "/readyz")).status_code != 200:
                await anyio.sleep(0.1)


async def follower_metrics(proc: ServerProcess) -> dict[str, float]:
    async with httpx.AsyncClient() as http:
        text = (await http.get(proc.url + "/metrics")).text
    return {
        name: float(value)
        for line in text.splitlines()
        if line.startswith("shoal_follower_")
        for name, value in [line.rsplit(" ", 1)]
    }


def docs(prefix: str, hot: list[bool]) -> list[dict[str, object]]:
    return [{"id": f"{prefix}{i}", "vector": HOT if h else COLD, "metadata": {"i": i}} for i, h in enumerate(hot)]


async def test_writes_creates_and_drops_on_one_node_are_seen_on_the_others(nodes: list[ServerProcess]) -> None:
    a, b, c = nodes
    async with (
        ShoalClient.connect(a.ws_url) as ca,
        ShoalClient.connect(b.ws_url) as cb,
        ShoalClient.connect(c.ws_url) as cc,
    ):
        await ca.create_collection("shared", dim=DIM)
        # At once on another node, whether or not it has followed the create yet.
        again = await cc.create_collection("shared", dim=DIM, if_not_exists=True)
        assert (again.name, again.dim) == ("shared", DIM)
        with anyio.fail_after(10):  # the create is followed (notification, else the poll)
            while "shared" not in [i.name for i in await cb.list_collections()]:
                await anyio.sleep(0.02)
        written = await ca.upsert("shared", docs("a", [True, False, True]))
        # Read-your-writes on another node: answered once B has applied A's seq.
        reply = await cb.request("count", collection="shared", min_seq=written.seq)
        assert reply["count"] == 3
        hits = await cb.request("query", collection="shared", vector=HOT, k=2, min_seq=written.seq)
        assert {h["id"] for h in hits["hits"]} == {"a0", "a2"}
        # B's follower shows what it did: listening, A's writes caught up, nothing left behind.
        follower = await follower_metrics(b)
        assert follower["shoal_follower_listening"] == 1
        assert follower["shoal_follower_catch_ups_total"] >= 1
        assert follower['shoal_follower_lag{collection="shared"}'] == 0
        deleted = await cc.delete("shared", ids=["a1"])
        got = await ca.request("get", collection="shared", ids=["a0", "a1"], min_seq=deleted.seq)
        assert [d["id"] for d in got["docs"]] == ["a0"]
        # A seq nobody committed: `unavailable` after SHOAL_MIN_SEQ_WAIT_MS, not a wrong answer.
        with pytest.raises(Unavailable):
            await cb.request("count", collection="shared", min_seq=deleted.seq + 1000)
        await cb.drop_collection("shared")
        with anyio.fail_after(10):
            while True:
                try:
                    await ca.count("shared")
                except NotFound:
                    break
                await anyio.sleep(0.02)


async def test_a_node_killed_under_write_load_catches_up_and_no_subscriber_misses_or_doubles(
    database: Postgres, nodes: list[ServerProcess]
) -> None:
    a, b, c = nodes
    async with ShoalClient.connect(a.ws_url) as ca:
        await ca.create_collection("load", dim=DIM)
    await anyio.sleep(0.1)
    expected: list[int] = []  # seqs of hot documents, all written on A
    seen: dict[str, list[int]] = {"b": [], "c": []}
    last = 0

    async def consume(name: str, sub: object) -> None:
        try:
            async for event in sub:  # type: ignore[attr-defined]
                if isinstance(event, MatchEvent):
                    seen[name].append(event.seq)
        except Exception:  # the connection to the killed node is gone
            pass

    async with (
        ShoalClient.connect(a.ws_url) as ca,
        ShoalClient.connect(b.ws_url) as cb,
    ):
        with anyio.fail_after(10):
            while "load" not in [i.name for i in await cb.list_collections()]:
                await anyio.sleep(0.02)
        sub_b = await cb.subscribe("load", HOT, threshold=0.9)
        cc = await ShoalClient.open(c.ws_url)
        with anyio.fail_after(10):
            while "load" not in [i.name for i in await cc.list_collections()]:
                await anyio.sleep(0.02)
        sub_c = await cc.subscribe("load", HOT, threshold=0.9)
        async with anyio.create_task_group() as tg:
            tg.start_soon(consume, "b", sub_b)
            tg.start_soon(consume, "c", sub_c)
            restarted: ServerProcess | None = None
            for n in range(60):
                hot = [(n + i) % 3 != 0 for i in range(5)]
                written = await ca.upsert("load", docs(f"n{n}-", hot))
                first = written.seq - written.count + 1
                expected.extend(first + i for i, h in enumerate(hot) if h)
                last = written.seq
                if n == 15:
                    c.kill()  # no shutdown at all
                if n == 40:
                    restarted = await anyio.to_thread.run_sync(lambda: node(database, c.data_dir))
                await anyio.sleep(0.02)
            assert restarted is not None
            nodes[2] = restarted
            await wait_ready(restarted)
            # Resume on the restarted node after the last match C delivered before the kill.
            resume = max(seen["c"], default=0)
            cc2 = await ShoalClient.open(restarted.ws_url)
            sub_c2 = await cc2.subscribe("load", HOT, threshold=0.9, after_seq=resume)
            tg.start_soon(consume, "c", sub_c2)
            with anyio.fail_after(30):
                while len(seen["b"]) < len(expected) or len(seen["c"]) < len(expected):
                    await anyio.sleep(0.05)
            await anyio.sleep(0.3)  # nothing more (no doubles) arrives
            for name, got in seen.items():
                assert got == expected, name
            # Every node has the same documents once it has applied A's last seq.
            for proc in (a, b, restarted):
                async with ShoalClient.connect(proc.ws_url) as client:
                    reply = await client.request("count", collection="load", min_seq=last)
                    assert reply["count"] == 60 * 5
            await cc2.close()
            with anyio.move_on_after(2):
                await cc.close()
            tg.cancel_scope.cancel()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def test_notifications_resume_after_the_database_restarts() -> None:
    """With a poll far longer than the test, changes still arrive within seconds after PostgreSQL
    was stopped and started again: the follower listens again on a new connection."""
    pg_dir = temp_data_dir("shoal-cluster-restart-")
    port = free_port()
    pg = Postgres(pg_dir, port)
    env = {**NODE_ENV, "SHOAL_FOLLOW_POLL_S": "60", "SHOAL_DATABASE_URL": pg.url}
    procs = [ServerProcess(temp_data_dir("shoal-node-"), env) for _ in range(2)]
    try:
        for proc in procs:
            proc.start()
        a, b = procs
        async with ShoalClient.connect(a.ws_url) as ca, ShoalClient.connect(b.ws_url) as cb:
            await ca.create_collection("restart", dim=DIM)
            first = await ca.upsert("restart", docs("x", [True]))
            assert (await cb.request("count", collection="restart", min_seq=first.seq))["count"] == 1
        assert pg.stop() == 0
        pg = Postgres(pg_dir, port)
        for proc in procs:
            await wait_ready(proc)
        async with ShoalClient.connect(a.ws_url) as ca, ShoalClient.connect(b.ws_url) as cb:
            with anyio.fail_after(20):
                while True:
                    try:
                        second = await ca.upsert("restart", docs("y", [True, True]))
                        break
                    except Unavailable:
                        await anyio.sleep(0.2)
            await anyio.sleep(1.0)  # the notification's time, with no min_seq wake-up
            reply = await cb.request("get", collection="restart", ids=["y0", "y1"])
            assert len(reply["docs"]) == 2, reply
            assert second.seq > first.seq
    finally:
        for proc in procs:
            if proc.proc is not None:
                proc.stop()
            shutil.rmtree(proc.data_dir, ignore_errors=True)
        pg.stop()
        shutil.rmtree(pg_dir, ignore_errors=True)
