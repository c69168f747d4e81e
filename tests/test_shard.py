"""The shard actor, driven through its mailbox: recall against brute force, exact scores, writes,
filters that never come back short, batching, and the read/write discipline under load."""

from __future__ import annotations

import random
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import anyio
import numpy as np
import pytest
from numpy.typing import NDArray

from actors import exact
from actors.indexes.base import QueryParams, query_params
from actors.planner import choose_plan
from actors.read_pool import ReadPool
from actors.shard import Shard
from models.config import EngineConfig
from models.errors import DimensionMismatch, Unavailable
from models.filters import Filter, TextFilter, parse_where, parse_where_text
from models.records import DEFAULT_INCLUDE, DocId, Hit, Include, Metadata, Metric, Seq, StoredDoc

pytestmark = pytest.mark.timeout(120)

METRICS = [Metric.COSINE, Metric.L2, Metric.IP]
VEC = frozenset({Include.VECTOR})
ALL = frozenset(Include)
# Every query goes through the graph unless the planner's k >= matches rule applies.
FORCE_HNSW = EngineConfig(exact_max_rows=0, exact_selectivity=0.0)


def clustered(n: int, dim: int, seed: int, clusters: int = 50) -> NDArray[np.float32]:
    """Gaussian clusters at unnormalised centres: realistic neighbourhoods, seeded."""
    rng = np.random.default_rng(seed)
    centres = rng.normal(size=(clusters, dim)) * 3.0
    pick = rng.integers(0, clusters, size=n)
    return (centres[pick] + rng.normal(size=(n, dim))).astype(np.float32)


def near(vectors: NDArray[np.float32], n: int, seed: int) -> NDArray[np.float32]:
    """Queries that look like the documents: stored vectors plus noise."""
    rng = np.random.default_rng(seed)
    picked = vectors[rng.integers(0, len(vectors), size=n)]
    return (picked + 0.5 * rng.normal(size=picked.shape)).astype(np.float32)


def docs_for(
    vectors: NDArray[np.float32], prefix: str = "d", meta: Callable[[int], Metadata] | None = None
) -> list[StoredDoc]:
    return [
        StoredDoc(DocId(f"{prefix}{i}"), f"text {i}", v, meta(i) if meta else {"i": i}, Seq(i + 1))
        for i, v in enumerate(vectors)
    ]


def ref_scores(
    vectors: NDArray[np.float32], query: NDArray[np.float32], metric: Metric
) -> NDArray[np.float64]:
    v, q = vectors.astype(np.float64), query.astype(np.float64)
    if metric is Metric.COSINE:
        return (v @ q) / (np.linalg.norm(v, axis=1) * np.linalg.norm(q))
    if metric is Metric.IP:
        return v @ q
    return -np.linalg.norm(v - q, axis=1)


@asynccontextmanager
async def running(
    dim: int, metric: Metric = Metric.COSINE, config: EngineConfig | None = None
) -> AsyncIterator[Shard]:
    with ReadPool(2).running() as pool:
        shard = Shard(dim, metric, config or EngineConfig(), pool)
        async with anyio.create_task_group() as tg:
            await tg.start(shard.run)
            try:
                yield shard
            finally:
                shard.close()


async def load(shard: Shard, docs: Sequence[StoredDoc], batch: int = 1_000) -> None:
    for i in range(0, len(docs), batch):
        await shard.apply_upserts(docs[i : i + batch])


async def search(
    shard: Shard,
    q: NDArray[np.float32],
    k: int = 10,
    *,
    ef: int | None = None,
    where: Filter | None = None,
    where_text: TextFilter | None = None,
    include: frozenset[Include] = DEFAULT_INCLUDE,
) -> list[Hit]:
    return await shard.search(q, k, query_params(ef=ef), where, where_text, include)


