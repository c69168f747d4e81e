"""An entry's fields -> the same typed request the WebSocket edge would build.

Fields (PROTOCOL.md, "Broker sources"): `op` (`upsert`, the default, or `delete`), `collection`
(else the source's default), `doc` (a Document as JSON text) for an upsert, `id` for a delete.
The entry becomes the op map a WebSocket client would send (`{"collection", "docs": [doc]}` or
`{"collection", "ids": [id]}`) and goes through `parse_request`: one validation for every edge.
Unknown fields are rejected, as unknown arguments are, so a misspelt field never passes silently.
A document's `vector` is a number array, or (as in `shoal import`'s JSON lines) a string holding
standard base64 of its little-endian float32 values, a third the size and much faster to parse.
"""

from __future__ import annotations

import base64
import binascii
from collections.abc import Mapping
from typing import Any

import orjson

from actors.sources.base import Entry, RawEntry
from models.config import Limits
from models.errors import BadRequest, ShoalError, TooLarge, UnknownOp, echo
from models.requests import Delete, Upsert, parse_request

FIELDS = frozenset({"op", "collection", "doc", "id"})
OPS = ("upsert", "delete")


def parse_entry(raw: RawEntry, default_collection: str | None, limits: Limits) -> Entry:
    """The entry parsed; never raises: a bad entry comes back with its `error` set."""
    size = sum(len(k) + len(v) for k, v in raw.fields.items())
    collection, doc_id = default_collection or "", ""
    try:
        if size > limits.max_frame_bytes:
            raise TooLarge(f"an entry is at most {limits.max_frame_bytes} bytes (this one has {size})")
        fields, doc = _decode(raw.fields)
        collection = fields.get("collection") or default_collection or ""
        request, doc_id = _request(fields, doc, collection, limits)
    except ShoalError as exc:
        return Entry(raw.id, collection, doc_id or _guess_id(raw.fields), None, exc, size)
    return Entry(raw.id, collection, doc_id, request, None, size)


def _decode(raw: Mapping[bytes, bytes]) -> tuple[dict[str, str], bytes | None]:
    """The text fields by name, and `doc` apart as bytes: orjson reads UTF-8 bytes directly
    (refusing what is not UTF-8), so a document's kilobytes are not decoded and copied first."""
    fields: dict[str, str] = {}
    doc: bytes | None = None
    for key, value in raw.items():
        try:
            name = key.decode("utf-8")
            if name == "doc":
                doc = value
            else:
                fields[name] = value.decode("utf-8")
        except UnicodeDecodeError:
            raise BadRequest(f"entry field {echo(key)} is not UTF-8 text") from None
        if name not in FIELDS:
            unknown = sorted({k.decode("utf-8", "replace") for k in raw} - FIELDS)
            raise BadRequest("unknown entry field(s): " + ", ".join(echo(name) for name in unknown[:5]))
    return fields, doc


def _request(
    fields: Mapping[str, str], doc_json: bytes | None, collection: str, limits: Limits
) -> tuple[Upsert | Delete, str]:
    op = fields.get("op") or "upsert"
    if op not in OPS:
        raise UnknownOp(f"entry op must be upsert or delete, not {echo(op)}")
    if not collection:
        raise BadRequest("the entry names no 'collection' and the source has no default collection")
    args: dict[str, Any] = {"collection": collection}
    if op == "delete":
        if doc_json is not None:
            raise BadRequest("a delete entry takes 'id', not 'doc'")
        given = fields.get("id")
        if given is None:
            raise BadRequest("a delete entry needs 'id'")
        args["ids"] = [given]
        doc_id = given
    else:
        if "id" in fields:
            raise BadRequest("an upsert entry takes the id inside 'doc', not as 'id'")
        if doc_json is None:
            raise BadRequest("an upsert entry needs 'doc' (a document as JSON text)")
        try:
            # orjson: a document with a 384-d vector parses several times faster than with json;
            # it refuses NaN / Infinity, deeper nesting than 1024 and lone surrogates outright.
            doc = orjson.loads(doc_json)
        except (ValueError, RecursionError) as exc:
            raise BadRequest(f"'doc' is not valid JSON in UTF-8 ({type(exc).__name__})") from None
        if isinstance(doc, dict) and isinstance(doc.get("vector"), str):
            doc["vector"] = _base64_vector(doc["vector"])
        args["docs"] = [doc]
        named = doc.get("id") if isinstance(doc, dict) else None
        doc_id = named if isinstance(named, str) else ""
    request = parse_request(op, args, limits)
    assert isinstance(request, Upsert | Delete)
    return request, doc_id


def _base64_vector(text: str) -> bytes:
    """A vector given as a string, as in `shoal import`'s lines: standard base64 of its
    little-endian float32 values, handed on as the bytes a msgpack `bin` vector would be."""
    try:
        return base64.b64decode(text, validate=True)
    except (binascii.Error, ValueError):
        raise BadRequest("a 'vector' string must be standard base64 of little-endian float32 values") from None


def _guess_id(raw: Mapping[bytes, bytes]) -> str:
    """The document id a rejected entry seems to name, for its completion event ("" if none)."""
    value = raw.get(b"id")
    if value is not None:
        return value[:256].decode("utf-8", "replace")
    return ""
