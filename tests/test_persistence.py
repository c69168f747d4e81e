"""Persistence against a real embedded PostgreSQL: seqs, the change log, deletes, restarts, outages."""

from __future__ import annotations

import itertools
import os
import signal
import subprocess
import sys
import tempfile
import zlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import anyio
import numpy as np
import pytest

from actors.persistence import CollectionSnapshot, Persistence
from actors.pg_codecs import decode_vector, encode_vector
from actors.pg_server import DatabaseServer, DatabaseSetupError, check_data_dir, open_database
from actors.schema import Tables
from models.errors import BadRequest, DimensionMismatch, Exists, NotFound, StartupError, Unavailable
from models.filters import parse_where, parse_where_text
from models.records import DocId, Document, Metadata, Metric, StoredDoc

pytestmark = pytest.mark.timeout(90)

DIM = 8
_counter = itertools.count()


def vec(seed: int, dim: int = DIM) -> np.ndarray:
    return np.random.default_rng(seed).standard_normal(dim).astype(np.float32)


def doc(
    i: int | str, seed: int | None = None, text: str | None = "", meta: Metadata | None = None
) -> Document:
    ident = i if isinstance(i, str) else f"d{i}"
    s = seed if seed is not None else zlib.crc32(ident.encode()) % 10_000
    return Document(
        DocId(ident),
        f"text of {ident}" if text == "" else text,
        vec(s),
        {"n": s} if meta is None else meta,
    )


async def load_all(db: Persistence, name: str, batch: int = 5000) -> dict[str, StoredDoc]:
    out: dict[str, StoredDoc] = {}
    async for chunk in db.load_collection(name, batch):
        for d in chunk:
            assert d.id not in out
            out[d.id] = d
    return out


@pytest.fixture(scope="module")
def tmp_root() -> Iterator[Path]:
    with tempfile.TemporaryDirectory(prefix="shoal-test-persist-", dir="/tmp") as tmp:
        yield Path(tmp)


@pytest.fixture(scope="module")
async def db(tmp_root: Path) -> AsyncIterator[Persistence]:
    async with open_database(tmp_root / "main", None) as dsn, Persistence(dsn) as persistence:
        yield persistence


@pytest.fixture
async def coll(db: Persistence) -> str:
    name = f"c{next(_counter)}"
    await db.create_collection(name, DIM, Metric.COSINE)
    return name


# --- codecs ------------------------------------------------------------------------------------


def test_vector_codec_round_trip() -> None:
    v = vec(1, 384)
    data = encode_vector(v)
    assert len(data) == 4 + 4 * 384
    assert encode_vector(data) == data  # pre-encoded bytes pass through
    out = decode_vector(data)
    assert out.dtype == np.float32 and out.flags.writeable
    np.testing.assert_array_equal(out, v)


def test_pgvector_version_parsing() -> None:
    from actors.schema import MIN_PGVECTOR, _version_tuple

    assert _version_tuple("0.8.6") == (0, 8, 6) >= MIN_PGVECTOR
    assert _version_tuple("0.7.0") >= MIN_PGVECTOR
    assert _version_tuple("0.6.2") < MIN_PGVECTOR
    assert _version_tuple("0.10.0rc1") > MIN_PGVECTOR


# --- collections -------------------------------------------------------------------------------


async def table_exists(db: Persistence, table: str) -> bool:
    async with db._connection() as conn:
        return bool(await conn.fetchval("SELECT to_regclass($1) IS NOT NULL", table))


