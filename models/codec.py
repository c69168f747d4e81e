"""The sans-I/O WebSocket codec: one binary frame <-> one msgpack map.

`decode_frame` turns bytes into (request id, op, args) or raises `BadFrame` / `BadRequest`
with the id it could recover; `encode_*` build reply and push frames. Nothing here touches
a socket, so the whole protocol surface is testable with bytes alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

import msgpack

from models.errors import BadFrame, BadRequest, ShoalError, echo

RESERVED_KEYS = frozenset({"id", "op"})
MAX_REQUEST_ID = 2**64 - 1


@dataclass(frozen=True, slots=True)
class Frame:
    """A decoded request frame: its id, op name and the remaining arguments."""

    request_id: int
    op: object
    args: dict[str, Any]
    # Bytes the frame took on the wire: big requests are parsed off the event loop.
    size: int = field(default=0, compare=False)


class FrameError(ShoalError):
    """A frame that cannot be served; carries the id to answer with (None if unknown) and the
    error to answer, whose code and status it takes (so it is a ShoalError like any other)."""

    def __init__(self, request_id: int | None, error: ShoalError) -> None:
        super().__init__(error.message, **error.extra)
        self.code, self.http_status = error.code, error.http_status
        self.request_id = request_id
        self.error = error


def decode_frame(data: bytes) -> Frame:
    """Decode one binary frame. Raises FrameError (bad_frame or bad_request) with the request id
    when the frame was a map that carried a valid one; never any other exception."""
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise FrameError(None, BadFrame("frame is not valid msgpack")) from exc
    if not isinstance(obj, dict):
        raise FrameError(None, BadFrame("a frame must be one msgpack map"))
    request_id = obj.get("id")
    if (
        isinstance(request_id, bool)
        or not isinstance(request_id, int)
        or not 0 <= request_id <= MAX_REQUEST_ID
    ):
        raise FrameError(None, BadRequest("'id' must be an unsigned integer"))
    op = obj.get("op")
    if op is None:
        raise FrameError(request_id, BadRequest("'op' is required"))
    args = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    for key in args:
        if not isinstance(key, str):  # msgpack `bin` keys: argument names are strings
            raise FrameError(request_id, BadRequest(f"argument names must be strings, got {echo(key)}"))
    return Frame(request_id, op, args, len(data))


class _Packers(threading.local):
    """One `msgpack.Packer` per thread: `packb` builds a packer per call, which cost more than
    packing a query's reply (timeit); a packer is not safe to share between threads."""

    def __init__(self) -> None:
        self.packer = msgpack.Packer(use_bin_type=True)


_packers = _Packers()


def _pack(obj: dict[str, Any]) -> bytes:
    # The packer resets its buffer on an error too, so it stays usable after one.
    packed: bytes = _packers.packer.pack(obj)
    return packed


def encode_reply(request_id: int, result: dict[str, Any]) -> bytes:
    return _pack({"id": request_id, "ok": True, **result})


def encode_error(request_id: int | None, error: ShoalError) -> bytes:
    return _pack({"id": request_id, "ok": False, "error": error.to_wire()})


def encode_push(event: str, body: dict[str, Any]) -> bytes:
    return _pack({"event": event, **body})
