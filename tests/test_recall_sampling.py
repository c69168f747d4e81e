"""Recall sampling through a real server: the exported recall@k estimate drops when the index
search is made too narrow, agrees with the recall this test measures against numpy exact search,
reads 1.0 where the index is exact, skips queries the planner answered exactly, never makes a
query wait (a full sample queue drops and counts), and keeps the exact re-runs within their
budget of search-thread time."""

from __future__ import annotations

import asyncio
import re
import shutil
import time
import uuid
from collections.abc import Iterator

import httpx
import numpy as np
import pytest

from actors.recall_sampler import SKIP_REASONS, CpuBudget, Sample, _groups, recall_at_k
from actors.shard_state import ShardState
from models.config import EngineConfig
from models.errors import StartupError
from models.filters import parse_where
from models.records import DocId, Hit, Metric, Seq, StoredDoc
from server.settings import load_settings
from shoal_client import ShoalClient
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(180)
K = 10


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def units(n: int, dim: int, seed: int) -> np.ndarray:
    v = np.random.default_rng(seed).standard_normal((n, dim)).astype(np.float32)
    return v / np.linalg.norm(v, axis=1, keepdims=True)


def own_recall(vectors: np.ndarray, query: np.ndarray, got: list[str], k: int) -> float:
    """The test's recall@k: returned ids against numpy's exact cosine top-k."""
    exact = {f"d{i}" for i in np.argsort(-(vectors @ query), kind="stable")[:k]}
    return len(exact & set(got)) / len(exact)


def start(env: dict[str, str]) -> Iterator[ServerProcess]:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir, env)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def sampled() -> Iterator[ServerProcess]:
    """Every query sampled; graphs built sparse and searched with ef = k, so recall is lost."""
    yield from start(
        {
            "SHOAL_RECALL_SAMPLE_RATE": "1",
            "SHOAL_RECALL_WINDOW": "1000",
            "SHOAL_RECALL_SAMPLE_QUEUE": "1000",
            "SHOAL_EXACT_MAX_ROWS": "100",
            "SHOAL_HNSW_M": "4",
            "SHOAL_HNSW_EF_CONSTRUCTION": "20",
            "SHOAL_SHARDS_PER_COLLECTION": "2",  # the exact answer is merged over shards too
        }
    )


async def scrape(server: ServerProcess) -> str:
    async with httpx.AsyncClient() as http:
        return (await http.get(f"{server.url}/metrics")).text


def value(text: str, family: str, **labels: str) -> float | None:
    for line in text.splitlines():
        if not line.startswith(family + "{") and not line.startswith(family + " "):
            continue
        found = dict(re.findall(r'(\w+)="([^"]*)"', line.split(" ")[0]))
        if all(found.get(k) == v for k, v in labels.items()):
            return float(line.rsplit(" ", 1)[1])
    return None


async def wait_for(server: ServerProcess, family: str, want: float, **labels: str) -> str:
    """The metrics text once `family{labels}` reached `want` (the sampler works off the query path)."""
    async with asyncio.timeout(60):
        while True:
            text = await scrape(server)
            got = value(text, family, **labels)
            if got is not None and got >= want:
                return text
            await asyncio.sleep(0.1)


async def fill(client: ShoalClient, name: str, vectors: np.ndarray) -> None:
    await client.create_collection(name, dim=vectors.shape[1])
    docs = [{"id": f"d{i}", "vector": v.tolist(), "metadata": {"g": i % 100}} for i, v in enumerate(vectors)]
    for at in range(0, len(docs), 1000):
        await client.upsert(name, docs[at : at + 1000])