async def test_create_get_list_drop(db: Persistence) -> None:
    info = await db.create_collection("lifecycle", 3, Metric.L2)
    assert (info.name, info.dim, info.metric, info.count) == ("lifecycle", 3, Metric.L2, 0)
    with pytest.raises(Exists):
        await db.create_collection("lifecycle", 3, Metric.L2)
    assert await db.get_collection("lifecycle") == info
    await db.commit_upserts("lifecycle", [Document(DocId("a"), None, np.ones(3, np.float32))])
    listed = {c.name: c for c in await db.list_collections()}
    assert listed["lifecycle"].count == 1

    async with db._connection() as conn:
        cid = await conn.fetchval("SELECT id FROM shoal_collections WHERE name = 'lifecycle'")
    tables = Tables(cid)
    assert await table_exists(db, tables.docs) and await table_exists(db, tables.log)
    await db.drop_collection("lifecycle")
    assert not await table_exists(db, tables.docs)
    assert not await table_exists(db, tables.log)
    assert "lifecycle" not in {c.name for c in await db.list_collections()}
    for call in (
        db.drop_collection("lifecycle"),
        db.get_collection("lifecycle"),
        db.last_seq("lifecycle"),
        db.commit_upserts("lifecycle", [doc(1)]),
        db.commit_delete_ids("lifecycle", ["a"]),
        db.changes_after("lifecycle", 0, 10),
        load_all(db, "lifecycle"),
    ):
        with pytest.raises(NotFound):
            await call
    # Recreated under the same name: new, empty tables.
    again = await db.create_collection("lifecycle", 5, Metric.IP)
    assert again.count == 0 and await db.last_seq("lifecycle") == 0
    await db.drop_collection("lifecycle")


async def test_bad_dim_rejected(db: Persistence) -> None:
    for dim in (0, -1, 16_001):
        with pytest.raises(BadRequest):
            await db.create_collection(f"bad{dim}", dim, Metric.COSINE)


# --- seqs --------------------------------------------------------------------------------------


async def test_batches_take_consecutive_seqs(db: Persistence, coll: str) -> None:
    assert await db.last_seq(coll) == 0
    assert await db.commit_upserts(coll, [doc(i) for i in range(5)]) == (1, 5)
    assert await db.commit_upserts(coll, [doc(5)]) == (6, 6)
    assert await db.commit_upserts(coll, [doc(i) for i in range(6, 13)]) == (7, 13)
    assert await db.last_seq(coll) == 13
    docs = await load_all(db, coll)
    assert {d.id: d.seq for d in docs.values()} == {f"d{i}": i + 1 for i in range(13)}
    # An empty batch is the empty range after the last seq and changes nothing.
    assert await db.commit_upserts(coll, []) == (14, 13)
    assert await db.last_seq(coll) == 13


async def test_concurrent_writers_never_interleave_or_repeat_seqs(db: Persistence, coll: str) -> None:
    ranges: dict[tuple[int, int], list[str]] = {}

    async def writer(w: int) -> None:
        for b in range(6):
            ids = [f"w{w}-b{b}-{i}" for i in range(1 + (w + b) % 7 * 5)]
            first, last = await db.commit_upserts(coll, [doc(i) for i in ids])
            assert last - first + 1 == len(ids)
            ranges[(first, last)] = ids

    with anyio.fail_after(60):
        async with anyio.create_task_group() as tg:
            for w in range(8):
                tg.start_soon(writer, w)

    total = sum(len(ids) for ids in ranges.values())
    spans = sorted(ranges)
    assert spans[0][0] == 1 and spans[-1][1] == total
    for (_, last), (first, _) in itertools.pairwise(spans):
        assert first == last + 1  # contiguous, disjoint
    changes = await db.changes_after(coll, 0, total + 10)
    assert [c.seq for c in changes] == list(range(1, total + 1))
    for (first, _), ids in ranges.items():
        assert [c.doc_id for c in changes[first - 1 : first - 1 + len(ids)]] == ids
    docs = await load_all(db, coll)
    assert len(docs) == total == (await db.get_collection(coll)).count
    for (first, _), ids in ranges.items():
        for k, ident in enumerate(ids):
            assert docs[ident].seq == first + k


