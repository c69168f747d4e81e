"""Prometheus metrics of one server instance (own registry, so several apps can share a process).

Request counters and latencies are updated as requests are served. Everything about the engine
(sizes, queues with their bounds, the database pool, plans, the embedder's batches) is read when
/metrics is scraped, by `EngineCollector`, from `Engine.status()`: no actor is messaged, so a
scrape answers while the engine is busy. Each bounded queue is exported as a pair, `<name>` and
`<name>_limit`, so an alert can compare the two.
"""

from __future__ import annotations

import platform
from collections.abc import Iterator, Mapping, Sequence
from importlib import metadata
from typing import Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector

from actors.compactor import compacted_rows
from actors.embedder import EmbedderStats
from actors.follower import FollowerStats
from actors.latency import LatencyHistogram
from actors.planner import plan_counts
from actors.snapshotter import snapshot_counts
from actors.status import CollectionStatus
from actors.supervisor import Engine
from models.requests import PARSERS

LATENCY_BUCKETS = (0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)

# Fixed caps exported as constant gauges: family name -> (help, value).
Caps = Mapping[str, tuple[str, int]]


def version() -> str:
    """The installed package's version ("unknown" when run from a bare checkout)."""
    try:
        return metadata.version("shoal")
    except metadata.PackageNotFoundError:
        return "unknown"


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        ProcessCollector(registry=self.registry)
        PlatformCollector(registry=self.registry)
        self.requests = Counter(
            "shoal_requests",
            "Requests served, by transport, op and result code",
            ["transport", "op", "code"],
            registry=self.registry,
        )
        self.latency = Histogram(
            "shoal_request_seconds",
            "Time to serve a request, by op",
            ["op"],
            buckets=LATENCY_BUCKETS,
            registry=self.registry,
        )
        self.ws_connections = Gauge("shoal_ws_connections", "Open WebSocket connections", registry=self.registry)
        build = Gauge(
            "shoal_build_info", "Always 1; the labels name the build", ["version", "python"], registry=self.registry
        )
        build.labels(version(), platform.python_version()).set(1)

        # Labelled children looked up once: `labels()` per request showed in the query profile.
        self._served: dict[tuple[str, str, str], tuple[Any, Any]] = {}

    def watch(self, engine: Engine, caps: Caps) -> None:
        """Export the engine's state, read at each scrape, and the fixed per-connection caps."""
        self.registry.register(EngineCollector(engine, caps))

    def served(self, transport: str, op: str, code: str, seconds: float) -> None:
        """Count one request and observe its latency; an unknown op counts as "-", so a client
        cannot create labels."""
        if op not in PARSERS:
            op = "-"
        key = (transport, op, code)
        children = self._served.get(key)
        if children is None:
            children = self._served[key] = (self.requests.labels(transport, op, code), self.latency.labels(op))
        children[0].inc()
        children[1].observe(seconds)

    def render(self) -> bytes:
        return generate_latest(self.registry)


