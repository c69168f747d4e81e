"""faiss, typed as Any: its bundled stubs disagree with the SWIG wrappers on several calls used
here (keyword parameters of SearchParameters*, IDSelectorBitmap over an array, IndexHNSWSQ)."""

from __future__ import annotations

from typing import Any

import faiss as _faiss

faiss: Any = _faiss

# Queries per thread below which a search runs on one thread: OpenMP's team costs more to wake
# (its threads sleep: OMP_WAIT_POLICY=PASSIVE) than it saves on a few queries, and a single
# query on two threads took twice as long as on one. hnswlib's knn_query applies the same rule.
QUERIES_PER_THREAD = 4


def use_threads(queries: int, threads: int) -> None:
    """Set the calling thread's OpenMP team for a search of `queries` queries within a budget
    of `threads`."""
    _faiss.omp_set_num_threads(max(1, threads) if queries > QUERIES_PER_THREAD * max(1, threads) else 1)