async def test_duplicate_ids_in_one_batch_last_wins(db: Persistence, coll: str) -> None:
    batch = [doc("a", seed=1, text="one"), doc("b", seed=2), doc("a", seed=3, text="three", meta={"k": "v"})]
    assert await db.commit_upserts(coll, batch) == (1, 3)
    docs = await load_all(db, coll)
    assert set(docs) == {"a", "b"}
    a = docs["a"]
    assert (a.seq, a.text, a.metadata) == (3, "three", {"k": "v"})
    np.testing.assert_array_equal(a.vector, vec(3))
    assert (await db.get_collection(coll)).count == 2
    # The log keeps both versions of "a".
    changes = await db.changes_after(coll, 0, 10)
    assert [(c.seq, c.doc_id, c.text) for c in changes] == [
        (1, "a", "one"),
        (2, "b", "text of b"),
        (3, "a", "three"),
    ]


async def test_replace_keeps_one_row(db: Persistence, coll: str) -> None:
    await db.commit_upserts(coll, [doc("x", seed=1, text="old", meta={"v": 1})])
    await db.commit_upserts(coll, [doc("x", seed=2, text=None, meta={"v": 2, "tags": ["a", "b"]})])
    docs = await load_all(db, coll)
    assert list(docs) == ["x"]
    x = docs["x"]
    assert (x.seq, x.text, x.metadata) == (2, None, {"v": 2, "tags": ["a", "b"]})
    np.testing.assert_array_equal(x.vector, vec(2))
    assert (await db.get_collection(coll)).count == 1
    async with db._connection() as conn:
        cid = await conn.fetchval("SELECT id FROM shoal_collections WHERE name = $1", coll)
        assert await conn.fetchval(f"SELECT count(*) FROM {Tables(cid).docs}") == 1


# --- the change log ----------------------------------------------------------------------------


async def test_change_log_holds_full_content(db: Persistence, coll: str) -> None:
    meta: Metadata = {"s": "é ✓ \U0001f600", "i": 7, "f": 0.25, "b": True, "l": ["x", "y"]}
    await db.commit_upserts(
        coll, [doc("u", seed=5, text="ünïcode ✓", meta=meta), doc("v", seed=6, text=None)]
    )
    await db.commit_upserts(coll, [doc("u", seed=9, text="second")])
    await db.commit_delete_ids(coll, ["v"])

    changes = await db.changes_after(coll, 0, 100)
    assert [(c.seq, c.op, c.doc_id) for c in changes] == [
        (1, "upsert", "u"),
        (2, "upsert", "v"),
        (3, "upsert", "u"),
        (4, "delete", "v"),
    ]
    first = changes[0]  # the document as it was at seq 1, not as it is now
    assert first.text == "ünïcode ✓" and first.metadata == meta
    assert first.vector is not None and first.vector.dtype == np.float32
    np.testing.assert_array_equal(first.vector, vec(5))
    assert changes[1].text is None and changes[1].metadata == {"n": 6}
    assert changes[2].text == "second"
    assert (changes[3].text, changes[3].vector, changes[3].metadata) == (None, None, None)

    assert [c.seq for c in await db.changes_after(coll, 1, 2)] == [2, 3]
    assert [c.seq for c in await db.changes_after(coll, 3, 100)] == [4]
    assert await db.changes_after(coll, 4, 100) == []


async def test_rejected_document_rolls_back(db: Persistence, coll: str) -> None:
    await db.commit_upserts(coll, [doc(1)])
    with pytest.raises(DimensionMismatch):
        await db.commit_upserts(coll, [doc(2), Document(DocId("w"), None, np.ones(DIM + 1, np.float32))])
    with pytest.raises(BadRequest):  # PostgreSQL text cannot hold NUL
        await db.commit_upserts(coll, [doc(3), doc(4, text="nul \x00 inside")])
    assert await db.last_seq(coll) == 1
    assert list(await load_all(db, coll)) == ["d1"]
    assert len(await db.changes_after(coll, 0, 10)) == 1
    # The collection still takes writes after the failed ones.
    assert await db.commit_upserts(coll, [doc(5)]) == (2, 2)


