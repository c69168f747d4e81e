"""/metrics for an operator, scraped from the real server after writes and queries."""

from __future__ import annotations

import platform
import uuid

import httpx
import numpy as np
import pytest
from prometheus_client.parser import text_string_to_metric_families
from prometheus_client.samples import Sample

from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(120)

Samples = dict[str, list[Sample]]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


async def scrape(http: httpx.AsyncClient) -> Samples:
    response = await http.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    out: Samples = {}
    for family in text_string_to_metric_families(response.text):
        for sample in family.samples:
            out.setdefault(sample.name, []).append(sample)
    return out


def value(samples: Samples, name: str, **labels: str) -> float:
    """The one sample of `name` whose labels include `labels`."""
    found = [s.value for s in samples.get(name, []) if all(s.labels.get(k) == v for k, v in labels.items())]
    assert len(found) == 1, (name, labels, samples.get(name))
    return found[0]


async def test_metrics_families_after_writes_and_queries(server: ServerProcess) -> None:
    name, text_name = unique("metrics"), unique("metrics_text")
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        before = await scrape(http)
        assert (await http.post("/v1/collections", json={"name": name, "dim": 4})).status_code == 200
        docs = [{"id": f"d{i}", "vector": [1.0, float(i), 0.5, 1.0], "metadata": {"i": i}} for i in range(30)]
        assert (await http.post(f"/v1/collections/{name}/upsert", json={"docs": docs})).status_code == 200
        deleted = await http.post(f"/v1/collections/{name}/delete", json={"ids": ["d0", "d1"]})
        assert deleted.json()["deleted"] == 2
        # A small collection: the filtered query goes exact.
        query = {"vector": [1.0, 0.0, 0.0, 1.0], "k": 3, "where": {"i": {"$gte": 10}}}
        assert len((await http.post(f"/v1/collections/{name}/query", json=query)).json()["hits"]) == 3
        # Text is embedded: one model batch at least.
        assert (await http.post("/v1/collections", json={"name": text_name})).status_code == 200
        text_docs = {"docs": [{"id": "a", "text": "a metrics scrape"}, {"id": "b", "text": "counts batches"}]}
        assert (await http.post(f"/v1/collections/{text_name}/upsert", json=text_docs)).status_code == 200
        after = await scrape(http)

    # Process and platform collectors, build info.
    assert value(after, "process_cpu_seconds_total") > 0
    assert value(after, "process_resident_memory_bytes") > 10_000_000
    assert value(after, "python_info", version=platform.python_version()) == 1
    (build,) = after["shoal_build_info"]
    assert build.value == 1 and build.labels["python"] == platform.python_version() and build.labels["version"]

    # Every bounded queue with its bound.
    for queue in ("shoal_ingest_queue", "shoal_subscription_queue", "shoal_shard_queue_limit"):
        assert queue in after, queue
    assert 0 <= value(after, "shoal_ingest_queue") <= value(after, "shoal_ingest_queue_limit") == 64
    assert value(after, "shoal_subscription_queue_limit") == 256
    for lane, limit in (("query", 1024), ("bulk", 64)):
        assert 0 <= value(after, "shoal_embed_queue", lane=lane) <= value(after, "shoal_embed_queue_limit", lane=lane)
        assert value(after, "shoal_embed_queue_limit", lane=lane) == limit
    assert value(after, "shoal_shard_queue", collection=name, shard="0") == 0
    assert value(after, "shoal_shard_queue_limit") == 1024
    for cap, expected in (
        ("shoal_ws_in_flight_limit", 256),
        ("shoal_ws_outgoing_frames_limit", 1024),
        ("shoal_ws_push_window_limit", 64),
        ("shoal_subscriptions_per_connection_limit", 1000),
        ("shoal_subscription_buffer_limit", 2000),
        ("shoal_subscriptions_limit", 100_000),
    ):
        assert value(after, cap) == expected, cap

    # The embedder's batches: a histogram whose count rose with the text upsert.
    batches = value(after, "shoal_embed_batch_seconds_count")
    assert batches >= value(before, "shoal_embed_batch_seconds_count") + 1
    assert value(after, "shoal_embed_batch_seconds_bucket", le="+Inf") == batches
    assert 0 < value(after, "shoal_embed_batch_seconds_sum") < 60 * batches
    assert value(after, "shoal_embed_texts_total", lane="bulk") >= 2

    # The database pool: open connections are in use or idle, within the bound; nobody waits now.
    in_use = value(after, "shoal_db_connections", state="in_use")
    idle = value(after, "shoal_db_connections", state="idle")
    assert 1 <= in_use + idle <= value(after, "shoal_db_connections_limit") == 8
    assert value(after, "shoal_db_waiting") == 0

    # The planner: the filtered query on a small collection went exact.
    for plan in ("hnsw", "hnsw_filtered", "exact"):
        assert value(after, "shoal_planner_queries_total", plan=plan) >= value(
            before, "shoal_planner_queries_total", plan=plan
        )
    exact_before = value(before, "shoal_planner_queries_total", plan="exact")
    assert value(after, "shoal_planner_queries_total", plan="exact") >= exact_before + 1

    # Shard sizes and memory.
    assert value(after, "shoal_documents", collection=name) == 28
    assert value(after, "shoal_shard_documents", collection=name, shard="0") == 28
    assert value(after, "shoal_shard_deleted", collection=name, shard="0") == 2
    capacity = value(after, "shoal_shard_capacity", collection=name, shard="0")
    assert capacity >= 30
    # At least the vectors and level-0 links of every slot; far below a megabyte per slot.
    index_bytes = value(after, "shoal_index_bytes", collection=name, shard="0")
    assert capacity * (4 * 4 + 16 * 2 * 4) <= index_bytes <= capacity * 1_000_000
    assert value(after, "shoal_vector_bytes", collection=name, shard="0") >= capacity * 4 * 4
    assert value(after, "shoal_index_bytes", collection=text_name, shard="0") > index_bytes  # 384-d
    assert value(after, "shoal_search_threads") >= 1
    assert value(after, "shoal_search_pool_queue") >= 0
    assert value(after, "shoal_ready") == 1

    # Requests are still counted.
    assert value(after, "shoal_requests_total", transport="http", op="query", code="ok") >= 1