async def test_estimate_drops_with_a_narrow_search_and_agrees_with_exact(sampled: ServerProcess) -> None:
    name = unique("hard")
    vectors = units(3000, 48, seed=1)
    queries = units(60, 48, seed=2)
    async with ShoalClient.connect(sampled.ws_url) as client:
        await fill(client, name, vectors)
        recalls = []
        for q in queries:
            reply = await client.request("query", collection=name, vector=q.tolist(), k=K, ef=K)
            recalls.append(own_recall(vectors, q, [h["id"] for h in reply["hits"]], K))
        measured = float(np.mean(recalls))
        text = await wait_for(sampled, "shoal_recall_samples_total", len(queries), collection=name, index="hnsw")
        estimate = value(text, "shoal_recall_estimate", collection=name, index="hnsw")
        assert estimate is not None
        # The narrow search loses recall, and the server sees the same loss the test measures.
        assert measured < 0.95, measured
        assert estimate < 0.95, estimate
        assert abs(estimate - measured) <= 0.01, (estimate, measured)
        assert value(text, "shoal_recall_window", collection=name, index="hnsw") == len(queries)
        assert value(text, "shoal_recall_samples_dropped_total", collection=name, index="hnsw") == 0

        # Queries the planner answers exactly (30 matches <= SHOAL_EXACT_MAX_ROWS) are skipped:
        # counted by reason, leaving the estimate as it was.
        for q in queries[:5]:
            await client.request("query", collection=name, vector=q.tolist(), k=K, ef=K, where={"g": 7})
        text = await wait_for(
            sampled, "shoal_recall_samples_skipped_total", 5, collection=name, index="hnsw", reason="exact_plan"
        )
        assert value(text, "shoal_recall_estimate", collection=name, index="hnsw") == estimate
        assert value(text, "shoal_recall_samples_total", collection=name, index="hnsw") == len(queries)

        # The collection's listing carries the same figures.
        listed = await client.request("list_collections")
        recall = next(c for c in listed["collections"] if c["name"] == name)["recall"]
        assert recall["index"] == "hnsw" and recall["estimate"] == pytest.approx(estimate)
        assert recall["samples"] == len(queries) and recall["skipped"]["exact_plan"] == 5
        assert recall["dropped"] == 0

        # A wide search on the same data recovers, and the window follows it.
        for q in queries:
            await client.request("query", collection=name, vector=q.tolist(), k=K, ef=3000)
        text = await wait_for(sampled, "shoal_recall_samples_total", 2 * len(queries), collection=name, index="hnsw")
        wide = value(text, "shoal_recall_estimate", collection=name, index="hnsw")
        assert wide is not None and wide > estimate
        await client.drop_collection(name)


async def test_estimate_reads_one_where_the_search_is_exhaustive(sampled: ServerProcess) -> None:
    name = unique("easy")
    vectors = units(400, 8, seed=3)
    queries = units(30, 8, seed=4)
    async with ShoalClient.connect(sampled.ws_url) as client:
        await fill(client, name, vectors)
        for q in queries:
            reply = await client.request("query", collection=name, vector=q.tolist(), k=K, ef=400)
            assert own_recall(vectors, q, [h["id"] for h in reply["hits"]], K) == 1.0
        text = await wait_for(sampled, "shoal_recall_samples_total", len(queries), collection=name, index="hnsw")
        assert value(text, "shoal_recall_estimate", collection=name, index="hnsw") == 1.0
        # Cached answers are not sampled again: the same query twice is one sample.
        again = await client.request("query", collection=name, vector=queries[0].tolist(), k=K, ef=400)
        assert again["cached"] is True
        await asyncio.sleep(0.3)
        text = await scrape(sampled)
        assert value(text, "shoal_recall_samples_total", collection=name, index="hnsw") == len(queries)
        await client.drop_collection(name)
        # A dropped collection's figures go with it.
        text = await scrape(sampled)
        assert value(text, "shoal_recall_samples_total", collection=name, index="hnsw") is None


@pytest.fixture(scope="module")
def crowded() -> Iterator[ServerProcess]:
    """Every query sampled into a queue of one: most samples must be dropped."""
    yield from start({"SHOAL_RECALL_SAMPLE_RATE": "1", "SHOAL_RECALL_SAMPLE_QUEUE": "1", "SHOAL_EXACT_MAX_ROWS": "0"})