async def test_other_dimensions(db: Persistence) -> None:
    for dim in (1, 3, 1536):
        name = f"dim{dim}"
        await db.create_collection(name, dim, Metric.IP)
        v = vec(dim, dim)
        await db.commit_upserts(name, [Document(DocId("a"), "t" * 2000, v, {"dim": dim})])
        (stored,) = (await load_all(db, name)).values()
        np.testing.assert_array_equal(stored.vector, v)
        assert stored.text == "t" * 2000
        (change,) = await db.changes_after(name, 0, 5)
        assert change.vector is not None
        np.testing.assert_array_equal(change.vector, v)
        await db.drop_collection(name)


# --- load --------------------------------------------------------------------------------------


async def test_load_collection_returns_exactly_the_live_docs(db: Persistence, coll: str) -> None:
    n = 1234
    for start in range(0, n, 500):
        await db.commit_upserts(coll, [doc(i, seed=i) for i in range(start, min(n, start + 500))])
    await db.commit_upserts(coll, [doc(i, seed=10_000 + i, text="replaced") for i in range(0, n, 10)])
    deleted, _ = await db.commit_delete_ids(coll, [f"d{i}" for i in range(5, n, 7)])
    last = await db.last_seq(coll)

    snap = db.load_collection(coll, batch=300)
    assert isinstance(snap, CollectionSnapshot)
    sizes: list[int] = []
    docs: dict[str, StoredDoc] = {}
    async for chunk in snap:
        sizes.append(len(chunk))
        docs.update((d.id, d) for d in chunk)
    assert snap.last_seq == last
    assert all(s == 300 for s in sizes[:-1]) and 0 < sizes[-1] <= 300

    live = {f"d{i}" for i in range(n)} - set(deleted)
    assert set(docs) == live and sum(sizes) == len(live)
    assert (await db.get_collection(coll)).count == len(live)
    for i in range(n):
        d = docs.get(f"d{i}")
        if d is None:
            continue
        replaced = i % 10 == 0
        assert d.text == ("replaced" if replaced else f"text of d{i}")
        np.testing.assert_array_equal(d.vector, vec(10_000 + i if replaced else i))


async def test_load_snapshot_ignores_later_writes_and_can_stop_early(db: Persistence, coll: str) -> None:
    await db.commit_upserts(coll, [doc(i) for i in range(20)])
    async with db.load_collection(coll, batch=5) as snap:
        first = await anext(snap)
        assert snap.last_seq == 20
        # A write after the snapshot began is not in it (and is not blocked by it).
        with anyio.fail_after(10):
            await db.commit_upserts(coll, [doc(i) for i in range(20, 30)])
        rest = [d async for chunk in snap for d in chunk]
    assert len(first) + len(rest) == 20
    # Stopping early gives the connection back.
    async with db.load_collection(coll, batch=5) as snap:
        await anext(snap)
    assert len(await load_all(db, coll)) == 30


# --- deletes -----------------------------------------------------------------------------------


async def test_delete_by_ids(db: Persistence, coll: str) -> None:
    await db.commit_upserts(coll, [doc(i) for i in range(10)])
    deleted, last = await db.commit_delete_ids(coll, ["d7", "missing", "d2", "d7", "d3"])
    assert (deleted, last) == (["d7", "d2", "d3"], 13)
    changes = await db.changes_after(coll, 10, 10)
    assert [(c.seq, c.op, c.doc_id) for c in changes] == [
        (11, "delete", "d7"),
        (12, "delete", "d2"),
        (13, "delete", "d3"),
    ]
    # Nothing to delete: no change, the current last seq.
    assert await db.commit_delete_ids(coll, ["d7", "nope"]) == ([], 13)
    assert await db.commit_delete_ids(coll, []) == ([], 13)
    assert await db.last_seq(coll) == 13
    assert set(await load_all(db, coll)) == {f"d{i}" for i in (0, 1, 4, 5, 6, 8, 9)}
    assert (await db.get_collection(coll)).count == 7
    # A deleted id can come back, under a new seq.
    assert await db.commit_upserts(coll, [doc(7)]) == (14, 14)
    assert (await db.get_collection(coll)).count == 8