# Bounded queues of `EngineStatus.queues`: key -> (family, help).
_QUEUES = {
    "ingest": ("shoal_ingest_queue", "Write jobs waiting in the ingest mailbox"),
    "subscriptions": ("shoal_subscription_queue", "Applied batches waiting for the subscriptions actor"),
}
_EMBED_LANES = {"embed_query": "query", "embed_bulk": "bulk"}


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class EngineCollector(Collector):
    """The engine's sizes, queues, pool and plan counts, read when /metrics is scraped."""

    def __init__(self, engine: Engine, caps: Caps) -> None:
        self.engine = engine
        self.caps = dict(caps)

    def collect(self) -> Iterator[Metric]:
        engine = self.engine
        status = engine.status()
        yield _gauge("shoal_ready", "1 when the engine serves requests", 1 if status.ready else 0)

        for key, (name, doc) in _QUEUES.items():
            queue = status.queues[key]
            if key != "subscriptions":  # its depth is exported with the subscription metrics
                yield _gauge(name, doc, queue.queued)
            yield _gauge(f"{name}_limit", f"Bound of {name}", queue.limit)

        depth = GaugeMetricFamily("shoal_embed_queue", "Work waiting for the embedder, by lane", labels=["lane"])
        limit = GaugeMetricFamily(
            "shoal_embed_queue_limit", "Bound of shoal_embed_queue (query: texts, bulk: chunks)", labels=["lane"]
        )
        for key, lane in _EMBED_LANES.items():
            depth.add_metric([lane], status.queues[key].queued)
            limit.add_metric([lane], status.queues[key].limit)
        yield depth
        yield limit
        yield from _embedder_metrics(status.embedder)

        docs = GaugeMetricFamily("shoal_documents", "Live documents per collection", labels=["collection"])
        families = {
            "documents": GaugeMetricFamily(
                "shoal_shard_documents", "Live documents per shard", labels=["collection", "shard"]
            ),
            "deleted": GaugeMetricFamily(
                "shoal_shard_deleted",
                "Deleted slots per shard, reused by later inserts",
                labels=["collection", "shard"],
            ),
            "capacity": GaugeMetricFamily(
                "shoal_shard_capacity", "Slots allocated per shard (grows by doubling)", labels=["collection", "shard"]
            ),
            "index_bytes": GaugeMetricFamily(
                "shoal_index_bytes",
                "Estimated memory of the HNSW index per shard (graph and its vectors)",
                labels=["collection", "shard"],
            ),
            "vector_bytes": GaugeMetricFamily(
                "shoal_vector_bytes",
                "Memory of the exact replica's arrays per shard (vectors, norms, flags, seqs)",
                labels=["collection", "shard"],
            ),
            "queued": GaugeMetricFamily(
                "shoal_shard_queue", "Messages waiting in the shard's mailbox", labels=["collection", "shard"]
            ),
        }
        for collection in status.collections:
            docs.add_metric([collection.name], sum(s.documents for s in collection.shards))
            for number, sizes in enumerate(collection.shards):
                labels = [collection.name, str(number)]
                for field, family in families.items():
                    family.add_metric(labels, getattr(sizes, field))
        yield docs
        yield from families.values()
        yield from _index_metrics(status.collections)
        yield _gauge("shoal_shard_queue_limit", "Bound of shoal_shard_queue", engine.config.shard_mailbox)

        yield _gauge("shoal_search_threads", "Threads running shard searches and writes", status.search_threads)
        yield _gauge("shoal_search_pool_queue", "Shard jobs waiting for a search thread", status.search_pool_queued)

        plans = CounterMetricFamily(
            "shoal_planner_queries", "Shard searches by the plan chosen (hnsw, hnsw_filtered, exact)", labels=["plan"]
        )
        for plan, count in plan_counts().items():
            plans.add_metric([plan], count)
        yield plans
        yield from _snapshot_metrics()
        yield from _cache_metrics(engine)
        yield from _follower_metrics(engine.follower_stats())
        yield from _recall_metrics(engine)

        if status.database is not None:
            pool = status.database
            conns = GaugeMetricFamily("shoal_db_connections", "Database connections, by state", labels=["state"])
            conns.add_metric(["in_use"], pool.in_use)
            conns.add_metric(["idle"], pool.idle)
            yield conns
            yield _gauge("shoal_db_connections_limit", "Bound of the database connection pool", pool.limit)
            yield _gauge("shoal_db_waiting", "Callers waiting for a database connection", pool.waiting)

        subs = engine.subscription_config
        yield _gauge("shoal_subscriptions_limit", "Subscriptions this server holds at most", subs.max_subscriptions)
        yield _gauge("shoal_subscription_buffer_limit", "Events buffered per subscription at most", subs.sub_buffer)
        yield _gauge(
            "shoal_subscriptions_per_connection_limit",
            "Subscriptions per WebSocket connection at most",
            subs.max_subscriptions_per_connection,
        )
        for name, (doc, value) in self.caps.items():
            yield _gauge(name, doc, value)


def _embedder_metrics(stats: EmbedderStats) -> Iterator[Metric]:
    yield _histogram(
        "shoal_embed_batch_seconds", "Time of one embedding model run (a batch of texts)", stats.batch_seconds
    )
    texts = CounterMetricFamily("shoal_embed_texts", "Texts embedded, by lane", labels=["lane"])
    texts.add_metric(["query"], stats.query_texts)
    texts.add_metric(["bulk"], stats.bulk_texts)
    yield texts
    yield CounterMetricFamily("shoal_embed_failed_batches", "Model runs that raised", value=stats.failed_batches)


