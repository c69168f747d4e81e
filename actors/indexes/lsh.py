"""Kind `lsh`: random-hyperplane signatures (faiss IndexLSH over a random rotation, `nbits`
bits), searched by Hamming distance; the candidates are re-ranked by the true metric on the
full-precision vectors. Labels are faiss ids (IndexIDMap2), deletes by `remove_ids`.

IndexLSH takes no id selector, so a filtered search asks for candidates in proportion to the
filter's selectivity and keeps the allowed ones; too few left means the exact fallback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from actors.indexes.base import F32, Found, Labels, Mask, QueryParams, VectorIndex, VectorStore, rerank
from actors.indexes.faiss_lib import faiss, use_threads
from actors.indexes.ivf import prepared
from models.config import EngineConfig
from models.index_spec import IndexSpec, default_nbits
from models.records import Metric

INDEX_FILE = "index.faiss"
DEFAULT_CANDIDATES = 100
_CANDIDATES_PER_K = 10


class LshIndex(VectorIndex):
    kind = "lsh"

    def __init__(self, dim: int, metric: Metric, spec: IndexSpec, config: EngineConfig, store: VectorStore) -> None:
        super().__init__(dim, metric, spec, config, store)
        self.nbits = spec.nbits if spec.nbits is not None else default_nbits(dim)
        self.index: Any = self._new()

    def _new(self) -> Any:
        # rotate_data: signatures are signs of a random rotation (nbits may exceed dim);
        # no trained thresholds: hyperplanes through the origin, the angle-preserving scheme.
        lsh = faiss.IndexLSH(self.dim, self.nbits, True, False)
        index = faiss.IndexIDMap2(lsh)
        index.own_fields = True
        lsh.this.disown()
        return index

    def candidates(self, k: int) -> int:
        given = self.spec.candidates
        return given if given is not None else max(DEFAULT_CANDIDATES, _CANDIDATES_PER_K * k)

    def add(self, labels: Labels, vectors: F32) -> None:
        faiss.omp_set_num_threads(self.threads)  # a write may use the shard's threads, as hnswlib's add
        self.index.remove_ids(labels)  # replaced ones
        self.index.add_with_ids(prepared(vectors, self.metric), labels)

    def remove(self, labels: Labels) -> None:
        self.index.remove_ids(labels)

    def search(self, queries: F32, k: int, allowed: Mask | None, params: QueryParams, threads: int) -> Found | None:
        total = int(self.index.ntotal)
        if total == 0:
            return None
        depth = max(k, self.candidates(k))
        if allowed is not None:
            share = max(1e-6, float(np.count_nonzero(allowed)) / max(1, total))
            depth = int(depth / share) + k
        use_threads(queries.shape[0], threads)
        _, labels = self.index.search(prepared(queries, self.metric), min(total, depth))
        return rerank(self.store, self.metric, queries, labels, k, allowed)

    def save(self, directory: Path) -> list[str]:
        faiss.write_index(self.index, str(directory / INDEX_FILE))
        return [INDEX_FILE]

    def load(self, directory: Path, high: int) -> None:
        index = faiss.read_index(str(directory / INDEX_FILE))
        live = int(np.count_nonzero(self.store.live))
        if int(index.ntotal) != live or int(index.d) != self.dim:
            raise ValueError(f"the snapshot's lsh index holds {index.ntotal} vectors, the shard {live}")
        self.index = index

    def memory_bytes(self) -> int:
        # codes + ids + the reverse id map (an unordered_map node each) + the rotation matrix
        return int(self.index.ntotal) * (self.nbits // 8 + 8 + 48) + self.nbits * self.dim * 4

    def describe(self) -> dict[str, object]:
        return {"library": "faiss", "nbits": self.nbits, "candidates": self.spec.candidates or DEFAULT_CANDIDATES}
