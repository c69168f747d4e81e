"""The write pipeline: every change to the data goes through here, in order.

    mailbox -> [batcher: coalesce upserts, embed texts] -> [forwarder: in mailbox order]
            -> stream(1) -> [committer: PostgreSQL transaction, hand to the applier, ack]

Two stages so that embedding batch N+1 overlaps committing batch N. Two batches are embedded at
once (the embedder runs their chunks in turn), so the model threads go straight from the last
chunks of one batch to the next while the first is committed; the forwarder hands them to the
committer in mailbox order. Jobs whose texts need embedding are coalesced only until the batch
holds `COALESCE_TEXT_ROUNDS` rounds of the model threads' texts: two clients' upserts of 500
texts each, coalesced, were embedded and acknowledged together, and while both clients sent
their next ones the model threads had nothing to do. The committer is the only
task of this node that commits; the applier (actors/applier.py) applies what it committed to the
shards and publishes it to subscriptions before the ack, so the writer's next query sees its
write. Changes committed by other nodes reach the same applier through the log follower; the
applier keeps seq order between the two. Collection create/drop travel the same path, so they
are ordered with this node's writes around them.

Queue policy: the mailbox is bounded and `send` waits, so a writer faster than the database is
slowed down (back-pressure) instead of growing memory.

Isolation: upserts of several clients share one batch and one transaction, so one job that the
database refuses would fail all of them. When a batch of several jobs fails to commit (or to
embed) for any reason but the database being unavailable, it is split in halves and each half is
committed on its own, recursively: only the job at fault gets the error, every other job commits
(in the original order) and is acked. A batch with one bad job among n costs about 2 log2(n)
extra transactions; `unavailable` still fails the whole batch at once.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from dataclasses import dataclass

import anyio
import numpy as np
from anyio.abc import ObjectReceiveStream, ObjectSendStream, TaskStatus

from actors.applier import Applied, Publisher
from actors.catalog import Catalog
from actors.embedder import Embedder
from actors.mailbox import Mailbox, Reply, unknown_message
from actors.persistence import Persistence
from actors.sources.base import SourcePosition
from models.config import EngineConfig
from models.errors import Exists, Overloaded, ShoalError, Unavailable
from models.filters import Filter, TextFilter
from models.index_spec import IndexSpec
from models.records import CollectionInfo, DocId, Document, Metric, Seq, StoredDoc, Vector

log = logging.getLogger("shoal.ingest")


@dataclass(frozen=True, slots=True)
class UpsertJob:
    collection: str
    docs: tuple[Document, ...]
    reply: Reply[tuple[int, int]]  # (count, seq)
    position: SourcePosition | None = None  # a broker source's, committed with the job


@dataclass(frozen=True, slots=True)
class DeleteJob:
    collection: str
    ids: tuple[DocId, ...] | None
    where: Filter | None
    where_text: TextFilter | None
    reply: Reply[tuple[int, int]]  # (deleted, seq)
    position: SourcePosition | None = None  # a broker source's, committed with the job


@dataclass(frozen=True, slots=True)
class CreateJob:
    name: str
    dim: int
    metric: Metric
    if_not_exists: bool
    reply: Reply[CollectionInfo]
    index: IndexSpec | None = None


@dataclass(frozen=True, slots=True)
class DropJob:
    name: str
    reply: Reply[None]


@dataclass(frozen=True, slots=True)
class UpsertBatch:
    """Several upsert jobs for one collection, with every document's vector filled in."""

    collection: str
    docs: tuple[Document, ...]
    jobs: tuple[UpsertJob, ...]


Job = UpsertJob | DeleteJob | CreateJob | DropJob
Stage2 = UpsertBatch | DeleteJob | CreateJob | DropJob

__all__ = ["Applied", "Ingest", "Publisher"]

# Texts a batch is coalesced up to: this many full rounds of the embedder's model threads.
COALESCE_TEXT_ROUNDS = 4


