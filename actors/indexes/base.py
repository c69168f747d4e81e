"""The one interface every index kind implements, and what the kinds share.

A shard (`actors/shard_state.py`) keeps the documents, their columns and the full-precision
vectors (`VectorStore`); its index answers "which labels are nearest" and nothing else. Labels
are the shard's slot numbers, the same for every kind. An index may decline a search (return
None: not trained yet, or it came back short) and the shard then answers by exact search, so
the k-guarantee of filtered queries holds for every kind.

Threads: the shard calls writes (`add`, `remove`) only while no search runs, and searches
concurrently with each other. `threads` is the thread budget of one call (hnswlib's
`num_threads`; for faiss, `faiss.omp_set_num_threads` in the calling thread, which OpenMP keeps
per thread).
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import ClassVar

import numpy as np
from numpy.typing import NDArray

from actors import exact
from models.config import EngineConfig
from models.index_spec import IndexSpec
from models.records import Metric

log = logging.getLogger(__name__)

F32 = NDArray[np.float32]
Labels = NDArray[np.int64]
Mask = NDArray[np.bool_]
# The query parameters a query gave, as sorted (name, value) pairs: hashable, so queries with
# the same parameters are batched together. The index resolves absent ones to its defaults.
QueryParams = tuple[tuple[str, int], ...]
NO_PARAMS: QueryParams = ()


def query_params(**given: int | None) -> QueryParams:
    """The parameters that are set, as `QueryParams`."""
    if all(value is None for value in given.values()):  # most queries: the index's defaults
        return NO_PARAMS
    return tuple(sorted((name, value) for name, value in given.items() if value is not None))


def param(params: QueryParams, name: str) -> int | None:
    for key, value in params:
        if key == name:
            return value
    return None


@dataclass(frozen=True, slots=True)
class Found:
    """Best-first labels, scores and protocol distances of a batch of queries: (queries, k)
    arrays, every row of the same length."""

    labels: NDArray[np.int64]
    scores: F32
    distances: F32


class VectorStore:
    """The shard's full-precision vectors by label (as given, not normalised), their norms and
    the live flags: in RAM, or memory-mapped from a file (quantised collections, whose index
    holds only codes: the full vectors for re-ranking and exact search then stay on disk and in
    the page cache, not twice in RAM). The file is the shard's scratch space, removed on close;
    snapshots copy the vectors into their own files."""

    def __init__(self, dim: int, capacity: int, path: Path | None = None) -> None:
        self.dim = dim
        self.path = path
        self.norms = np.zeros(capacity, np.float32)
        self.live = np.zeros(capacity, np.bool_)
        self.vectors: F32 = self._allocate(capacity)

    def _allocate(self, capacity: int) -> F32:
        if self.path is None:
            return np.zeros((capacity, self.dim), np.float32)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        with self.path.open("ab") as f:  # grows the file (sparse); keeps what it holds
            f.truncate(max(1, capacity * self.dim * 4))
        mapped: F32 = np.memmap(self.path, dtype=np.float32, mode="r+", shape=(capacity, self.dim))
        return mapped

    @property
    def capacity(self) -> int:
        return int(self.vectors.shape[0])

    def plain_vectors(self) -> F32:
        """The vectors as a plain array (a mapped file's memmap subclass costs per indexing)."""
        plain: F32 = self.vectors.view(np.ndarray) if isinstance(self.vectors, np.memmap) else self.vectors
        return plain

    @property
    def mapped(self) -> bool:
        return self.path is not None

    def grow(self, capacity: int) -> None:
        extra = capacity - self.capacity
        if extra <= 0:
            return
        if self.path is None:
            self.vectors = np.concatenate([self.vectors, np.zeros((extra, self.dim), np.float32)])
        else:
            old = self.vectors
            self.vectors = self._allocate(capacity)
            del old
        self.norms = np.concatenate([self.norms, np.zeros(extra, np.float32)])
        self.live = np.concatenate([self.live, np.zeros(extra, np.bool_)])

    def ram_bytes(self) -> int:
        """Bytes this store holds in process memory (a mapped file's pages are the OS's cache)."""
        own = int(self.norms.nbytes + self.live.nbytes)
        return own if self.path is not None else own + int(self.vectors.nbytes)

    def file_bytes(self) -> int:
        return 0 if self.path is None else int(self.vectors.nbytes)

    def close(self) -> None:
        """Remove the mapped file (the mapping stays valid until the arrays are dropped)."""
        if self.path is not None:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.path)


