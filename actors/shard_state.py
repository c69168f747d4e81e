"""The state of one shard and its blocking operations: documents, metadata columns, the
full-precision vectors (`VectorStore`) and the collection's index (any kind, `actors/indexes`),
which it asks for nearest labels and otherwise knows nothing about.

Not thread-safe on its own: `actors/shard.py` runs these methods in worker threads under a
read/write discipline (reads may overlap each other, a write overlaps nothing). `Occupancy`
records any overlap it observes, so tests can prove the discipline holds.
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, NamedTuple, cast

import msgpack
import numpy as np
from numpy.typing import NDArray

from actors import exact
from actors.indexes import make_index
from actors.indexes.base import NO_PARAMS, Found, Mask, QueryParams, VectorIndex, VectorStore
from actors.keyword_index import KeywordIndex, term_counts
from actors.planner import choose_plan, would_plan
from actors.status import ShardSizes
from models.config import EngineConfig
from models.errors import DimensionMismatch
from models.filters import Filter, MetadataColumns, TextFilter, text_mask
from models.index_spec import IndexSpec, default_spec
from models.records import DocId, Hit, Include, Metadata, Metric, Seq, StoredDoc, Vector

# The files of one shard in a snapshot (beside the index's own, see `VectorIndex.save`).
ARRAYS_FILE = "arrays.npz"
DOCS_FILE = "docs.msgpack"


class Occupancy:
    """Counts readers and writers inside the state's blocking operations.

    The actor's discipline should make a write and a read never overlap; this records any
    overlap it observes (`violations`), which the stress test asserts is zero.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.readers = 0
        self.writers = 0
        self.violations = 0
        self.max_readers = 0  # the most reads seen overlapping one another
        self._reading = _Section(self, write=False)
        self._writing = _Section(self, write=True)

    def reading(self) -> _Section:
        return self._reading

    def writing(self) -> _Section:
        return self._writing


class _Section:
    """`with occupancy.reading():` / `writing()`: one object per kind, made once (a class, not
    @contextmanager: it runs once per search). It keeps no per-use state, so threads share it."""

    __slots__ = ("_occupancy", "_write")

    def __init__(self, occupancy: Occupancy, write: bool) -> None:
        self._occupancy = occupancy
        self._write = write

    def __enter__(self) -> None:
        o = self._occupancy
        with o._lock:
            if self._write:
                o.writers += 1
                o.violations += o.readers > 0 or o.writers > 1
            else:
                o.readers += 1
                o.violations += o.writers > 0
                o.max_readers = max(o.max_readers, o.readers)

    def __exit__(self, *exc: object) -> None:
        o = self._occupancy
        with o._lock:
            if self._write:
                o.writers -= 1
            else:
                o.readers -= 1


class ExactRerun(NamedTuple):
    """`ShardState.search_exact`'s answer: hits per query, whether the planner would have used
    the index for such a query, and the search thread's CPU seconds."""

    hits: list[list[Hit]]
    by_index: bool
    cpu_s: float


