"""The embedder actor: texts in, unit vectors out, with queries ahead of bulk work.

Two lanes feed one dispatcher task:
- the query lane holds single texts from searches. It is bounded (`embed_queue` texts) and a full
  lane fails fast with `Overloaded`: a search should not queue without bound behind ingest;
- the bulk lane holds chunks of at most `embed_batch` already tokenized texts from ingest. It is
  bounded (`embed_queue // embed_batch` chunks, at least 2) and a full lane makes the caller
  wait: ingest is pushed back, never dropped.

The dispatcher waits for a free worker first and only then forms a batch from what is pending at
that moment: every pending query (up to `embed_batch`) if there is any, otherwise bulk chunks
merged up to `embed_batch` texts. So there is no linger delay, batches grow by themselves while
the workers are busy, and a query waits for at most the batches already running. Up to
`embed_workers` batches run at once, each in a worker thread behind a `CapacityLimiter`.

A bulk request is tokenized (in a worker thread) before it is queued so its texts can be sorted
by token count: each chunk then holds texts of similar length and pads little. Results are put
back in the caller's order.

Lifecycle: `run()` loads the model in a thread, reports `started`, and serves until `close()`;
then it finishes everything queued and in flight and returns. Calls made after `close()` raise
`Unavailable`. A caller that is cancelled simply stops waiting: its queued work is skipped, work
already running completes and is discarded. A failure inside the model fails the callers whose
texts were in that batch; the actor keeps serving.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol, cast

import anyio
import numpy as np
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream
from numpy.typing import NDArray

from actors.mailbox import Mailbox, Reply
from actors.onnx_model import MiniLM, TokenIds
from models.config import EngineConfig
from models.errors import Unavailable
from models.records import MODEL_DIM, Vector

log = logging.getLogger("shoal.embedder")

Vectors = NDArray[np.float32]


class EmbeddingModel(Protocol):
    """What the actor needs from a model (`actors.onnx_model.MiniLM`); thread-safe methods."""

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]: ...

    def encode_ids(self, rows: Sequence[TokenIds]) -> Vectors: ...

    def encode(self, texts: Sequence[str]) -> Vectors: ...


@dataclass(frozen=True, slots=True)
class _Query:
    text: str
    reply: Reply[Vector]


@dataclass(frozen=True, slots=True)
class _Chunk:
    """Up to `embed_batch` tokenized texts of one bulk request, similar in length."""

    rows: tuple[TokenIds, ...]
    reply: Reply[Vectors]


@dataclass(slots=True)
class EmbedderStats:
    """Counters for metrics. Owned by the actor; read them, never write them."""

    batches: int = 0
    query_texts: int = 0
    bulk_texts: int = 0
    failed_batches: int = 0
    abandoned: int = 0
    largest_batch: int = 0


class _Abandoned(Exception):
    """Marks a reply whose caller stopped waiting; the dispatcher skips such work."""


_ABANDONED = _Abandoned()


def _abandon(reply: Reply[Vectors]) -> None:
    # No-op when the reply is already set: then the work was done and the caller has it.
    reply.fail(_ABANDONED)


@dataclass(slots=True)
class _Lanes:
    """The dispatcher's view of both lanes; only the dispatcher task touches it."""

    query_done: bool = False
    bulk_done: bool = False
    held: _Chunk | None = None
    stats: EmbedderStats = field(default_factory=EmbedderStats)