class VectorIndex(ABC):
    """An approximate (or exact) nearest-neighbour index over the labels of one shard."""

    kind: ClassVar[str]
    # True for an index whose every answer is exact (the planner then always plans "exact").
    exact: ClassVar[bool] = False
    # True for an index whose inserts are slow (a graph): a shard may then keep a batch out of
    # it for a while and score those documents exactly (`ShardState.upsert`'s `defer_index`).
    defers_inserts: ClassVar[bool] = False

    def __init__(self, dim: int, metric: Metric, spec: IndexSpec, config: EngineConfig, store: VectorStore) -> None:
        self.dim = dim
        self.metric = metric
        self.spec = spec
        self.config = config
        self.store = store
        self.threads = max(1, config.search_threads)

    @abstractmethod
    def add(self, labels: Labels, vectors: F32) -> None:
        """Insert these labels, or replace their vectors (the store already holds the new ones)."""

    @abstractmethod
    def remove(self, labels: Labels) -> None:
        """Delete these labels: no search returns them again (a label may be added again later)."""

    def resize(self, capacity: int) -> None:
        """Room for labels below `capacity` (called before `add` needs it)."""
        return None

    def grown(self, n_live: int) -> None:
        """After a write batch: the shard now holds `n_live` documents (kinds that train may start
        a rebuild off the write path)."""
        return None

    def ready(self) -> bool:
        """Whether the index can answer now (False: the shard answers exactly)."""
        return True

    def needs_exclusive(self, params: QueryParams) -> bool:
        """Whether `params` must first be made the index's state (`apply`) while no search runs
        (hnswlib's ef is index-global); False when they are passed per call."""
        return False

    def apply(self, params: QueryParams) -> None:
        """Make `params` the index's state; call only while no search runs."""
        return None

    @abstractmethod
    def search(self, queries: F32, k: int, allowed: Mask | None, params: QueryParams, threads: int) -> Found | None:
        """The k best live labels of each query (allowed[label] True, when a mask is given; the
        mask covers labels below the shard's high mark), or None when the index cannot answer
        them all in full (the caller then searches exactly)."""

    @abstractmethod
    def save(self, directory: Path) -> list[str]:
        """Write the index's files into `directory`; returns their names. Raises OSError."""

    @abstractmethod
    def load(self, directory: Path, high: int) -> None:
        """Read the files `save` wrote (checksums verified by the caller) over this fresh index,
        whose store already holds the vectors. Raises ValueError when they disagree."""

    @abstractmethod
    def memory_bytes(self) -> int:
        """Process memory the index holds (estimated where the library does not say)."""

    def builds(self) -> int:
        """Background (re)builds swapped in so far."""
        rebuild = getattr(self, "rebuild", None)
        return rebuild.builds if isinstance(rebuild, Rebuild) else 0

    def building(self) -> bool:
        """Whether a background (re)build is running now: it takes a core until it swaps in."""
        rebuild = getattr(self, "rebuild", None)
        return isinstance(rebuild, Rebuild) and rebuild.running

    def describe(self) -> dict[str, object]:
        """Runtime facts for an operator (e.g. whether an ivf is trained, its nlist)."""
        return {}

    def close(self) -> None:
        """Drop background work (the shard is replaced or stopping)."""
        return None