def _follower_metrics(stats: FollowerStats) -> Iterator[Metric]:
    yield _gauge("shoal_follower_listening", "1 while the notifications connection is open", int(stats.listening))
    yield CounterMetricFamily("shoal_follower_syncs", "Full syncs with the shared catalog", value=stats.syncs)
    yield CounterMetricFamily(
        "shoal_follower_catch_ups", "Collections caught up with changes committed by other nodes", value=stats.catch_ups
    )
    yield CounterMetricFamily(
        "shoal_follower_reconnects", "Change notification connections lost and opened again", value=stats.reconnects
    )
    if stats.seconds_since_sync is not None:
        yield _gauge("shoal_follower_sync_age_seconds", "Seconds since the last full sync", stats.seconds_since_sync)
    lag = GaugeMetricFamily(
        "shoal_follower_lag",
        "Changes known committed (by any node) and not applied here yet, per collection",
        labels=["collection"],
    )
    for name, behind in sorted(stats.lag.items()):
        lag.add_metric([name], behind)
    yield lag


def _histogram(name: str, doc: str, histogram: LatencyHistogram) -> HistogramMetricFamily:
    buckets = [("+Inf" if bound == float("inf") else repr(bound), count) for bound, count in histogram.cumulative()]
    return HistogramMetricFamily(name, doc, buckets=buckets, sum_value=histogram.sum)


def _snapshot_metrics() -> Iterator[Metric]:
    counts = snapshot_counts()
    loads = CounterMetricFamily(
        "shoal_snapshot_loads",
        "Collections loaded at start, by result (loaded: snapshot + log tail; rebuilt: snapshot unusable, "
        "full rebuild; absent: no snapshot, full rebuild)",
        labels=["result"],
    )
    for result, n in counts["loads"].items():
        loads.add_metric([result], n)
    yield loads
    writes = CounterMetricFamily(
        "shoal_snapshot_writes", "Snapshots written, by result (ok, failed)", labels=["result"]
    )
    for result, n in counts["writes"].items():
        writes.add_metric([result], n)
    yield writes
    yield CounterMetricFamily(
        "shoal_log_compacted_rows", "Change-log rows this node deleted by compaction", value=compacted_rows()
    )


def _cache_metrics(engine: Engine) -> Iterator[Metric]:
    """Results and query-embedding caches: lookups by outcome, evictions, size and bound."""
    caches = engine.cache_stats()
    for prefix, what, stats in (
        ("shoal_results_cache", "Query results cache", caches["results"]),
        ("shoal_embedding_cache", "Query embedding cache", caches["embeddings"]),
    ):
        lookups = CounterMetricFamily(f"{prefix}_lookups", f"{what} lookups, by outcome", labels=["outcome"])
        lookups.add_metric(["hit"], stats.hits)
        lookups.add_metric(["miss"], stats.misses)
        yield lookups
        dropped = CounterMetricFamily(f"{prefix}_dropped", f"{what} entries dropped, by reason", labels=["reason"])
        dropped.add_metric(["evicted"], stats.evictions)
        dropped.add_metric(["invalidated"], stats.invalidations)
        yield dropped
        yield _gauge(f"{prefix}_bytes", f"{what}: estimated bytes held", stats.bytes)
        yield _gauge(f"{prefix}_entries", f"{what}: entries held", stats.entries)
        yield _gauge(f"{prefix}_limit_bytes", f"{what}: bound in bytes (0: off)", stats.limit_bytes)