def count_index_batches(shard: Shard) -> list[int]:
    """A list that collects the number of queries of each unfiltered index search the shard makes
    from now on."""
    batch_sizes: list[int] = []
    real = shard._state.search_unfiltered

    def spy(
        qs: Sequence[NDArray[np.float32]],
        k: int,
        include: frozenset[Include],
        threads: int,
        params: QueryParams = (),
    ) -> list[list[Hit]]:
        batch_sizes.append(len(qs))
        return real(qs, k, include, threads, params)

    shard._state.search_unfiltered = spy  # type: ignore[method-assign]
    return batch_sizes


def ids_of(hits: Sequence[Hit]) -> list[str]:
    return [h.id for h in hits]


# -- recall and exactness -------------------------------------------------------------------------


@pytest.mark.parametrize("metric", METRICS)
async def test_recall_and_scores_against_brute_force(metric: Metric) -> None:
    vecs = clustered(5_000, 64, seed=1)
    queries = near(vecs, 200, seed=2)
    async with running(64, metric) as shard:  # 5,000 rows > exact_max_rows: the graph answers
        await load(shard, docs_for(vecs))
        found = total = 0
        for q in queries:
            hits = await search(shard, q, 10, include=VEC)
            ref = ref_scores(vecs, q, metric)
            want = set(np.argsort(-ref)[:10].tolist())
            got = [int(h.id[1:]) for h in hits]
            found += len(want & set(got))
            total += 10
            assert len(hits) == 10
            assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
            for h, label in zip(hits, got, strict=True):
                assert h.score == pytest.approx(ref[label], rel=1e-4, abs=1e-4)
                dist = -ref[label] if metric is Metric.L2 else 1.0 - ref[label]
                assert h.distance == pytest.approx(dist, rel=1e-4, abs=1e-4)
                assert h.vector is not None and np.array_equal(h.vector, vecs[label])  # as given
        assert found / total >= 0.95, f"recall@10 {found / total:.3f}"


@pytest.mark.parametrize("metric", METRICS)
async def test_small_collection_is_exact(metric: Metric) -> None:
    vecs = clustered(300, 16, seed=3)
    async with running(16, metric) as shard:
        await load(shard, docs_for(vecs))
        for q in clustered(10, 16, seed=4):
            hits = await search(shard, q, 7)
            ref = ref_scores(vecs, q, metric)
            assert [int(h.id[1:]) for h in hits] == np.argsort(-ref, kind="stable")[:7].tolist()
            np.testing.assert_allclose([h.score for h in hits], np.sort(ref)[::-1][:7], rtol=1e-5, atol=1e-5)


# -- writes --------------------------------------------------------------------------------------


async def test_upsert_replace_delete_and_label_reuse() -> None:
    vecs = clustered(40, 8, seed=5)
    async with running(8, Metric.L2, FORCE_HNSW) as shard:
        await load(shard, docs_for(vecs))
        assert await shard.count() == 40
        # Replace d3: new vector, text, metadata; the old one is gone.
        new = StoredDoc(DocId("d3"), "replaced", vecs[0] + 50.0, {"v": 2}, Seq(100))
        await shard.apply_upserts([new])
        assert await shard.count() == 40
        (got,) = await shard.get([DocId("d3")])
        assert got.text == "replaced" and got.metadata == {"v": 2} and got.seq == 100
        assert np.array_equal(got.vector, new.vector)
        hits = await search(shard, new.vector, 1, include=ALL)
        assert ids_of(hits) == ["d3"] and hits[0].text == "replaced" and hits[0].distance == 0.0
        # The same id twice in one batch: the last one wins.
        a = StoredDoc(DocId("twice"), "first", vecs[1], {}, Seq(101))
        b = StoredDoc(DocId("twice"), "second", vecs[2] + 9.0, {}, Seq(102))
        await shard.apply_upserts([a, b])
        assert await shard.count() == 41
        assert [d.text for d in await shard.get([DocId("twice")])] == ["second"]
        # Delete: only existing ids come back, each once.
        gone = await shard.apply_deletes([DocId("d5"), DocId("nope"), DocId("d5"), DocId("d6")])
        assert gone == ["d5", "d6"]
        assert await shard.apply_deletes([DocId("d5")]) == []
        assert await shard.count() == 39
        assert [d.id for d in await shard.get([DocId("d5"), DocId("d7"), DocId("d6")])] == ["d7"]
        assert "d5" not in ids_of(await search(shard, vecs[5], 40))
        # New ids take the deleted labels: no growth, and the reused labels are searchable.
        high = shard._state.high
        fresh = docs_for(clustered(2, 8, seed=6) + 100.0, prefix="new")
        await shard.apply_upserts(fresh)
        assert shard._state.high == high
        for doc in fresh:
            assert ids_of(await search(shard, doc.vector, 1)) == [doc.id]
        assert await shard.count() == 41
        # Re-inserting a deleted id works like any new id.
        await shard.apply_upserts([StoredDoc(DocId("d5"), None, vecs[5], {}, Seq(200))])
        assert ids_of(await search(shard, vecs[5], 1)) == ["d5"]