class Embedder:
    """The embedding actor. Start `run()` in a task group; stop it with `close()`."""

    def __init__(
        self,
        config: EngineConfig,
        *,
        model_factory: Callable[[], EmbeddingModel] | None = None,
    ) -> None:
        if config.embed_batch < 1 or config.embed_workers < 1 or config.embed_queue < 1:
            raise ValueError("embed_batch, embed_workers and embed_queue must be >= 1")
        self._batch = config.embed_batch
        self._workers = config.embed_workers
        intra = config.embed_intra_threads
        self._factory: Callable[[], EmbeddingModel] = model_factory or (lambda: MiniLM(intra_threads=intra))
        self._queries: Mailbox[_Query] = Mailbox(config.embed_queue, "embedder query lane")
        bulk_chunks = max(2, config.embed_queue // config.embed_batch)
        self._bulk: Mailbox[_Chunk] = Mailbox(bulk_chunks, "embedder bulk lane")
        # The dispatcher polls both lanes without waiting (there is no select over two streams).
        self._query_rx = cast(MemoryObjectReceiveStream[_Query], self._queries.receive)
        self._bulk_rx = cast(MemoryObjectReceiveStream[_Chunk], self._bulk.receive)
        self._limiter = anyio.CapacityLimiter(config.embed_workers)
        # Tokenizing a bulk request (~1% of the cost of embedding it) has its own limiter, so a
        # request can be prepared while the model threads are busy instead of stalling behind them.
        self._tokenize_limiter = anyio.CapacityLimiter(config.embed_workers)
        # Set whenever a lane may have changed; the dispatcher replaces it before each look.
        self._bell = anyio.Event()
        self._ready = anyio.Event()
        self._model: EmbeddingModel | None = None
        self._started = False
        self._closed = False
        self._lanes = _Lanes()

    @property
    def stats(self) -> EmbedderStats:
        return self._lanes.stats

    # ------------------------------------------------------------------ public API

    async def embed_query(self, text: str) -> Vector:
        """The unit vector of one query text (shape `(384,)`).

        Raises `Overloaded` when the query lane is full, `Unavailable` once the actor is closing,
        and whatever the model raised if its batch failed.
        """
        reply: Reply[Vector] = Reply()
        self._queries.offer(_Query(text, reply))
        self._bell.set()
        try:
            return await reply.wait()
        finally:
            _abandon(reply)

    async def embed_documents(self, texts: Sequence[str]) -> Vectors:
        """Unit vectors `(len(texts), 384)` in the order of `texts`.

        Waits (back-pressure) while the bulk lane is full. Raises `Unavailable` once the actor is
        closing, and whatever the model raised if one of this request's batches failed.
        """
        if not texts:
            return np.zeros((0, MODEL_DIM), dtype=np.float32)
        model = await self._loaded_model()
        rows = await anyio.to_thread.run_sync(model.tokenize, list(texts), limiter=self._tokenize_limiter)
        # Longest first: the widest batches start early and the tail of the request is cheap.
        order = np.argsort([-len(r) for r in rows], kind="stable")
        pending: list[tuple[NDArray[np.intp], Reply[Vectors]]] = []
        try:
            for start in range(0, len(order), self._batch):
                index = order[start : start + self._batch]
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
                self._model = await anyio.to_thread.run_sync(self._factory)
            finally:
                # Callers waiting for the model learn either way (a failed load leaves it None).
                self._ready.set()
            task_status.started()
            slots = anyio.Semaphore(self._workers)
            async with anyio.create_task_group() as tg:
                while True:
                    # A free worker first, then the batch: work that arrives meanwhile (queries
                    # above all) is still eligible for it.
                    await slots.acquire()
                    batch = await self._next_batch()
                    if batch is None:
                        slots.release()
                        break
                    tg.start_soon(self._run_batch, self._model, batch, slots)
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

    async def _next_batch(self) -> list[_Query] | list[_Chunk] | None:
        """The next batch to run, waiting for work; None once both lanes are closed and empty."""
        lanes = self._lanes
        while True:
            self._bell = anyio.Event()
            queries = self._take_queries()
            if queries:
                return queries
            chunks = self._take_chunks()
            if chunks:
                return chunks
            if lanes.query_done and lanes.bulk_done and lanes.held is None:
                return None
            await self._bell.wait()

    def _take_queries(self) -> list[_Query]:
        lanes = self._lanes
        taken: list[_Query] = []
        while len(taken) < self._batch and not lanes.query_done:
            try:
                query = self._query_rx.receive_nowait()
            except anyio.WouldBlock:
                break
            except anyio.EndOfStream:
                lanes.query_done = True
                break
            if query.reply.done:
                lanes.stats.abandoned += 1
            else:
                taken.append(query)
        return taken

    def _take_chunks(self) -> list[_Chunk]:
        """Whole chunks, in arrival order, merged while they fit in one batch."""
        lanes = self._lanes
        taken: list[_Chunk] = []
        count = 0
        while count < self._batch:
            chunk, lanes.held = lanes.held, None
            if chunk is None:
                if lanes.bulk_done:
                    break
                try:
                    chunk = self._bulk_rx.receive_nowait()
                except anyio.WouldBlock:
                    break
                except anyio.EndOfStream:
                    lanes.bulk_done = True
                    break
            if chunk.reply.done:
                lanes.stats.abandoned += len(chunk.rows)
                continue
            if taken and count + len(chunk.rows) > self._batch:
                lanes.held = chunk
                break
            taken.append(chunk)
            count += len(chunk.rows)
        return taken

    async def _run_batch(
        self, model: EmbeddingModel, batch: list[_Query] | list[_Chunk], slots: anyio.Semaphore
    ) -> None:
        stats = self._lanes.stats
        try:
            if isinstance(batch[0], _Query):
                queries = [q for q in batch if isinstance(q, _Query)]
                texts = [q.text for q in queries]
                vectors = await anyio.to_thread.run_sync(model.encode, texts, limiter=self._limiter)
                for i, query in enumerate(queries):
                    query.reply.set(vectors[i])
                stats.query_texts += len(texts)
                size = len(texts)
            else:
                chunks = [c for c in batch if isinstance(c, _Chunk)]
                rows = [row for c in chunks for row in c.rows]
                vectors = await anyio.to_thread.run_sync(model.encode_ids, rows, limiter=self._limiter)
                offset = 0
                for chunk in chunks:
                    chunk.reply.set(vectors[offset : offset + len(chunk.rows)])
                    offset += len(chunk.rows)
                stats.bulk_texts += len(rows)
                size = len(rows)
            stats.batches += 1
            stats.largest_batch = max(stats.largest_batch, size)
        except Exception as exc:
            stats.failed_batches += 1
            log.exception("embedding batch of %d request(s) failed", len(batch))
            for job in batch:
                job.reply.fail(exc)
        except BaseException:
            for job in batch:
                job.reply.fail(Unavailable("embedder stopped"))
            raise
        finally:
            slots.release()

    def _fail_queued(self, error: Exception) -> None:
        lanes = self._lanes
        if lanes.held is not None:
            lanes.held.reply.fail(error)
            lanes.held = None
        receivers: tuple[MemoryObjectReceiveStream[_Query] | MemoryObjectReceiveStream[_Chunk], ...]
        receivers = (self._query_rx, self._bulk_rx)
        for receive in receivers:
            while True:
                try:
                    job = receive.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream, anyio.ClosedResourceError):
                    break
                job.reply.fail(error)