def _index_metrics(collections: Sequence[CollectionStatus]) -> Iterator[GaugeMetricFamily]:
    """Memory per vector by collection and index kind (RAM of the index and the replica's arrays
    over live documents; quantised kinds' mapped vectors counted apart), and whether each shard's
    index answers (0: an ivf not trained yet, searched exactly)."""
    per_vector = GaugeMetricFamily(
        "shoal_index_bytes_per_vector",
        "RAM per live document: index plus the shard's arrays, by index kind",
        labels=["collection", "kind"],
    )
    mapped = GaugeMetricFamily(
        "shoal_index_mapped_bytes",
        "Full-precision vectors memory-mapped from the data directory",
        labels=["collection", "kind"],
    )
    ready = GaugeMetricFamily(
        "shoal_index_ready",
        "1 when the shard's index answers, 0 while it is searched exactly",
        labels=["collection", "shard", "kind"],
    )
    builds = GaugeMetricFamily(
        "shoal_index_builds",
        "Index (re)builds swapped in off the write path (ivf training, quantised hnsw)",
        labels=["collection", "kind"],
    )
    building = GaugeMetricFamily(
        "shoal_index_building",
        "Shards whose index is being (re)built in the background now (a core each until swapped in)",
        labels=["collection", "kind"],
    )
    unindexed = GaugeMetricFamily(
        "shoal_index_unindexed",
        "Documents replayed at start that the index has not taken yet (searched exactly meanwhile)",
        labels=["collection", "kind"],
    )
    for collection in collections:
        shards = collection.shards
        if not shards:
            continue
        kind = shards[0].kind
        docs = sum(s.documents for s in shards)
        ram = sum(s.index_bytes + s.vector_bytes for s in shards)
        per_vector.add_metric([collection.name, kind], ram / docs if docs else 0.0)
        mapped.add_metric([collection.name, kind], sum(s.mapped_bytes for s in shards))
        builds.add_metric([collection.name, kind], sum(s.builds for s in shards))
        building.add_metric([collection.name, kind], sum(1 for s in shards if s.building))
        unindexed.add_metric([collection.name, kind], sum(s.unindexed for s in shards))
        for number, sizes in enumerate(shards):
            ready.add_metric([collection.name, str(number), kind], 1 if sizes.ready else 0)
    yield per_vector
    yield mapped
    yield ready
    yield builds
    yield building
    yield unindexed


def _recall_metrics(engine: Engine) -> Iterator[Metric]:
    """Recall sampling (actors/recall_sampler.py): the windowed estimate per collection and index
    kind, samples measured, skipped by reason and dropped, the queue, the sample rate, and the
    search-thread time the exact re-runs took against their budget."""
    labels = ["collection", "index"]
    estimate = GaugeMetricFamily(
        "shoal_recall_estimate",
        "Mean recall@k of the last sampled vector queries against exact search (absent before the first)",
        labels=labels,
    )
    window = GaugeMetricFamily("shoal_recall_window", "Samples shoal_recall_estimate is the mean of", labels=labels)
    samples = CounterMetricFamily(
        "shoal_recall_samples", "Sampled queries measured against exact search", labels=labels
    )
    skipped = CounterMetricFamily(
        "shoal_recall_samples_skipped",
        "Sampled queries not measured, by reason (exact_plan: answered exactly; changed: the collection "
        "changed before the exact re-run; failed: the re-run was not served)",
        labels=[*labels, "reason"],
    )
    dropped = CounterMetricFamily(
        "shoal_recall_samples_dropped", "Sampled queries dropped because the sample queue was full", labels=labels
    )
    sampler = engine.recall
    for stats in sampler.all_stats():
        key = [stats.collection, stats.index]
        if stats.estimate is not None:
            estimate.add_metric(key, stats.estimate)
        window.add_metric(key, stats.window)
        samples.add_metric(key, stats.samples)
        for reason, count in stats.skipped.items():
            skipped.add_metric([*key, reason], count)
        dropped.add_metric(key, stats.dropped)
    yield from (estimate, window, samples, skipped, dropped)
    yield _gauge("shoal_recall_sample_rate", "Fraction of fresh vector queries sampled for recall", sampler.rate)
    yield _gauge("shoal_recall_queue", "Sampled queries waiting for their exact re-run", sampler.queued)
    yield _gauge("shoal_recall_queue_limit", "Bound of shoal_recall_queue", sampler.queue_limit)
    yield _gauge(
        "shoal_recall_sample_budget",
        "Share of one search thread's time the exact re-runs of recall samples may take on average",
        sampler.budget,
    )
    yield CounterMetricFamily(
        "shoal_recall_exact_cpu_seconds",
        "Search-thread CPU seconds spent on exact re-runs of recall samples",
        value=sampler.exact_cpu_s,
    )
