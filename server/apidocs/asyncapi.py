"""The AsyncAPI 3 document of the WebSocket protocol and the SSE streams, built from the same
op table as /openapi.json (`models.op_schema`). It is kept in the repository as
docs/asyncapi.json; a test fails when that file differs from what this module builds.

Regenerate it with `python -m server.apidocs.asyncapi > docs/asyncapi.json`.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from models.config import Limits
from models.op_schema import ERROR, NAME, Schema, args_schema, op_args

MSGPACK = "application/msgpack"
REQUEST_ID: Schema = {"type": "integer", "minimum": 0, "description": "echoed in the reply"}


def _message(name: str, summary: str, payload: Schema, content_type: str = MSGPACK) -> Schema:
    message: Schema = {"name": name, "summary": summary, "contentType": content_type, "payload": payload}
    if "id" in payload.get("properties", {}):
        message["correlationId"] = {"location": "$message.payload#/id"}
    return message


def _with(base: Schema, **extra: Schema) -> Schema:
    properties = {**extra, **base.get("properties", {})}
    required = [*extra, *base.get("required", [])]
    return {**base, "properties": properties, "required": required}


def asyncapi(limits: Limits | None = None) -> dict[str, Any]:
    """The AsyncAPI 3.0 document (default limits)."""
    ops = op_args(limits or Limits())
    messages: dict[str, Schema] = {}
    operations: dict[str, Schema] = {}
    error_reply = {
        "type": "object",
        "required": ["id", "ok", "error"],
        "properties": {"id": {"type": ["integer", "null"]}, "ok": {"const": False}, **ERROR["properties"]},
    }
    messages["error"] = _message("error", "a refused request (id null for a frame that is no request)", error_reply)
    ws = "#/channels/ws/messages/"
    for op_name, op in ops.items():
        request = _with(args_schema(op), id=REQUEST_ID, op={"const": op_name})
        messages[f"{op_name}_request"] = _message(f"{op_name}_request", op.summary, request)
        reply = _with(op.result, id=REQUEST_ID, ok={"const": True})
        messages[f"{op_name}_reply"] = _message(f"{op_name}_reply", f"result of {op_name}", reply)
        operations[op_name] = {
            "action": "send",
            "summary": op.summary,
            "channel": {"$ref": "#/channels/ws"},
            "messages": [{"$ref": f"{ws}{op_name}_request"}],
            "reply": {
                # The reply comes back on the same connection, matched to its request by `id`.
                "address": {
                    "description": "the same connection; `id` pairs the reply",
                    "location": "$message.payload#/id",
                },
                "channel": {"$ref": "#/channels/ws"},
                "messages": [{"$ref": f"{ws}{op_name}_reply"}, {"$ref": f"{ws}error"}],
            },
        }
    sub: Schema = {"type": "string"}
    pushes = {
        "match": {"sub": sub, "seq": {"type": "integer"}, "op": {"const": "upsert"}, "hit": {"type": "object"}},
        "leave": {"sub": sub, "seq": {"type": "integer"}, "id": {"type": "string"}},
        "topk": {"sub": sub, "seq": {"type": "integer"}, "hits": {"type": "array", "items": {"type": "object"}}},
        "lagged": {"sub": sub, "dropped": {"type": "integer", "minimum": 1}},
        "ended": {"sub": sub, "code": {"type": "string"}, "reason": {"type": "string"}},
    }
    for event, fields in pushes.items():
        payload = {
            "type": "object",
            "required": ["event", *fields],
            "properties": {"event": {"const": event}, **fields},
        }
        messages[f"push_{event}"] = _message(f"push_{event}", f"server push: {event}", payload)
    operations["pushes"] = {
        "action": "receive",
        "summary": "subscription pushes (no id)",
        "channel": {"$ref": "#/channels/ws"},
        "messages": [{"$ref": f"{ws}push_{event}"} for event in pushes],
    }
    sse_data = {"type": "object", "description": "the `data:` line, JSON; `id:` carries the seq"}
    sse_messages = {
        "subscribe": {
            "match": "a match",
            "leave": "a document that matched no longer does (deleted or re-upserted)",
            "topk": "a top-k subscription's whole current list (with `k`)",
            "lagged": "matches were dropped: reconnect with Last-Event-ID (top-k: the newest list follows)",
            "error": "the stream ends",
        },
        "changes": {
            "upsert": "an applied upsert",
            "delete": "an applied delete",
            "lagged": "changes were dropped",
            "error": "the stream ends",
        },
    }
    channels: dict[str, Schema] = {
        "ws": {
            "address": "/v1/ws",
            "title": "WebSocket, subprotocol shoal.v1: one msgpack map per binary frame",
            "servers": [{"$ref": "#/servers/ws"}],
            "messages": {name: {"$ref": f"#/components/messages/{name}"} for name in messages},
        }
    }
    for stream, events in sse_messages.items():
        channel_messages = {
            event: _message(event, what, sse_data, "text/event-stream") for event, what in events.items()
        }
        channels[f"sse_{stream}"] = {
            "address": f"/v1/collections/{{name}}/{stream}",
            "title": f"Server-Sent Events: GET /v1/collections/{{name}}/{stream}",
            "servers": [{"$ref": "#/servers/http"}],
            "parameters": {"name": {"description": f"the collection ({NAME['pattern']})"}},
            "messages": channel_messages,
        }
        operations[f"sse_{stream}"] = {
            "action": "receive",
            "summary": f"the events of GET .../{stream}; reconnect with Last-Event-ID to resume",
            "channel": {"$ref": f"#/channels/sse_{stream}"},
            "messages": [{"$ref": f"#/channels/sse_{stream}/messages/{event}"} for event in events],
        }
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "Shoal",
            "version": "1",
            "description": "The WebSocket protocol (/v1/ws) and the SSE streams; the HTTP API is /openapi.json.",
        },
        "servers": {
            "ws": {"host": "127.0.0.1:8080", "protocol": "ws", "pathname": "/v1/ws"},
            "http": {"host": "127.0.0.1:8080", "protocol": "http"},
        },
        "defaultContentType": MSGPACK,
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }


def render() -> str:
    """docs/asyncapi.json as it should read."""
    return json.dumps(asyncapi(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":
    sys.stdout.write(render())
