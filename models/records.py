"""Records: collections, documents and hits as the engine passes them around."""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Literal, NamedTuple, NewType

import numpy as np
from numpy.typing import NDArray

DocId = NewType("DocId", str)
Seq = NewType("Seq", int)

# A metadata value: PROTOCOL.md allows str | int | float | bool | list of str, nothing else.
MetaValue = str | int | float | bool | list[str]
Metadata = dict[str, MetaValue]
Vector = NDArray[np.float32]

# The embedding model's output width; the default `dim` of a new collection.
MODEL_DIM = 384

# The largest float32: a score or distance beyond it (or NaN) is never sent (see `wire_number`).
FLOAT32_MAX = float(np.finfo(np.float32).max)


def wire_number(value: float | None, worst: float) -> float | None:
    """`value` if finite (or None: a hit without that number); +/-inf clamped to +/-FLOAT32_MAX,
    NaN replaced by `worst`.

    Validation keeps vectors small enough that scores stay finite; this is the last guard, at
    the one place hits become wire maps, so that no encoder (JSON refuses NaN, msgpack and SSE
    would pass it on) ever meets a non-finite score from data stored before that validation.
    """
    if value is None or -FLOAT32_MAX <= value <= FLOAT32_MAX:
        return value
    if value > 0:
        return FLOAT32_MAX
    if value < 0:
        return -FLOAT32_MAX
    return worst  # NaN


class Metric(enum.StrEnum):
    """Similarity measure of a collection. `score` is always 'higher is better'."""

    COSINE = "cosine"
    L2 = "l2"
    IP = "ip"
    L1 = "l1"  # Manhattan: score = -distance, distance = sum of absolute differences


class Include(enum.StrEnum):
    TEXT = "text"
    METADATA = "metadata"
    VECTOR = "vector"


DEFAULT_INCLUDE: frozenset[Include] = frozenset({Include.TEXT, Include.METADATA})


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    """A collection's shape. `index` is its index kind and parameters as the wire shows them
    (`{"kind": "hnsw", "m": 16, ...}`; see `models/index_spec.py`); None: the default."""

    name: str
    dim: int
    metric: Metric
    count: int = 0
    index: dict[str, object] | None = None

    def to_wire(self) -> dict[str, object]:
        out: dict[str, object] = {"name": self.name, "dim": self.dim, "metric": self.metric.value, "count": self.count}
        if self.index is not None:
            out["index"] = dict(self.index)
        return out


@dataclass(frozen=True, slots=True)
class Document:
    """A validated document. `vector` is None until the embedder fills it in (text-only docs)."""

    id: DocId
    text: str | None
    vector: Vector | None
    metadata: Metadata = field(default_factory=dict)


@dataclass(frozen=True, slots=True)
class StoredDoc:
    """A document as committed: it has a vector and the seq of the change that wrote it."""

    id: DocId
    text: str | None
    vector: Vector
    metadata: Metadata
    seq: Seq


class SideScores(NamedTuple):
    """A keyword or hybrid hit's score on each side (None: that side did not return it)."""

    vector: float | None
    keyword: float | None

    def to_wire(self) -> dict[str, float | None]:
        top = FLOAT32_MAX
        return {"vector": wire_number(self.vector, -top), "keyword": wire_number(self.keyword, -top)}


class Hit(NamedTuple):
    """One search result. A named tuple rather than a frozen dataclass: a query builds k of
    them, and a tuple is built several times faster (it showed in the query profile)."""

    id: DocId
    score: float
    distance: float | None  # None on keyword and hybrid hits
    text: str | None = None
    metadata: Metadata | None = None
    vector: Vector | None = None
    scores: SideScores | None = None  # set on keyword and hybrid hits

    @staticmethod
    def many_to_wire(hits: list[Hit], include: frozenset[Include], compact_vectors: bool) -> list[dict[str, object]]:
        """The Hit maps of a result list. Ids and scores only (the common case) are built in one
        comprehension: a query answers k of them, and per-hit calls showed in the loop's profile."""
        if not include and (not hits or hits[0].scores is None):
            top = FLOAT32_MAX
            # `wire_number` inline for finite numbers (every one, but for data stored before
            # validation bounded them): two calls per hit showed beside the packing itself.
            return [
                {
                    "id": h.id,
                    "score": h.score if -top <= h.score <= top else wire_number(h.score, -top),
                    "distance": d if d is None or -top <= d <= top else wire_number(d, top),
                }
                for h in hits
                for d in (h.distance,)
            ]
        return [h.to_wire(include, compact_vectors) for h in hits]

    def to_wire(self, include: frozenset[Include], compact_vectors: bool) -> dict[str, object]:
        """The Hit map of PROTOCOL.md; vectors as little-endian float32 bytes when compact.
        A non-finite score or distance is clamped (see `wire_number`): NaN reads as the worst."""
        out: dict[str, object] = {
            "id": self.id,
            "score": wire_number(self.score, -FLOAT32_MAX),
            "distance": wire_number(self.distance, FLOAT32_MAX),
        }
        if self.scores is not None:
            out["scores"] = self.scores.to_wire()
        if Include.TEXT in include and self.text is not None:
            out["text"] = self.text
        if Include.METADATA in include and self.metadata is not None:
            out["metadata"] = self.metadata
        if Include.VECTOR in include and self.vector is not None:
            vec = self.vector.astype("<f4", copy=False)
            out["vector"] = vec.tobytes() if compact_vectors else vec.tolist()
        return out


ChangeOp = Literal["upsert", "delete"]


@dataclass(frozen=True, slots=True)
class Change:
    """One entry of a collection's durable change log.

    An upsert carries the full document as it was at `seq`; a delete carries only `doc_id`
    (text, vector and metadata are None).
    """

    seq: Seq
    op: ChangeOp
    doc_id: DocId
    text: str | None
    vector: Vector | None
    metadata: Metadata | None
