"""The arguments of every op as JSON Schema, and the OpenAPI 3.1 document built from them.

`op_args(limits)` is the one table of argument specs: for each op of `models.requests.PARSERS`,
each argument's schema (bounds taken from the same `Limits` the parser checks against), whether
it is required, and complete example requests. `openapi(limits)` renders the HTTP API from it.
Tests hold the table to the parser (tests/test_openapi.py): every op is here, every example
parses, every documented argument appears in an example (so the parser accepts it), an
undocumented argument is refused, and every argument name the parser reads is documented.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from models.config import Limits
from models.errors import ShoalError

Schema = dict[str, Any]
# Every wire error code (one ShoalError subclass each).
ERROR_CODES = frozenset({ShoalError.code} | {cls.code for cls in ShoalError.__subclasses__()})


@dataclass(frozen=True, slots=True)
class Arg:
    schema: Schema
    description: str
    required: bool = False


@dataclass(frozen=True, slots=True)
class Op:
    summary: str
    args: dict[str, Arg]
    examples: list[dict[str, Any]] = field(default_factory=list)
    result: Schema = field(default_factory=lambda: {"type": "object"})


NAME: Schema = {"type": "string", "pattern": "^[A-Za-z0-9_-]{1,64}$"}
METRIC: Schema = {"type": "string", "enum": ["cosine", "l2", "ip", "l1"], "default": "cosine"}
# create_collection's `index` (models/index_spec.py holds the rules per kind).
INDEX: Schema = {
    "type": "object",
    "required": ["kind"],
    "properties": {
        "kind": {"type": "string", "enum": ["hnsw", "flat", "ivf", "lsh"], "default": "hnsw"},
        "m": {"type": "integer", "minimum": 2, "maximum": 1_000, "description": "hnsw: links per node"},
        "ef_construction": {"type": "integer", "minimum": 1, "description": "hnsw: build breadth"},
        "nlist": {"type": "integer", "minimum": 1, "maximum": 65_536, "description": "ivf: lists (default: from size)"},
        "nbits": {"type": "integer", "minimum": 8, "maximum": 4_096, "multipleOf": 8, "description": "lsh: bits"},
        "candidates": {"type": "integer", "minimum": 1, "maximum": 10_000, "description": "lsh: re-ranked"},
        "quantization": {"type": "string", "enum": ["int8", "f16"], "description": "hnsw, ivf: vector codes"},
    },
    "additionalProperties": False,
}
FILTER: Schema = {
    "type": "object",
    "description": 'Chroma-compatible: {"field": value}, {"field": {"$eq|$ne|$gt|$gte|$lt|$lte": value}}, '
    '{"field": {"$in|$nin": [..]}}, {"$and": [..]}, {"$or": [..]}. {} means no filter.',
}
TEXT_FILTER: Schema = {
    "type": "object",
    "description": '{"$contains": str} or {"$not_contains": str}: a case-sensitive substring test.',
    "maxProperties": 1,
}
INCLUDE: Schema = {
    "type": "array",
    "items": {"type": "string", "enum": ["text", "metadata", "vector"]},
    "maxItems": 16,
    "default": ["text", "metadata"],
}
METADATA_VALUE: Schema = {
    "oneOf": [
        {"type": "string"},
        {"type": "integer"},
        {"type": "number"},
        {"type": "boolean"},
        {"type": "array", "items": {"type": "string"}},
    ]
}


def _vector(limits: Limits) -> Schema:
    return {
        "type": "array",
        "items": {"type": "number"},
        "minItems": 1,
        "maxItems": limits.max_dim,
        "description": "JSON: an array of numbers. msgpack: also `bin` holding little-endian float32.",
    }


def _document(limits: Limits) -> Schema:
    return {
        "type": "object",
        "required": ["id"],
        "additionalProperties": False,
        "properties": {
            "id": {"type": "string", "minLength": 1, "maxLength": limits.max_id_chars},
            "text": {"type": "string", "maxLength": limits.max_text_chars},
            "vector": _vector(limits),
            "metadata": {
                "type": "object",
                "maxProperties": limits.max_metadata_keys,
                "additionalProperties": METADATA_VALUE,
            },
        },
        "description": "At least one of text or vector; with only text the server embeds it.",
    }


def _ids(limits: Limits) -> Schema:
    item = {"type": "string", "minLength": 1, "maxLength": limits.max_id_chars}
    return {"type": "array", "items": item, "maxItems": limits.max_ids}


def op_args(limits: Limits) -> dict[str, Op]:
    """Every op's arguments, bounded by `limits`."""
    collection = Arg(NAME, "the collection", required=True)
    where = Arg(FILTER, "metadata filter")
    where_text = Arg(TEXT_FILTER, "text filter")
    include = Arg(INCLUDE, "fields of each document or hit to return")
    min_seq = Arg({"type": "integer", "minimum": 0}, "answer once this node has applied the collection to this seq")
    vector = Arg(_vector(limits), "the query vector (or give text)")
    text = Arg({"type": "string", "minLength": 1, "maxLength": limits.max_text_chars}, "query text, embedded")
    like = Arg(
        {"type": "string", "minLength": 1, "maxLength": limits.max_id_chars},
        "query by example: a stored document's id; its vector is the query and it is left out of the hits",
    )
    v4 = [0.1, 0.2, 0.3, 0.4]
    docs: Schema = {"type": "array", "items": _document(limits)}
    collection_info = {
        "type": "object",
        "properties": {
            "name": NAME,
            "dim": {"type": "integer"},
            "metric": METRIC,
            "count": {"type": "integer"},
            "index": INDEX,
        },
    }
    query = Op(
        "the k best hits for a vector or a text",
        {
            "collection": collection,
            "vector": vector,
            "text": text,
            "like": like,
            "k": Arg({"type": "integer", "minimum": 1, "maximum": limits.max_k, "default": 10}, "hits wanted"),
            "where": where,
            "where_text": where_text,
            "include": include,
            "ef": Arg({"type": "integer", "minimum": 1, "maximum": limits.max_ef}, "hnsw kind: search breadth"),
            "nprobe": Arg({"type": "integer", "minimum": 1, "maximum": 65_536}, "ivf kind: lists searched"),
            "mode": Arg(
                {"type": "string", "enum": ["vector", "keyword", "hybrid"], "default": "vector"}, "search mode"
            ),
            "fusion": Arg({"type": "string", "enum": ["rrf", "weighted"], "default": "rrf"}, "hybrid fusion"),
            "alpha": Arg(
                {"type": "number", "minimum": 0, "maximum": 1, "default": 0.5}, "hybrid, weighted: vector weight"
            ),
            "rrf_k": Arg({"type": "integer", "minimum": 0, "maximum": 1_000_000, "default": 60}, "hybrid, rrf: k"),
            "vector_candidates": Arg(
                {"type": "integer", "minimum": 1, "maximum": limits.max_k}, "hybrid: vector-side depth (>= k)"
            ),
            "keyword_candidates": Arg(
                {"type": "integer", "minimum": 1, "maximum": limits.max_k}, "hybrid: keyword-side depth (>= k)"
            ),
            "min_seq": min_seq,
        },
        [
            {"collection": "c", "text": "hello", "k": 5, "where": {"lang": "en"}, "include": ["text"]},
            {"collection": "c", "vector": v4, "ef": 100, "where_text": {"$contains": "h"}, "mode": "vector"},
            {"collection": "big", "vector": v4, "nprobe": 32},
            {"collection": "c", "text": "hello", "mode": "hybrid", "fusion": "weighted", "alpha": 0.3},
            {
                "collection": "c",
                "text": "hello",
                "mode": "hybrid",
                "rrf_k": 10,
                "vector_candidates": 20,
                "keyword_candidates": 30,
            },
            {"collection": "c", "text": "hello", "mode": "keyword", "k": 3, "min_seq": 5},
            {"collection": "c", "like": "doc-1", "k": 5, "where": {"lang": "en"}},
        ],
        {
            "type": "object",
            "properties": {"hits": {"type": "array", "items": {"type": "object"}}, "took_ms": {"type": "number"}},
        },
    )
    return {
        "ping": Op("liveness of the connection", {}, [{}]),
        "auth": Op(
            "authenticate a WebSocket connection (first request)",
            {"key": Arg({"type": "string"}, "API key", required=True)},
            [{"key": "secret"}],
        ),
        "create_collection": Op(
            "create a collection",
            {
                "name": Arg(NAME, "collection name", required=True),
                "dim": Arg({"type": "integer", "minimum": 1, "maximum": limits.max_dim}, "vector width (default 384)"),
                "metric": Arg(METRIC, "distance metric"),
                "if_not_exists": Arg({"type": "boolean", "default": False}, "return an existing one instead of exists"),
                "index": Arg(INDEX, "index kind and parameters (default hnsw; flat under l1)"),
            },
            [
                {"name": "docs"},
                {"name": "vecs", "dim": 4, "metric": "l2", "if_not_exists": True},
                {"name": "big", "dim": 4, "index": {"kind": "ivf", "quantization": "int8"}},
            ],
            {"type": "object", "properties": {"collection": collection_info}},
        ),
        "list_collections": Op(
            "list collections",
            {},
            [{}],
            {"type": "object", "properties": {"collections": {"type": "array", "items": collection_info}}},
        ),
        "drop_collection": Op(
            "drop a collection", {"name": Arg(NAME, "collection name", required=True)}, [{"name": "c"}]
        ),
        "upsert": Op(
            "insert or replace documents by id; answered once durable and visible",
            {
                "collection": collection,
                "docs": Arg(
                    {"type": "array", "items": _document(limits), "minItems": 1, "maxItems": limits.max_batch_docs},
                    "documents",
                    required=True,
                ),
            },
            [
                {
                    "collection": "c",
                    "docs": [{"id": "a", "text": "hello", "metadata": {"lang": "en"}}, {"id": "b", "vector": v4}],
                }
            ],
            {"type": "object", "properties": {"count": {"type": "integer"}, "seq": {"type": "integer"}}},
        ),
        "delete": Op(
            "delete documents by ids or by filter",
            {
                "collection": collection,
                "ids": Arg(_ids(limits), "ids to delete"),
                "where": where,
                "where_text": where_text,
            },
            [
                {"collection": "c", "ids": ["a"]},
                {"collection": "c", "where": {"lang": "en"}, "where_text": {"$contains": "x"}},
            ],
            {"type": "object", "properties": {"deleted": {"type": "integer"}, "seq": {"type": "integer"}}},
        ),
        "get": Op(
            "documents by ids, or else pages of every document passing the filters, in id order",
            {
                "collection": collection,
                "ids": Arg(_ids(limits), "ids to fetch (missing ids are left out)"),
                "include": include,
                "where": where,
                "where_text": where_text,
                "limit": Arg(
                    {"type": "integer", "minimum": 1, "maximum": limits.max_ids, "default": 100},
                    "documents per page (without ids)",
                ),
                "cursor": Arg({"type": "string"}, "next_cursor of the previous page (without ids)"),
                "min_seq": min_seq,
            },
            [
                {"collection": "c", "ids": ["a", "b"], "include": ["text"]},
                {"collection": "c", "where": {"lang": "en"}, "where_text": {"$contains": "h"}, "limit": 50},
                {"collection": "c", "cursor": "AWE", "include": ["vector"], "min_seq": 7},
            ],
            {
                "type": "object",
                "properties": {
                    "docs": docs,
                    "next_cursor": {
                        "type": ["string", "null"],
                        "description": "paged form only; null on the last page",
                    },
                },
            },
        ),
        "count": Op(
            "number of documents",
            {"collection": collection, "min_seq": min_seq},
            [{"collection": "c"}, {"collection": "c", "min_seq": 12}],
            {"type": "object", "properties": {"count": {"type": "integer"}}},
        ),
        "query": query,
        "query_batch": Op(
            "several queries of one collection in one request; each answered (or failed) on its own",
            {
                "collection": collection,
                "queries": Arg(
                    {
                        "type": "array",
                        "minItems": 1,
                        "maxItems": limits.max_query_batch,
                        "items": args_schema(query, frozenset({"collection"})),
                    },
                    "the queries: each the arguments of `query` without `collection`",
                    required=True,
                ),
            },
            [
                {"collection": "c", "queries": [{"vector": v4, "k": 5}, {"vector": v4, "ef": 100}]},
                {"collection": "c", "queries": [{"text": "hello", "mode": "hybrid"}, {"like": "doc-1"}]},
            ],
            {
                "type": "object",
                "properties": {
                    "results": {
                        "type": "array",
                        "description": "one per query, in order: {hits, cached} or {error: {code, message}}",
                        "items": {"type": "object"},
                    },
                    "took_ms": {"type": "number"},
                },
            },
        ),
        "subscribe": Op(
            "a standing query: pushes every later match and leave, or with k a live top-k list "
            "(WebSocket; SSE: GET .../subscribe)",
            {
                "collection": collection,
                "vector": vector,
                "text": text,
                "like": like,
                "threshold": Arg({"type": "number"}, "minimum score of a match (required unless k is given)"),
                "k": Arg({"type": "integer", "minimum": 1, "maximum": 100}, "a live top-k list of this many hits"),
                "where": where,
                "where_text": where_text,
                "include": include,
                "after_seq": Arg({"type": "integer", "minimum": 0}, "replay matches of changes after this seq"),
            },
            [
                {"collection": "c", "text": "hello", "threshold": 0.5, "where": {"a": 1}, "include": ["text"]},
                {"collection": "c", "vector": v4, "threshold": 0.1, "where_text": {"$contains": "x"}, "after_seq": 3},
                {"collection": "c", "like": "doc-1", "threshold": 0.8},
                {"collection": "c", "text": "hello", "k": 10, "where": {"a": 1}},
            ],
            {"type": "object", "properties": {"sub": {"type": "string"}}},
        ),
        "unsubscribe": Op(
            "end a subscription",
            {"sub": Arg({"type": "string", "maxLength": 64}, "subscription id", required=True)},
            [{"sub": "s1"}],
        ),
    }


