"""Recall sampling: a small share of live vector queries re-run by exact search, off the hot path.

`Engine.query` offers each freshly computed vector query (not one served from the results
cache) to `RecallSampler.offer`, which keeps a fraction of them (`recall_sample_rate`) in a
bounded queue and returns at once: a full queue drops the sample and counts it, so a query never
waits for sampling. The sampler's own task takes what is queued and asks each shard for the
exact answers with the queries' filters (`Shard.search_exact`, run on the search threads under
the shard's read discipline, so the event loop never computes it), then records

    recall@k = |approximate ids ∩ exact ids| / |exact ids|

where k is the query's k and |exact ids| = min(k, matching documents). A returned hit whose
score ties the exact k-th score counts as found (a tie may be broken either way).

What it costs. An exact search reads every vector of the collection, and those reads also push
the index out of the CPU caches that the next searches would have used. Two things bound it:
- samples of one collection, seq, k and no filter are re-run together, one pass over the
  vectors for all of them (a matrix product instead of a matrix-vector product per sample);
- the re-runs may take `recall_sample_budget` of one search thread's time on average (CPU
  seconds measured on the thread). Past it the sampler waits; samples queue meanwhile, so the
  next pass takes more of them at once, and those past the queue are dropped and counted. On a
  large collection the estimate therefore comes from fewer samples, never from a busier server.

Per collection and index kind the estimate is the mean over the last `recall_window` samples.
A sample is skipped, and counted by reason, when it cannot measure the index:
- `exact_plan`: the planner answered the query by exact search on every shard (a small or
  tightly filtered candidate set, or k covering every match), so its recall is 1 by
  construction and would only dilute the estimate;
- `changed`: the collection applied a change between the query and its exact re-run, so the
  two answers are of different data;
- `failed`: the exact re-run could not be served (a full shard mailbox, a stopping server).
"""

from __future__ import annotations

import logging
import math
import random
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import anyio
from anyio.abc import TaskStatus
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from actors.planner import merge_hits
from models.config import EngineConfig
from models.errors import ShoalError
from models.filters import Filter, TextFilter
from models.records import Hit, Vector

if TYPE_CHECKING:
    from actors.catalog import Catalog, Collection

log = logging.getLogger("shoal.recall")

SKIP_REASONS = ("exact_plan", "changed", "failed")
# Relative slack under which an approximate hit's score counts as tying the exact k-th score.
_TIE_SLACK = 1e-5


def index_kind(collection: Collection) -> str:
    """The collection's index kind, the `index` label of its recall figures: the kind its
    index spec names where the collection has one, else "hnsw" (the only kind without)."""
    spec = getattr(collection, "index", None)
    kind = getattr(spec, "kind", None)
    kind = getattr(kind, "value", kind)
    return kind if isinstance(kind, str) else "hnsw"


def recall_at_k(approx: Sequence[tuple[str, float]], exact: Sequence[Hit]) -> float:
    """|approx ∩ exact| / |exact| on ids, an approximate (id, score) whose score reaches the
    exact k-th score counting as found (ties); 1.0 when the exact answer is empty."""
    if not exact:
        return 1.0
    ids = {hit.id for hit in exact}
    kth = exact[-1].score
    floor = kth - _TIE_SLACK * max(1.0, abs(kth))
    found = sum(1 for doc_id, score in approx[: len(exact)] if doc_id in ids or score >= floor)
    return min(1.0, found / len(exact))


@dataclass(frozen=True, slots=True)
class Sample:
    """One sampled query: what it asked and what it got, and the collection's seq then."""

    collection: Collection
    index: str
    vector: Vector
    k: int
    where: Filter | None
    where_text: TextFilter | None
    hits: tuple[tuple[str, float], ...]
    seq: int


@dataclass(slots=True)
class _Window:
    recalls: deque[float]
    samples: int = 0
    dropped: int = 0
    skipped: dict[str, int] = field(default_factory=lambda: dict.fromkeys(SKIP_REASONS, 0))