def rerank(
    store: VectorStore, metric: Metric, queries: F32, candidates: NDArray[np.int64], k: int, allowed: Mask | None
) -> Found | None:
    """The k best of each query's candidate labels (-1: none) by the true metric on the
    full-precision vectors, or None when a query has fewer than k usable candidates. The whole
    batch is scored at once: per query, the numpy calls cost more than their arithmetic."""
    cand = np.asarray(candidates, dtype=np.int64)
    if k <= 0 or cand.shape[1] < k:
        return None
    # The candidates that may be answered, or None when all may: the common case, every
    # candidate a live label and no filter, costs one reduction.
    usable = None if allowed is None and int(cand.min()) >= 0 else cand >= 0
    if usable is not None:
        if allowed is not None:
            usable &= cand < allowed.shape[0]
            usable[usable] = allowed[cand[usable]]
        if bool(usable.all()):
            usable = None
        elif int(np.count_nonzero(usable, axis=1).min()) < k:
            return None
    rows = cand if usable is None else np.where(usable, cand, 0)
    got = exact.candidate_scores(store.plain_vectors(), store.norms, queries, rows, metric)
    if usable is not None:
        got[~usable] = -np.inf  # after every usable one: k of those come first
    # Best first; ties keep the candidate order (the index's), as a stable sort of -score does.
    if cand.shape[0] == 1:  # 1-D sort and plain column indexing, cheaper than the 2-D gather
        best = np.argsort(np.negative(got[0]), kind="stable")[:k]
        labels, scores = cand[:, best], got[:, best]
    else:
        order = np.argsort(np.negative(got), axis=1, kind="stable")[:, :k]
        rows_of = np.arange(cand.shape[0])[:, None]
        labels, scores = cand[rows_of, order], got[rows_of, order]
    if metric is Metric.COSINE:  # plain ufuncs: np.clip's argument handling costs more
        np.maximum(np.minimum(scores, 1.0, out=scores), -1.0, out=scores)
    return Found(labels, scores, exact.distance_of(scores, metric))


def bitmap(mask: Mask) -> NDArray[np.uint8]:
    """`mask` packed for faiss's IDSelectorBitmap (bit i of byte i // 8, little-endian)."""
    packed: NDArray[np.uint8] = np.packbits(mask, bitorder="little")
    return packed


class Rebuild:
    """A replacement index built in a worker thread from a copy of the live vectors, then caught
    up with the writes made meanwhile and swapped in, so neither queries nor writes wait for the
    build. Writes call `record` under `lock`; the builder replays the records under it too."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self._pending: list[tuple[bool, Labels, F32 | None]] | None = None
        self._thread: threading.Thread | None = None
        self._cancelled = False
        self.builds = 0  # rebuilds swapped in (tests and metrics)

    @property
    def running(self) -> bool:
        return self._pending is not None

    def record(self, added: bool, labels: Labels, vectors: F32 | None) -> None:
        """Call under `lock` for every write while a build runs (a no-op otherwise)."""
        if self._pending is not None:
            self._pending.append((added, labels.copy(), None if vectors is None else vectors.copy()))

    def start(
        self,
        build: Callable[[], object],
        replay: Callable[[object, bool, Labels, F32 | None], None],
        swap: Callable[[object], None],
    ) -> None:
        """Run `build()` in a thread; then, under `lock`, `replay` every recorded write on its
        result and `swap` it in. Call under `lock`, with no build running."""
        assert self._pending is None
        self._pending = []

        def run() -> None:
            try:
                built = build()
            except Exception as exc:  # the old index (or exact search) keeps serving; a later write retries
                with self.lock:
                    self._pending = None
                log.warning("index build failed: %s", exc)
                return
            with self.lock:
                pending, self._pending = self._pending or [], None
                if self._cancelled:
                    return
                for added, labels, vectors in pending:
                    replay(built, added, labels, vectors)
                swap(built)
                self.builds += 1

        self._thread = threading.Thread(target=run, name="shoal-index-build", daemon=True)
        self._thread.start()

    def wait(self, timeout: float | None = None) -> None:
        """Wait for a running build (tests; snapshots do not need to)."""
        thread = self._thread
        if thread is not None:
            thread.join(timeout)

    def cancel(self) -> None:
        with self.lock:
            self._cancelled = True
