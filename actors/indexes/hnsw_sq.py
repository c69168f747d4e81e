"""Kind `hnsw` with `quantization`: faiss IndexHNSWSQ (int8 or float16 codes; hnswlib has no
quantisation). Candidates are re-ranked on the full-precision vectors: 4·k of them (at least 40)
for int8 codes, whose 256 steps per dimension reorder close neighbours; the k found for float16
codes, which rank as the full vectors do but for near-ties (README, "Index kinds": recall@10
re-ranking k candidates and 4·k), so the re-rank only makes their scores exact.

faiss's HNSW cannot remove a vector, so the graph's entries are its own ids, mapped to labels:
a delete (or the old vector of a replaced document) marks its entry dead and searches skip dead
entries with an id selector. Once dead entries outnumber live ones, a new graph is built from the
live vectors in a worker thread and swapped in (`Rebuild`). Until the first build (the int8 codes
need vectors to learn their ranges) the index declines and the shard answers exactly.

Growth rebuilds only when the codes stopped fitting. Each time the shard has grown
`ivf_retrain_growth`-fold since the last look, a sample of the live vectors is checked against the
int8 ranges the codes were trained on (`codes_drifted`); f16 codes learn nothing, so they never
go stale. A rebuild costs a second graph for as long as it runs and every insert again on one
core, and the re-rank on full-precision vectors already absorbs the clipping of vectors from the
same distribution as the training set: recall stayed the same with codes trained on the first
1,000 vectors as on all 20,000 (README, "Index kinds, query by example, recall you can see").
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
from numpy.typing import NDArray

from actors.indexes.base import (
    F32,
    Found,
    Labels,
    Mask,
    QueryParams,
    Rebuild,
    VectorIndex,
    VectorStore,
    bitmap,
    param,
    rerank,
)
from actors.indexes.faiss_lib import faiss, use_threads
from actors.indexes.ivf import FAISS_METRICS, QTYPES, prepared
from models.config import EngineConfig
from models.index_spec import IndexSpec
from models.records import Metric

INDEX_FILE = "index.faiss"
MAP_FILE = "entries.npz"
META_FILE = "index.json"
_TRAIN_MIN = 1_000
_RERANK_FACTOR = 4
_RERANK_MIN = 40
# The growth check: sampled live vectors, and the limits past which the int8 codes are retrained.
_DRIFT_SAMPLE = 4_096
_OUTSIDE_LIMIT = 0.01  # share of coordinates beyond the trained range by more than a code step
_NARROW_LIMIT = 0.5  # the sample's range over the trained range, averaged over the dimensions


class _Graph:
    """One faiss HNSW graph and the label of each of its entries."""

    def __init__(self, index: Any, labels: Labels, trained_n: int) -> None:
        self.index = index
        self.label_of: NDArray[np.int64] = labels.astype(np.int64).copy()
        self.alive = np.ones(labels.shape[0], np.bool_)
        self.entry: dict[int, int] = {int(label): i for i, label in enumerate(labels.tolist())}
        self.dead = 0
        self.trained_n = trained_n  # live vectors when the codes were trained
        self.checked_n = trained_n  # live vectors when the codes were last checked against them

    def remove(self, labels: Labels) -> None:
        for label in labels.tolist():
            i = self.entry.pop(int(label), None)
            if i is not None:
                self.alive[i] = False
                self.dead += 1

    def add(self, labels: Labels, vectors: F32) -> None:
        self.remove(labels)
        start = int(self.index.ntotal)
        self.index.add(vectors)
        self.label_of = np.concatenate([self.label_of, labels.astype(np.int64)])
        self.alive = np.concatenate([self.alive, np.ones(labels.shape[0], np.bool_)])
        for offset, label in enumerate(labels.tolist()):
            self.entry[int(label)] = start + offset


def codes_drifted(index: Any, sample: F32) -> bool:
    """Whether the int8 codes of `index` no longer fit the vectors of `sample`: more than
    `_OUTSIDE_LIMIT` of its coordinates lie beyond the trained range by more than one code step
    (they are clipped), or it spans on average less than `_NARROW_LIMIT` of that range (the codes
    spend their 256 steps on values that no longer occur)."""
    if sample.shape[0] == 0:
        return False
    quantizer = faiss.downcast_index(index.storage).sq
    trained = faiss.vector_to_array(quantizer.trained)
    dim = sample.shape[1]
    low, width = trained[:dim], trained[dim : 2 * dim]  # QT_8bit, min-max: vmin, then vmax - vmin
    step = width / 255.0
    clipped = (sample < low - step) | (sample > low + width + step)
    if float(clipped.mean()) > _OUTSIDE_LIMIT:
        return True
    spans = (sample.max(axis=0) - sample.min(axis=0)) / np.maximum(width, np.float32(1e-30))
    return float(spans.mean()) < _NARROW_LIMIT


class HnswSqIndex(VectorIndex):
    kind = "hnsw"

    def __init__(self, dim: int, metric: Metric, spec: IndexSpec, config: EngineConfig, store: VectorStore) -> None:
        super().__init__(dim, metric, spec, config, store)
        self.m = spec.m if spec.m is not None else config.hnsw_m
        self.ef_construction = spec.ef_construction if spec.ef_construction is not None else config.hnsw_ef_construction
        self.default_ef = max(1, config.hnsw_ef_search)
        self._graph: _Graph | None = None
        self.rebuild = Rebuild()

    def _new_index(self) -> Any:
        assert self.spec.quantization is not None
        index = faiss.IndexHNSWSQ(self.dim, QTYPES[self.spec.quantization], self.m, FAISS_METRICS[self.metric])
        index.hnsw.efConstruction = self.ef_construction
        return index

    def grown(self, n_live: int) -> None:
        with self.rebuild.lock:
            graph = self._graph
            if self.rebuild.running:
                return
            if graph is None:
                due = n_live >= _TRAIN_MIN
            elif graph.dead > max(_TRAIN_MIN, n_live):
                due = True
            elif n_live >= self.config.ivf_retrain_growth * graph.checked_n:
                graph.checked_n = n_live
                due = self.spec.quantization == "int8" and codes_drifted(graph.index, self._live_sample())
            else:
                due = False
            if not due:
                return
            labels = np.flatnonzero(self.store.live).astype(np.int64)
            vectors = prepared(self.store.vectors[labels], self.metric)
            self.rebuild.start(lambda: self._build(labels, vectors), self._replay, self._swap)

    def _live_sample(self) -> F32:
        """Up to `_DRIFT_SAMPLE` live vectors as faiss sees them, the same ones for the same shard."""
        labels = np.flatnonzero(self.store.live)
        if labels.shape[0] > _DRIFT_SAMPLE:
            labels = np.sort(np.random.default_rng(labels.shape[0]).choice(labels, _DRIFT_SAMPLE, replace=False))
        return prepared(self.store.vectors[labels], self.metric)

    def _build(self, labels: Labels, vectors: F32) -> _Graph:
        faiss.omp_set_num_threads(1)  # a background build takes one core, never the search budget
        index = self._new_index()
        index.train(vectors)
        index.add(vectors)
        return _Graph(index, labels, int(labels.shape[0]))

    def _replay(self, built: object, added: bool, labels: Labels, vectors: F32 | None) -> None:
        assert isinstance(built, _Graph)
        if added and vectors is not None:
            built.add(labels, prepared(vectors, self.metric))
        else:
            built.remove(labels)

    def _swap(self, built: object) -> None:
        assert isinstance(built, _Graph)
        self._graph = built

    def add(self, labels: Labels, vectors: F32) -> None:
        faiss.omp_set_num_threads(self.threads)  # a write may use the shard's threads, as hnswlib's add
        with self.rebuild.lock:
            self.rebuild.record(True, labels, vectors)
            if self._graph is not None:
                self._graph.add(labels, prepared(vectors, self.metric))

    def remove(self, labels: Labels) -> None:
        with self.rebuild.lock:
            self.rebuild.record(False, labels, None)
            if self._graph is not None:
                self._graph.remove(labels)

    def ready(self) -> bool:
        return self._graph is not None

    def search(self, queries: F32, k: int, allowed: Mask | None, params: QueryParams, threads: int) -> Found | None:
        graph = self._graph
        if graph is None:
            return None
        ef = param(params, "ef")
        depth = k if self.spec.quantization == "f16" else max(_RERANK_FACTOR * k, _RERANK_MIN)
        search_params = faiss.SearchParametersHNSW(efSearch=max(depth, ef if ef is not None else self.default_ef))
        packed = None
        n = graph.label_of.shape[0]
        if graph.dead or allowed is not None:
            ok = graph.alive[:n].copy()
            if allowed is not None:
                ok &= allowed[graph.label_of]
            packed = bitmap(ok)
            search_params.sel = faiss.IDSelectorBitmap(packed)
        use_threads(queries.shape[0], threads)
        _, entries = graph.index.search(prepared(queries, self.metric), depth, params=search_params)
        del packed
        if int(entries.min()) >= 0:  # the common case: every slot found an entry
            labels = graph.label_of[entries]
        else:
            labels = np.where(entries >= 0, graph.label_of[np.maximum(entries, 0)], -1)
        return rerank(self.store, self.metric, queries, labels, k, allowed)

    def save(self, directory: Path) -> list[str]:
        graph = self._graph
        (directory / META_FILE).write_text(
            json.dumps(
                {
                    "trained": graph is not None,
                    "trained_n": 0 if graph is None else graph.trained_n,
                    "checked_n": 0 if graph is None else graph.checked_n,
                }
            )
        )
        if graph is None:
            return [META_FILE]
        faiss.write_index(graph.index, str(directory / INDEX_FILE))
        with (directory / MAP_FILE).open("wb") as f:
            np.savez(f, label_of=graph.label_of, alive=graph.alive)
        return [META_FILE, INDEX_FILE, MAP_FILE]

    def load(self, directory: Path, high: int) -> None:
        meta = json.loads((directory / META_FILE).read_text())
        if not meta.get("trained"):
            return
        index = faiss.read_index(str(directory / INDEX_FILE))
        with np.load(directory / MAP_FILE, allow_pickle=False) as arrays:
            label_of, alive = arrays["label_of"], arrays["alive"]
        if int(index.ntotal) != label_of.shape[0] or alive.shape != label_of.shape or int(index.d) != self.dim:
            raise ValueError("the snapshot's hnsw graph and its entry map disagree")
        graph = _Graph(index, label_of[alive], int(meta["trained_n"]))
        graph.checked_n = int(meta.get("checked_n", graph.trained_n))  # snapshots before the growth check
        graph.label_of, graph.alive = label_of.astype(np.int64), alive.astype(np.bool_)
        graph.entry = {int(label_of[i]): int(i) for i in np.flatnonzero(alive).tolist()}
        graph.dead = int(alive.shape[0] - np.count_nonzero(alive))
        live = {int(x) for x in np.flatnonzero(self.store.live).tolist()}
        if set(graph.entry) != live:
            raise ValueError("the snapshot's hnsw graph holds other documents than its arrays")
        self._graph = graph

    def memory_bytes(self) -> int:
        graph = self._graph
        if graph is None:
            return 0
        n = int(graph.index.ntotal)
        code = self.dim if self.spec.quantization == "int8" else 2 * self.dim
        # codes, level-0 links (2M ids), upper levels (~M/(M-1) per entry), offsets and levels,
        # and the entry map (label array, alive flag, a dict item per live entry)
        links = 2 * self.m * 4 + (self.m * 4) // max(1, self.m - 1) + 8 + 4
        return n * (code + links + 8 + 1) + len(graph.entry) * 100

    def describe(self) -> dict[str, object]:
        graph = self._graph
        return {
            "library": "faiss",
            "trained": graph is not None,
            "dead": 0 if graph is None else graph.dead,
            "builds": self.rebuild.builds,
            "building": self.rebuild.running,
        }

    def close(self) -> None:
        self.rebuild.cancel()
