"""Typed results of the Shoal client: frozen, slotted dataclasses, built from reply maps.

Vectors always come back as `numpy.ndarray` of float32, whether the server sent the compact
`bin` form (WebSocket, msgpack) or a JSON array (HTTP, SSE).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

import numpy as np
from numpy.typing import NDArray

from shoal_client.codec import decode_vector
from shoal_client.errors import ProtocolError, ShoalError, error_from_wire

Vector: TypeAlias = NDArray[np.float32]
# A metadata value: str | int | float | bool | list of str (PROTOCOL.md).
Metadata: TypeAlias = dict[str, Any]


@dataclass(frozen=True, slots=True)
class CollectionInfo:
    name: str
    dim: int
    metric: str
    count: int = 0
    # The index kind and its parameters, e.g. {"kind": "ivf", "quantization": "int8"} (None:
    # a server that does not report it).
    index: dict[str, Any] | None = None
    # The server's recall estimate of the collection's index, as listed (None elsewhere).
    recall: Mapping[str, Any] | None = None


@dataclass(frozen=True, slots=True)
class Hit:
    """One search result. `score` is higher-is-better; `distance` follows the collection's metric
    (None on keyword and hybrid hits, which carry each side's score in `scores` instead)."""

    id: str
    score: float
    distance: float | None
    text: str | None = None
    metadata: Metadata | None = None
    vector: Vector | None = None
    scores: SideScores | None = None


@dataclass(frozen=True, slots=True)
class SideScores:
    """A keyword or hybrid hit's score on each side; None for a side that did not return it."""

    vector: float | None
    keyword: float | None


@dataclass(frozen=True, slots=True)
class QueryResult:
    hits: list[Hit]
    took_ms: float
    cached: bool = False  # answered from the server's results cache


@dataclass(frozen=True, slots=True)
class UpsertResult:
    """`seq` is the seq of the batch's last document (the batch took `count` consecutive seqs)."""

    count: int
    seq: int


@dataclass(frozen=True, slots=True)
class Page:
    """One page of a paged `get`: documents in id order (vectors as float32 numpy) and the cursor
    of the next page, None on the last."""

    docs: list[dict[str, Any]]
    next_cursor: str | None


@dataclass(frozen=True, slots=True)
class DeleteResult:
    deleted: int
    seq: int


@dataclass(frozen=True, slots=True)
class MatchEvent:
    """A document upserted after the subscription started whose score reached the threshold."""

    sub: str
    seq: int
    op: str
    hit: Hit


@dataclass(frozen=True, slots=True)
class LaggedEvent:
    """`dropped` matches were lost for a slow reader: by the server, or by this client's bounded queue."""

    sub: str
    dropped: int


@dataclass(frozen=True, slots=True)
class LeaveEvent:
    """A document that matched before change `seq` no longer does (deleted, or re-upserted out of
    the threshold or the filters): drop `id` from a live view."""

    sub: str
    seq: int
    id: str


@dataclass(frozen=True, slots=True)
class TopkEvent:
    """A top-k subscription's whole current list, best first, as a query would answer at `seq`."""

    sub: str
    seq: int
    hits: list[Hit]


SubscriptionEvent: TypeAlias = MatchEvent | LeaveEvent | TopkEvent | LaggedEvent


@dataclass(frozen=True, slots=True)
class SSEEvent:
    """One Server-Sent Event: `id` is the seq as sent (resume with it), `data` the parsed JSON."""

    id: str | None
    event: str
    data: dict[str, Any]

    @property
    def seq(self) -> int | None:
        """The event's seq as an integer, when the id is one."""
        try:
            return int(self.id) if self.id else None
        except ValueError:
            return None


# --- parsing reply maps -------------------------------------------------------------------------


def _field(body: Mapping[str, Any], name: str, kind: type | tuple[type, ...]) -> Any:
    value = body.get(name)
    # bool is an int subclass; a bool where a number is expected is a protocol error too.
    if not isinstance(value, kind) or (isinstance(value, bool) and bool not in _as_tuple(kind)):
        raise ProtocolError(f"reply field {name!r} missing or of the wrong type: {value!r}")
    return value


def _as_tuple(kind: type | tuple[type, ...]) -> tuple[type, ...]:
    return kind if isinstance(kind, tuple) else (kind,)


def parse_doc(body: Mapping[str, Any]) -> dict[str, Any]:
    """A document or hit map with its `vector` (bin or array) decoded to float32."""
    doc = dict(body)
    if doc.get("vector") is not None:
        doc["vector"] = decode_vector(doc["vector"])
    return doc


def parse_hit(body: Any) -> Hit:
    if not isinstance(body, Mapping):
        raise ProtocolError(f"hit is not a map: {body!r}")
    vector = body.get("vector")
    metadata = body.get("metadata")
    text = body.get("text")
    distance = body.get("distance")
    scores = body.get("scores")
    return Hit(
        id=_field(body, "id", str),
        score=float(_field(body, "score", (int, float))),
        distance=None if distance is None else float(_field(body, "distance", (int, float))),
        text=text if isinstance(text, str) else None,
        metadata=dict(metadata) if isinstance(metadata, Mapping) else None,
        vector=decode_vector(vector) if vector is not None else None,
        scores=_side_scores(scores) if isinstance(scores, Mapping) else None,
    )


def _side_scores(body: Mapping[str, Any]) -> SideScores:
    def side(name: str) -> float | None:
        value = body.get(name)
        return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None

    return SideScores(vector=side("vector"), keyword=side("keyword"))


def parse_collection(body: Any) -> CollectionInfo:
    if not isinstance(body, Mapping):
        raise ProtocolError(f"collection is not a map: {body!r}")
    count = body.get("count", 0)
    index = body.get("index")
    return CollectionInfo(
        name=_field(body, "name", str),
        dim=_field(body, "dim", int),
        metric=_field(body, "metric", str),
        count=count if isinstance(count, int) else 0,
        index=dict(index) if isinstance(index, Mapping) else None,
        recall=recall if isinstance(recall := body.get("recall"), Mapping) else None,
    )


def parse_query(body: Mapping[str, Any]) -> QueryResult:
    hits = _field(body, "hits", list)
    took = body.get("took_ms", 0.0)
    return QueryResult(
        hits=[parse_hit(h) for h in hits],
        took_ms=float(took) if isinstance(took, int | float) else 0.0,
        cached=body.get("cached") is True,
    )


def parse_query_batch(body: Mapping[str, Any]) -> list[QueryResult | ShoalError]:
    """Each query's result, or the error it alone met, in order; every result carries the
    batch's `took_ms`."""
    took = body.get("took_ms", 0.0)
    out: list[QueryResult | ShoalError] = []
    for item in _field(body, "results", list):
        if not isinstance(item, Mapping):
            raise ProtocolError(f"query_batch result is not a map: {item!r}")
        if "error" in item:
            out.append(error_from_wire(item["error"]))
        else:
            out.append(parse_query({**item, "took_ms": took}))
    return out


def parse_upsert(body: Mapping[str, Any]) -> UpsertResult:
    return UpsertResult(count=_field(body, "count", int), seq=_field(body, "seq", int))


def parse_delete(body: Mapping[str, Any]) -> DeleteResult:
    return DeleteResult(deleted=_field(body, "deleted", int), seq=_field(body, "seq", int))


def parse_push(msg: Mapping[str, Any]) -> SubscriptionEvent | None:
    """A subscription push as a typed event; None for an event kind this client does not know."""
    kind = msg.get("event")
    sub = _field(msg, "sub", str)
    if kind == "match":
        return MatchEvent(
            sub=sub,
            seq=_field(msg, "seq", int),
            op=str(msg.get("op", "upsert")),
            hit=parse_hit(msg.get("hit")),
        )
    if kind == "lagged":
        return LaggedEvent(sub=sub, dropped=_field(msg, "dropped", int))
    if kind == "leave":
        return LeaveEvent(sub=sub, seq=_field(msg, "seq", int), id=_field(msg, "id", str))
    if kind == "topk":
        hits = msg.get("hits")
        if not isinstance(hits, list):
            raise ProtocolError(f"topk push without a hits list: {msg!r}")
        return TopkEvent(sub=sub, seq=_field(msg, "seq", int), hits=[parse_hit(h) for h in hits])
    return None