async def test_a_dropped_collection_leaves_the_metrics(server: ServerProcess) -> None:
    name = unique("metrics_drop")
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        assert (await http.post("/v1/collections", json={"name": name, "dim": 2})).status_code == 200
        assert value(await scrape(http), "shoal_shard_documents", collection=name, shard="0") == 0
        assert (await http.delete(f"/v1/collections/{name}")).status_code == 200
        samples = await scrape(http)
    assert not [s for s in samples.get("shoal_shard_documents", []) if s.labels["collection"] == name]
    assert not [s for s in samples.get("shoal_documents", []) if s.labels["collection"] == name]


async def test_planner_counts_each_plan(server: ServerProcess) -> None:
    """Above `exact_max_rows` (4,096) matching documents the graph answers: unfiltered through
    `hnsw`, a filter matching 90% of them through `hnsw_filtered`, a filter matching a few exactly."""
    name = unique("metrics_plans")
    n = 5_000
    rng = np.random.default_rng(5)
    vectors = rng.normal(size=(n, 4)).astype(np.float32)
    docs = [{"id": f"d{i}", "vector": vectors[i].tolist(), "metadata": {"i": i}} for i in range(n)]
    async with httpx.AsyncClient(base_url=server.url, timeout=60) as http:
        assert (await http.post("/v1/collections", json={"name": name, "dim": 4})).status_code == 200
        assert (await http.post(f"/v1/collections/{name}/upsert", json={"docs": docs})).status_code == 200
        expected = {"hnsw": 0, "hnsw_filtered": 0, "exact": 0}
        before = await scrape(http)
        for plan, where, times in (
            ("hnsw", None, 3),
            ("hnsw_filtered", {"i": {"$gte": 500}}, 2),  # 4,500 of 5,000 match
            ("exact", {"i": {"$lt": 10}}, 1),
        ):
            for t in range(times):  # each vector its own, so the results cache answers none
                body = {"vector": [1.0, 0.5, -0.5, 0.2 + 0.01 * t], "k": 5, "where": where}
                assert len((await http.post(f"/v1/collections/{name}/query", json=body)).json()["hits"]) == 5
            expected[plan] += times
        after = await scrape(http)
        assert (await http.delete(f"/v1/collections/{name}")).status_code == 200
    for plan, count in expected.items():
        grown = value(after, "shoal_planner_queries_total", plan=plan) - value(
            before, "shoal_planner_queries_total", plan=plan
        )
        # Other tests may query meanwhile on the shared server: at least ours.
        assert grown >= count, (plan, grown, count)
    assert value(after, "shoal_shard_capacity", collection=name, shard="0") >= n
