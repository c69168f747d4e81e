"""Index kinds behind one interface (`base.VectorIndex`): `make_index` builds the one a
collection's `IndexSpec` names."""

from __future__ import annotations

from actors.indexes.base import VectorIndex, VectorStore
from actors.indexes.flat import FlatIndex
from actors.indexes.hnsw import HnswIndex
from actors.indexes.hnsw_sq import HnswSqIndex
from actors.indexes.ivf import IvfIndex
from actors.indexes.lsh import LshIndex
from models.config import EngineConfig
from models.index_spec import IndexSpec
from models.records import Metric


def make_index(spec: IndexSpec, dim: int, metric: Metric, config: EngineConfig, store: VectorStore) -> VectorIndex:
    """A new, empty index of `spec`'s kind over `store`'s labels."""
    if spec.kind == "hnsw":
        cls: type[VectorIndex] = HnswIndex if spec.quantization is None else HnswSqIndex
    elif spec.kind == "flat":
        cls = FlatIndex
    elif spec.kind == "ivf":
        cls = IvfIndex
    elif spec.kind == "lsh":
        cls = LshIndex
    else:
        raise ValueError(f"unknown index kind {spec.kind!r}")
    return cls(dim, metric, spec, config, store)


def needs_mapped_vectors(spec: IndexSpec) -> bool:
    """Quantised indexes hold codes only: the shard's full vectors then live in a mapped file."""
    return spec.quantization is not None