async def test_growth_past_initial_capacity() -> None:
    vecs = clustered(1_500, 16, seed=7)
    config = EngineConfig(hnsw_initial_capacity=16, exact_max_rows=0, exact_selectivity=0.0)
    async with running(16, Metric.COSINE, config) as shard:
        await load(shard, docs_for(vecs), batch=37)
        assert await shard.count() == 1_500
        assert shard._state.capacity >= 1_500 and shard._state.index.index.get_max_elements() >= 1_500
        found = 0
        for i in range(0, 1_500, 15):
            found += ids_of(await search(shard, vecs[i], 1, ef=100)) == [f"d{i}"]
        assert found >= 98


async def test_wrong_dimension_is_refused() -> None:
    async with running(8) as shard:
        with pytest.raises(DimensionMismatch):
            await search(shard, np.ones(9, np.float32))
        with pytest.raises(DimensionMismatch):
            await shard.apply_upserts([StoredDoc(DocId("x"), None, np.ones(7, np.float32), {}, Seq(1))])
        assert await shard.count() == 0


async def test_closed_shard_answers_unavailable() -> None:
    async with running(4) as shard:
        pass
    with pytest.raises(Unavailable):
        await shard.count()
    with pytest.raises(Unavailable):
        await shard.apply_upserts([])


async def test_search_fails_instead_of_hanging_when_the_pool_is_stopped() -> None:
    """The direct path hands searches to pool threads; with none running, callers get an answer."""
    shard = Shard(4, Metric.L2, EngineConfig(), ReadPool(2))  # the pool is never started
    with anyio.fail_after(5):
        async with anyio.create_task_group() as tg:
            await tg.start(shard.run)
            await anyio.sleep(0)  # the loop now waits on its empty mailbox
            for _ in range(3):
                with pytest.raises(Unavailable):
                    await shard.search(np.ones(4, np.float32), 1, (), None, None, DEFAULT_INCLUDE)
            shard.close()
    assert shard.direct_searches == 3


async def test_cancelled_shard_fails_waiting_callers() -> None:
    """Cancelling the actor mid-flight answers every caller (`unavailable` at worst)."""
    vecs = clustered(5_000, 32, seed=17)
    pool = ReadPool(2)
    shard = Shard(32, Metric.L2, EngineConfig(), pool)
    outcomes: list[str] = []

    async def one(i: int) -> None:
        try:
            where = parse_where({"i": {"$gte": 100}}) if i % 3 == 0 else None
            await search(shard, vecs[i], 10, ef=[None, 99][i % 2], where=where)
            outcomes.append("ok")
        except Unavailable:
            outcomes.append("unavailable")

    with anyio.fail_after(30), pool.running():
        async with anyio.create_task_group() as callers, anyio.create_task_group() as actor:
            await actor.start(shard.run)
            await load(shard, docs_for(vecs))
            for i in range(300):
                callers.start_soon(one, i)
            await anyio.sleep(0.002)
            actor.cancel_scope.cancel()
    assert len(outcomes) == 300 and "unavailable" in outcomes
    with pytest.raises(Unavailable):
        await shard.count()


