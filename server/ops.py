"""One dispatcher from typed requests to engine calls to wire results, shared by every transport.

`compact` chooses how vectors travel back: msgpack `bin` (WebSocket, msgpack HTTP) or number
arrays (JSON). `parse` is the edges' one way into `parse_request`.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from typing import Any

import anyio

from actors.subscriber import MatchEvent
from actors.supervisor import Engine
from models import requests as rq
from models.codec import MIN_FRAME_ITEMS, Frame, decode_frame, frame_items
from models.config import Limits
from models.cursor import encode_cursor
from models.errors import BadRequest, ShoalError
from models.records import CollectionInfo, DocId, Hit, Include, StoredDoc
from server.lifecycle import writes_in_flight

# Counted while served, so that a stopping server waits for their acks (server.lifecycle).
WRITES = (rq.Upsert, rq.Delete, rq.CreateCollection, rq.DropCollection)

# Worker threads that parse big requests at once: each holds the GIL for a slice at a time, so
# more of them would only slow the event loop further.
PARSE_THREADS = 2
_parse_limiter: anyio.CapacityLimiter | None = None


def _limiter() -> anyio.CapacityLimiter:
    global _parse_limiter
    if _parse_limiter is None:  # made on first use: it belongs to the running event loop
        _parse_limiter = anyio.CapacityLimiter(PARSE_THREADS)
    return _parse_limiter


async def decode(data: bytes, limits: Limits) -> Frame:
    """`decode_frame(data)`, in a worker thread for a frame of `limits.parse_in_thread_bytes` or
    more (unpacking a million-element array takes a while). Raises FrameError."""
    if len(data) < limits.parse_in_thread_bytes:
        # Under MIN_FRAME_ITEMS bytes no array or map can hold more items than that.
        return decode_frame(data) if len(data) < MIN_FRAME_ITEMS else decode_frame(data, frame_items(limits))
    return await anyio.to_thread.run_sync(decode_frame, data, frame_items(limits), limiter=_limiter())


async def parse(op: object, args: Mapping[str, Any], limits: Limits, size: int) -> rq.Request:
    """`parse_request(op, args, limits)`, in a worker thread when the request took at least
    `limits.parse_in_thread_bytes` bytes on the wire (a filter of thousands of values, a batch of
    thousands of documents), so that validating it does not stall every other connection.
    Raises what `parse_request` raises."""
    if size < limits.parse_in_thread_bytes:
        return rq.parse_request(op, args, limits)
    return await anyio.to_thread.run_sync(rq.parse_request, op, args, limits, limiter=_limiter())


def doc_to_wire(doc: StoredDoc, include: frozenset[Include], compact: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"id": doc.id}
    if Include.TEXT in include and doc.text is not None:
        out["text"] = doc.text
    if Include.METADATA in include:
        out["metadata"] = doc.metadata
    if Include.VECTOR in include:
        vec = doc.vector.astype("<f4", copy=False)
        out["vector"] = vec.tobytes() if compact else vec.tolist()
    return out


async def _page(engine: Engine, request: rq.Get, compact: bool) -> dict[str, Any]:
    """One page of a paged `get`: `{"docs", "next_cursor"}`. A page is also cut short before its
    estimated size passes the frame limit, so that it always fits in one frame; `next_cursor`
    then continues after its last document."""
    docs, more = await engine.scan(request)
    budget = engine.limits.max_frame_bytes - PAGE_HEADROOM_BYTES
    out: list[dict[str, Any]] = []
    for doc in docs:
        budget -= _wire_size(doc, request.include, compact)
        if budget < 0 and out:
            more = True
            break
        out.append(doc_to_wire(doc, request.include, compact))
    return {"docs": out, "next_cursor": encode_cursor(DocId(out[-1]["id"])) if more and out else None}


# Room left in a page's frame for the reply's own keys and framing.
PAGE_HEADROOM_BYTES = 4_096
# The most bytes one float32 takes as a JSON number (`-1.2345678901234567e-38,`).
JSON_FLOAT_BYTES = 25


def _wire_size(doc: StoredDoc, include: frozenset[Include], compact: bool) -> int:
    """An upper estimate of the bytes `doc_to_wire(doc, include, compact)` encodes to."""
    # A character takes at most 4 bytes in UTF-8 (msgpack), 6 as a JSON escape (`\u00e9`).
    per_char = 4 if compact else 6
    size = 64 + per_char * len(doc.id)
    if Include.TEXT in include and doc.text is not None:
        size += per_char * len(doc.text)
    if Include.METADATA in include:
        for key, value in doc.metadata.items():
            size += 16 + per_char * len(key)
            if isinstance(value, str):
                size += per_char * len(value)
            elif isinstance(value, list):
                size += sum(8 + per_char * len(item) for item in value)
            else:
                size += 32
    if Include.VECTOR in include:
        size += 8 + (4 if compact else JSON_FLOAT_BYTES) * int(doc.vector.shape[0])
    return size


def match_hit(event: MatchEvent, include: frozenset[Include], compact: bool) -> dict[str, Any]:
    """The Hit map of a subscription match: the same fields a query for that document returns."""
    doc = event.upserted.doc
    hit = Hit(doc.id, event.score, event.distance, doc.text, doc.metadata, doc.vector)
    return hit.to_wire(include, compact)


def _listed(engine: Engine, info: CollectionInfo) -> dict[str, Any]:
    """A collection's shape as listed: with the recall estimate of its index."""
    return {**info.to_wire(), "recall": engine.recall_stats(info.name).to_wire()}