class Ingest:
    def __init__(
        self,
        config: EngineConfig,
        persistence: Persistence,
        embedder: Embedder,
        catalog: Catalog,
    ) -> None:
        self._config = config
        self._coalesce_texts = COALESCE_TEXT_ROUNDS * config.embed_batch * config.embed_workers
        self._persistence = persistence
        self._embedder = embedder
        self._catalog = catalog
        self._mailbox: Mailbox[Job] = Mailbox(config.ingest_queue, "ingest")

    # -- public API: each call waits for the commit (and, for writes, shard visibility) --------

    async def upsert(self, collection: str, docs: Sequence[Document]) -> tuple[int, int]:
        reply: Reply[tuple[int, int]] = Reply()
        await self._mailbox.send(UpsertJob(collection, tuple(docs), reply))
        return await reply.wait()

    async def delete(
        self,
        collection: str,
        ids: Sequence[DocId] | None,
        where: Filter | None,
        where_text: TextFilter | None,
    ) -> tuple[int, int]:
        reply: Reply[tuple[int, int]] = Reply()
        await self._mailbox.send(
            DeleteJob(collection, None if ids is None else tuple(ids), where, where_text, reply)
        )
        return await reply.wait()

    async def create_collection(
        self, name: str, dim: int, metric: Metric, if_not_exists: bool, index: IndexSpec | None = None
    ) -> CollectionInfo:
        reply: Reply[CollectionInfo] = Reply()
        await self._mailbox.send(CreateJob(name, dim, metric, if_not_exists, reply, index))
        return await reply.wait()

    async def drop_collection(self, name: str) -> None:
        reply: Reply[None] = Reply()
        await self._mailbox.send(DropJob(name, reply))
        await reply.wait()

    async def enqueue_upsert(
        self, collection: str, docs: Sequence[Document], position: SourcePosition
    ) -> Reply[tuple[int, int]]:
        """Queue a broker source's upsert whose position commits with it; returns the reply to
        await, so that a source keeps several jobs in flight in order (actors/sources/actor.py)."""
        reply: Reply[tuple[int, int]] = Reply()
        await self._mailbox.send(UpsertJob(collection, tuple(docs), reply, position))
        return reply

    async def enqueue_delete(
        self, collection: str, ids: Sequence[DocId], position: SourcePosition
    ) -> Reply[tuple[int, int]]:
        """`enqueue_upsert` for a delete by ids."""
        reply: Reply[tuple[int, int]] = Reply()
        await self._mailbox.send(DeleteJob(collection, tuple(ids), None, None, reply, position))
        return reply

    def close(self) -> None:
        """Stop taking jobs; what is queued is still committed and acked."""
        self._mailbox.close()

    @property
    def queued(self) -> int:
        return self._mailbox.receive.statistics().current_buffer_used

    # -- the two stages ---------------------------------------------------------------------

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        # One batch waits for the committer: with the one the forwarder holds and the one the
        # batcher holds, the batches ahead of a commit are as many as before batches were
        # embedded two at a time, so vector upserts queue in the mailbox and coalesce as they did.
        send, receive = anyio.create_memory_object_stream[Stage2](1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._committer, receive)
            task_status.started()
            await self._batcher(send)

    async def _batcher(self, out: ObjectSendStream[Stage2]) -> None:
        # Slots in mailbox order; each is filled when its batch is embedded (writes that need no
        # embedding are filled at once). Unbuffered: the forwarder waits on one slot and the
        # batcher holds the next, its embedding started, until the forwarder takes it.
        send, receive = anyio.create_memory_object_stream[Reply[Stage2 | None]](0)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._forward, receive, out)
            async with send:
                carried: Job | None = None
                while True:
                    if carried is not None:
                        job, carried = carried, None
                    else:
                        try:
                            job = await self._mailbox.receive.receive()
                        except anyio.EndOfStream:
                            return
                    slot: Reply[Stage2 | None] = Reply()
                    if isinstance(job, DeleteJob | CreateJob | DropJob):
                        slot.set(job)
                        await send.send(slot)
                        continue
                    if not isinstance(job, UpsertJob):
                        unknown_message("ingest", job)
                    jobs, carried = await self._coalesce(job)
                    tg.start_soon(self._embed_into, jobs, slot)
                    await send.send(slot)

    async def _embed_into(self, jobs: list[UpsertJob], slot: Reply[Stage2 | None]) -> None:
        try:
            slot.set(await self._embed(jobs))
        except BaseException as exc:  # the forwarder re-raises it: as before, it ends the stage
            slot.fail(exc)
            raise

    @staticmethod
    async def _forward(slots: ObjectReceiveStream[Reply[Stage2 | None]], out: ObjectSendStream[Stage2]) -> None:
        """Hand each slot's batch to the committer in mailbox order, once it is embedded."""
        async with slots, out:
            async for slot in slots:
                item = await slot.wait()
                if item is not None:
                    await out.send(item)

    async def _coalesce(self, first: UpsertJob) -> tuple[list[UpsertJob], Job | None]:
        """Take queued upserts to the same collection until the batch is full (documents, or
        texts to embed) or the linger time has passed; the first job that does not fit is
        handed back."""
        jobs, size, texts = [first], len(first.docs), _texts_to_embed(first)
        limit = self._config.ingest_batch_docs
        with anyio.move_on_after(self._config.ingest_linger_ms / 1000):
            while size < limit and texts < self._coalesce_texts:
                try:
                    job = self._mailbox.receive.receive_nowait()
                except anyio.WouldBlock:
                    try:
                        job = await self._mailbox.receive.receive()
                    except anyio.EndOfStream:
                        break
                except anyio.EndOfStream:
                    break
                if (
                    isinstance(job, UpsertJob)
                    and job.collection == first.collection
                    and size + len(job.docs) <= limit
                ):
                    jobs.append(job)
                    size += len(job.docs)
                    texts += _texts_to_embed(job)
                else:
                    return jobs, job
        return jobs, None

    async def _embed(self, jobs: list[UpsertJob]) -> UpsertBatch | None:
        """The jobs' documents with every vector filled in; a job whose texts cannot be embedded
        is failed and left out (None when none is left)."""
        docs = [doc for job in jobs for doc in job.docs]
        missing = [i for i, doc in enumerate(docs) if doc.vector is None]
        if missing:
            try:
                texts = [docs[i].text or "" for i in missing]
                vectors = await self._embedder.embed_documents(texts)
            except Exception as exc:
                if len(jobs) > 1 and not isinstance(exc, Unavailable | Overloaded):
                    # One job's text may be at fault: embed each job alone.
                    log.warning("embedding a batch of %d jobs failed; embedding them one by one", len(jobs))
                    alone = [await self._embed([job]) for job in jobs]
                    kept = [batch for batch in alone if batch is not None]
                    if not kept:
                        return None
                    return UpsertBatch(
                        jobs[0].collection,
                        tuple(doc for batch in kept for doc in batch.docs),
                        tuple(job for batch in kept for job in batch.jobs),
                    )
                if not isinstance(exc, ShoalError):
                    log.exception("embedding failed")
                for job in jobs:
                    job.reply.fail(exc)
                return None
            for row, i in enumerate(missing):
                docs[i] = dataclasses.replace(docs[i], vector=np.asarray(vectors[row], dtype=np.float32))
        return UpsertBatch(jobs[0].collection, tuple(docs), tuple(jobs))

    async def _committer(self, source: ObjectReceiveStream[Stage2]) -> None:
        async with source:
            async for item in source:
                replies = _replies_of(item)
                if all(reply.done for reply in replies):
                    continue  # every caller gave up (request deadline) while it queued: never commit it
                try:
                    await self._commit(item)
                except ShoalError as exc:
                    for reply in replies:
                        reply.fail(exc)
                except Exception as exc:
                    log.exception("commit failed")
                    for reply in replies:
                        reply.fail(exc)

    async def _commit(self, item: Stage2) -> None:
        if isinstance(item, UpsertBatch):
            await self._commit_upserts(item)
        elif isinstance(item, DeleteJob):
            await self._commit_delete(item)
        elif isinstance(item, CreateJob):
            await self._commit_create(item)
        elif isinstance(item, DropJob):
            await self._persistence.drop_collection(item.name)
            await self._catalog.remove(item.name)
            item.reply.set(None)
        else:
            unknown_message("ingest committer", item)

    async def _commit_upserts(self, batch: UpsertBatch) -> None:
        """Commit, apply and ack a batch; if several jobs share it and the commit fails for a
        reason other than `unavailable`, commit its halves apart (see the module docstring).
        Raises what committing a single job raised."""
        collection = self._catalog.get(batch.collection)
        try:
            # The sources' positions of exactly the jobs in this transaction (a half after a
            # split carries its own jobs' only).
            positions = tuple(job.position for job in batch.jobs if job.position is not None)
            first, _ = await self._persistence.commit_upserts(batch.collection, batch.docs, positions)
        except Unavailable:
            raise
        except Exception as exc:
            if len(batch.jobs) == 1:
                raise
            # Nothing of the batch was committed (one transaction): retrying halves is safe.
            log.warning(
                "a batch of %d upsert jobs failed to commit (%s); committing its halves apart",
                len(batch.jobs),
                type(exc).__name__,
            )
            for half in _halves(batch):
                await self._commit_part(half)
            return
        stored = tuple(
            StoredDoc(doc.id, doc.text, _vector(doc), doc.metadata, Seq(first + i))
            for i, doc in enumerate(batch.docs)
        )
        await collection.applier.apply_upserts(stored)
        end = first - 1
        for job in batch.jobs:
            end += len(job.docs)
            job.reply.set((len(job.docs), end))

    async def _commit_part(self, part: UpsertBatch) -> None:
        """Commit one half of a failed batch; a failure of a single job fails that job alone,
        `unavailable` fails the whole half (the caller fails what is left)."""
        try:
            await self._commit_upserts(part)
        except Unavailable:
            raise
        except Exception as exc:
            # A single job at fault, or (several jobs) a failure after their commit: replies
            # already acked stay acked, a second fill being a no-op.
            if not isinstance(exc, ShoalError):
                log.error("%d upsert job(s) failed to commit", len(part.jobs), exc_info=exc)
            for job in part.jobs:
                job.reply.fail(exc)

    async def _commit_delete(self, job: DeleteJob) -> None:
        collection = self._catalog.get(job.collection)
        if job.ids is not None:
            positions = () if job.position is None else (job.position,)
            deleted, last = await self._persistence.commit_delete_ids(job.collection, job.ids, positions)
        else:
            deleted, last = await self._persistence.commit_delete_where(
                job.collection, job.where, job.where_text
            )
        first = last - len(deleted) + 1
        changes = [(DocId(doc_id), first + i) for i, doc_id in enumerate(deleted)]
        await collection.applier.apply_deletes(changes)
        job.reply.set((len(deleted), last))

    async def _commit_create(self, job: CreateJob) -> None:
        try:
            info, cid = await self._persistence.create_collection_row(job.name, job.dim, job.metric, job.index)
        except Exists:
            if not job.if_not_exists:
                raise
            existing = self._catalog.get(job.name)
            job.reply.set(existing.info(await self._catalog.counts(existing)))
            return
        await self._catalog.add(info.name, info.dim, info.metric, cid, index=job.index)
        job.reply.set(info)


def _texts_to_embed(job: UpsertJob) -> int:
    return sum(1 for doc in job.docs if doc.vector is None)


def _vector(doc: Document) -> Vector:
    assert doc.vector is not None, "documents reach the committer with vectors"
    return doc.vector


def _halves(batch: UpsertBatch) -> tuple[UpsertBatch, UpsertBatch]:
    """The first and second half of a batch's jobs, each with its own documents, in order."""
    middle = len(batch.jobs) // 2
    split = sum(len(job.docs) for job in batch.jobs[:middle])
    return (
        UpsertBatch(batch.collection, batch.docs[:split], batch.jobs[:middle]),
        UpsertBatch(batch.collection, batch.docs[split:], batch.jobs[middle:]),
    )


def _replies_of(item: Stage2) -> list[Reply[object]]:
    if isinstance(item, UpsertBatch):
        return [job.reply for job in item.jobs]  # type: ignore[misc]
    return [item.reply]  # type: ignore[list-item]