class ShardState:
    """Everything a shard holds. Labels (slot numbers, the index's ids) index every
    per-document array.

    `spec`: the collection's index (None: its metric's default). `vectors_path`: a file for the
    full-precision vectors, memory-mapped (quantised indexes keep only codes in RAM)."""

    def __init__(
        self,
        dim: int,
        metric: Metric,
        config: EngineConfig,
        spec: IndexSpec | None = None,
        vectors_path: Path | None = None,
    ) -> None:
        self.dim = dim
        self.metric = metric
        self.config = config
        self.spec = spec if spec is not None else default_spec(metric)
        self.threads = max(1, config.search_threads)
        cap = max(16, config.hnsw_initial_capacity)
        # Vectors as given (not normalised) and their norms, for exact search and include=vector.
        self.store = VectorStore(dim, cap, vectors_path)
        self.index = make_index(self.spec, dim, metric, config, self.store)
        self.seqs = np.zeros(cap, np.int64)
        self.texts: list[str | None] = [None] * cap
        self.metas: list[Metadata | None] = [None] * cap
        self.ids: list[DocId | None] = [None] * cap
        self.labels: dict[DocId, int] = {}
        self.free: list[int] = []  # labels of deleted documents, reused first
        self.high = 0  # labels below this have been handed out
        self.n_live = 0
        self.columns = MetadataColumns()
        # BM25 over the documents' texts, by label: written on the same apply calls as the
        # vectors, so keyword search sees exactly what the shard has applied.
        self.keywords = KeywordIndex()
        self.occupancy = Occupancy()
        # Live ids in sorted order and their labels, for paging; None once an id came or went.
        self._id_order: tuple[list[DocId], NDArray[np.int64]] | None = None
        # Live labels whose vectors are in the store but not yet in the index (`upsert` with
        # `defer_index`: the log tail replayed at start). Searches score them exactly beside
        # the index's answer; `index_unindexed` moves them into the index a chunk at a time.
        # Every other label below `high` has been added to the index.
        self.unindexed = np.zeros(cap, np.bool_)
        self.n_unindexed = 0

    @property
    def capacity(self) -> int:
        return self.store.capacity

    @property
    def vectors(self) -> exact.F32:
        return self.store.vectors

    @property
    def norms(self) -> exact.F32:
        return self.store.norms

    @property
    def live(self) -> exact.Mask:
        return self.store.live

    def sizes(self, queued: int, queue_limit: int) -> ShardSizes:
        """Counts and memory now, read without taking the occupancy (a metrics gauge may lag a
        write that is being applied)."""
        return ShardSizes(
            documents=self.n_live,
            deleted=len(self.free),
            capacity=self.capacity,
            index_bytes=self.index.memory_bytes(),
            vector_bytes=self.store.ram_bytes() + int(self.seqs.nbytes),
            queued=queued,
            queue_limit=queue_limit,
            kind=self.spec.kind if self.spec.quantization is None else f"{self.spec.kind}_{self.spec.quantization}",
            mapped_bytes=self.store.file_bytes(),
            ready=self.index.ready(),
            builds=self.index.builds(),
            building=self.index.building(),
            unindexed=self.n_unindexed,
        )

    def close(self) -> None:
        """Stop the index's background work and remove the mapped vector file."""
        self.index.close()
        self.store.close()

    # -- writes -----------------------------------------------------------------------------

    def upsert(self, docs: Sequence[StoredDoc], fresh_labels: bool = False, defer_index: bool = False) -> None:
        """Insert or replace documents by id. `fresh_labels`: a replaced document is deleted and
        inserted under a new label, and no free label is reused (hnswlib inserts a new element
        several times faster than it updates one in place; the log replay at start uses it).
        `defer_index`: for an index slow to insert into (`VectorIndex.defers_inserts`), leave
        the documents out of it for now: searches score them exactly until `index_unindexed`
        adds them (the log replay at start, so a node is ready before its graph has caught up)."""
        latest: dict[DocId, StoredDoc] = {}
        for doc in docs:  # the same id twice in one batch: the last one wins
            latest[doc.id] = doc
        if not latest:
            return
        batch = list(latest.values())
        vecs = np.stack([np.asarray(doc.vector, dtype=np.float32).reshape(-1) for doc in batch])
        if vecs.shape[1] != self.dim:
            raise DimensionMismatch(f"vector has {vecs.shape[1]} dimensions, the collection {self.dim}")
        terms = [term_counts(doc.text) for doc in batch]  # tokenised before reads are held off
        with self.occupancy.writing():
            if fresh_labels:
                self._delete_held([doc.id for doc in batch])
            labels = np.empty(len(batch), np.int64)
            for i, doc in enumerate(batch):
                label = self.labels.get(doc.id)
                if label is None:
                    label = self.free.pop() if self.free and not fresh_labels else self._new_label()
                    self.labels[doc.id] = label
                    self.n_live += 1
                    self._id_order = None
                labels[i] = label
            self._ensure_capacity(self.high)
            store = self.store
            store.vectors[labels] = vecs
            store.norms[labels] = exact.row_norms(vecs)
            store.live[labels] = True
            if defer_index and self.index.defers_inserts:
                self.unindexed[labels] = True
                self._count_unindexed()
            else:
                if self.n_unindexed:
                    self.unindexed[labels] = False
                    self._count_unindexed()
                self.index.add(labels, vecs)
            for label, doc, counts in zip(labels.tolist(), batch, terms, strict=True):
                self.ids[label] = doc.id
                self.seqs[label] = doc.seq
                self.texts[label] = doc.text
                self.metas[label] = doc.metadata
                self.columns.set_row(label, doc.metadata)
                self.keywords.set_counts(label, counts)
            self.index.grown(self.n_live)

    def delete(self, ids: Sequence[DocId]) -> list[DocId]:
        with self.occupancy.writing():
            existed = self._delete_held(ids)
            self.index.grown(self.n_live)
            return existed

    def _delete_held(self, ids: Sequence[DocId]) -> list[DocId]:
        """Delete by id (the caller holds the write occupancy); returns the ids that existed."""
        existed: list[DocId] = []
        gone: list[int] = []
        for doc_id in ids:
            label = self.labels.pop(doc_id, None)
            if label is None:
                continue
            existed.append(doc_id)
            gone.append(label)
            self.live[label] = False
            self.texts[label] = self.metas[label] = self.ids[label] = None
            self.columns.clear_row(label)
            self.keywords.remove(label)
            self.free.append(label)
            self.n_live -= 1
            self._id_order = None
        if gone:
            removed = np.asarray(gone, np.int64)
            if self.n_unindexed:
                # Added first, so that every label below `high` but the unindexed ones is in
                # the index (a snapshot's index is checked against it) and removed like any.
                late = removed[self.unindexed[removed]]
                if late.size:
                    self.index.add(late, self.store.plain_vectors()[late])
                    self.unindexed[late] = False
                    self._count_unindexed()
            self.index.remove(removed)
        return existed

    def index_unindexed(self, limit: int) -> int:
        """Add up to `limit` unindexed documents to the index (a write); returns how many stay
        unindexed."""
        with self.occupancy.writing():
            if self.n_unindexed:
                labels = np.flatnonzero(self.unindexed[: self.high])[:limit].astype(np.int64)
                self.index.add(labels, self.store.plain_vectors()[labels])
                self.unindexed[labels] = False
                self._count_unindexed()
            return self.n_unindexed

    def _count_unindexed(self) -> None:
        self.n_unindexed = int(np.count_nonzero(self.unindexed[: self.high]))

    def serves(self, params: QueryParams) -> bool:
        """Whether a search with `params` can start now, without `use_params` first."""
        return not self.index.needs_exclusive(params)

    def use_params(self, params: QueryParams) -> None:
        """Make `params` the index's state (hnswlib's ef is index-global): a write."""
        with self.occupancy.writing():
            self.index.apply(params)

    def _new_label(self) -> int:
        self.high += 1
        return self.high - 1

    def _ensure_capacity(self, needed: int) -> None:
        if needed <= self.capacity:
            return
        cap = self.capacity
        while cap < needed:
            cap *= 2
        self.index.resize(cap)
        extra = cap - self.capacity
        self.store.grow(cap)
        self.unindexed = np.concatenate([self.unindexed, np.zeros(extra, np.bool_)])
        self.seqs = np.concatenate([self.seqs, np.zeros(extra, np.int64)])
        self.texts.extend([None] * extra)
        self.metas.extend([None] * extra)
        self.ids.extend([None] * extra)

    # -- reads --------------------------------------------------------------------------------

    def search_unfiltered(
        self,
        queries: Sequence[Vector],
        k: int,
        include: frozenset[Include],
        threads: int = 1,
        params: QueryParams = NO_PARAMS,
    ) -> list[list[Hit]]:
        """Best-first hits of each query; min(k, live documents) each. `threads` is the index's
        thread budget for the batch (hnswlib parallelises only above 4 queries per thread);
        `params` the query's index parameters (see `actors/indexes/base.py`)."""
        with self.occupancy.reading():
            if self.n_live == 0 or k <= 0:
                return [[] for _ in queries]
            q = queries[0][None, :] if len(queries) == 1 else np.stack(queries)
            index = self.index
            plan = choose_plan(self.n_live, self.n_live, k, self.config, len(queries), _usable(index))
            k_eff = min(k, self.n_live)
            if plan == "hnsw":
                found = self._search_index(q, k_eff, None, self.n_live, params, threads)
                if found is not None:  # else short (deleted elements, tiny ef): answer exactly
                    return self._hits_rows(
                        found.labels.tolist(), found.scores.tolist(), found.distances.tolist(), include
                    )
            tops = exact.search(self.vectors, self.norms, q, k, self.metric, mask=self.live[: self.high])
            return [self._hits(t.labels, t.scores, t.distances, include) for t in tops]

    def search_filtered(
        self,
        query: Vector,
        k: int,
        where: Filter | None,
        where_text: TextFilter | None,
        include: frozenset[Include],
        params: QueryParams = NO_PARAMS,
    ) -> list[Hit]:
        """Best-first hits among the matching documents: exactly min(k, matches) of them (an
        index that comes back short or with a label the filter excludes is answered exactly)."""
        with self.occupancy.reading():
            mask = self._mask(where, where_text)
            n_match = int(np.count_nonzero(mask))
            k_eff = min(k, n_match)
            if k_eff <= 0:
                return []
            index = self.index
            plan = choose_plan(self.n_live, n_match, k, self.config, 1, _usable(index))
            if plan != "exact":
                # A filter that matches every live document needs no per-label filter.
                allowed = mask if plan == "hnsw_filtered" else None
                found = self._search_index(query[None, :], k_eff, allowed, n_match, params, 1)
                if found is not None and found.labels.shape[1] == k_eff and bool(mask[found.labels[0]].all()):
                    return self._hits(found.labels[0], found.scores[0], found.distances[0], include)
            top = exact.search(self.vectors, self.norms, query, k, self.metric, mask=mask)[0]
            return self._hits(top.labels, top.scores, top.distances, include)

    def _search_index(
        self, q: exact.F32, k: int, allowed: Mask | None, n_match: int, params: QueryParams, threads: int
    ) -> Found | None:
        """The index's k best of each query among `allowed` (None: every live document;
        `n_match` of them), merged with the exact scores of the unindexed ones among them."""
        if not self.n_unindexed:
            return self.index.search(q, k, allowed, params, threads)
        high = self.high
        late = self.unindexed[:high] if allowed is None else self.unindexed[:high] & allowed
        n_late = int(np.count_nonzero(late))
        k_index = min(k, n_match - n_late)
        found = None if k_index <= 0 else self.index.search(q, k_index, allowed, params, threads)
        if found is None and k_index > 0:
            return None
        tops = exact.search(self.vectors, self.norms, q, k, self.metric, mask=late)
        labels = np.stack([top.labels for top in tops]).astype(np.int64, copy=False)
        scores = np.stack([top.scores for top in tops])
        dists = np.stack([top.distances for top in tops])
        if found is not None:
            labels = np.concatenate([found.labels, labels], axis=1)
            scores = np.concatenate([found.scores, scores], axis=1)
            dists = np.concatenate([found.distances, dists], axis=1)
        best = np.argsort(-scores, axis=1, kind="stable")[:, :k]
        return Found(
            np.take_along_axis(labels, best, axis=1),
            np.take_along_axis(scores, best, axis=1),
            np.take_along_axis(dists, best, axis=1),
        )

    def search_exact(
        self, queries: Sequence[Vector], k: int, where: Filter | None, where_text: TextFilter | None
    ) -> ExactRerun:
        """The exact best-first hits of each query among the documents passing the filters
        (min(k, matches), ids and scores only), whether such a query would have been planned on
        the index rather than answered exactly, and the CPU seconds this took: the reference
        recall samples are measured against. One pass over the vectors scores every query."""
        started = time.thread_time()
        with self.occupancy.reading():
            mask = self._mask(where, where_text)
            tops = exact.search(self.vectors, self.norms, np.asarray(queries), k, self.metric, mask=mask)
            hits = [self._hits(top.labels, top.scores, top.distances, frozenset()) for top in tops]
            n_match = int(np.count_nonzero(mask))
            plan = would_plan(self.n_live, n_match, k, self.config, _usable(self.index))
        return ExactRerun(hits, plan != "exact", time.thread_time() - started)

    def search_keyword(
        self,
        terms: Sequence[str],
        k: int,
        where: Filter | None,
        where_text: TextFilter | None,
        include: frozenset[Include],
    ) -> list[Hit]:
        """Best-first BM25 hits among the live documents passing the filters that hold at least
        one of `terms`: up to k of them (none for no terms). `distance` is None."""
        with self.occupancy.reading():
            n = self.high
            if not terms or k <= 0 or self.n_live == 0:
                return []
            scores, matched = self.keywords.scores(terms, n)
            matched &= self.live[:n]
            if where is not None or where_text is not None:
                matched &= self._mask(where, where_text)
            candidates = np.flatnonzero(matched)
            if candidates.size == 0:
                return []
            picked = scores[candidates]
            if candidates.size > k:
                # The k best and every document tied with the k-th, so ties go by label below.
                kth = picked[np.argpartition(-picked, k - 1)[k - 1]]
                keep = picked >= kth
                candidates, picked = candidates[keep], picked[keep]
            order = np.lexsort((candidates, -picked))[:k]  # best first; ties by label
            labels = candidates[order].tolist()
            values = picked[order].tolist()
            hits = self._hits_rows([labels], [values], [[0.0] * len(labels)], include)[0]
            return [hit._replace(distance=None) for hit in hits]

    def get(self, ids: Sequence[DocId]) -> list[StoredDoc]:
        with self.occupancy.reading():
            out: list[StoredDoc] = []
            for doc_id in ids:
                label = self.labels.get(doc_id)
                if label is None:
                    continue
                meta = self.metas[label]
                out.append(
                    StoredDoc(
                        id=doc_id,
                        text=self.texts[label],
                        vector=self.vectors[label].copy(),
                        metadata=meta if meta is not None else {},
                        seq=Seq(int(self.seqs[label])),
                    )
                )
            return out

    def scan(
        self, after: DocId | None, limit: int, where: Filter | None, where_text: TextFilter | None
    ) -> list[StoredDoc]:
        """Up to `limit` live documents passing both filters whose ids sort after `after` (None:
        from the first), in id order (Python string order: by code point)."""
        with self.occupancy.reading():
            ids, labels = self._sorted_ids()
            start = 0 if after is None else bisect.bisect_right(ids, after)
            rest = labels[start:]
            if where is None and where_text is None:
                picked = np.arange(min(limit, rest.shape[0]))
            else:
                picked = np.flatnonzero(self._mask(where, where_text)[rest])[:limit]
            out: list[StoredDoc] = []
            for i in picked.tolist():
                label = int(rest[i])
                meta = self.metas[label]
                out.append(
                    StoredDoc(
                        id=ids[start + i],
                        text=self.texts[label],
                        vector=self.vectors[label].copy(),
                        metadata=meta if meta is not None else {},
                        seq=Seq(int(self.seqs[label])),
                    )
                )
            return out

    def _sorted_ids(self) -> tuple[list[DocId], NDArray[np.int64]]:
        """The live ids sorted, with their labels; rebuilt on the first scan after an id came or
        went (a replaced document keeps its id and label). Readers may build it at once: each
        builds the same value, and assigning it is atomic."""
        order = self._id_order
        if order is None:
            ids = sorted(self.labels)
            labels = np.fromiter((self.labels[i] for i in ids), np.int64, len(ids))
            order = self._id_order = (ids, labels)
        return order

    def ids_matching(self, where: Filter | None, where_text: TextFilter | None) -> list[DocId]:
        with self.occupancy.reading():
            mask = self._mask(where, where_text)
            return [self._id(label) for label in np.flatnonzero(mask).tolist()]

    def _mask(self, where: Filter | None, where_text: TextFilter | None) -> NDArray[np.bool_]:
        """Live documents passing both filters, as a bool per label below `high`."""
        n = self.high
        mask = self.live[:n].copy()
        if where is not None:
            mask &= self.columns.mask(where, n)
        if where_text is not None:
            mask &= text_mask(where_text, self.texts[:n])
        return mask

    def _id(self, label: int) -> DocId:
        doc_id = self.ids[label]
        assert doc_id is not None, "a search returned a label with no document"
        return doc_id

    def _hits(
        self,
        labels: NDArray[Any],
        scores: NDArray[np.float32],
        dists: NDArray[np.float32],
        include: frozenset[Include],
    ) -> list[Hit]:
        return self._hits_rows([labels.tolist()], [scores.tolist()], [dists.tolist()], include)[0]

    def _hits_rows(
        self,
        labels: list[list[int]],
        scores: list[list[float]],
        dists: list[list[float]],
        include: frozenset[Include],
    ) -> list[list[Hit]]:
        """Hits of many queries at once: this is per-hit Python work, so it is kept lean."""
        # Labels come from the index or the live mask, so they always name a document.
        ids = cast(list[DocId], self.ids)
        if not include:
            # Ids and scores only, the common case: `tuple.__new__` is a C call, where the named
            # tuple's own `__new__` and the `_NONES` lookups are three Python calls per hit.
            new = _tuple_new
            return [
                [new(Hit, (ids[x], s, d, None, None, None, None)) for x, s, d in zip(lab, sco, dis, strict=True)]
                for lab, sco, dis in zip(labels, scores, dists, strict=True)
            ]
        texts = self.texts if Include.TEXT in include else _NONES
        metas = self.metas if Include.METADATA in include else _NONES
        if Include.VECTOR in include:
            vectors = self.vectors
            return [
                [
                    Hit(ids[x], s, d, texts[x], metas[x], vectors[x].copy())
                    for x, s, d in zip(lab, sco, dis, strict=True)
                ]
                for lab, sco, dis in zip(labels, scores, dists, strict=True)
            ]
        return [
            [Hit(ids[x], s, d, texts[x], metas[x], None) for x, s, d in zip(lab, sco, dis, strict=True)]
            for lab, sco, dis in zip(labels, scores, dists, strict=True)
        ]

    # -- snapshot files (see actors/snapshot.py) -------------------------------------------------

    def save_files(self, directory: Path) -> int:
        """Write the index's files, the arrays and the documents into `directory` (not fsynced:
        the caller fsyncs and checksums them); returns the live count the files hold.

        A read: it may overlap searches, never a write. Raises OSError.
        """
        with self.occupancy.reading():
            high = self.high
            self.index.save(directory)
            with (directory / ARRAYS_FILE).open("wb") as f:
                np.savez(
                    f,
                    vectors=self.vectors[:high],
                    norms=self.norms[:high],
                    live=self.live[:high],
                    seqs=self.seqs[:high],
                )
            docs = {
                "high": high,
                "n_live": self.n_live,
                "free": self.free,
                "ids": self.ids[:high],
                "texts": self.texts[:high],
                "metas": self.metas[:high],
                "index": self.spec.to_wire(),
            }
            (directory / DOCS_FILE).write_bytes(msgpack.packb(docs, use_bin_type=True))
            return self.n_live

    @classmethod
    def load_files(
        cls,
        directory: Path,
        dim: int,
        metric: Metric,
        config: EngineConfig,
        spec: IndexSpec | None = None,
        vectors_path: Path | None = None,
    ) -> ShardState:
        """A state rebuilt from files `save_files` wrote (and whose checksums were verified).

        Raises ValueError when the files disagree with each other, with `dim` or with `spec`
        (files of another index kind or parameters are never loaded); OSError.
        """
        state = cls(dim, metric, config, spec, vectors_path)
        try:
            state._load_files(directory)
        except BaseException:
            state.close()
            raise
        return state

    def _load_files(self, directory: Path) -> None:
        state, dim = self, self.dim
        docs = msgpack.unpackb((directory / DOCS_FILE).read_bytes(), raw=False)
        if docs.get("index") != state.spec.to_wire():
            raise ValueError(f"the snapshot holds index {docs.get('index')!r}, the collection {state.spec.to_wire()!r}")
        with np.load(directory / ARRAYS_FILE, allow_pickle=False) as arrays:
            vectors = arrays["vectors"]
            norms = arrays["norms"]
            live = arrays["live"]
            seqs = arrays["seqs"]
        high = int(docs["high"])
        ids: list[DocId | None] = docs["ids"]
        texts: list[str | None] = docs["texts"]
        metas: list[Metadata | None] = docs["metas"]
        free = [int(x) for x in docs["free"]]
        shapes_ok = (
            vectors.shape == (high, dim)
            and vectors.dtype == np.float32
            and norms.shape == live.shape == seqs.shape == (high,)
            and live.dtype == np.bool_
            and len(ids) == len(texts) == len(metas) == high
        )
        if not shapes_ok:
            raise ValueError("the snapshot's arrays and documents disagree in size or type")
        labels = {doc_id: label for label, doc_id in enumerate(ids) if doc_id is not None}
        n_live = int(docs["n_live"])
        dead = [label for label, doc_id in enumerate(ids) if doc_id is None]
        if not (len(labels) == n_live == int(np.count_nonzero(live)) and sorted(free) == dead):
            raise ValueError("the snapshot's live documents and free slots disagree")
        if any(not live[label] for label in labels.values()):
            raise ValueError("the snapshot marks a document as deleted")
        cap = state.capacity
        while cap < high:
            cap *= 2
        state.index.resize(cap)
        state.store.grow(cap)
        state.store.vectors[:high] = vectors
        state.store.norms[:high] = norms
        state.store.live[:high] = live
        state.index.load(directory, high)
        state.seqs = np.zeros(cap, np.int64)
        state.seqs[:high] = seqs
        state.unindexed = np.zeros(cap, np.bool_)
        pad = cap - high
        state.ids = ids + [None] * pad
        state.texts = texts + [None] * pad
        state.metas = metas + [None] * pad
        state.labels = labels
        state.free = free
        state.high = high
        state.n_live = n_live
        for label, meta in enumerate(metas):
            if meta:
                state.columns.set_row(label, meta)
        for label, text in enumerate(texts):  # the keyword index is rebuilt, not stored
            if text is not None and ids[label] is not None:
                state.keywords.set_counts(label, term_counts(text))
        state.index.grown(n_live)  # a kind that trains may be due (e.g. an untrained ivf)


def _usable(index: VectorIndex) -> bool:
    """Whether the planner may plan the index at all (not for flat, nor an untrained ivf)."""
    return not index.exact and index.ready()


class _Nones:
    """Indexing gives None: stands in for a column the caller did not ask for."""

    def __getitem__(self, label: int) -> None:
        return None


_NONES = _Nones()
_tuple_new = tuple.__new__
# `_hits_rows` builds ids-and-scores hits as raw 7-tuples, which nothing checks against the fields.
if Hit._fields != ("id", "score", "distance", "text", "metadata", "vector", "scores"):
    raise ImportError("Hit's fields changed: update the fast path of ShardState._hits_rows")