async def test_delete_where(db: Persistence, coll: str) -> None:
    docs = [
        doc(
            i,
            text=None if i % 5 == 0 else f"item {i} {'red' if i % 2 else 'blue'}",
            meta={"i": i, "g": f"g{i % 3}"},
        )
        for i in range(30)
    ]
    await db.commit_upserts(coll, docs)

    deleted, last = await db.commit_delete_where(coll, parse_where({"g": "g0"}), None)
    assert deleted == sorted(f"d{i}" for i in range(0, 30, 3))
    assert last == 30 + len(deleted)
    assert [c.doc_id for c in await db.changes_after(coll, 30, 100)] == deleted

    deleted2, last2 = await db.commit_delete_where(
        coll,
        parse_where({"$and": [{"i": {"$gte": 10}}, {"i": {"$lt": 20}}]}),
        parse_where_text({"$contains": "red"}),
    )
    assert deleted2 == sorted(f"d{i}" for i in range(10, 20) if i % 3 and i % 2 and i % 5)
    assert last2 == last + len(deleted2)

    # $not_contains never matches a document without text.
    deleted3, _ = await db.commit_delete_where(coll, None, parse_where_text({"$not_contains": "blue"}))
    assert all(docs[int(d[1:])].text is not None for d in deleted3)

    assert await db.commit_delete_where(coll, parse_where({"g": "nope"}), None) == (
        [],
        await db.last_seq(coll),
    )
    with pytest.raises(BadRequest):
        await db.commit_delete_where(coll, None, None)

    gone = set(deleted) | set(deleted2) | set(deleted3)
    remaining = await load_all(db, coll)
    assert set(remaining) == {f"d{i}" for i in range(30)} - gone
    assert (await db.get_collection(coll)).count == len(remaining)


# --- life cycle, restarts and outages ----------------------------------------------------------


async def test_run_reports_started_and_closes(db: Persistence) -> None:
    other = Persistence(db._dsn, pool_size=2)
    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            started = await tg.start(other.run)
            assert started is other
            assert await other.ping()
            other.close()
    assert not await other.ping()
    with pytest.raises(Unavailable):
        await other.list_collections()


async def test_restart_keeps_committed_data(tmp_root: Path) -> None:
    data = tmp_root / "restart"
    async with open_database(data, None) as dsn, Persistence(dsn) as db:
        await db.create_collection("keep", DIM, Metric.COSINE)
        await db.commit_upserts("keep", [doc(i) for i in range(50)])
        await db.commit_delete_ids("keep", ["d3"])
    assert not (data / "pg" / "postmaster.pid").exists()  # stopped cleanly

    async with open_database(data, None) as dsn, Persistence(dsn) as db:
        assert await db.last_seq("keep") == 51
        docs = await load_all(db, "keep")
        assert set(docs) == {f"d{i}" for i in range(50)} - {"d3"}
        np.testing.assert_array_equal(docs["d7"].vector, doc(7).vector)
        assert (await db.get_collection("keep")).count == 49
        assert await db.commit_upserts("keep", [doc(99)]) == (52, 52)


async def test_unavailable_while_the_server_is_down(tmp_root: Path) -> None:
    data = tmp_root / "outage"
    server = DatabaseServer(data, None)
    dsn = await server.start()
    async with Persistence(dsn, connect_timeout=2.0, acquire_timeout=2.0) as db:
        await db.create_collection("o", DIM, Metric.COSINE)
        await db.commit_upserts("o", [doc(1)])
        await server.stop()

        with anyio.fail_after(10):  # fails fast, does not hang
            with pytest.raises(Unavailable):
                await db.commit_upserts("o", [doc(2)])
            with pytest.raises(Unavailable):
                await db.commit_delete_ids("o", ["d1"])
            with pytest.raises(Unavailable):
                await db.list_collections()
            assert not await db.ping()

        # The same pool recovers once the server is back.
        assert await server.start() == dsn
        try:
            with anyio.fail_after(30):
                while not await db.ping():
                    await anyio.sleep(0.1)
            assert await db.commit_upserts("o", [doc(3)]) == (2, 2)
            assert set(await load_all(db, "o")) == {"d1", "d3"}
        finally:
            await server.stop()


