"""Snapshots for fast restart: the file format on its own, then real `shoal serve` restarts."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
import signal
import urllib.request
from pathlib import Path

import numpy as np
import pytest

from actors.indexes.hnsw import INDEX_FILE
from actors.shard_state import ARRAYS_FILE, ShardState
from actors.snapshot import (
    FORMAT_VERSION,
    MANIFEST,
    Identity,
    Manifest,
    Params,
    ShardEntry,
    SnapshotInvalid,
    SnapshotStore,
    _body_checksum,
    check_usable,
    file_entry,
    library_versions,
)
from actors.snapshotter import params_of
from models.config import EngineConfig
from models.filters import parse_where
from models.records import DocId, Include, Metric, Seq, StoredDoc
from shoal_client import ShoalClient
from tests.server_process import ServerProcess, temp_data_dir

DIM = 16
CONFIG = EngineConfig()
IDENTITY = Identity(7, "2026-01-01T00:00:00+00:00", DIM, "cosine")


def _vec(i: int) -> np.ndarray:
    return np.random.default_rng(i).normal(size=DIM).astype(np.float32)


def _state(n: int = 500) -> ShardState:
    state = ShardState(DIM, Metric.COSINE, CONFIG)
    state.upsert(
        [StoredDoc(DocId(f"d{i}"), f"text {i}", _vec(i), {"n": i, "tag": "ab"[i % 2]}, Seq(i + 1)) for i in range(n)]
    )
    state.delete([DocId("d3"), DocId("d10")])
    return state


def _write(store: SnapshotStore, state: ShardState, seq: int = 500, name: str = "c") -> Manifest:
    gen = store.new_generation(name, seq, 1)
    count = state.save_files(store.shard_dir(gen, 0))
    sdir = store.shard_dir(gen, 0)
    entry = ShardEntry(count, {p.name: file_entry(p) for p in sorted(sdir.iterdir())})
    manifest = Manifest(name, IDENTITY, seq, count, params_of(CONFIG), gen.name, (entry,))
    store.commit(manifest)
    return manifest


def _load(store: SnapshotStore, name: str = "c") -> ShardState:
    manifest = store.read_manifest(name)
    assert manifest is not None
    gen = store.verify_files(manifest)
    return ShardState.load_files(store.shard_dir(gen, 0), DIM, Metric.COSINE, CONFIG)


# -- the format -------------------------------------------------------------------------------------


def test_round_trip_answers_the_same(tmp_path: Path) -> None:
    state = _state()
    store = SnapshotStore(tmp_path)
    _write(store, state)
    loaded = _load(store)
    assert loaded.n_live == state.n_live == 498
    for i in range(20):
        q = _vec(10_000 + i)
        want = [(h.id, round(h.score, 5)) for h in state.search_unfiltered([q], 10, frozenset())[0]]
        got = [(h.id, round(h.score, 5)) for h in loaded.search_unfiltered([q], 10, frozenset())[0]]
        assert got == want
    doc = loaded.get([DocId("d7")])[0]
    assert doc.text == "text 7" and doc.metadata == {"n": 7, "tag": "b"} and doc.seq == 8
    assert np.array_equal(doc.vector, _vec(7))
    assert loaded.get([DocId("d3")]) == []
    # Metadata columns are rebuilt: filtered search works on the loaded state.
    hits = loaded.search_filtered(_vec(1), 5, parse_where({"tag": "a"}), None, frozenset({Include.METADATA}))
    assert len(hits) == 5 and all(h.metadata is not None and h.metadata["tag"] == "a" for h in hits)
    # The keyword index is rebuilt from the texts: BM25 answers as before.
    for terms in (("text", "7"), ("42",)):
        want_kw = [(h.id, round(h.score, 5)) for h in state.search_keyword(terms, 5, None, None, frozenset())]
        assert [(h.id, round(h.score, 5)) for h in loaded.search_keyword(terms, 5, None, None, frozenset())] == want_kw
        assert want_kw
    # Writes keep working after a load: a freed label is reused, new ones are added.
    loaded.upsert([StoredDoc(DocId("new"), None, _vec(99), {}, Seq(600))])
    assert loaded.n_live == 499 and loaded.get([DocId("new")])


def test_a_new_snapshot_replaces_the_old_generation(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    first = _write(store, _state(), seq=500)
    second = _write(store, _state(), seq=600)
    names = sorted(p.name for p in (tmp_path / "c").iterdir())
    assert names == sorted([MANIFEST, second.generation]) and first.generation not in names


def test_truncated_file_is_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    manifest = _write(store, _state())
    path = tmp_path / "c" / manifest.generation / "shard-0" / INDEX_FILE
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(SnapshotInvalid, match=r"index\.hnsw is damaged"):
        _load(store)


def test_flipped_byte_is_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    manifest = _write(store, _state())
    path = tmp_path / "c" / manifest.generation / "shard-0" / ARRAYS_FILE
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(SnapshotInvalid, match=r"arrays\.npz is damaged"):
        _load(store)


def test_damaged_or_foreign_manifest_is_refused(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    _write(store, _state())
    path = tmp_path / "c" / MANIFEST
    good = path.read_bytes()
    path.write_bytes(good.replace(b'"seq": 500', b'"seq": 400'))  # content changed, checksum not
    with pytest.raises(SnapshotInvalid, match="checksum"):
        store.read_manifest("c")
    path.write_bytes(good[:-10])
    with pytest.raises(SnapshotInvalid, match="malformed"):
        store.read_manifest("c")
    body = json.loads(good)
    body.pop("checksum")
    body["format"] = FORMAT_VERSION + 1
    body["checksum"] = _body_checksum(body)
    path.write_text(json.dumps(body))
    with pytest.raises(SnapshotInvalid, match="format"):
        store.read_manifest("c")
    path.unlink()
    assert store.read_manifest("c") is None


def test_check_usable_refuses_mismatches(tmp_path: Path) -> None:
    manifest = _write(SnapshotStore(tmp_path), _state(), seq=500)
    params = params_of(CONFIG)
    versions = library_versions()
    check_usable(manifest, IDENTITY, 500, params, versions)  # the database is at the same seq
    check_usable(manifest, IDENTITY, 900, params, versions)  # or ahead: the log tail replays
    with pytest.raises(SnapshotInvalid, match="ahead"):
        check_usable(manifest, IDENTITY, 499, params, versions)
    with pytest.raises(SnapshotInvalid, match="another collection"):
        check_usable(manifest, Identity(8, IDENTITY.created_at, DIM, "cosine"), 500, params, versions)
    with pytest.raises(SnapshotInvalid, match="another collection"):
        check_usable(manifest, Identity(7, IDENTITY.created_at, DIM, "l2"), 500, params, versions)
    with pytest.raises(SnapshotInvalid, match="other settings"):
        check_usable(manifest, IDENTITY, 500, Params(1, 32, 200), versions)
    with pytest.raises(SnapshotInvalid, match="hnswlib"):
        check_usable(manifest, IDENTITY, 500, params, {**versions, "hnswlib": "0.0.1"})


# -- real restarts ---------------------------------------------------------------------------------

ENV = {"SHOAL_SNAPSHOT_INTERVAL_S": "1", "SHOAL_SNAPSHOT_EVERY_CHANGES": "1000000"}
# A snapshot after every 1,000 changes and none by time: fewer changes stay in the log only.
BY_CHANGES = {"SHOAL_SNAPSHOT_INTERVAL_S": "3600", "SHOAL_SNAPSHOT_EVERY_CHANGES": "1000"}


def _metric(url: str, name: str, result: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    m = re.search(rf'^{name}_total{{result="{result}"}} (\S+)$', text, re.M)
    assert m is not None, f"{name} missing from /metrics"
    return float(m.group(1))


def _gauge(url: str, name: str, collection: str) -> float:
    text = urllib.request.urlopen(url + "/metrics", timeout=10).read().decode()
    m = re.search(rf'^{name}{{collection="{collection}"[^}}]*}} (\S+)$', text, re.M)
    assert m is not None, f"{name} missing from /metrics"
    return float(m.group(1))


async def _answers(c: ShoalClient, n_queries: int = 15) -> list[list[tuple[str, float]]]:
    out = []
    for i in range(n_queries):
        res = await c.query("snap", vector=_vec(50_000 + i), k=10)
        out.append([(h.id, round(h.score, 4)) for h in res.hits])
    return out


async def _wait_for_snapshot(proc: ServerProcess, seq: int, timeout: float = 30.0) -> None:
    manifest = proc.data_dir / "snapshots" / "snap" / MANIFEST
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while loop.time() < deadline:
        if manifest.exists() and json.loads(manifest.read_text())["seq"] >= seq:
            return
        await asyncio.sleep(0.2)
    raise AssertionError(f"no snapshot at seq {seq}:\n{proc.log_tail()}")


@pytest.mark.timeout(300)
async def test_restart_loads_snapshot_and_replays_the_log() -> None:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir, ENV)
    url = proc.start()
    try:
        async with ShoalClient.connect(url) as c:
            await c.create_collection("snap", dim=DIM)
            await c.create_collection("gone", dim=DIM)
            for start in range(0, 3000, 500):
                docs = [
                    {"id": f"d{i}", "vector": _vec(i), "text": f"t{i}", "metadata": {"i": i}}
                    for i in range(start, start + 500)
                ]
                await c.upsert("snap", docs)
            await c.upsert("gone", [{"id": "x", "vector": _vec(1)}])
            await c.delete("snap", ids=["d1", "d2"])
            before = await _answers(c)
        assert proc.stop(signal.SIGTERM) == 0

        # 1. SIGTERM: the shutdown snapshot is loaded; answers are identical.
        proc = ServerProcess(data_dir, BY_CHANGES)
        url = proc.start()
        assert _metric(url, "shoal_snapshot_loads", "loaded") == 2
        assert "loaded collection snap from snapshot: 2998 documents" in proc.log_path.read_text()
        async with ShoalClient.connect(url) as c:
            assert await _answers(c) == before
            assert await c.count("snap") == 2998
            # A dropped collection's snapshot goes away.
            await c.drop_collection("gone")
            await _wait_until(lambda: not (data_dir / "snapshots" / "gone").exists())
            # 2. More writes after the periodic snapshot, then SIGKILL: snapshot + log tail.
            for start in range(0, 1000, 500):
                bulk = [{"id": f"bulk{k}", "vector": _vec(200_000 + k)} for k in range(start, start + 500)]
                ack = await c.upsert("snap", bulk)
            await _wait_for_snapshot(proc, seq=ack.seq)  # 1,000 changes: snapshotted
            manifest_seq = json.loads((data_dir / "snapshots" / "snap" / MANIFEST).read_text())["seq"]
            acked = []
            for j in range(5):
                docs = [{"id": f"late{j}-{k}", "vector": _vec(100_000 + j * 100 + k)} for k in range(100)]
                await c.upsert("snap", docs)
                acked += [d["id"] for d in docs]
            await c.delete("snap", ids=["d5", "late0-0"])
            await c.upsert("snap", [{"id": "d6", "vector": _vec(6), "text": "changed"}])
            before = await _answers(c)
        proc.kill()

        proc = ServerProcess(data_dir, ENV)
        url = proc.start()
        log_text = proc.log_path.read_text()
        assert _metric(url, "shoal_snapshot_loads", "loaded") == 1, log_text[-3000:]
        pattern = r"loaded collection snap from snapshot: .* snapshot seq (\d+), (\d+) changes replayed"
        replay = re.findall(pattern, log_text)
        assert replay and int(replay[-1][0]) == manifest_seq and int(replay[-1][1]) == 503
        # The replayed documents join the index in the background (searched exactly meanwhile).
        await _wait_until(lambda: _gauge(url, "shoal_index_unindexed", "snap") == 0)
        async with ShoalClient.connect(url) as c:
            assert await _answers(c) == before
            got = {d["id"] for d in await c.get("snap", acked, include=[])}
            assert got == set(acked) - {"late0-0"}
            assert await c.get("snap", ["d5"]) == []
            assert (await c.get("snap", ["d6"], include=["text"]))[0]["text"] == "changed"
            assert await c.count("snap") == 2998 + 1000 + 500 - 2
        assert proc.stop(signal.SIGTERM) == 0

        # 3. Damaged files: a full rebuild with a warning, and the start succeeds.
        manifest = json.loads((data_dir / "snapshots" / "snap" / MANIFEST).read_text())
        index = data_dir / "snapshots" / "snap" / manifest["generation"] / "shard-0" / INDEX_FILE
        data = bytearray(index.read_bytes())
        data[len(data) // 3] ^= 0x5A
        index.write_bytes(bytes(data[: len(data) - 100]))
        proc = ServerProcess(data_dir, ENV)
        url = proc.start()
        assert _metric(url, "shoal_snapshot_loads", "rebuilt") == 1
        assert "snapshot not used (shard 0 file index.hnsw is damaged" in proc.log_path.read_text()
        async with ShoalClient.connect(url) as c:
            assert await _answers(c) == before
            assert await c.count("snap") == 4496
    finally:
        proc.stop()


async def _wait_until(predicate: object, timeout: float = 15.0) -> None:
    assert callable(predicate)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        if loop.time() > deadline:
            raise AssertionError("condition not reached")
        await asyncio.sleep(0.1)


@pytest.mark.timeout(300)
async def test_snapshot_ahead_of_the_database_is_not_used() -> None:
    """A snapshot claiming more than PostgreSQL holds (another data set's, or the database was
    reset) is ignored and removed: the collection is rebuilt from the database."""
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir, ENV)
    url = proc.start()
    try:
        async with ShoalClient.connect(url) as c:
            await c.create_collection("snap", dim=DIM)
            await c.upsert("snap", [{"id": f"d{i}", "vector": _vec(i)} for i in range(50)])
        assert proc.stop(signal.SIGTERM) == 0
        path = data_dir / "snapshots" / "snap" / MANIFEST
        body = json.loads(path.read_text())
        body.pop("checksum")
        body["seq"] = 10_000
        body["checksum"] = _body_checksum(body)
        path.write_text(json.dumps(body))
        orphan = data_dir / "snapshots" / "orphan"  # a collection this database does not have
        shutil.copytree(data_dir / "snapshots" / "snap", orphan)
        proc = ServerProcess(data_dir, ENV)
        url = proc.start()
        assert _metric(url, "shoal_snapshot_loads", "rebuilt") == 1
        assert "ahead of the database's last seq 50" in proc.log_path.read_text()
        async with ShoalClient.connect(url) as c:
            assert await c.count("snap") == 50
            assert [col.name for col in await c.list_collections()] == ["snap"]
        await _wait_until(lambda: not orphan.exists())
    finally:
        proc.stop()


def test_replay_replaces_documents_under_fresh_labels() -> None:
    state = _state(100)
    old_label = state.labels[DocId("d7")]
    state.upsert([StoredDoc(DocId("d7"), "again", _vec(700), {"n": 0}, Seq(200))], fresh_labels=True)
    assert state.n_live == 98 and state.labels[DocId("d7")] >= 100 and old_label in state.free
    hit = state.search_unfiltered([_vec(700)], 1, frozenset({Include.TEXT}))[0][0]
    assert hit.id == "d7" and hit.text == "again"
    assert state.get([DocId("d7")])[0].seq == 200
