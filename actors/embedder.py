"""The embedder actor: texts in, unit vectors out, with queries ahead of bulk work.

Two lanes feed one dispatcher task:
- the query lane holds single texts from searches. It is bounded (`embed_queue` texts) and a full
  lane fails fast with `Overloaded`: a search should not queue without bound behind ingest;
- the bulk lane holds chunks of texts from ingest. It is bounded (`embed_queue // embed_batch`
  chunks, at least 2) and a full lane makes the caller wait: ingest is pushed back, never dropped.

Callers tokenize their texts (in a worker thread) before queueing them. A bulk request is sorted
by token count and cut into chunks of at most `embed_batch` texts and `embed_batch_tokens` padded
tokens, so each chunk holds texts of similar length and takes a bounded time to run. The cut
points are planned (`plan_runs`): a run costs its padded tokens plus a fixed overhead, and filling
every chunk to its limit pads many short texts to a long one wherever lengths fall steeply, as
they do in a request of a few hundred texts (a corpus sorted as a whole falls gently).
Bulk requests queue their chunks one request after another, in the order they were made, not
interleaved: the first finishes first and is committed while the second is embedded (the
ingest pipeline keeps two batches embedding for that, actors/ingest.py).

The dispatcher starts a batch whenever a worker is free and work is pending, from what is pending
at that moment: every queued query (within the same limits) if there is any, otherwise bulk chunks
merged within the limits where merging costs less than running them apart (small requests of
similar lengths share a run; the planned chunks of one request stay as planned). There is no linger
delay; batches grow by themselves while the workers are busy. Up to `embed_workers` batches run at
once, each in a worker thread. When all workers are busy with bulk work, query batches may also use
`embed_express_slots` extra threads, so a search is not stuck behind ingest batches (it shares the
cores with them for a few milliseconds).

Lifecycle: `run()` loads the model in a thread, reports `started`, and serves until `close()`;
then it finishes everything queued and in flight and returns. Calls made after `close()` raise
`Unavailable`. A caller that is cancelled simply stops waiting: its queued work is skipped, work
already running completes and is discarded. A failure inside the model fails the callers whose
texts were in that batch; the actor keeps serving.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import anyio
import numpy as np
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream
from numpy.typing import NDArray

from actors.latency import LatencyHistogram
from actors.mailbox import Mailbox, Reply, unknown_message
from actors.onnx_model import MiniLM, TokenIds
from models.config import EngineConfig
from models.errors import Unavailable
from models.records import MODEL_DIM, Vector

log = logging.getLogger("shoal.embedder")

Vectors = NDArray[np.float32]

# What a model run costs beyond its padded tokens, in tokens' worth of time: the fixed part of a
# run (starting the graph, matrices too small to use the cores' vector units fully). It is the
# intercept of run time against padded tokens, which load/embed_bench.py prints (`run_cost`);
# plans made with it are within half a percent of the best plan for any overhead from 2 to 20
# tokens, so a round figure serves every machine.
RUN_OVERHEAD_TOKENS = 10


def plan_runs(widths: Sequence[int], max_rows: int, max_tokens: int, overhead: int = RUN_OVERHEAD_TOKENS) -> list[int]:
    """How many rows each run takes when `widths` (token counts, longest first) are cut into
    consecutive runs of at most `max_rows` rows and `max_tokens` padded tokens (a row wider than
    that runs alone), such that the padded tokens of all runs plus `overhead` per run are least.

    Dynamic programming over the cut points: O(len(widths) x max_rows).
    """
    n = len(widths)
    cost = [0] * (n + 1)  # cost[end]: the least cost of rows [0, end)
    last = [0] * (n + 1)  # last[end]: the rows of the final run in that plan
    for end in range(1, n + 1):
        best, rows_of_best = -1, 1
        for start in range(end - 1, max(-1, end - 1 - max_rows), -1):
            rows = end - start
            padded = widths[start] * rows  # a run pads to its first (longest) row
            if rows > 1 and padded > max_tokens:
                break  # longer runs start on wider rows: over the budget too
            total = cost[start] + padded + overhead
            if best < 0 or total < best:
                best, rows_of_best = total, rows
        cost[end], last[end] = best, rows_of_best
    sizes: list[int] = []
    end = n
    while end > 0:
        sizes.append(last[end])
        end -= last[end]
    sizes.reverse()
    return sizes


class EmbeddingModel(Protocol):
    """What the actor needs from a model (`actors.onnx_model.MiniLM`); both are thread-safe."""

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]: ...

    def encode_ids(self, rows: Sequence[TokenIds]) -> Vectors: ...


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Tokenized texts of one request (a query is a chunk of one), longest first."""

    rows: tuple[TokenIds, ...]
    reply: Reply[Vectors]

    @property
    def width(self) -> int:
        return len(self.rows[0])


