"""Kind `hnsw`: hnswlib's graph (float32). Its search breadth `ef` is index-global in hnswlib,
so a query asking for another `ef` first has it applied while no search runs."""

from __future__ import annotations

from pathlib import Path

import hnswlib
import numpy as np

from actors import exact
from actors.indexes.base import F32, Found, Labels, Mask, QueryParams, VectorIndex, VectorStore, param
from actors.status import hnsw_bytes
from models.config import EngineConfig
from models.index_spec import IndexSpec
from models.records import Metric

SPACES = {Metric.COSINE: "cosine", Metric.L2: "l2", Metric.IP: "ip"}
INDEX_FILE = "index.hnsw"


class HnswIndex(VectorIndex):
    kind = "hnsw"
    defers_inserts = True

    def __init__(self, dim: int, metric: Metric, spec: IndexSpec, config: EngineConfig, store: VectorStore) -> None:
        super().__init__(dim, metric, spec, config, store)
        self.m = spec.m if spec.m is not None else config.hnsw_m
        self.ef_construction = spec.ef_construction if spec.ef_construction is not None else config.hnsw_ef_construction
        self.default_ef = max(1, config.hnsw_ef_search)
        self.index = hnswlib.Index(space=SPACES[metric], dim=dim)
        self.index.init_index(
            max_elements=store.capacity, M=self.m, ef_construction=self.ef_construction, random_seed=100
        )
        self.ef = self.default_ef
        self.index.set_ef(self.ef)
        self.elements = 0

    def _ef_of(self, params: QueryParams) -> int:
        ef = param(params, "ef")
        return max(1, ef if ef is not None else self.default_ef)

    def needs_exclusive(self, params: QueryParams) -> bool:
        return self._ef_of(params) != self.ef

    def apply(self, params: QueryParams) -> None:
        self.ef = self._ef_of(params)
        self.index.set_ef(self.ef)

    def add(self, labels: Labels, vectors: F32) -> None:
        # An existing label is updated in place; a reused (deleted) one is unmarked too.
        self.index.add_items(vectors, labels, num_threads=min(self.threads, len(labels)))
        self.elements = int(self.index.element_count)

    def remove(self, labels: Labels) -> None:
        for label in labels.tolist():
            self.index.mark_deleted(label)

    def resize(self, capacity: int) -> None:
        if capacity > self.index.get_max_elements():
            self.index.resize_index(capacity)

    def search(self, queries: F32, k: int, allowed: Mask | None, params: QueryParams, threads: int) -> Found | None:
        filter_fn = None if allowed is None else allowed.tolist().__getitem__
        try:
            labels, raw = self.index.knn_query(queries, k=k, num_threads=threads, filter=filter_fn)
        except RuntimeError:  # came back short (deleted elements, tiny ef)
            return None
        if labels.shape[1] != k:
            return None
        labels = labels.astype(np.int64, copy=False)
        if allowed is not None and not bool(allowed[labels].all()):
            return None
        scores, dists = exact.from_hnsw(raw, self.metric)
        return Found(labels, scores, dists)

    def save(self, directory: Path) -> list[str]:
        self.index.save_index(str(directory / INDEX_FILE))
        return [INDEX_FILE]

    def load(self, directory: Path, high: int) -> None:
        index = hnswlib.Index(space=SPACES[self.metric], dim=self.dim)
        index.load_index(str(directory / INDEX_FILE), max_elements=self.store.capacity)
        count = int(index.element_count)
        if count != high:
            raise ValueError(f"the snapshot's index holds {count} elements, its arrays {high}")
        index.set_ef(self.ef)
        self.index = index
        self.elements = count

    def memory_bytes(self) -> int:
        return hnsw_bytes(int(self.index.get_max_elements()), self.elements, self.dim, self.m)

    def describe(self) -> dict[str, object]:
        return {"library": "hnswlib", "ef": self.default_ef}
