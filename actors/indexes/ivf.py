"""Kind `ivf`: faiss IndexIVFFlat (or IndexIVFScalarQuantizer with `quantization`), labels as
faiss ids, deletes by `remove_ids`.

Training. Until a shard holds `ivf_train_min` vectors (and, with an explicit `nlist`, 39 per
list: faiss's own floor for k-means) the index declines every search and the shard answers
exactly. Then it is trained in a worker thread on a copy of the live vectors, caught up with the
writes made meanwhile and swapped in (`Rebuild`); with `nlist` left to the server it is trained
again the same way each time the shard has grown `ivf_retrain_growth`-fold since.

`nlist` by default: min(4·sqrt(n), n / 39), at least 1, for the n live vectors at training.
`nprobe` by default: max(16, nlist / 4) lists (capped at nlist); a query may ask for its own.
Candidates are re-ranked on the full-precision vectors, so scores are exact for what is found
(quantised codes only choose the candidates: 4·k of them, at least 40).
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np

from actors import exact
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
from models.config import EngineConfig
from models.index_spec import IndexSpec
from models.records import Metric

INDEX_FILE = "index.faiss"
META_FILE = "index.json"
_MIN_PER_LIST = 39
_RERANK_FACTOR = 4
_RERANK_MIN = 40

FAISS_METRICS = {
    Metric.COSINE: faiss.METRIC_INNER_PRODUCT,
    Metric.IP: faiss.METRIC_INNER_PRODUCT,
    Metric.L2: faiss.METRIC_L2,
    Metric.L1: faiss.METRIC_L1,
}
QTYPES = {"int8": faiss.ScalarQuantizer.QT_8bit, "f16": faiss.ScalarQuantizer.QT_fp16}


def auto_nlist(n: int) -> int:
    """Inverted lists for n vectors when the collection does not fix them."""
    return max(1, min(int(4 * math.sqrt(n)), n // _MIN_PER_LIST))


def default_nprobe(nlist: int) -> int:
    return min(nlist, max(16, nlist // 4))


def prepared(vectors: F32, metric: Metric) -> F32:
    """Vectors as faiss sees them: unit length under cosine (inner product then is cosine)."""
    out = np.ascontiguousarray(vectors, dtype=np.float32)
    if metric is Metric.COSINE:  # row_norms: np.linalg.norm costs more per call
        unit: F32 = np.divide(out, np.maximum(exact.row_norms(out), np.float32(1e-30))[:, None], dtype=np.float32)
        return unit
    return out


class IvfIndex(VectorIndex):
    kind = "ivf"

    def __init__(self, dim: int, metric: Metric, spec: IndexSpec, config: EngineConfig, store: VectorStore) -> None:
        super().__init__(dim, metric, spec, config, store)
        self._index: Any = None  # the trained faiss index, or None (exact until then)
        self._quantizer: Any = None  # kept alive beside the index that refers to it
        self._trained_n = 0
        self.rebuild = Rebuild()

    # -- training ------------------------------------------------------------------------------

    def _train_at(self) -> int:
        floor = max(1, self.config.ivf_train_min)
        return floor if self.spec.nlist is None else max(floor, _MIN_PER_LIST * self.spec.nlist)

    def grown(self, n_live: int) -> None:
        with self.rebuild.lock:
            if self.rebuild.running:
                return
            if self._index is None:
                due = n_live >= self._train_at()
            else:
                due = self.spec.nlist is None and n_live >= self.config.ivf_retrain_growth * self._trained_n
            if not due:
                return
            labels = np.flatnonzero(self.store.live).astype(np.int64)
            vectors = prepared(self.store.vectors[labels], self.metric)  # a copy, taken under the write
            nlist = self.spec.nlist if self.spec.nlist is not None else auto_nlist(labels.shape[0])
            self.rebuild.start(lambda: self._build(nlist, labels, vectors), self._replay, self._swap)

    def _build(self, nlist: int, labels: Labels, vectors: F32) -> tuple[Any, Any, int]:
        faiss.omp_set_num_threads(1)  # a background build takes one core, never the search budget
        quantizer = faiss.IndexFlat(self.dim, FAISS_METRICS[self.metric])
        if self.spec.quantization is None:
            index = faiss.IndexIVFFlat(quantizer, self.dim, nlist, FAISS_METRICS[self.metric])
        else:
            qtype = QTYPES[self.spec.quantization]
            index = faiss.IndexIVFScalarQuantizer(quantizer, self.dim, nlist, qtype, FAISS_METRICS[self.metric])
        index.cp.seed = 1234
        index.train(vectors)
        index.add_with_ids(vectors, labels)
        return index, quantizer, int(labels.shape[0])

    def _replay(self, built: object, added: bool, labels: Labels, vectors: F32 | None) -> None:
        index = built[0]  # type: ignore[index]
        index.remove_ids(labels)
        if added and vectors is not None:
            index.add_with_ids(prepared(vectors, self.metric), labels)

    def _swap(self, built: object) -> None:
        self._index, self._quantizer, self._trained_n = built  # type: ignore[misc]

    # -- writes ----------------------------------------------------------------------------------

    def add(self, labels: Labels, vectors: F32) -> None:
        faiss.omp_set_num_threads(self.threads)  # a write may use the shard's threads, as hnswlib's add
        with self.rebuild.lock:
            self.rebuild.record(True, labels, vectors)
            if self._index is not None:
                self._index.remove_ids(labels)  # replaced ones; a scan of the lists either way
                self._index.add_with_ids(prepared(vectors, self.metric), labels)

    def remove(self, labels: Labels) -> None:
        with self.rebuild.lock:
            self.rebuild.record(False, labels, None)
            if self._index is not None:
                self._index.remove_ids(labels)

    # -- reads -----------------------------------------------------------------------------------

    def ready(self) -> bool:
        return self._index is not None

    def nprobe_of(self, params: QueryParams, nlist: int) -> int:
        nprobe = param(params, "nprobe")
        return min(nlist, nprobe if nprobe is not None else default_nprobe(nlist))

    def search(self, queries: F32, k: int, allowed: Mask | None, params: QueryParams, threads: int) -> Found | None:
        index = self._index
        if index is None:
            return None
        use_threads(queries.shape[0], threads)
        search_params = faiss.SearchParametersIVF(nprobe=self.nprobe_of(params, int(index.nlist)))
        packed = None
        if allowed is not None:
            packed = bitmap(allowed)
            search_params.sel = faiss.IDSelectorBitmap(packed)
        depth = k if self.spec.quantization is None else max(_RERANK_FACTOR * k, _RERANK_MIN)
        _, labels = index.search(prepared(queries, self.metric), depth, params=search_params)
        del packed
        return rerank(self.store, self.metric, queries, labels, k, allowed)

    # -- files -----------------------------------------------------------------------------------

    def save(self, directory: Path) -> list[str]:
        index, trained_n = self._index, self._trained_n
        (directory / META_FILE).write_text(json.dumps({"trained_n": trained_n, "trained": index is not None}))
        if index is None:
            return [META_FILE]
        faiss.write_index(index, str(directory / INDEX_FILE))
        return [META_FILE, INDEX_FILE]

    def load(self, directory: Path, high: int) -> None:
        meta = json.loads((directory / META_FILE).read_text())
        if not meta.get("trained"):
            return
        index = faiss.read_index(str(directory / INDEX_FILE))
        live = int(np.count_nonzero(self.store.live))
        if not isinstance(index, faiss.IndexIVF) or int(index.ntotal) != live or int(index.d) != self.dim:
            raise ValueError(f"the snapshot's ivf index holds {index.ntotal} vectors, the shard {live}")
        self._index = index
        self._trained_n = int(meta["trained_n"])

    def memory_bytes(self) -> int:
        index = self._index
        if index is None:
            return 0
        codes = int(index.ntotal) * (int(index.code_size) + 8)
        return codes + int(index.nlist) * self.dim * 4

    def describe(self) -> dict[str, object]:
        index = self._index
        nlist = 0 if index is None else int(index.nlist)
        return {
            "library": "faiss",
            "trained": index is not None,
            "nlist": nlist,
            "nprobe": default_nprobe(nlist) if nlist else 0,
            "builds": self.rebuild.builds,
            "building": self.rebuild.running,
        }

    def close(self) -> None:
        self.rebuild.cancel()
