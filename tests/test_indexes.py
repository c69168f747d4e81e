"""Every index kind in isolation, through `ShardState` (which owns the store the index reads):
recall against exact search, the filtered k-guarantee, deletes, snapshots files, l1, training in
the background, memory per vector, and the index spec's validation."""

from __future__ import annotations

import hashlib
import json
import threading
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import pytest
from numpy.typing import NDArray

from actors import exact
from actors.indexes.base import NO_PARAMS, Rebuild, VectorStore, query_params, rerank
from actors.indexes.faiss_lib import faiss
from actors.indexes.hnsw_sq import codes_drifted
from actors.matching import StandingQuery, compile_queries, doc_batch, match
from actors.shard_state import ShardState
from actors.snapshot import (
    MANIFEST,
    Identity,
    Manifest,
    ShardEntry,
    SnapshotInvalid,
    SnapshotStore,
    check_usable,
    file_entry,
    library_versions,
)
from actors.snapshotter import params_of
from models.config import EngineConfig
from models.errors import BadRequest
from models.filters import parse_where
from models.index_spec import IndexSpec, check_query_params, parse_index_spec
from models.records import DocId, Metric, Seq, StoredDoc

DIM = 32
N = 3_000
# exact_max_rows 0: the planner sends every query to the index, however small the shard.
CONFIG = EngineConfig(search_threads=1, exact_max_rows=0, ivf_train_min=500, hnsw_initial_capacity=64)
KINDS = {
    "flat": (IndexSpec("flat"), 1.0),
    "hnsw": (IndexSpec("hnsw", m=16, ef_construction=200), 0.95),
    "ivf": (IndexSpec("ivf"), 0.90),
    "lsh": (IndexSpec("lsh"), 0.90),
    "hnsw_int8": (IndexSpec("hnsw", quantization="int8"), 0.95),
    "hnsw_f16": (IndexSpec("hnsw", quantization="f16"), 0.95),
    "ivf_int8": (IndexSpec("ivf", quantization="int8"), 0.90),
    "ivf_f16": (IndexSpec("ivf", quantization="f16"), 0.90),
}


