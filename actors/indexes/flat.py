"""Kind `flat`: no index; every query is an exact search over the shard's vectors."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from actors import exact
from actors.indexes.base import F32, Found, Labels, Mask, QueryParams, VectorIndex


class FlatIndex(VectorIndex):
    kind = "flat"
    exact = True

    def add(self, labels: Labels, vectors: F32) -> None:
        pass  # the store holds the vectors

    def remove(self, labels: Labels) -> None:
        pass  # the store's live flags say it

    def search(self, queries: F32, k: int, allowed: Mask | None, params: QueryParams, threads: int) -> Found | None:
        store = self.store
        mask = allowed if allowed is not None else store.live
        n = int(mask.shape[0])
        tops = exact.search(store.vectors[:n], store.norms[:n], queries, k, self.metric, mask=mask)
        if any(len(t) < k for t in tops):
            return None
        labels = np.stack([t.labels for t in tops])
        return Found(labels, np.stack([t.scores for t in tops]), np.stack([t.distances for t in tops]))

    def save(self, directory: Path) -> list[str]:
        return []

    def load(self, directory: Path, high: int) -> None:
        pass

    def memory_bytes(self) -> int:
        return 0