@dataclass(slots=True)
class EmbedderStats:
    """Counters for metrics. Owned by the actor; read them, never write them."""

    batches: int = 0
    query_texts: int = 0
    bulk_texts: int = 0
    express_batches: int = 0
    failed_batches: int = 0
    abandoned: int = 0
    largest_batch: int = 0
    # Time of each model run (a batch in its worker thread), successful or not.
    batch_seconds: LatencyHistogram = field(default_factory=LatencyHistogram)


@dataclass(frozen=True, slots=True)
class LaneDepth:
    """What waits in one lane now, and its bound (texts for the query lane, chunks for bulk)."""

    queued: int
    limit: int


@dataclass(slots=True)
class _Batch:
    chunks: list[_Chunk]
    query: bool
    express: bool


@dataclass(slots=True)
class _Lane:
    """The dispatcher's side of one lane, with room to hold back a chunk that did not fit."""

    rx: MemoryObjectReceiveStream[_Chunk]
    done: bool = False
    held: _Chunk | None = None

    def next(self) -> _Chunk | None:
        """The next chunk without waiting, or None if there is none right now."""
        if self.held is not None:
            chunk, self.held = self.held, None
            return chunk
        if self.done:
            return None
        try:
            chunk = self.rx.receive_nowait()
        except anyio.WouldBlock:
            return None
        except anyio.EndOfStream:
            self.done = True
            return None
        if not isinstance(chunk, _Chunk):
            unknown_message("embedder", chunk)
        return chunk

    @property
    def drained(self) -> bool:
        return self.done and self.held is None


class _Abandoned(Exception):
    """Marks a reply whose caller stopped waiting; the dispatcher skips such work."""


_ABANDONED = _Abandoned()


def _abandon(reply: Reply[Vectors]) -> None:
    # No-op when the reply is already set: then the work was done and the caller has it.
    reply.fail(_ABANDONED)


