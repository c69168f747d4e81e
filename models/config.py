"""Limits and tuning knobs. Pure values: `server/settings.py` fills them from the environment.

Every field is settable as `SHOAL_<FIELD>` and range-checked there generically: an int is a
count (>= 1, or >= 0 when its default is 0), a float a non-negative finite number (a fraction,
by its name, in 0..1). A field whose range differs says so in its metadata (`bounds`).
Thread and pool counts default from the CPUs this process may run on (`available_cpus`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from typing import Any

MIB = 1024 * 1024


def bounds(lo: float | None = None, hi: float | None = None) -> dict[str, Any]:
    """Field metadata overriding the generic range check: the value must be in lo..hi."""
    return {"min": lo, "max": hi}


def available_cpus() -> int:
    """The CPUs this process may run on (its affinity mask, which containers and `taskset`
    narrow), not the machine's count."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _per_cpu(per_cpu: int, cap: int) -> Any:
    """A default factory: `per_cpu` for every available CPU, at most `cap`."""
    return lambda: max(1, min(cap, per_cpu * available_cpus()))


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound a client can hit. Over a limit inside a frame answers `too_large`."""

    max_text_chars: int = 100_000
    max_batch_docs: int = 10_000
    max_ids: int = 10_000
    max_k: int = 1_000
    max_query_batch: int = field(default=1_000, metadata=bounds(1, 100_000))
    max_filter_depth: int = 8
    max_frame_bytes: int = 16 * MIB
    max_id_chars: int = 256
    max_dim: int = 4_096
    max_ef: int = 10_000
    max_metadata_keys: int = 256
    max_in_flight_per_connection: int = 256
    # Hostile input: filter size (nodes 1..10,000: a delete by filter takes up to 4 SQL parameters
    # a node; values 1..10**6), the largest vector L2 norm (0 < x <= 4e18:
    # float32 dot products and squared distances of such vectors stay finite), and the request
    # size from which parsing runs in a worker thread instead of on the event loop (>= 0 bytes).
    max_filter_nodes: int = field(default=1_000, metadata=bounds(1, 10_000))
    max_filter_values: int = field(default=10_000, metadata=bounds(1, 1_000_000))
    max_vector_norm: float = field(default=1e18, metadata=bounds(1e-6, 4e18))
    parse_in_thread_bytes: int = field(default=65_536, metadata=bounds(0))
    # Request deadlines (0.1..3600 s): a request still unanswered after its deadline answers
    # `unavailable` (writes: upsert, delete, create/drop collection; reads: everything else).
    write_deadline_s: float = field(default=5.0, metadata=bounds(0.1, 3600))
    read_deadline_s: float = field(default=30.0, metadata=bounds(0.1, 3600))
    # Added to an upsert's deadline for each text the server embeds for it (0..60 s): embedding
    # is work, not a stall, and a batch of 500 texts takes seconds on a small machine.
    embed_deadline_per_text_s: float = field(default=0.05, metadata=bounds(0.0, 60.0))
    # Connection hardening. Reply bytes one WebSocket may have pending (queued to send, or
    # reserved by requests being served) before the server stops reading its requests; 64 KiB
    # up to 64 GiB. A reply larger than this is still sent, alone.
    max_pending_reply_bytes: int = field(default=8 * MIB, metadata=bounds(64 * 1024, 64 * 1024 * MIB))
    # A WebSocket whose socket took nothing for this long while frames wait is closed with 1013
    # (and dropped this long after that if the client still reads nothing); 0.1 s up to a day.
    stuck_close_s: float = field(default=10.0, metadata=bounds(0.1, 86_400.0))


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tuning of the actors. Thread counts follow the CPUs available to the process."""

    shards_per_collection: int = 1
    hnsw_m: int = field(default=16, metadata=bounds(2, 1_000))
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    hnsw_initial_capacity: int = 1_024
    # A filtered query is answered by exact search when at most this many rows match, or when
    # the matching fraction is below `exact_selectivity`: HNSW under a tight filter walks most
    # of the graph and may come back short, a dot product over a few thousand rows does not.
    exact_max_rows: int = field(default=4_096, metadata=bounds(0))
    exact_selectivity: float = field(default=0.05, metadata=bounds(0.0, 1.0))
    # Ingest micro-batching: a batch is cut at this many documents or after this linger.
    ingest_batch_docs: int = 2_000
    ingest_linger_ms: float = 2.0
    ingest_queue: int = 64
    # Embedding: texts per ONNX run, worker threads (one per CPU: several single-threaded runs
    # beat one multi-threaded run), intra-op threads per run. Batches of ~16 length-sorted texts
    # are the most work per CPU-second (load/embed_bench.py measures both).
    embed_batch: int = 16
    # Padded tokens per ONNX run (texts x longest text): long texts go in smaller batches, so
    # every run takes a bounded time.
    embed_batch_tokens: int = 1_024
    # One model session per worker; each holds its own copy of the weights, hence the cap.
    embed_workers: int = field(default_factory=_per_cpu(1, 16))
    embed_intra_threads: int = 1
    # Extra threads only query batches may use while every worker is busy with bulk work.
    embed_express_slots: int = field(default=1, metadata=bounds(0))
    embed_queue: int = 1_024
    # Threads that may run hnswlib / numpy work at once: one per CPU.
    search_threads: int = field(default_factory=_per_cpu(1, 1_024))
    # Keep each search thread on its own CPU when the process has no more CPUs than search
    # threads (never on a bigger machine; see actors/read_pool.py).
    pin_search_threads: bool = True
    shard_mailbox: int = 1_024
    # Largest number of queued queries one shard answers with a single knn_query call.
    search_batch: int = 64
    # startup: PostgreSQL connections in the pool, four per CPU (a commit waits on the disk, so
    # several overlap per core), at most 32 so that a few nodes fit PostgreSQL's
    # max_connections (100). Range 1..1000.
    pg_pool_size: int = field(default_factory=_per_cpu(4, 32), metadata=bounds(1, 1_000))
    # Database faults. Connect and per-operation timeouts (0.1..600 s): past them an operation
    # answers `unavailable` and its connection is dropped. The health probe's period and timeout
    # (0.05..60 s). How often the embedded PostgreSQL is checked for a crash (0.05..60 s).
    db_connect_timeout_s: float = field(default=5.0, metadata=bounds(0.1, 600))
    db_command_timeout_s: float = field(default=10.0, metadata=bounds(0.1, 600))
    db_probe_interval_s: float = field(default=1.0, metadata=bounds(0.05, 60))
    db_probe_timeout_s: float = field(default=2.0, metadata=bounds(0.05, 60))
    db_restart_check_s: float = field(default=0.5, metadata=bounds(0.05, 60))
    # Snapshots for fast restart (actors/snapshotter.py): on/off; a collection is snapshotted
    # again after this many seconds with changes (1..86,400) or this many changes (1..10**9),
    # and at clean shutdown.
    snapshots: bool = True
    snapshot_interval_s: float = field(default=300.0, metadata=bounds(1, 86_400))
    snapshot_every_changes: int = field(default=50_000, metadata=bounds(1, 1_000_000_000))
    # Keyword and hybrid search: each side's default candidate depth for hybrid (at least k;
    # 1..1000, queries may ask for their own). Results cache: bytes of answers kept (0: off;
    # 0..2**40), and bytes of cached query embeddings (0: off; 0..2**40).
    hybrid_candidates: int = field(default=100, metadata=bounds(1, 1_000))
    results_cache_bytes: int = field(default=64 * MIB, metadata=bounds(0, 2**40))
    embedding_cache_bytes: int = field(default=16 * MIB, metadata=bounds(0, 2**40))
    # cluster: how often the log follower syncs with the shared catalog even without a
    # notification (0.01..60 s), and how long a read with `min_seq` waits for this node to apply
    # that seq before answering `unavailable` (0..60000 ms).
    follow_poll_s: float = field(default=1.0, metadata=bounds(0.01, 60))
    min_seq_wait_ms: float = field(default=2_000.0, metadata=bounds(0, 60_000))
    # compaction (actors/compactor.py): on/off; how often each node reports its applied seqs and
    # compacts (0.05..86,400 s); the newest changes of a collection always kept, whatever every
    # node has applied (0..10**12); how long a node's report counts without a newer one
    # (1..10**6 s); the log rows one compaction step deletes at most (1..10**7).
    log_compaction: bool = True
    compact_interval_s: float = field(default=60.0, metadata=bounds(0.05, 86_400))
    log_retention_changes: int = field(default=100_000, metadata=bounds(0, 10**12))
    node_expiry_s: float = field(default=300.0, metadata=bounds(1, 1_000_000))
    compact_batch: int = field(default=10_000, metadata=bounds(1, 10_000_000))
    # index kinds (actors/indexes): an ivf index is trained once a shard holds this many vectors
    # (exact search until then; 1..10**9), and ivf and quantised hnsw are rebuilt off the write
    # path each time the shard has grown this many times since their last build (1.5..1000).
    ivf_train_min: int = field(default=4_096, metadata=bounds(1, 1_000_000_000))
    ivf_retrain_growth: float = field(default=4.0, metadata=bounds(1.5, 1_000))
    # recall sampling (actors/recall_sampler.py): the fraction of fresh vector queries re-run by
    # exact search off the hot path (0: off), the samples waiting at most (more are dropped and
    # counted), the share of one search thread's time the re-runs may take on average, and the
    # samples each collection's recall estimate is the mean of.
    recall_sample_rate: float = field(default=0.01, metadata=bounds(0.0, 1.0))
    recall_sample_queue: int = field(default=64, metadata=bounds(1, 100_000))
    recall_sample_budget: float = field(default=0.02, metadata=bounds(0.001, 1.0))
    recall_window: int = field(default=200, metadata=bounds(1, 1_000_000))
    # broker sources (actors/sources): entries per read (1..100,000); entries between read and
    # acknowledgement at most (1..10**7); how long a read waits for new entries (1..60,000 ms);
    # idle time after which a dead consumer's pending entries are taken over (1..86,400,000 ms);
    # completion events kept in the notify stream, approximately (1..10**9); the back-off
    # between attempts after an outage, first and longest (0.01..600 s); a broker command's
    # timeout (0.1..600 s).
    source_read_batch: int = field(default=500, metadata=bounds(1, 100_000))
    source_max_in_flight: int = field(default=5_000, metadata=bounds(1, 10_000_000))
    source_block_ms: int = field(default=1_000, metadata=bounds(1, 60_000))
    source_claim_idle_ms: int = field(default=30_000, metadata=bounds(1, 86_400_000))
    source_notify_maxlen: int = field(default=100_000, metadata=bounds(1, 1_000_000_000))
    source_retry_initial_s: float = field(default=0.1, metadata=bounds(0.01, 600))
    source_retry_max_s: float = field(default=5.0, metadata=bounds(0.01, 600))
    source_timeout_s: float = field(default=5.0, metadata=bounds(0.1, 600))
