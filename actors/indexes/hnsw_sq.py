"""Kind `hnsw` with `quantization`: faiss IndexHNSWSQ (int8 or float16 codes; hnswlib has no
quantisation). Candidates (4·k, at least 40) are re-ranked on the full-precision vectors.

faiss's HNSW cannot remove a vector, so the graph's entries are its own ids, mapped to labels:
a delete (or the old vector of a replaced document) marks its entry dead and searches skip dead
entries with an id selector. Once dead entries outnumber live ones, or the shard has grown
`ivf_retrain_growth`-fold since the codes were trained, a new graph is built from the live
vectors in a worker thread and swapped in (`Rebuild`). Until the first build (the int8 codes
need vectors to learn their ranges) the index declines and the shard answers exactly.
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


class _Graph:
    """One faiss HNSW graph and the label of each of its entries."""

    def __init__(self, index: Any, labels: Labels, trained_n: int) -> None:
        self.index = index
        self.label_of: NDArray[np.int64] = labels.astype(np.int64).copy()
        self.alive = np.ones(labels.shape[0], np.bool_)
        self.entry: dict[int, int] = {int(label): i for i, label in enumerate(labels.tolist())}
        self.dead = 0
        self.trained_n = trained_n

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
            else:
                due = graph.dead > max(_TRAIN_MIN, n_live) or n_live >= self.config.ivf_retrain_growth * graph.trained_n
            if not due:
                return
            labels = np.flatnonzero(self.store.live).astype(np.int64)
            vectors = prepared(self.store.vectors[labels], self.metric)
            self.rebuild.start(lambda: self._build(labels, vectors), self._replay, self._swap)

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
        depth = max(_RERANK_FACTOR * k, _RERANK_MIN)
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
        labels = np.where(entries >= 0, graph.label_of[np.maximum(entries, 0)], -1)
        return rerank(self.store, self.metric, queries, labels, k, allowed)

    def save(self, directory: Path) -> list[str]:
        graph = self._graph
        (directory / META_FILE).write_text(
            json.dumps({"trained": graph is not None, "trained_n": 0 if graph is None else graph.trained_n})
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