async def test_a_full_sample_queue_drops_and_never_blocks_a_query(crowded: ServerProcess) -> None:
    name = unique("busy")
    vectors = units(2000, 32, seed=5)
    async with ShoalClient.connect(crowded.ws_url) as client:
        await fill(client, name, vectors)
        queries = units(300, 32, seed=6)
        async with asyncio.timeout(60):
            replies = await asyncio.gather(*(client.query(name, q, k=K) for q in queries))
        assert all(len(r.hits) == K for r in replies)
        text = await scrape(crowded)
        dropped = value(text, "shoal_recall_samples_dropped_total", collection=name, index="hnsw")
        assert dropped is not None and dropped > 0
        assert value(text, "shoal_recall_queue_limit") == 1
        assert value(text, "shoal_recall_sample_rate") == 1.0


BUDGET = 0.005


@pytest.fixture(scope="module")
def budgeted() -> Iterator[ServerProcess]:
    """Every query sampled, and the exact re-runs allowed 0.5% of one search thread's time."""
    yield from start(
        {
            "SHOAL_RECALL_SAMPLE_RATE": "1",
            "SHOAL_RECALL_SAMPLE_BUDGET": str(BUDGET),
            "SHOAL_EXACT_MAX_ROWS": "0",
            "SHOAL_RESULTS_CACHE_BYTES": "0",
        }
    )


async def test_exact_reruns_stay_within_their_budget(budgeted: ServerProcess) -> None:
    name = unique("budget")
    vectors = units(8000, 96, seed=7)
    queries = units(3000, 96, seed=8)
    async with ShoalClient.connect(budgeted.ws_url) as client:
        await fill(client, name, vectors)
        began = time.monotonic()
        for at in range(0, len(queries), 100):
            async with asyncio.timeout(30):
                replies = await asyncio.gather(*(client.query(name, q, k=K) for q in queries[at : at + 100]))
            assert all(len(r.hits) == K for r in replies)
        # Every sample is accounted for once the queue has drained: measured, skipped or dropped.
        async with asyncio.timeout(60):
            while True:
                text = await scrape(budgeted)
                labels = {"collection": name, "index": "hnsw"}
                measured = value(text, "shoal_recall_samples_total", **labels) or 0.0
                dropped = value(text, "shoal_recall_samples_dropped_total", **labels) or 0.0
                skipped = sum(
                    value(text, "shoal_recall_samples_skipped_total", **labels, reason=r) or 0.0 for r in SKIP_REASONS
                )
                if value(text, "shoal_recall_queue") == 0 and measured + dropped + skipped == len(queries):
                    break
                await asyncio.sleep(0.2)
        elapsed = time.monotonic() - began
        spent = value(text, "shoal_recall_exact_cpu_seconds_total")
        assert spent is not None and spent > 0
        # The bucket holds at most its burst (0.05 s) when the queries start, earns BUDGET a
        # second, and the last pass may overdraw it by one pass (well under 0.05 s here).
        assert spent <= 0.05 + BUDGET * elapsed + 0.05, (spent, elapsed)
        # The budget, not the queue, decided: most samples were dropped, and those measured
        # were re-run many to a pass (one at a time they would have cost several times more).
        assert dropped > len(queries) / 2, dropped
        assert measured >= 64, measured
        assert value(text, "shoal_recall_estimate", **labels) is not None
        assert value(text, "shoal_recall_sample_budget") == BUDGET
        await client.drop_collection(name)


def test_a_cpu_budget_earns_its_rate_and_waits_out_an_overdraft() -> None:
    now = [100.0]
    budget = CpuBudget(0.01, burst_s=0.05, clock=lambda: now[0])
    assert budget.wait_s() == 0.0
    budget.spend(0.03)
    assert budget.wait_s() == 0.0  # within the burst
    budget.spend(0.04)  # overdrawn by 0.02: 2 s at 0.01 a second
    assert budget.wait_s() == pytest.approx(2.0)
    now[0] += 1.0
    assert budget.wait_s() == pytest.approx(1.0)
    now[0] += 1000.0  # idle: the balance is capped at the burst
    budget.spend(0.06)
    assert budget.wait_s() == pytest.approx(1.0)
    assert budget.spent == pytest.approx(0.13)