def args_schema(op: Op, without: frozenset[str] = frozenset()) -> Schema:
    """The JSON Schema of an op's argument map (leaving out arguments taken from the path)."""
    properties = {
        name: {**arg.schema, "description": arg.description} for name, arg in op.args.items() if name not in without
    }
    required = [name for name, arg in op.args.items() if arg.required and name not in without]
    schema: Schema = {"type": "object", "properties": properties, "additionalProperties": False}
    if required:
        schema["required"] = required
    return schema


ERROR: Schema = {
    "type": "object",
    "required": ["error"],
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "properties": {"code": {"type": "string", "enum": sorted(ERROR_CODES)}, "message": {"type": "string"}},
        }
    },
}
_ERROR_RESPONSE = {
    "description": "error",
    "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
}
# HTTP routes of ops (server/app.py): path, method, op, and the argument taken from the path.
HTTP_OPS: list[tuple[str, str, str, str | None]] = [
    ("/v1/collections", "post", "create_collection", None),
    ("/v1/collections", "get", "list_collections", None),
    ("/v1/collections/{name}", "delete", "drop_collection", "name"),
    *[
        (f"/v1/collections/{{name}}/{op}", "post", op, "collection")
        for op in ("upsert", "delete", "get", "query", "query_batch", "count")
    ],
]
_SSE_PARAMS = [
    ("text", "query text"),
    ("vector", "comma-separated floats"),
    ("like", "a stored document's id (query by example)"),
    ("threshold", "minimum score"),
    ("k", "a live top-k list of this many hits (1..100)"),
    ("where", "filter as JSON"),
    ("where_text", "text filter as JSON"),
    ("include", "comma-separated fields"),
    ("last_event_id", "resume after this seq (or the Last-Event-ID header)"),
]