async def execute(
    engine: Engine, request: rq.Request, *, compact: bool, visible: frozenset[str] | None = None
) -> dict[str, Any]:
    """Serve one request; raises ShoalError for anything the client got wrong. `visible`
    restricts which collections a listing shows (a key scoped to some collections)."""
    if isinstance(request, WRITES):
        with writes_in_flight(engine).track():
            return await _dispatch(engine, request, compact, visible)
    return await _dispatch(engine, request, compact, visible)


async def _dispatch(
    engine: Engine, request: rq.Request, compact: bool, visible: frozenset[str] | None
) -> dict[str, Any]:
    if isinstance(request, rq.Ping | rq.Auth):
        return {}
    if isinstance(request, rq.Query):
        started = time.perf_counter()
        hits, cached = await engine.query(request, visible)
        took_ms = (time.perf_counter() - started) * 1000.0
        return {
            "hits": Hit.many_to_wire(hits, request.include, compact),
            "took_ms": round(took_ms, 3),
            "cached": cached,
        }
    if isinstance(request, rq.QueryBatch):
        started = time.perf_counter()
        answers = await engine.query_batch(request, visible)
        results: list[dict[str, Any]] = []
        for query, answer in zip(request.queries, answers, strict=True):
            if isinstance(answer, ShoalError):
                results.append({"error": answer.to_wire()})
            else:
                results.append({"hits": Hit.many_to_wire(answer[0], query.include, compact), "cached": answer[1]})
        return {"results": results, "took_ms": round((time.perf_counter() - started) * 1000.0, 3)}
    if isinstance(request, rq.Upsert):
        count, seq = await engine.upsert(request)
        return {"count": count, "seq": seq}
    if isinstance(request, rq.Get):
        if request.ids is None:
            return await _page(engine, request, compact)
        docs = await engine.get(request)
        return {"docs": [doc_to_wire(doc, request.include, compact) for doc in docs]}
    if isinstance(request, rq.Count):
        return {"count": await engine.count(request)}
    if isinstance(request, rq.Delete):
        deleted, seq = await engine.delete(request)
        return {"deleted": deleted, "seq": seq}
    if isinstance(request, rq.CreateCollection):
        return {"collection": (await engine.create_collection(request)).to_wire()}
    if isinstance(request, rq.ListCollections):
        infos = await engine.list_collections()
        return {"collections": [_listed(engine, i) for i in infos if visible is None or i.name in visible]}
    if isinstance(request, rq.DropCollection):
        await engine.drop_collection(request)
        return {}
    raise BadRequest(f"op {type(request).__name__} is not served on this transport")
