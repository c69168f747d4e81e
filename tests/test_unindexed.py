"""Documents kept out of the index for a while (`upsert(defer_index=True)`, the log tail replayed
at start): searches score them exactly beside the index, deletes and replacements of them keep
the state's invariants, the shard actor adds them to the index in the background, and a
snapshot taken meanwhile holds every document."""

from __future__ import annotations

from pathlib import Path

import anyio
import numpy as np
import pytest

from actors.indexes.base import NO_PARAMS, query_params
from actors.shard_state import ShardState
from models.config import EngineConfig
from models.filters import parse_where
from models.index_spec import parse_index_spec
from models.records import DocId, Include, Metric, Seq, StoredDoc
from tests.test_shard import clustered, docs_for, near, running

pytestmark = pytest.mark.timeout(120)

DIM = 24
# Every query goes through the index (and the exact scores of the unindexed documents).
FORCE_INDEX = EngineConfig(exact_max_rows=0, exact_selectivity=0.0, hnsw_initial_capacity=64)
NONE = frozenset[Include]()


def _split_state(vectors: np.ndarray, indexed: int, metric: Metric = Metric.COSINE) -> ShardState:
    """A state whose first `indexed` documents are in the index and the rest deferred."""
    state = ShardState(DIM, metric, FORCE_INDEX)
    docs = docs_for(vectors, meta=lambda i: {"g": i % 4})
    state.upsert(docs[:indexed])
    state.upsert(docs[indexed:], fresh_labels=True, defer_index=True)
    return state


def _exact_ids(state: ShardState, q: np.ndarray, k: int, where: object = None) -> list[str]:
    answer = state.search_exact([q], k, where, None)  # type: ignore[arg-type]
    return [h.id for h in answer.hits[0]]


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.L2, Metric.IP])
def test_unindexed_documents_are_found_exactly_beside_the_index(metric: Metric) -> None:
    vectors = clustered(3_000, DIM, seed=1)
    state = _split_state(vectors, 2_000, metric)
    assert state.n_unindexed == 1_000 and state.n_live == 3_000
    assert state.sizes(0, 1).unindexed == 1_000
    # A document's own vector finds it first, indexed or not (cosine, l2: the nearest is itself).
    for i in (5, 1_999, 2_000, 2_500, 2_999):
        hits = state.search_unfiltered([vectors[i]], 5, NONE)[0]
        assert len(hits) == 5
        if metric is not Metric.IP:
            assert hits[0].id == f"d{i}"
    # Recall against exact search stays that of the index alone; batched queries too.
    queries = list(near(vectors, 40, seed=2))
    batched = state.search_unfiltered(queries, 10, NONE)
    pairs = zip(queries, batched, strict=True)
    overlaps = [len({h.id for h in hits} & set(_exact_ids(state, q, 10))) for q, hits in pairs]
    recall = sum(overlaps) / (10 * len(queries))
    assert recall >= 0.9, recall
    for hits in batched:
        assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
    # Filtered: the k-guarantee holds and every hit passes the filter.
    where = parse_where({"g": {"$eq": 1}})
    for q in queries[:10]:
        hits = state.search_filtered(q, 10, where, None, frozenset({Include.METADATA}), NO_PARAMS)
        assert len(hits) == 10 and all(h.metadata is not None and h.metadata["g"] == 1 for h in hits)


def test_a_query_wider_than_the_index_gets_every_document() -> None:
    vectors = clustered(300, DIM, seed=3)
    state = _split_state(vectors, 20)
    hits = state.search_unfiltered([vectors[0]], 200, NONE, params=query_params(ef=400))[0]
    assert len(hits) == 200
    assert len({h.id for h in hits}) == 200
    assert [h.id for h in hits] == _exact_ids(state, vectors[0], 200)


def test_deletes_and_replacements_of_unindexed_documents(tmp_path: Path) -> None:
    vectors = clustered(1_200, DIM, seed=4)
    state = _split_state(vectors, 1_000)
    state.delete([DocId("d1000"), DocId("d1001"), DocId("d5")])
    assert state.n_unindexed == 198 and state.n_live == 1_197
    # Replaced in place by an ordinary write: it is indexed now.
    state.upsert([StoredDoc(DocId("d1100"), "new", vectors[7] * 2, {}, Seq(9_999))])
    assert state.n_unindexed == 197
    # A freed unindexed label, reused: an ordinary insert.
    state.upsert([StoredDoc(DocId("fresh"), None, vectors[8], {}, Seq(10_000))])
    hits = state.search_unfiltered([vectors[1_000]], 10, NONE)[0]
    assert "d1000" not in {h.id for h in hits}
    assert state.index_unindexed(100) == 97
    assert state.index_unindexed(1_000) == 0
    for i in (1_050, 1_150, 1_199):
        assert state.search_unfiltered([vectors[i]], 1, NONE)[0][0].id == f"d{i}"
    # Every label below `high` was added to the index: the snapshot's check holds.
    state.save_files(tmp_path)
    loaded = ShardState.load_files(tmp_path, DIM, Metric.COSINE, FORCE_INDEX)
    assert loaded.n_live == state.n_live and loaded.n_unindexed == 0
    assert loaded.search_unfiltered([vectors[1_150]], 1, NONE)[0][0].id == "d1150"


async def test_the_shard_indexes_them_in_the_background_and_snapshots_hold_them(tmp_path: Path) -> None:
    vectors = clustered(4_000, DIM, seed=5)
    docs = docs_for(vectors)
    async with running(DIM, Metric.COSINE, FORCE_INDEX) as shard:
        await shard.apply_upserts(docs[:1_000])
        await shard.apply_upserts(docs[1_000:], fresh_labels=True, defer_index=True)
        seen_unindexed = shard.sizes().unindexed
        # Queries answer correctly while the catch-up runs between them.
        for i in range(0, 4_000, 97):
            hits = await shard.search(vectors[i], 3, NO_PARAMS, None, None, NONE)
            assert hits[0].id == f"d{i}"
        with anyio.fail_after(60):
            while shard.sizes().unindexed:
                await anyio.sleep(0.01)
        assert seen_unindexed > 0
        # A snapshot taken while some are unindexed first adds them to the index.
        await shard.apply_upserts(docs_for(vectors[:500], prefix="late"), fresh_labels=True, defer_index=True)
        assert await shard.save_files(tmp_path) == 4_500
        assert shard.sizes().unindexed == 0
    loaded = ShardState.load_files(tmp_path, DIM, Metric.COSINE, FORCE_INDEX)
    assert loaded.n_live == 4_500


def test_other_kinds_index_at_once() -> None:
    """Kinds that insert fast take the documents at once (`defers_inserts` is False)."""
    spec = parse_index_spec({"kind": "flat"}, Metric.COSINE, 1_000)
    state = ShardState(DIM, Metric.COSINE, FORCE_INDEX, spec)
    state.upsert(docs_for(clustered(100, DIM, seed=6)), defer_index=True)
    assert state.n_unindexed == 0