class Embedder:
    """The embedding actor. Start `run()` in a task group; stop it with `close()`."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        model_factory: Callable[[], EmbeddingModel] | None = None,
    ) -> None:
        if min(config.embed_batch, config.embed_workers, config.embed_queue, config.embed_batch_tokens) < 1:
            raise ValueError("embed_batch, embed_batch_tokens, embed_workers and embed_queue must be >= 1")
        if config.embed_express_slots < 0:
            raise ValueError("embed_express_slots must be >= 0")
        self._batch = config.embed_batch
        self._batch_tokens = config.embed_batch_tokens
        self._workers = config.embed_workers
        self._express = config.embed_express_slots
        intra = config.embed_intra_threads
        self._factory: Callable[[], EmbeddingModel] = model_factory or (lambda: MiniLM(intra_threads=intra))
        self._queries: Mailbox[_Chunk] = Mailbox(config.embed_queue, "embedder query lane")
        bulk_chunks = max(2, config.embed_queue // config.embed_batch)
        self._bulk: Mailbox[_Chunk] = Mailbox(bulk_chunks, "embedder bulk lane")
        self._bulk_admission = anyio.Lock()  # FIFO: requests queue their chunks in turn
        # The dispatcher polls both lanes without waiting (there is no select over two streams).
        self._query_rx = self._queries.receive
        self._bulk_rx = self._bulk.receive
        self._query_lane = _Lane(self._query_rx)
        self._bulk_lane = _Lane(self._bulk_rx)
        self._busy = 0
        self._express_busy = 0
        self._stats = EmbedderStats()
        # Model runs: the dispatcher's slot counts already bound them; this caps the threads.
        self._limiter = anyio.CapacityLimiter(config.embed_workers + config.embed_express_slots)
        # Tokenizing (~1% of the cost of embedding) has its own threads, so callers prepare their
        # work while the model threads are busy instead of queueing behind them.
        self._tokenize_limiter = anyio.CapacityLimiter(config.embed_workers)
        # Set whenever work arrives or a batch ends; the dispatcher replaces it before each look.
        self._bell = anyio.Event()
        self._ready = anyio.Event()
        self._model: EmbeddingModel | None = None
        self._started = False
        self._closed = False

    @property
    def stats(self) -> EmbedderStats:
        return self._stats

    def queue_depths(self) -> dict[str, LaneDepth]:
        """What waits in each lane ("query", "bulk") now, with the lane's bound."""
        return {
            "query": LaneDepth(self._queries.depth, self._queries.size),
            "bulk": LaneDepth(self._bulk.depth, self._bulk.size),
        }

    # ------------------------------------------------------------------ public API

    async def embed_query(self, text: str) -> Vector:
        """The unit vector of one query text (shape `(384,)`).

        Raises `Overloaded` when the query lane is full, `Unavailable` once the actor is closing,
        and whatever the model raised if its batch failed.
        """
        model = await self._loaded_model()
        (row,) = await anyio.to_thread.run_sync(model.tokenize, [text], limiter=self._tokenize_limiter)
        reply: Reply[Vectors] = Reply()
        self._queries.offer(_Chunk((row,), reply))
        self._bell.set()
        try:
            vectors = await reply.wait()
        finally:
            _abandon(reply)
        vector: Vector = vectors[0]
        return vector

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        """Unit vectors `(len(texts), 384)` in the order of `texts`.

        Waits (back-pressure) while the bulk lane is full. Raises `Unavailable` once the actor is
        closing, and whatever the model raised if one of this request's batches failed.
        """
        if not texts:
            return np.zeros((0, MODEL_DIM), dtype=np.float32)
        model = await self._loaded_model()
        pending: list[tuple[NDArray[np.intp], Reply[Vectors]]] = []
        try:
            # Requests queue their chunks in turn, in the order they were made (module note):
            # the next one tokenizes while this one's chunks are embedded.
            async with self._bulk_admission:
                rows, order, sizes = await anyio.to_thread.run_sync(
                    self._prepare, model, list(texts), limiter=self._tokenize_limiter
                )
                start = 0
                for take in sizes:
                    index = order[start : start + take]
                    start += take
                    reply: Reply[Vectors] = Reply()
                    await self._bulk.send(_Chunk(tuple(rows[i] for i in index), reply))
                    self._bell.set()
                    pending.append((index, reply))
            out = np.empty((len(texts), MODEL_DIM), dtype=np.float32)
            for index, reply in pending:
                out[index] = await reply.wait()
            return out
        finally:
            for _, reply in pending:
                _abandon(reply)

    def close(self) -> None:
        """Stop taking work. `run()` finishes what is queued and in flight, then returns."""
        self._closed = True
        self._queries.close()
        self._bulk.close()
        self._bell.set()
        if not self._started:
            self._ready.set()

    # ------------------------------------------------------------------ the actor

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Load the model, report started, serve until `close()`, drain, return.

        Raises what loading the model raised; queued callers then get `Unavailable`.
        """
        self._started = True
        try:
            try:
                model = self._model = await anyio.to_thread.run_sync(self._factory)
            finally:
                # Callers waiting for the model learn either way (a failed load leaves it None).
                self._ready.set()
            task_status.started()
            async with anyio.create_task_group() as tg:
                while True:
                    self._bell = anyio.Event()
                    batch = self._next_batch()
                    if batch is not None:
                        tg.start_soon(self._run_batch, model, batch)
                        continue
                    if self._query_lane.drained and self._bulk_lane.drained:
                        break  # closed and drained; the task group waits for running batches
                    await self._bell.wait()
        finally:
            # After a drain this finds nothing; after a failed load or a cancellation it fails
            # whatever is still queued, so that nobody waits forever.
            self.close()
            self._fail_queued(Unavailable("embedder stopped"))

    async def _loaded_model(self) -> EmbeddingModel:
        if self._closed:
            raise Unavailable("embedder is shutting down")
        await self._ready.wait()
        if self._model is None:
            raise Unavailable("embedder is not running")
        return self._model

    def _prepare(self, model: EmbeddingModel, texts: list[str]) -> tuple[list[TokenIds], NDArray[np.intp], list[int]]:
        """Tokenized `texts`, their order longest first (each chunk's first row sets its width;
        the widest start early) and the planned chunk sizes in that order."""
        rows = model.tokenize(texts)
        widths = [len(r) for r in rows]
        order = np.argsort([-w for w in widths], kind="stable")
        sizes = plan_runs([widths[i] for i in order], self._batch, self._batch_tokens)
        return rows, order, sizes

    def _fit(self, width: int) -> int:
        """How many rows of at most `width` tokens fit in one batch."""
        return max(1, min(self._batch, self._batch_tokens // max(width, 1)))

    def _next_batch(self) -> _Batch | None:
        """A batch to start now, if a thread is free for it and work is pending."""
        if self._busy < self._workers:
            express = False
            chunks = self._take(self._query_lane)
            query = bool(chunks)
            if not query:
                chunks = self._take(self._bulk_lane, thrifty=True)
        elif self._express_busy < self._express:
            express = query = True
            chunks = self._take(self._query_lane)
        else:
            return None
        if not chunks:
            return None
        # Counted here, not when the task starts: the dispatcher looks again right away.
        if express:
            self._express_busy += 1
        else:
            self._busy += 1
        return _Batch(chunks, query=query, express=express)

    def _take(self, lane: _Lane, *, thrifty: bool = False) -> list[_Chunk]:
        """Whole chunks from one lane, in arrival order, while they fit in one batch; if
        `thrifty`, only while merging pads less than a run's overhead (the cost `plan_runs`
        minimises), so queries wait for nothing but bulk work runs in its cheapest shape."""
        taken: list[_Chunk] = []
        count = width = 0
        while count < self._batch and (chunk := lane.next()) is not None:
            if chunk.reply.done:
                self._stats.abandoned += len(chunk.rows)
                continue
            grown = max(width, chunk.width)
            rows = len(chunk.rows)
            costlier = thrifty and grown * (count + rows) > width * count + chunk.width * rows + RUN_OVERHEAD_TOKENS
            if taken and (count + rows > self._fit(grown) or costlier):
                lane.held = chunk  # it starts the next batch from this lane
                break
            taken.append(chunk)
            count += len(chunk.rows)
            width = grown
        return taken

    async def _run_batch(self, model: EmbeddingModel, batch: _Batch) -> None:
        stats = self._stats
        rows = [row for chunk in batch.chunks for row in chunk.rows]
        started = time.perf_counter()
        try:
            try:
                vectors = await anyio.to_thread.run_sync(model.encode_ids, rows, limiter=self._limiter)
            finally:
                stats.batch_seconds.observe(time.perf_counter() - started)
            offset = 0
            for chunk in batch.chunks:
                chunk.reply.set(vectors[offset : offset + len(chunk.rows)])
                offset += len(chunk.rows)
            stats.batches += 1
            stats.express_batches += batch.express
            if batch.query:
                stats.query_texts += len(rows)
            else:
                stats.bulk_texts += len(rows)
            stats.largest_batch = max(stats.largest_batch, len(rows))
        except Exception as exc:
            stats.failed_batches += 1
            log.exception("embedding batch of %d text(s) failed", len(rows))
            for chunk in batch.chunks:
                chunk.reply.fail(exc)
        except BaseException:
            for chunk in batch.chunks:
                chunk.reply.fail(Unavailable("embedder stopped"))
            raise
        finally:
            if batch.express:
                self._express_busy -= 1
            else:
                self._busy -= 1
            self._bell.set()

    def _fail_queued(self, error: Exception) -> None:
        for lane in (self._query_lane, self._bulk_lane):
            while not lane.drained and (chunk := lane.next()) is not None:
                chunk.reply.fail(error)
