"""Encoding between Shoal's records and PostgreSQL rows: vectors, metadata, result rows.

The `vector` codec is registered on every pooled connection (see `Persistence`): pgvector's
binary format in and out, numpy float32 arrays on our side.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Sequence
from typing import Any

import numpy as np

from models.index_spec import IndexSpec, default_spec, spec_from_wire
from models.records import Change, CollectionInfo, DocId, Document, Metric, Seq, StoredDoc, Vector

_VEC_HEADER = struct.Struct(">HH")


def encode_vector(value: Any) -> bytes:
    """pgvector's binary format: big-endian uint16 dim, uint16 0, dim big-endian float32.

    Bytes pass through unchanged: they are vectors encoded ahead of time (outside the row lock,
    and for array parameters, which asyncpg would otherwise descend into).
    """
    if isinstance(value, bytes | bytearray | memoryview):
        return bytes(value)
    arr = np.asarray(value, dtype=">f4")
    if arr.ndim != 1:
        raise ValueError("a vector must be one-dimensional")
    return _VEC_HEADER.pack(arr.shape[0], 0) + arr.tobytes()


def decode_vector(data: bytes) -> Vector:
    """A native float32 numpy array from pgvector's binary format."""
    dim, _ = _VEC_HEADER.unpack_from(data)
    return np.frombuffer(data, dtype=">f4", count=dim, offset=4).astype(np.float32)


def encode_metadata(metadata: object) -> str:
    return json.dumps(metadata, separators=(",", ":"), ensure_ascii=False, allow_nan=False)


# Batches larger than this are encoded in a worker thread, so that a 10,000-document upsert does
# not stall the event loop for tens of milliseconds.
ENCODE_INLINE_MAX = 1000


def encode_batch(docs: Sequence[Document]) -> tuple[list[bytes], list[str], set[int]]:
    """Vectors in pgvector's binary format, metadata as JSON, and the set of vector widths."""
    vectors: list[bytes] = []
    widths: set[int] = set()
    for doc in docs:
        if doc.vector is None:
            raise ValueError(f"document {doc.id!r} has no vector")
        widths.add(int(doc.vector.shape[0]))
        vectors.append(encode_vector(doc.vector))
    return vectors, [encode_metadata(doc.metadata) for doc in docs], widths


def stored_spec(row: Any) -> IndexSpec | None:
    """A catalog row's index spec (column `index_spec`, JSON), or None: a row written before
    index kinds, or one this build cannot read (the metric's default index then)."""
    raw = row["index_spec"]
    if raw is None:
        return None
    try:
        return spec_from_wire(json.loads(raw))
    except ValueError:
        return None


def row_to_info(row: Any) -> CollectionInfo:
    spec = stored_spec(row) or default_spec(Metric(row["metric"]))
    return CollectionInfo(row["name"], row["dim"], Metric(row["metric"]), row["doc_count"], spec.to_wire())


def row_to_stored(row: Any) -> StoredDoc:
    return StoredDoc(
        DocId(row["id"]), row["text"], row["vector"], json.loads(row["metadata"]), Seq(row["seq"])
    )


def row_to_change(row: Any) -> Change:
    meta = row["metadata"]
    return Change(
        Seq(row["seq"]),
        row["op"],
        DocId(row["doc_id"]),
        row["text"],
        row["vector"],
        None if meta is None else json.loads(meta),
    )
