"""The source actor: one broker stream in, commits with positions, completion events out.

    session:  connect -> read the committed position -> claim dead consumers' pending entries
              -> feeder: read (own pending first, then new) -> parse -> skip / reject / batch
                 into jobs -> ingest (each job carries its position: prev -> new)
              -> completer (in entry order): await each job's commit -> completion events ->
                 acknowledge
    any outage (broker or database), or a job that must be retried: drain what is in flight,
    back off, start a new session from the committed position.

Back-pressure: at most `max_in_flight` entries are between their read and their
acknowledgement; the feeder reads only as many as there is room for, so the source reads as
fast as ingest commits and a burst waits in the broker, not in memory.

Ordering: jobs are queued to ingest in entry order and each one's position is `prev -> new`
(actors/sources/base.py), so a job whose predecessor failed cannot commit: the session ends and
the next one starts from the committed position, where the broker's pending list still holds
every entry not acknowledged. A job that fails for a reason of its own (its collection was
dropped meanwhile, say) is retried entry by entry; an entry failing alone is rejected, its
position committed without a change.

Completion events are published after the commit and before the acknowledgement, so each is
sent at least once: an entry delivered again after a crash (at or below the committed position)
is acknowledged and skipped, and its event sent again, with the document's current seq.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING

import anyio
from anyio.abc import ObjectSendStream, TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream

from actors.mailbox import Reply
from actors.sources.base import Completion, Entry, PositionMoved, RawEntry, SourcePosition, Status, Transport
from actors.sources.parse import parse_entry
from actors.sources.status import SourceConfig, SourceState, SourceStatus
from actors.sources.units import Isolate, Unit, Window, fits, settle, unit_size
from models import requests as rq
from models.config import Limits
from models.errors import Overloaded, ShoalError, Unavailable
from models.records import DocId

if TYPE_CHECKING:
    from actors.supervisor import Engine

log = logging.getLogger("shoal.source")

LAG_REFRESH_S = 1.0
# A session that ran this long without trouble resets the back-off.
HEALTHY_SESSION_S = 5.0
# How long a stopping source may take to acknowledge what it committed.
STOP_FLUSH_S = 5.0
# Delay before starting over after a job lost the position race (no outage: no back-off).
RESTART_S = 0.02


def _transient(exc: BaseException) -> bool:
    return not isinstance(exc, ShoalError) or isinstance(exc, Unavailable | Overloaded | PositionMoved)


class SourceActor:
    """Consumes one `Transport` into `engine` (see the module docstring). Start `run()` in a
    task group after ingest; `close()` stops reading, lets the jobs in flight commit and be
    acknowledged, and ends `run()`. `status()` never waits."""

    def __init__(self, transport: Transport, engine: Engine, config: SourceConfig, limits: Limits) -> None:
        self.transport = transport
        self._engine = engine
        self._config = config
        self._limits = limits
        self._stop = anyio.Event()
        self._feed_scope: anyio.CancelScope | None = None
        self._setup_scope: anyio.CancelScope | None = None
        self._failures_in_row = 0
        self._window = Window(config.max_in_flight)
        self._parse_limiter = anyio.CapacityLimiter(1)
        self._isolate_through: tuple[int, ...] | None = None
        self._failure: Exception | None = None
        self._state = SourceState.STARTING
        self._processed = 0
        self._rejected = 0
        self._skipped = 0
        self._retries = 0
        self._lag: int | None = None
        self._position = transport.initial_position
        self._last_error: str | None = None
        self._last_error_at: float | None = None

    # -- operators ------------------------------------------------------------------------------

    def status(self) -> SourceStatus:
        info = self.transport.info
        return SourceStatus(
            info.url,
            info.stream,
            info.group,
            info.consumer,
            info.notify,
            self._state,
            self._processed,
            self._rejected,
            self._skipped,
            self._retries,
            self._lag,
            self._window.used,
            self._window.limit,
            self._position,
            self._last_error,
            self._last_error_at,
        )

    # -- life cycle -----------------------------------------------------------------------------

    def close(self) -> None:
        self._stop.set()
        if self._setup_scope is not None:
            self._setup_scope.cancel()
        if self._feed_scope is not None:
            self._feed_scope.cancel()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        """Sessions until `close()`, backing off after each failed one (the server keeps
        serving whatever the broker does)."""
        task_status.started()
        delay = self._config.retry_initial_s
        try:
            while not self._stop.is_set():
                started = time.monotonic()
                try:
                    await self._session()
                    continue
                except Exception as exc:
                    if self._stop.is_set():
                        break
                    wait = self._failed(exc, delay)
                if time.monotonic() - started > HEALTHY_SESSION_S:
                    delay = self._config.retry_initial_s
                elif wait >= delay:
                    delay = min(self._config.retry_max_s, delay * 2)
                with anyio.move_on_after(wait):
                    await self._stop.wait()
        finally:
            self._state = SourceState.STOPPED
            with anyio.CancelScope(shield=True), anyio.move_on_after(1):
                await self.transport.aclose()

    def _failed(self, exc: Exception, delay: float) -> float:
        """Record a failed session; returns how long to wait before the next one."""
        name = self.transport.info.stream
        if isinstance(exc, Isolate):
            self._isolate_through = self.transport.order(exc.through)
            log.info("source %s: a job failed (%s); retrying its entries one by one", name, exc.cause.code)
            return RESTART_S
        if isinstance(exc, PositionMoved):
            log.info("source %s: %s", name, exc.message)
            return RESTART_S
        self._state = SourceState.RETRYING
        self._retries += 1
        message = exc.message if isinstance(exc, ShoalError) else str(exc) or type(exc).__name__
        self._last_error = f"{type(exc).__name__}: {message}"[:500]
        self._last_error_at = time.time()
        self._failures_in_row += 1
        if isinstance(exc, ShoalError) or self.transport.is_outage(exc):
            # The first failure of an outage, then every tenth: one line per attempt would flood
            # the log while a broker stays down.
            level = logging.WARNING if self._failures_in_row % 10 == 1 else logging.INFO
            log.log(
                level,
                "source %s: %s (failure %d in a row); retrying in %.1fs",
                name,
                self._last_error,
                self._failures_in_row,
                delay,
            )
        else:
            log.error("source %s failed; retrying in %.1fs", name, delay, exc_info=exc)
        return delay

    async def _session(self) -> None:
        config = self._config
        # Connecting and claiming hold nothing in flight: `close()` may cut them short.
        with anyio.CancelScope() as self._setup_scope:
            if self._stop.is_set():
                self._setup_scope.cancel()
            self._state = SourceState.STARTING
            await self.transport.connect()
            key, initial = self.transport.key, self.transport.initial_position
            position = await self._engine.persistence.source_position(key, initial)
            self._position = position
            self._state = SourceState.CLAIMING
            deadline = time.monotonic() + 2 * config.claim_idle_ms / 1000
            while await self.transport.claim(config.claim_idle_ms) and time.monotonic() < deadline:
                await anyio.sleep(min(1.0, config.claim_idle_ms / 4000))
        self._setup_scope = None
        if self._stop.is_set():
            return
        self._state = SourceState.RUNNING
        self._failures_in_row = 0
        log.info("source %s: consuming from position %s", self.transport.info.url, position)
        send, receive = anyio.create_memory_object_stream[Unit](config.max_in_flight)
        self._window = Window(config.max_in_flight)
        self._failure = None
        self._feed_scope = anyio.CancelScope()
        if self._stop.is_set():
            self._feed_scope.cancel()
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._refresh_lag)
            try:
                async with anyio.create_task_group() as pipeline:
                    pipeline.start_soon(self._complete, receive)
                    with self._feed_scope:
                        try:
                            await self._feed(send, position)
                        except Exception as exc:  # the completer drains what is in flight first
                            self._fail_session(exc)
            finally:
                tg.cancel_scope.cancel()
        if self._failure is not None:
            raise self._failure

    async def _refresh_lag(self) -> None:
        while True:
            try:
                self._lag = await self.transport.lag()
            except Exception as exc:  # the feeder's reads report outages
                log.debug("source lag not known: %s", exc)
            await anyio.sleep(LAG_REFRESH_S)

    # -- reading --------------------------------------------------------------------------------

    async def _feed(self, out: ObjectSendStream[Unit], position: str) -> None:
        """Turn parsed batches into units and queue their jobs to ingest, in entry order; the
        next batch is read and parsed meanwhile (`_read`)."""
        key = self.transport.key
        chain = position
        committed = self.transport.order(position)
        batches, parsed = anyio.create_memory_object_stream[list[Entry]](1)
        async with anyio.create_task_group() as tg:
            tg.start_soon(self._read, batches)
            async with out, parsed:
                try:
                    async for entries in parsed:
                        for unit in self._plan(entries, committed):
                            if unit.entries and unit.position is None:  # a job: chain its position
                                unit.position = SourcePosition(key, chain, unit.entries[-1].id)
                                chain = unit.entries[-1].id
                                # Shielded: once queued, its reply must reach the completer.
                                with anyio.CancelScope(shield=True):
                                    unit.reply = await self._submit(unit)
                                    await out.send(unit)
                            else:
                                await out.send(unit)
                except Exception as exc:  # ingest refused the job (stopping): end the session
                    self._fail_session(exc)

    async def _read(self, batches: ObjectSendStream[list[Entry]]) -> None:
        """Read (this consumer's pending entries first, then new ones) as far as the in-flight
        window has room, and parse. A failure ends the session (`_fail_session`)."""
        config, transport = self._config, self.transport
        pending_after: str | None = "0-0"
        async with batches:
            try:
                while True:
                    room = await self._window.wait_room()
                    count = min(config.read_batch, room)
                    if pending_after is not None:
                        raws = await transport.read_pending(pending_after, count)
                        if not raws:
                            pending_after = None
                            continue
                        pending_after = raws[-1].id
                    else:
                        raws = await transport.read_new(count, config.block_ms)
                        if not raws:
                            continue
                    self._window.take(len(raws))
                    await batches.send(await self._parse(raws))
            except Exception as exc:
                self._fail_session(exc)

    async def _parse(self, raws: Sequence[RawEntry]) -> list[Entry]:
        default = self.transport.info.default_collection
        limits = self._limits

        def parse_all() -> list[Entry]:
            return [parse_entry(raw, default, limits) for raw in raws]

        size = sum(len(v) for raw in raws for v in raw.fields.values())
        if size < limits.parse_in_thread_bytes:
            return parse_all()
        return await anyio.to_thread.run_sync(parse_all, limiter=self._parse_limiter)

    def _plan(self, entries: list[Entry], committed: tuple[int, ...]) -> list[Unit]:
        """The entries as units in entry order: runs of the same op and collection become one
        job each; skipped and rejected entries come as done units."""
        order = self.transport.order
        units: list[Unit] = []
        job: Unit | None = None
        done = Unit([])
        # A batch's ids ascend: when its first is past the committed position, all are, and only
        # an isolation in progress needs each entry's order.
        all_new = bool(entries) and order(entries[0].id) > committed
        for entry in entries:
            key = None if all_new and self._isolate_through is None else order(entry.id)
            error = entry.error if entry.error is not None else self._check(entry)
            if key is not None and key <= committed:
                # Done before a crash: its event is sent again, rejected if it still is.
                status = Status.INDEXED if error is None else Status.REJECTED
                done.completions.append(
                    Completion(entry.id, entry.collection, entry.doc_id, status, error=error, skipped=True)
                )
                continue
            if error is not None:
                done.completions.append(
                    Completion(entry.id, entry.collection, entry.doc_id, Status.REJECTED, error=error)
                )
                continue
            alone = self._isolate_through is not None and key is not None and key <= self._isolate_through
            if job is not None and not alone and fits(job, entry, self._config.read_batch):
                job.entries.append(entry)
                continue
            job = Unit([entry])
            if done.completions:
                units.append(done)
                done = Unit([])
            units.append(job)
            if alone:
                job = None  # nothing joins an isolated entry
        if done.completions:
            units.append(done)
        if self._isolate_through is not None and entries and order(entries[-1].id) >= self._isolate_through:
            self._isolate_through = None
        return units

    def _check(self, entry: Entry) -> ShoalError | None:
        """What the engine would refuse before queueing the write (unknown collection, a
        vector of the wrong width, text for a collection that is not the model's width)."""
        try:
            if isinstance(entry.request, rq.Upsert):
                self._engine.check_upsert(entry.request)
            elif entry.request is not None:
                self._engine.catalog.get(entry.request.collection)
        except ShoalError as exc:
            return exc
        return None

    async def _submit(self, unit: Unit) -> Reply[tuple[int, int]]:
        ingest, first, position = self._engine.ingest, unit.entries[0].request, unit.position
        assert position is not None
        if isinstance(first, rq.Upsert):
            docs = [doc for entry in unit.entries if isinstance(entry.request, rq.Upsert) for doc in entry.request.docs]
            return await ingest.enqueue_upsert(first.collection, docs, position)
        assert isinstance(first, rq.Delete)
        ids = [DocId(entry.doc_id) for entry in unit.entries]
        return await ingest.enqueue_delete(first.collection, ids, position)

    # -- completing -----------------------------------------------------------------------------

    async def _complete(self, units: MemoryObjectReceiveStream[Unit]) -> None:
        """Await each unit's commit in order; publish and acknowledge the outcomes in batches
        (as long as the next unit is already done). On a failure, stop the feeder, drain what
        is in flight (acknowledging nothing more) and leave the failure in `_failure`."""
        completions: list[Completion] = []
        carried: Unit | None = None
        taken = 0
        async with units:
            while True:
                if carried is None:
                    try:
                        unit = await units.receive()
                    except anyio.EndOfStream:
                        break
                else:
                    unit, carried = carried, None
                taken += unit_size(unit)
                if self._failure is not None:
                    await settle(unit)
                else:
                    try:
                        completions.extend(await self._outcome(unit))
                    except Exception as exc:
                        self._fail_session(exc)
                try:
                    carried = units.receive_nowait()
                except (anyio.WouldBlock, anyio.EndOfStream):
                    carried = None
                ready = carried is not None and (carried.reply is None or carried.reply.done)
                if ready and len(completions) < 4 * self._config.read_batch:
                    continue  # the next outcome is known already: publish them together
                if self._failure is None and completions:
                    try:
                        with anyio.CancelScope(shield=True), anyio.fail_after(STOP_FLUSH_S + self._config.timeout_s):
                            await self.transport.complete(completions, [c.entry for c in completions])
                        self._count(completions)
                    except Exception as exc:
                        self._fail_session(exc)
                completions = []
                self._window.release(taken)
                taken = 0
        self._window.release(taken)

    def _fail_session(self, exc: Exception) -> None:
        if self._failure is None:
            self._failure = exc
        self._stop_feeding()

    def _stop_feeding(self) -> None:
        if self._feed_scope is not None:
            self._feed_scope.cancel()

    def _count(self, completions: Sequence[Completion]) -> None:
        for completion in completions:
            if completion.skipped:
                self._skipped += 1
            elif completion.status is Status.REJECTED:
                self._rejected += 1
            else:
                self._processed += 1
        last = completions[-1].entry if completions else None
        if last is not None and self.transport.order(last) > self.transport.order(self._position):
            self._position = last

    async def _outcome(self, unit: Unit) -> list[Completion]:
        """The completions of a unit once its job committed. Raises what calls for a new
        session (see `_transient`, `Isolate`)."""
        if unit.position is None:
            return await self._redelivered(unit.completions)
        assert unit.reply is not None
        try:
            count, last = await unit.reply.wait()
        except Exception as exc:
            if _transient(exc):
                raise
            assert isinstance(exc, ShoalError)
            if len(unit.entries) > 1:
                raise Isolate(unit.position.new, exc) from exc
            # One entry refused for a reason of its own: reject it, and move the position past it
            # (a later job's `prev` is this one's `new`).
            await self._engine.persistence.commit_source_position(unit.position)
            entry = unit.entries[0]
            return [Completion(entry.id, entry.collection, entry.doc_id, Status.REJECTED, error=exc)]
        n = len(unit.entries)
        exact = count == n  # a delete of ids that did not exist took fewer seqs
        return [
            Completion(e.id, e.collection, e.doc_id, Status.INDEXED, last - n + 1 + i if exact else last)
            for i, e in enumerate(unit.entries)
        ]

    async def _redelivered(self, completions: list[Completion]) -> list[Completion]:
        """Skipped entries (committed before a crash) get the document's current seq in their
        re-sent event; rejected entries are returned as they are."""
        out: list[Completion] = []
        for c in completions:
            if c.skipped and c.status is Status.INDEXED:
                seq = await self._seq_now(c)
                out.append(Completion(c.entry, c.collection, c.doc_id, Status.INDEXED, seq, skipped=True))
            else:
                out.append(c)
        return out

    async def _seq_now(self, completion: Completion) -> int | None:
        try:
            docs = await self._engine.get(rq.Get(completion.collection, (DocId(completion.doc_id),), frozenset()))
            if docs:
                return int(docs[0].seq)
            return self._engine.catalog.get(completion.collection).last_seq
        except ShoalError:
            return None


def build_source(url: str, engine: Engine) -> SourceActor:
    """The source actor for `url` (only `redis://` / `rediss://` so far). Raises StartupError
    for a URL that is not a source's."""
    from actors.sources.redis_stream import RedisStream

    config = SourceConfig.of(engine.config)
    transport = RedisStream(
        url, block_ms=config.block_ms, notify_maxlen=config.notify_maxlen, timeout_s=config.timeout_s
    )
    return SourceActor(transport, engine, config, engine.limits)