# -- k larger than what is there -----------------------------------------------------------------


@pytest.mark.parametrize("config", [EngineConfig(), FORCE_HNSW], ids=["default", "force_hnsw"])
async def test_k_larger_than_live(config: EngineConfig) -> None:
    vecs = clustered(6_000, 16, seed=8)
    async with running(16, Metric.IP, config) as shard:
        assert await search(shard, vecs[0], 10) == []
        await load(shard, docs_for(vecs[:50]))
        assert len(await search(shard, vecs[0], 100)) == 50
        await shard.apply_deletes([DocId(f"d{i}") for i in range(20)])
        hits = await search(shard, vecs[0], 100)
        assert len(hits) == 30 and not {f"d{i}" for i in range(20)} & set(ids_of(hits))
        # Mostly deleted: the graph is full of tombstones and may come back short; never the caller.
        await load(shard, docs_for(vecs[50:], prefix="m"))
        await shard.apply_deletes([DocId(f"m{i}") for i in range(5_940)])
        for q in vecs[:20]:
            hits = await search(shard, q, 40)
            assert len(hits) == 40 and len(set(ids_of(hits))) == 40


# -- filters -------------------------------------------------------------------------------------


SELECTIVITIES = {0.001: 1, 0.01: 10, 0.1: 100, 0.5: 500}  # fraction -> bucket < n (of 1,000)


@pytest.mark.parametrize("config", [EngineConfig(), FORCE_HNSW], ids=["planner", "force_hnsw_filtered"])
async def test_filtered_queries_never_come_back_short(config: EngineConfig, monkeypatch: Any) -> None:
    n, dim = 20_000, 16
    vecs = clustered(n, dim, seed=9)
    buckets = np.random.default_rng(10).permutation(n) % 1_000
    exact_calls: list[int] = []
    real_search = exact.search
    monkeypatch.setattr(exact, "search", lambda *a, **kw: exact_calls.append(1) or real_search(*a, **kw))
    async with running(dim, Metric.COSINE, config) as shard:
        await load(shard, docs_for(vecs, meta=lambda i: {"bucket": int(buckets[i])}), batch=5_000)
        rng = np.random.default_rng(11)
        for fraction, below in SELECTIVITIES.items():
            where = parse_where({"bucket": {"$lt": below}})
            match = buckets < below
            assert match.sum() == fraction * n
            exact_calls.clear()
            found = total = 0
            for k in (10, 100, 1_000):
                for q in vecs[rng.integers(0, n, 4)]:
                    hits = await search(shard, q, k, where=where, include=ALL)
                    assert len(hits) == min(k, int(match.sum()))
                    assert all(h.metadata is not None and h.metadata["bucket"] < below for h in hits)
                    assert len(set(ids_of(hits))) == len(hits)
                    ref = ref_scores(vecs, q, Metric.COSINE)
                    ref[~match] = -np.inf
                    want = set(np.argsort(-ref)[: len(hits)].tolist())
                    found += len(want & {int(h.id[1:]) for h in hits})
                    total += len(hits)
            plan = choose_plan(n, int(match.sum()), 10, config)
            assert found / total >= (1.0 if plan == "exact" else 0.95), (fraction, plan, found / total)
            if config is FORCE_HNSW and fraction >= 0.1:
                assert len(exact_calls) <= 2, "hnsw_filtered should rarely need the exact fallback"