def test_samples_of_one_collection_seq_and_k_without_filters_are_rerun_together() -> None:
    a, b = object(), object()
    vec = np.zeros(4, np.float32)
    where = parse_where({"g": 1})

    def sample(collection: object, seq: int, k: int, filtered: bool = False) -> Sample:
        return Sample(collection, "hnsw", vec, k, where if filtered else None, None, (), seq)  # type: ignore[arg-type]

    batch = [sample(a, 5, 10), sample(a, 5, 10), sample(b, 5, 10), sample(a, 6, 10), sample(a, 5, 3)]
    batch += [sample(a, 5, 10, filtered=True), sample(a, 5, 10)]
    groups = _groups(batch)
    sizes = sorted(len(g) for g in groups)
    assert sizes == [1, 1, 1, 1, 3]
    together = next(g for g in groups if len(g) == 3)
    assert {id(s) for s in together} == {id(batch[0]), id(batch[1]), id(batch[6])}
    assert any(g[0].where is not None for g in groups)


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.L2, Metric.IP])
def test_an_exact_rerun_of_many_queries_answers_each_as_alone(metric: Metric) -> None:
    vectors = units(3000, 24, seed=9)
    state = ShardState(24, metric, EngineConfig())
    state.upsert(
        [StoredDoc(DocId(f"d{i}"), None, v, {"g": i % 3}, Seq(i + 1)) for i, v in enumerate(vectors)]
    )
    queries = list(units(40, 24, seed=10))
    for where in (None, parse_where({"g": 1})):
        together = state.search_exact(queries, K, where, None)
        assert together.cpu_s > 0 and len(together.hits) == len(queries)
        for q, hits in zip(queries, together.hits, strict=True):
            one = state.search_exact([q], K, where, None)
            assert one.by_index == together.by_index
            alone = one.hits[0]
            assert len(hits) == K and [h.id for h in hits] == [h.id for h in alone]
            assert [h.score for h in hits] == pytest.approx([h.score for h in alone], abs=1e-5)


async def test_default_rate_is_exported(server: ServerProcess) -> None:
    text = await scrape(server)
    assert value(text, "shoal_recall_sample_rate") == 0.01
    assert value(text, "shoal_recall_queue_limit") == 64
    assert value(text, "shoal_recall_sample_budget") == 0.02


def test_the_rate_is_bounded() -> None:
    for bad in ("1.5", "-0.1", "often"):
        with pytest.raises(StartupError, match="SHOAL_RECALL_SAMPLE_RATE"):
            load_settings({"SHOAL_RECALL_SAMPLE_RATE": bad})
    assert load_settings({"SHOAL_RECALL_SAMPLE_RATE": "0"}).engine.recall_sample_rate == 0.0


def hit(doc_id: str, score: float) -> Hit:
    return Hit(DocId(doc_id), score, 1.0 - score, None, None, None)


def test_recall_at_k_counts_ids_and_ties() -> None:
    exact = [hit("a", 0.9), hit("b", 0.8), hit("c", 0.7), hit("d", 0.6)]
    assert recall_at_k([("a", 0.9), ("b", 0.8), ("c", 0.7), ("d", 0.6)], exact) == 1.0
    assert recall_at_k([("a", 0.9), ("b", 0.8), ("x", 0.5), ("y", 0.4)], exact) == 0.5
    # "t" ties the exact 4th score: either could have been returned.
    assert recall_at_k([("a", 0.9), ("b", 0.8), ("c", 0.7), ("t", 0.6)], exact) == 1.0
    assert recall_at_k([("a", 0.9)], exact) == 0.25  # came back short
    assert recall_at_k([], []) == 1.0