async def test_open_fails_fast_without_a_server(tmp_root: Path) -> None:
    dsn = f"postgresql://postgres:@/postgres?host={tmp_root / 'nowhere'}"
    # At start-up an unreachable database is a configuration mistake, reported in one line.
    with anyio.fail_after(10), pytest.raises(StartupError, match="cannot reach the database"):
        async with Persistence(dsn, connect_timeout=2.0):
            pass


async def test_two_users_of_one_directory_share_the_server(tmp_root: Path) -> None:
    data = tmp_root / "shared"
    async with open_database(data, None) as dsn1:
        async with open_database(data, None) as dsn2, Persistence(dsn2, pool_size=1) as db:
            assert dsn1 == dsn2 and await db.ping()
        # The inner exit did not stop the server the outer block still uses.
        async with Persistence(dsn1, pool_size=1) as db:
            assert await db.ping()
    assert not (data / "pg" / "postmaster.pid").exists()


def test_data_dir_must_be_under_tmp_or_var_lib_as_root() -> None:
    if os.geteuid() != 0:
        assert check_data_dir(Path("/root/shoal")) == Path("/root/shoal").resolve()
        return
    for bad in ("/root/shoal", "/work/data", "/tmp/../root/x"):
        with pytest.raises(DatabaseSetupError, match="/tmp or /var/lib"):
            check_data_dir(Path(bad))
    assert check_data_dir(Path("/tmp/shoal-x")) == Path("/tmp/shoal-x")
    assert check_data_dir(Path("/var/lib/shoal")) == Path("/var/lib/shoal")
    with pytest.raises(DatabaseSetupError):
        DatabaseServer(None, None)
    assert not DatabaseServer(Path("/root/ignored"), "postgresql://h/db").embedded


async def test_start_over_a_stale_pidfile_whose_pid_was_reused(tmp_root: Path) -> None:
    data = tmp_root / "stale"
    async with open_database(data, None):
        content = (data / "pg" / "postmaster.pid").read_text().splitlines()
    # As after a container restart: the old server's pid now belongs to an unrelated process.
    other = subprocess.Popen(["sleep", "60"])
    try:
        (data / "pg" / "postmaster.pid").write_text("\n".join([str(other.pid), *content[1:]]) + "\n")
        async with open_database(data, None) as dsn, Persistence(dsn, pool_size=1) as db:
            assert await db.ping()
    finally:
        other.kill()
        other.wait()


CHILD = """
import sys, anyio, numpy as np
from pathlib import Path
from actors.pg_server import open_database
from actors.persistence import Persistence
from models.records import DocId, Document, Metric

async def main() -> None:
    async with open_database(Path(sys.argv[1]), None) as dsn, Persistence(dsn) as db:
        await db.create_collection("k", 2, Metric.L2)
        await db.commit_upserts("k", [Document(DocId("a"), "acked", np.ones(2, np.float32))])
        print("ACKED", flush=True)
        await anyio.sleep(120)

anyio.run(main)
"""


async def test_sigkilled_owner_leaves_a_server_the_next_start_reattaches_to(tmp_root: Path) -> None:
    data = tmp_root / "killed"
    child = subprocess.Popen(
        [sys.executable, "-c", CHILD, str(data)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=Path(__file__).parents[1],
    )
    try:
        assert child.stdout is not None
        with anyio.fail_after(60):
            line = await anyio.to_thread.run_sync(child.stdout.readline)
        assert line.strip() == "ACKED"
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert (data / "pg" / "postmaster.pid").exists()  # the server outlived its owner

    async with open_database(data, None) as dsn, Persistence(dsn, pool_size=1) as db:
        (stored,) = (await load_all(db, "k")).values()
        assert (stored.id, stored.text, stored.seq) == ("a", "acked", 1)
    # The dead owner does not keep the server alive: the clean exit stopped it.
    assert not (data / "pg" / "postmaster.pid").exists()