@dataclass(frozen=True, slots=True)
class RecallStats:
    """One collection and index kind: the estimate (None before the first measured sample), the
    samples it is the mean of, every sample measured, skipped by reason, and dropped."""

    collection: str
    index: str
    estimate: float | None
    window: int
    samples: int
    skipped: dict[str, int]
    dropped: int

    def to_wire(self) -> dict[str, Any]:
        return {
            "index": self.index,
            "estimate": self.estimate,
            "window": self.window,
            "samples": self.samples,
            "skipped": dict(self.skipped),
            "dropped": self.dropped,
        }


# The exact search time the sampler may save up while idle: one pass over a mid-sized collection.
_MIN_BURST_S = 0.05


class CpuBudget:
    """A token bucket of CPU seconds: `rate` seconds accrue per second of wall time, at most
    `burst_s` saved up; spending may overdraw it, and `wait_s` says how long until it is paid
    back. Over any window the spending is at most `rate` x window + `burst_s` + one overdraft."""

    def __init__(self, rate: float, burst_s: float, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self.burst_s = burst_s
        self.spent = 0.0
        self._clock = clock
        self._balance = burst_s
        self._at = clock()

    def _refill(self) -> None:
        now = self._clock()
        self._balance = min(self.burst_s, self._balance + (now - self._at) * self.rate)
        self._at = now

    def spend(self, seconds: float) -> None:
        self._refill()
        self._balance -= seconds
        self.spent += seconds

    def wait_s(self) -> float:
        """Seconds until the balance is no longer negative (0 when it is not)."""
        self._refill()
        return 0.0 if self._balance >= 0 else -self._balance / self.rate


def _groups(batch: Sequence[Sample]) -> list[list[Sample]]:
    """Samples that one exact pass can answer together: the same collection, seq and k, and no
    filters (a filtered sample goes alone: its filter chooses the rows)."""
    groups: dict[tuple[int, int, int], list[Sample]] = {}
    alone: list[list[Sample]] = []
    for sample in batch:
        if sample.where is None and sample.where_text is None:
            groups.setdefault((id(sample.collection), sample.seq, sample.k), []).append(sample)
        else:
            alone.append([sample])
    return [*groups.values(), *alone]


class RecallSampler:
    """The actor. `offer` from the query path; start `run()` in a task group; stop with
    `close()` (samples still queued are abandoned: they are estimates, not work owed)."""

    def __init__(self, config: EngineConfig, catalog: Catalog, rng: random.Random | None = None) -> None:
        self._config = config
        self._catalog = catalog
        self.rate = config.recall_sample_rate
        self.queue_limit = config.recall_sample_queue
        self._rng = rng or random.Random()
        send, receive = anyio.create_memory_object_stream[Sample](self.queue_limit)
        self._send: MemoryObjectSendStream[Sample] = send
        self._receive: MemoryObjectReceiveStream[Sample] = receive
        self._windows: dict[tuple[str, str], _Window] = {}
        self._closed = False
        budget = config.recall_sample_budget
        self._budget = CpuBudget(budget, burst_s=max(_MIN_BURST_S, budget))

    @property
    def queued(self) -> int:
        """Samples waiting for their exact re-run."""
        return self._send.statistics().current_buffer_used

    def offer(
        self,
        collection: Collection,
        vector: Vector,
        k: int,
        where: Filter | None,
        where_text: TextFilter | None,
        hits: Sequence[Hit],
        seq: int,
    ) -> None:
        """Keep this answered vector query as a sample with probability `recall_sample_rate`;
        `seq` is the collection's applied seq when it was answered. Never waits, never raises."""
        if self.rate <= 0.0 or self._closed or (self.rate < 1.0 and self._rng.random() >= self.rate):
            return
        index = index_kind(collection)
        sample = Sample(collection, index, vector, k, where, where_text, tuple((h.id, h.score) for h in hits), seq)
        try:
            self._send.send_nowait(sample)
        except (anyio.WouldBlock, anyio.BrokenResourceError, anyio.ClosedResourceError):
            self._window(collection.name, index).dropped += 1

    def stats(self, name: str) -> RecallStats:
        """The figures of collection `name` under its current index kind (zeros and no
        estimate before its first sample)."""
        collection = self._catalog.find(name)
        kind = "hnsw" if collection is None else index_kind(collection)
        window = self._windows.get((name, kind))
        if window is None:
            return RecallStats(name, kind, None, 0, 0, dict.fromkeys(SKIP_REASONS, 0), 0)
        return self._stats((name, kind), window)

    def all_stats(self) -> list[RecallStats]:
        """The figures of every collection still served here, by name and index kind."""
        live = set(self._catalog.names())
        return [self._stats(key, w) for key, w in sorted(self._windows.items()) if key[0] in live]

    def forget(self, name: str) -> None:
        """Drop a collection's figures (it was dropped)."""
        for key in [key for key in self._windows if key[0] == name]:
            del self._windows[key]

    def close(self) -> None:
        self._closed = True
        self._send.close()

    async def run(self, *, task_status: TaskStatus[None] = anyio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        async with self._receive:
            async for first in self._receive:
                await anyio.sleep(self._budget.wait_s())
                if self._closed:
                    break
                batch = [first]
                while len(batch) < self.queue_limit:
                    try:
                        batch.append(self._receive.receive_nowait())
                    except (anyio.WouldBlock, anyio.EndOfStream):
                        break
                for group in _groups(batch):
                    try:
                        await self._measure(group)
                    except Exception:  # an estimate is never worth the engine: log, count, go on
                        log.exception("recall samples of collection %s failed", group[0].collection.name)
                        self._window(group[0].collection.name, group[0].index).skipped["failed"] += len(group)

    @property
    def budget(self) -> float:
        """The share of one search thread's time the exact re-runs may take on average."""
        return self._budget.rate

    @property
    def exact_cpu_s(self) -> float:
        """Search-thread CPU seconds the exact re-runs have taken so far."""
        return self._budget.spent

    async def _measure(self, group: Sequence[Sample]) -> None:
        """Re-run samples of one collection, seq, k and filters together and record each."""
        first = group[0]
        collection = first.collection
        if not self._catalog.holds(collection):
            return  # dropped meanwhile: nothing left to report on
        window = self._window(collection.name, first.index)
        if collection.last_seq != first.seq:
            window.skipped["changed"] += len(group)
            return
        per_shard: list[list[list[Hit]]] = []
        exact_everywhere = True
        try:
            for shard in collection.shards:
                answer = await shard.search_exact([s.vector for s in group], first.k, first.where, first.where_text)
                self._budget.spend(answer.cpu_s)
                per_shard.append(answer.hits)
                exact_everywhere = exact_everywhere and not answer.by_index
        except ShoalError as exc:
            log.debug("recall samples of %s not measured: %s", collection.name, exc.message)
            window.skipped["failed"] += len(group)
            return
        if collection.last_seq != first.seq:
            window.skipped["changed"] += len(group)
        elif exact_everywhere:
            window.skipped["exact_plan"] += len(group)
        else:
            for i, sample in enumerate(group):
                exact_hits = merge_hits([hits[i] for hits in per_shard], sample.k)
                window.recalls.append(recall_at_k(sample.hits, exact_hits))
                window.samples += 1

    def _window(self, name: str, index: str) -> _Window:
        window = self._windows.get((name, index))
        if window is None:
            window = self._windows[(name, index)] = _Window(deque(maxlen=self._config.recall_window))
        return window

    @staticmethod
    def _stats(key: tuple[str, str], window: _Window) -> RecallStats:
        n = len(window.recalls)
        estimate = math.fsum(window.recalls) / n if n else None
        return RecallStats(key[0], key[1], estimate, n, window.samples, dict(window.skipped), window.dropped)
