"""Limits and tuning knobs. Pure values: `server/settings.py` fills them from the environment."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True, slots=True)
class Limits:
    """Every bound a client can hit. Over a limit inside a frame answers `too_large`."""

    max_text_chars: int = 100_000
    max_batch_docs: int = 10_000
    max_ids: int = 10_000
    max_k: int = 1_000
    max_filter_depth: int = 8
    max_frame_bytes: int = 16 * MIB
    max_id_chars: int = 256
    max_dim: int = 4_096
    max_ef: int = 10_000
    max_metadata_keys: int = 256
    max_in_flight_per_connection: int = 256
    # Connection hardening. Reply bytes one WebSocket may have pending (queued to send, or
    # reserved by requests being served) before the server stops reading its requests; 64 KiB
    # up to a few GiB. A reply larger than this is still sent, alone.
    max_pending_reply_bytes: int = 8 * MIB
    # A WebSocket whose socket took nothing for this long while frames wait is closed with 1013
    # (and dropped this long after that if the client still reads nothing); 0.1 s up to hours.
    stuck_close_s: float = 10.0


@dataclass(frozen=True, slots=True)
class EngineConfig:
    """Tuning of the actors; defaults suit a 2-core machine."""

    shards_per_collection: int = 1
    hnsw_m: int = 16
    hnsw_ef_construction: int = 200
    hnsw_ef_search: int = 64
    hnsw_initial_capacity: int = 1_024
    # A filtered query is answered by exact search when at most this many rows match, or when
    # the matching fraction is below `exact_selectivity`: HNSW under a tight filter walks most
    # of the graph and may come back short, a dot product over a few thousand rows does not.
    exact_max_rows: int = 4_096
    exact_selectivity: float = 0.05
    # Ingest micro-batching: a batch is cut at this many documents or after this linger.
    ingest_batch_docs: int = 2_000
    ingest_linger_ms: float = 2.0
    ingest_queue: int = 64
    # Embedding: texts per ONNX run, worker threads, intra-op threads per run. On 2 cores, two
    # single-threaded runs beat one two-threaded run, and batches of ~16 length-sorted texts are
    # the most work per CPU-second (load/embed_bench.py measures both).
    embed_batch: int = 16
    # Padded tokens per ONNX run (texts x longest text): long texts go in smaller batches, so
    # every run takes a bounded time.
    embed_batch_tokens: int = 1_024
    embed_workers: int = 2
    embed_intra_threads: int = 1
    # Extra threads only query batches may use while every worker is busy with bulk work.
    embed_express_slots: int = 1
    embed_queue: int = 1_024
    # Threads that may run hnswlib / numpy work at once.
    search_threads: int = 2
    # Keep each search thread on its own CPU when the process has no more CPUs than search
    # threads (never on a bigger machine): +10-16% q/s on 2 cores (actors/read_pool.py).
    pin_search_threads: bool = True
    shard_mailbox: int = 1_024
    # Largest number of queued queries one shard answers with a single knn_query call.
    search_batch: int = 64