async def test_text_filter_and_ids_matching() -> None:
    vecs = clustered(200, 8, seed=12)
    docs = [
        StoredDoc(
            DocId(f"d{i}"),
            None if i % 10 == 0 else f"{'apple' if i % 2 else 'pear'} {i}",
            v,
            {"i": i},
            Seq(i),
        )
        for i, v in enumerate(vecs)
    ]
    async with running(8, Metric.COSINE, FORCE_HNSW) as shard:
        await load(shard, docs)
        apple = parse_where_text({"$contains": "apple"})
        not_apple = parse_where_text({"$not_contains": "apple"})
        hits = await search(shard, vecs[0], 500, where_text=apple, include=ALL)
        assert len(hits) == 100 and all(h.text is not None and "apple" in h.text for h in hits)
        # A document without text matches neither form.
        hits = await search(shard, vecs[0], 500, where_text=not_apple, include=ALL)
        assert len(hits) == 80 and all(h.text is not None and "pear" in h.text for h in hits)
        both = parse_where({"i": {"$gte": 150}})
        hits = await search(shard, vecs[0], 500, where=both, where_text=apple)
        assert sorted(ids_of(hits)) == sorted(f"d{i}" for i in range(151, 200, 2))
        ids = await shard.ids_matching(both, apple)
        assert sorted(ids) == sorted(ids_of(hits))
        assert len(await shard.ids_matching(None, None)) == 200
        assert await search(shard, vecs[0], 5, where=parse_where({"nope": 1})) == []


# -- batching ------------------------------------------------------------------------------------


async def test_concurrent_searches_are_batched_and_match_sequential() -> None:
    vecs = clustered(5_000, 32, seed=13)
    queries = clustered(300, 32, seed=14)
    async with running(32, Metric.COSINE) as shard:
        await load(shard, docs_for(vecs))
        efs = [None, 16, 128]
        sequential = [await search(shard, q, 10, ef=efs[i % 3]) for i, q in enumerate(queries)]
        batch_sizes = count_index_batches(shard)
        concurrent: list[list[Hit]] = [[] for _ in queries]

        async def one(i: int) -> None:
            concurrent[i] = await search(shard, queries[i], 10, ef=efs[i % 3])

        async with anyio.create_task_group() as tg:
            for i in range(len(queries)):
                tg.start_soon(one, i)
        assert concurrent == sequential
        assert sum(batch_sizes) == len(queries)
        assert max(batch_sizes) > 8, batch_sizes  # queued queries went out together


async def test_search_many_answers_what_search_answers_on_both_paths() -> None:
    """Idle and with the index serving its parameters, `search_many` takes the direct path and
    hands the drains several queries per index call; with another `ef` (which the loop sets
    while no read runs) it goes through the mailbox `search_batch` at a time, whose drains batch
    them too."""
    vecs = clustered(3_000, 32, seed=21)
    queries = near(vecs, 150, seed=22)
    async with running(32, Metric.COSINE, FORCE_HNSW) as shard:
        await load(shard, docs_for(vecs))
        alone = [await search(shard, q, 7, include=VEC) for q in queries]
        batch_sizes = count_index_batches(shard)
        direct_before = shard.direct_searches
        many = await shard.search_many(queries, 7, query_params(), VEC)
        assert [ids_of(h) for h in many] == [ids_of(h) for h in alone]
        assert [[x.score for x in h] for h in many] == [[x.score for x in h] for h in alone]
        assert shard.direct_searches - direct_before == len(queries)
        assert sum(batch_sizes) == len(queries) and max(batch_sizes) > 1, batch_sizes
        wide = [await search(shard, q, 7, ef=300, include=VEC) for q in queries]
        await search(shard, queries[0], 7)  # the index is back at its default ef
        batch_sizes.clear()
        direct_before = shard.direct_searches
        queued = await shard.search_many(queries, 7, query_params(ef=300), VEC)
        assert [ids_of(h) for h in queued] == [ids_of(h) for h in wide]
        assert shard.direct_searches == direct_before  # the mailbox path
        assert sum(batch_sizes) == len(queries) and 1 < max(batch_sizes) <= FORCE_HNSW.search_batch, batch_sizes
        with pytest.raises(DimensionMismatch):
            await shard.search_many(np.zeros((2, 31), dtype=np.float32), 7, query_params(), VEC)


# -- the read/write discipline -------------------------------------------------------------------