def _operation(op_name: str, op: Op, path_arg: str | None) -> Schema:
    operation: Schema = {
        "operationId": op_name,
        "summary": op.summary,
        "responses": {
            "200": {"description": "result", "content": {"application/json": {"schema": op.result}}},
            "default": _ERROR_RESPONSE,
        },
    }
    if path_arg is not None:
        operation["parameters"] = [{"name": "name", "in": "path", "required": True, "schema": NAME}]
    body = args_schema(op, frozenset({path_arg}) if path_arg else frozenset())
    if body["properties"]:
        examples = {
            f"example{i + 1}": {"value": {k: v for k, v in ex.items() if k != path_arg}}
            for i, ex in enumerate(op.examples)
        }
        content = {"schema": body, "examples": examples}
        operation["requestBody"] = {
            "required": bool(body.get("required")),
            "content": {"application/json": content, "application/msgpack": {"schema": body}},
        }
    return operation


def openapi(limits: Limits, version: str = "1") -> Schema:
    """The OpenAPI 3.1 document of the HTTP API under `limits`."""
    ops = op_args(limits)
    paths: dict[str, Schema] = {}
    for path, method, op_name, path_arg in HTTP_OPS:
        paths.setdefault(path, {})[method] = _operation(op_name, ops[op_name], path_arg)
    for stream, what in (("subscribe", "matches of a standing query"), ("changes", "every applied change")):
        params: list[Schema] = [{"name": "name", "in": "path", "required": True, "schema": NAME}]
        if stream == "subscribe":
            params += [
                {"name": n, "in": "query", "schema": {"type": "string"}, "description": d} for n, d in _SSE_PARAMS
            ]
        else:
            params.append({"name": "last_event_id", "in": "query", "schema": {"type": "string"}})
        paths[f"/v1/collections/{{name}}/{stream}"] = {
            "get": {
                "operationId": f"sse_{stream}",
                "summary": f"Server-Sent Events: {what} (see docs/asyncapi.yaml)",
                "parameters": params,
                "responses": {
                    "200": {
                        "description": "event stream",
                        "content": {"text/event-stream": {"schema": {"type": "string"}}},
                    },
                    "default": _ERROR_RESPONSE,
                },
            }
        }
    plain = {"description": "ok", "content": {"text/plain": {"schema": {"type": "string"}}}}
    paths["/healthz"] = {"get": {"operationId": "healthz", "summary": "process up", "responses": {"200": plain}}}
    paths["/readyz"] = {
        "get": {
            "operationId": "readyz",
            "summary": "PostgreSQL reachable, shards loaded",
            "responses": {"200": plain, "default": _ERROR_RESPONSE},
        }
    }
    paths["/metrics"] = {
        "get": {"operationId": "metrics", "summary": "Prometheus text format", "responses": {"200": plain}}
    }
    paths["/openapi.json"] = {
        "get": {
            "operationId": "openapi",
            "summary": "this document",
            "responses": {
                "200": {"description": "OpenAPI 3.1", "content": {"application/json": {"schema": {"type": "object"}}}}
            },
        }
    }
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "Shoal",
            "version": version,
            "description": "Real-time semantic search. The same ops run over the WebSocket /v1/ws (msgpack; "
            "see docs/asyncapi.yaml) with the arguments shown here.",
        },
        "servers": [{"url": "/"}],
        "paths": paths,
        "components": {"schemas": {"Error": ERROR}},
    }