def clustered(n: int, seed: int = 7) -> NDArray[np.float32]:
    """Vectors around 40 centres: structure an approximate index can find (uniform noise in 32-d
    has no near neighbours worth the name)."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(40, DIM)).astype(np.float32)
    picks = rng.integers(0, 40, n)
    return (centres[picks] + 0.35 * rng.normal(size=(n, DIM))).astype(np.float32)


def docs(vectors: NDArray[np.float32], start: int = 0) -> list[StoredDoc]:
    return [
        StoredDoc(
            DocId(f"d{start + i}"), None, v, {"bucket": (start + i) % 10, "tiny": (start + i) < 3}, Seq(start + i + 1)
        )
        for i, v in enumerate(vectors)
    ]


def build(spec: IndexSpec, metric: Metric, tmp_path: Path, vectors: NDArray[np.float32]) -> ShardState:
    path = tmp_path / "vectors.f32" if spec.quantization else None
    state = ShardState(DIM, metric, CONFIG, spec, path)
    for start in range(0, len(vectors), 500):
        state.upsert(docs(vectors[start : start + 500], start))
    wait_built(state)
    return state


def wait_built(state: ShardState) -> None:
    rebuild = getattr(state.index, "rebuild", None)
    if rebuild is not None:
        rebuild.wait(60)


def truth(vectors: NDArray[np.float32], queries: NDArray[np.float32], metric: Metric, k: int) -> NDArray[np.int64]:
    if metric is Metric.L1:
        scores = -np.abs(queries[:, None, :] - vectors[None, :, :]).sum(axis=2)
    elif metric is Metric.L2:
        scores = -np.linalg.norm(queries[:, None, :] - vectors[None, :, :], axis=2)
    else:
        unit = vectors / np.linalg.norm(vectors, axis=1, keepdims=True)
        scores = queries @ unit.T
    return np.argsort(-scores, axis=1, kind="stable")[:, :k]


def recall(state: ShardState, vectors: NDArray[np.float32], queries: NDArray[np.float32], metric: Metric) -> float:
    want = truth(vectors, queries, metric, 10)
    hits = state.search_unfiltered(list(queries), 10, frozenset(), 1)
    got = [{int(h.id[1:]) for h in row} for row in hits]
    return float(np.mean([len(g & set(w.tolist())) / 10 for g, w in zip(got, want, strict=True)]))


@pytest.fixture(scope="module")
def data() -> tuple[NDArray[np.float32], NDArray[np.float32]]:
    vectors = clustered(N)
    queries = clustered(60, seed=99)
    return vectors, queries


@pytest.mark.parametrize("name", list(KINDS))
def test_recall_filters_deletes_and_files(
    name: str, data: tuple[NDArray[np.float32], NDArray[np.float32]], tmp_path: Path
) -> None:
    spec, floor = KINDS[name]
    vectors, queries = data
    state = build(spec, Metric.COSINE, tmp_path, vectors)
    assert state.index.ready()
    assert recall(state, vectors, queries, Metric.COSINE) >= floor

    # A filter never makes a query come back short, whatever the kind.
    for where, matches in (({"bucket": 3}, N // 10), ({"bucket": {"$lt": 6}}, 6 * N // 10), ({"tiny": True}, 3)):
        flt = parse_where(where, 8)
        for q in queries[:5]:
            hits = state.search_filtered(q, 10, flt, None, frozenset({"metadata"}))  # type: ignore[arg-type]
            assert len(hits) == min(10, matches)
            assert all(hit.metadata is not None and _passes(where, hit.metadata) for hit in hits)

    # Deleted documents never come back; a replaced vector is found under its new value.
    gone = [DocId(f"d{i}") for i in range(0, N, 2)]
    assert len(state.delete(gone)) == len(gone)
    wait_built(state)
    for i in range(0, 40, 2):
        assert not {h.id for h in state.search_unfiltered([vectors[i]], 10, frozenset(), 1)[0]} & set(gone)
    moved = clustered(1, seed=5)[0] * 3
    state.upsert([StoredDoc(DocId("d1"), None, moved, {}, Seq(N + 1))])
    top = state.search_unfiltered([moved], 1, frozenset(), 1)[0][0]
    assert top.id == "d1" and top.score == pytest.approx(1.0, abs=1e-5)

    # Snapshot files load back into the same answers; never into another kind.
    (tmp_path / "snap").mkdir()
    state.save_files(tmp_path / "snap")
    loaded = ShardState.load_files(tmp_path / "snap", DIM, Metric.COSINE, CONFIG, spec, _other_path(spec, tmp_path))
    before = state.search_unfiltered(list(queries[:10]), 10, frozenset(), 1)
    after = loaded.search_unfiltered(list(queries[:10]), 10, frozenset(), 1)
    assert [[h.id for h in row] for row in before] == [[h.id for h in row] for row in after]
    other = IndexSpec("flat") if spec.kind != "flat" else IndexSpec("hnsw")
    with pytest.raises(ValueError, match="index"):
        ShardState.load_files(tmp_path / "snap", DIM, Metric.COSINE, CONFIG, other)
    state.close()
    loaded.close()


def _other_path(spec: IndexSpec, tmp_path: Path) -> Path | None:
    return tmp_path / "loaded.f32" if spec.quantization else None


def _passes(where: Mapping[str, object], meta: Mapping[str, object]) -> bool:
    if "bucket" in where:
        cond = where["bucket"]
        value = meta["bucket"]
        assert isinstance(value, int)
        return value < 6 if isinstance(cond, dict) else value == cond
    return meta["tiny"] is True


@pytest.mark.parametrize("kind", ["flat", "ivf"])
def test_l1_scores_are_exact(kind: str, data: tuple[NDArray[np.float32], NDArray[np.float32]], tmp_path: Path) -> None:
    vectors, queries = data
    state = build(IndexSpec(kind), Metric.L1, tmp_path, vectors)
    assert recall(state, vectors, queries, Metric.L1) >= (1.0 if kind == "flat" else 0.9)
    for q in queries[:10]:
        for hit in state.search_unfiltered([q], 10, frozenset(), 1)[0]:
            want = float(np.abs(vectors[int(hit.id[1:])] - q).sum())
            assert hit.distance == pytest.approx(want, rel=1e-5)
            assert hit.score == pytest.approx(-want, rel=1e-5)
    state.close()


def test_ivf_is_exact_until_trained_then_retrains_off_the_write_path(
    data: tuple[NDArray[np.float32], NDArray[np.float32]],
) -> None:
    vectors, queries = data
    state = ShardState(DIM, Metric.COSINE, CONFIG, IndexSpec("ivf"))
    state.upsert(docs(vectors[:400]))
    assert not state.index.ready()  # below ivf_train_min: every answer is exact
    assert recall(state, vectors[:400], queries, Metric.COSINE) == 1.0
    state.upsert(docs(vectors[400:600], 400))
    wait_built(state)
    assert state.index.ready() and state.index.describe()["builds"] == 1
    # Growing 4x starts a rebuild; writes and searches go on while it runs and all survive it.
    state.upsert(docs(vectors[600:2_400], 600))
    wrote_meanwhile = docs(vectors[2_400:], 2_400)
    state.upsert(wrote_meanwhile)
    state.delete([DocId("d601")])
    assert len(state.search_unfiltered([vectors[5]], 10, frozenset(), 1)[0]) == 10
    wait_built(state)
    assert state.index.describe()["builds"] == 2
    assert int(state.index.describe()["nlist"]) > 15  # type: ignore[call-overload]
    assert recall(state, vectors, queries, Metric.COSINE) >= 0.9
    last = state.search_unfiltered([vectors[N - 1]], 1, frozenset(), 1)[0][0]
    assert last.id == f"d{N - 1}"
    assert "d601" not in {h.id for h in state.search_unfiltered([vectors[601]], 10, frozenset(), 1)[0]}
    state.close()


@pytest.mark.parametrize("quantization", ["int8", "f16"])
def test_quantised_hnsw_grows_without_rebuilding_codes_that_still_fit(quantization: str, tmp_path: Path) -> None:
    vectors, queries = clustered(5_000, seed=11), clustered(60, seed=12)
    state = build(IndexSpec("hnsw", quantization=quantization), Metric.COSINE, tmp_path, vectors[:1_000])
    assert state.index.describe()["builds"] == 1  # trained on the first 1,000
    for start in range(1_000, 5_000, 500):  # 5x: past the growth check, from the same distribution
        state.upsert(docs(vectors[start : start + 500], start))
        wait_built(state)
    assert state.index.describe()["builds"] == 1 and not state.index.describe()["building"]
    assert recall(state, vectors, queries, Metric.COSINE) >= 0.95
    state.close()


def test_int8_codes_are_retrained_once_the_vectors_outgrow_them(tmp_path: Path) -> None:
    first, later, queries = clustered(1_000, seed=11), 3.0 * clustered(3_000, seed=13), clustered(60, seed=12)
    state = build(IndexSpec("hnsw", quantization="int8"), Metric.L2, tmp_path, first)
    assert state.index.describe()["builds"] == 1
    for start in range(0, 3_000, 500):  # values three times as wide: most would be clipped
        state.upsert(docs(later[start : start + 500], 1_000 + start))
        wait_built(state)
    assert state.index.describe()["builds"] == 2
    everything = np.concatenate([first, later])
    assert not codes_drifted(state.index._graph.index, everything)  # type: ignore[attr-defined]
    assert recall(state, everything, 3.0 * queries, Metric.L2) >= 0.95
    state.close()


def test_codes_drift_when_clipped_or_too_coarse() -> None:
    vectors = clustered(2_000, seed=5)
    index = faiss.IndexHNSWSQ(DIM, faiss.ScalarQuantizer.QT_8bit, 16, faiss.METRIC_L2)
    index.train(vectors[:1_000])
    assert not codes_drifted(index, vectors[1_000:])  # the same distribution: a few edges clipped
    assert codes_drifted(index, 1.5 * vectors[1_000:])  # many clipped
    assert codes_drifted(index, 0.3 * vectors[1_000:])  # a third of each range used
    assert not codes_drifted(index, vectors[:0])


def test_query_params_reach_the_index(data: tuple[NDArray[np.float32], NDArray[np.float32]], tmp_path: Path) -> None:
    vectors, queries = data
    state = build(IndexSpec("ivf"), Metric.COSINE, tmp_path, vectors)
    wide = state.search_unfiltered(list(queries), 10, frozenset(), 1, query_params(nprobe=1_000))
    want = truth(vectors, queries, Metric.COSINE, 10)
    got = np.mean([len({int(h.id[1:]) for h in row} & set(w.tolist())) / 10 for row, w in zip(wide, want, strict=True)])
    assert got >= 0.99  # every list probed: exact
    hnsw = ShardState(DIM, Metric.COSINE, CONFIG, IndexSpec("hnsw"))
    assert hnsw.serves(()) and not hnsw.serves(query_params(ef=200))
    hnsw.use_params(query_params(ef=200))
    assert hnsw.serves(query_params(ef=200))
    state.close()


def test_int8_ram_per_vector_is_a_fraction_of_float32_hnsw(tmp_path: Path) -> None:
    vectors = np.random.default_rng(3).normal(size=(2_000, 384)).astype(np.float32)
    sizes = {}
    for name, spec in (("f32", IndexSpec("hnsw")), ("int8", IndexSpec("hnsw", quantization="int8"))):
        path = tmp_path / f"{name}.f32" if spec.quantization else None
        state = ShardState(384, Metric.COSINE, CONFIG, spec, path)
        state.upsert([StoredDoc(DocId(f"d{i}"), None, v, {}, Seq(i + 1)) for i, v in enumerate(vectors)])
        wait_built(state)
        sizes[name] = state.sizes(0, 1)
        state.close()
    assert sizes["int8"].mapped_bytes > 0 and sizes["f32"].mapped_bytes == 0
    assert sizes["int8"].bytes_per_vector <= 0.4 * sizes["f32"].bytes_per_vector
    assert not (tmp_path / "int8.f32").exists()  # the mapped file goes with its shard


@pytest.mark.parametrize(
    ("raw", "metric", "message"),
    [
        ({"kind": "annoy"}, Metric.COSINE, "kind"),
        ({"kind": "hnsw", "nlist": 4}, Metric.COSINE, "no parameter"),
        ({"kind": "hnsw", "m": 1}, Metric.COSINE, "index.m"),
        ({"kind": "hnsw", "m": True}, Metric.COSINE, "index.m"),
        ({"kind": "ivf", "nlist": 0}, Metric.COSINE, "index.nlist"),
        ({"kind": "lsh", "nbits": 12}, Metric.COSINE, "multiple of 8"),
        ({"kind": "flat", "quantization": "int8"}, Metric.COSINE, "quantization"),
        ({"kind": "lsh", "quantization": "int8"}, Metric.COSINE, "quantization"),
        ({"kind": "ivf", "quantization": "int4"}, Metric.COSINE, "quantization"),
        ({"kind": "hnsw"}, Metric.L1, "flat, ivf"),
        ({"kind": "lsh"}, Metric.L1, "flat, ivf"),
        ({"kind": "ivf", "quantization": "int8"}, Metric.L1, "quantised"),
        ("hnsw", Metric.COSINE, "map"),
    ],
)
def test_bad_index_specs(raw: object, metric: Metric, message: str) -> None:
    with pytest.raises(BadRequest, match=message):
        parse_index_spec(raw, metric, 10_000)


def test_index_spec_defaults_and_query_params() -> None:
    assert parse_index_spec(None, Metric.L1, 10_000) == IndexSpec("flat")
    assert parse_index_spec(None, Metric.IP, 10_000) == IndexSpec("hnsw")
    resolved = IndexSpec("hnsw").resolved(384, 16, 200)
    assert resolved.to_wire() == {"kind": "hnsw", "m": 16, "ef_construction": 200}
    assert IndexSpec("lsh").resolved(384, 16, 200).to_wire() == {"kind": "lsh", "nbits": 768}
    check_query_params(IndexSpec("hnsw"), "c", 50, None)
    check_query_params(IndexSpec("ivf"), "c", None, 5)
    with pytest.raises(BadRequest, match="'nprobe' applies to index kind ivf"):
        check_query_params(IndexSpec("hnsw"), "c", None, 5)
    with pytest.raises(BadRequest, match="'ef' applies to index kind hnsw"):
        check_query_params(IndexSpec("ivf"), "c", 50, None)
    with pytest.raises(BadRequest, match="'ef'"):
        check_query_params(IndexSpec("flat"), "c", 50, None)


def test_standing_queries_match_l1_exactly() -> None:
    vectors = clustered(50, seed=11)
    query = vectors[0] + 0.1
    distances = np.abs(vectors - query).sum(axis=1)
    threshold = -float(np.sort(distances)[4]) - 1e-4  # the five nearest pass
    compiled = compile_queries([StandingQuery(query, threshold, None, None)], Metric.L1, DIM)
    found = match(compiled, doc_batch(list(vectors), [None] * 50, [{}] * 50))
    docs_hit = sorted(int(d) for m in found for d in m.docs.tolist())
    assert docs_hit == sorted(np.argsort(distances)[:5].tolist())
    scores = np.concatenate([m.scores for m in found])
    assert np.allclose(np.sort(-scores), np.sort(distances)[:5], rtol=1e-5)


def test_a_snapshot_of_another_kind_or_an_older_format_is_never_used(tmp_path: Path) -> None:
    store = SnapshotStore(tmp_path)
    state = build(IndexSpec("ivf"), Metric.COSINE, tmp_path, clustered(600))
    gen = store.new_generation("c", 600, 1)
    count = state.save_files(store.shard_dir(gen, 0))
    sdir = store.shard_dir(gen, 0)
    assert {p.name for p in sdir.iterdir()} >= {"index.faiss", "index.json", "arrays.npz", "docs.msgpack"}
    entry = ShardEntry(count, {p.name: file_entry(p) for p in sorted(sdir.iterdir())})
    identity = Identity(1, "t", DIM, "cosine")
    manifest = Manifest("c", identity, 600, count, params_of(CONFIG, IndexSpec("ivf")), gen.name, (entry,))
    store.commit(manifest)
    versions = library_versions()
    check_usable(manifest, identity, 600, params_of(CONFIG, IndexSpec("ivf")), versions)
    for other in (IndexSpec("hnsw"), IndexSpec("ivf", quantization="int8"), IndexSpec("ivf", nlist=4)):
        with pytest.raises(SnapshotInvalid, match="other settings"):
            check_usable(manifest, identity, 600, params_of(CONFIG, other), versions)
    old = json.loads((tmp_path / "c" / MANIFEST).read_text())
    old["format"] = 1
    old.pop("checksum")
    old["checksum"] = hashlib.sha256(json.dumps(old, sort_keys=True).encode()).hexdigest()
    (tmp_path / "c" / MANIFEST).write_text(json.dumps(old))
    with pytest.raises(SnapshotInvalid, match="format 1"):
        store.read_manifest("c")
    state.close()


def test_a_rebuild_reports_itself_running_until_it_is_swapped_in() -> None:
    release = threading.Event()
    swapped: list[object] = []
    rebuild = Rebuild()
    assert not rebuild.running
    with rebuild.lock:
        rebuild.start(lambda: release.wait(10) and "built", lambda *_: None, swapped.append)
    assert rebuild.running and not swapped
    release.set()
    rebuild.wait(10)
    assert not rebuild.running and swapped == ["built"] and rebuild.builds == 1


def test_query_params_of_none_given_are_the_index_defaults() -> None:
    assert query_params(ef=None, nprobe=None) == NO_PARAMS
    assert query_params(nprobe=4, ef=None) == (("nprobe", 4),)
    assert query_params(nprobe=4, ef=32) == (("ef", 32), ("nprobe", 4))


@pytest.mark.parametrize("metric", list(Metric))
def test_a_rerank_keeps_each_querys_k_best_usable_candidates_by_the_true_metric(metric: Metric) -> None:
    rng = np.random.default_rng(7)
    store = VectorStore(16, 450)
    store.vectors[:] = rng.standard_normal((450, 16)).astype(np.float32)
    store.norms[:] = exact.row_norms(store.vectors)
    queries = rng.standard_normal((3, 16)).astype(np.float32)
    candidates = np.stack([rng.permutation(300)[:40] for _ in range(3)]).astype(np.int64)
    candidates[:, 35:] = -1  # no candidate there
    candidates[1, 2] = 400  # past the filter's end: usable only without one
    allowed = rng.random(350) < 0.6
    for mask in (None, allowed):
        found = rerank(store, metric, queries, candidates, 5, mask)
        assert found is not None
        for i in range(3):
            rows = [int(c) for c in candidates[i] if c >= 0 and (mask is None or (c < 350 and mask[c]))]
            want = exact.scores_of(store.vectors[rows], store.norms[rows], queries[i : i + 1], metric)[0]
            best = np.argsort(-want, kind="stable")[:5]
            assert found.labels[i].tolist() == [rows[j] for j in best]
            expected = np.clip(want[best], -1, 1) if metric is Metric.COSINE else want[best]
            np.testing.assert_allclose(found.scores[i], expected, rtol=1e-4, atol=1e-5)
        one = rerank(store, metric, queries[:1], candidates[:1], 5, mask)
        assert one is not None and one.labels.tolist() == found.labels[:1].tolist()
    assert rerank(store, metric, queries, candidates, 30, allowed) is None  # fewer than k usable
    # Every candidate a label and no filter (the common case), one query and several.
    full = candidates[:, :35]
    for n in (1, 3):
        found = rerank(store, metric, queries[:n], full[:n], 5, None)
        assert found is not None and found.scores.dtype == np.float32 and found.distances.dtype == np.float32
        for i in range(n):
            rows = full[i].tolist()
            want = exact.scores_of(store.vectors[rows], store.norms[rows], queries[i : i + 1], metric)[0]
            best = np.argsort(-want, kind="stable")[:5]
            assert found.labels[i].tolist() == [rows[j] for j in best]
            expected = np.clip(want[best], -1, 1) if metric is Metric.COSINE else want[best]
            np.testing.assert_allclose(found.scores[i], expected, rtol=1e-4, atol=1e-5)