async def test_concurrent_searches_and_writes_stay_consistent() -> None:
    """Many searches in flight while upserts, replacements and deletes stream through the actor.

    Proves the discipline: no search crashes or returns a torn result (every hit's id existed
    with exactly the vector returned, and its score is that vector's score), the occupancy
    counters saw reads overlap each other but never a write, and the end state is exact.
    """
    dim, metric = 24, Metric.COSINE
    config = EngineConfig(hnsw_initial_capacity=16, exact_max_rows=0, exact_selectivity=0.0, search_batch=16)
    rng = np.random.default_rng(15)
    pick = random.Random(15)
    pool = clustered(12_000, dim, seed=16)
    history: dict[str, set[bytes]] = {}
    current: dict[str, NDArray[np.float32]] = {}
    next_vec = 0

    def make(doc_id: str) -> StoredDoc:
        nonlocal next_vec
        vec = pool[next_vec]
        next_vec += 1
        history.setdefault(doc_id, set()).add(vec.tobytes())
        return StoredDoc(DocId(doc_id), doc_id, vec, {"g": int(rng.integers(0, 4))}, Seq(next_vec))

    async with running(dim, metric, config) as shard:
        initial = [make(f"s{i}") for i in range(2_000)]
        await load(shard, initial, batch=500)
        current.update({d.id: d.vector for d in initial})
        writing = True
        searches = 0

        async def writer() -> None:
            nonlocal writing
            serial = 2_000
            for _ in range(60):
                live = list(current)
                batch = [make(pick.choice(live)) for _ in range(20)]  # replacements
                batch += [make(f"s{serial + j}") for j in range(30)]  # new ids (reuse labels)
                serial += 30
                await shard.apply_upserts(batch)
                current.update({d.id: d.vector for d in batch})
                doomed = pick.sample(list(current), 30)
                assert sorted(await shard.apply_deletes([DocId(x) for x in doomed])) == sorted(doomed)
                for x in doomed:
                    del current[x]
                await anyio.sleep(0)
            writing = False

        async def searcher(seed: int) -> None:
            nonlocal searches
            r = np.random.default_rng(seed)
            while writing:
                q = pool[int(r.integers(0, len(pool)))]
                ef = [None, 24, 80][int(r.integers(0, 3))]
                where = parse_where({"g": {"$in": [0, 1, 2]}}) if r.random() < 0.2 else None
                hits = await search(shard, q, 15, ef=ef, where=where, include=ALL)
                searches += 1
                assert len(hits) == 15
                for h in hits:
                    assert h.vector is not None and h.vector.tobytes() in history[h.id]
                    assert h.text == h.id
                    want = ref_scores(h.vector[None, :], q, metric)[0]
                    assert h.score == pytest.approx(want, abs=1e-4)
                    if where is not None:
                        assert h.metadata is not None and h.metadata["g"] in (0, 1, 2)
                assert [h.score for h in hits] == sorted((h.score for h in hits), reverse=True)
                if r.random() < 0.05:
                    for doc in await shard.get([h.id for h in hits]):
                        assert doc.vector.tobytes() in history[doc.id]

        with anyio.fail_after(100):
            async with anyio.create_task_group() as tg:
                tg.start_soon(writer)
                for s in range(8):
                    tg.start_soon(searcher, s)

        occupancy = shard._state.occupancy
        assert occupancy.violations == 0
        assert occupancy.max_readers >= 2, "reads never overlapped: the test proved nothing"
        assert searches > 100
        assert shard.direct_searches > 0, "no search took the direct path beside the writes"
        assert await shard.count() == len(current)
        assert set(await shard.ids_matching(None, None)) == set(current)
        docs = await shard.get([DocId(x) for x in current])
        assert all(np.array_equal(d.vector, current[d.id]) for d in docs)
        for doc_id in pick.sample(list(current), 50):
            hits = await search(shard, current[doc_id], 1, ef=200)
            assert ids_of(hits) == [doc_id]
