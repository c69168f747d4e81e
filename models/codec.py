"""The sans-I/O WebSocket codec: one binary frame <-> one msgpack map.

`decode_frame` turns bytes into (request id, op, args) or raises `BadFrame` / `BadRequest`
with the id it could recover; `encode_*` build reply and push frames. Nothing here touches
a socket, so the whole protocol surface is testable with bytes alone.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any, TypeGuard

import msgpack

from models.config import Limits
from models.errors import BadFrame, BadRequest, ShoalError, TooLarge, echo

RESERVED_KEYS = frozenset({"id", "op"})
MAX_REQUEST_ID = 2**64 - 1
# The most items any one array or map in a frame may hold (see `frame_items`), unless a limit
# allows more: unpacking builds every item holding the GIL, so a frame of a million small
# integers stalls the event loop while it is decoded, even in a worker thread (README, "Hostile
# input").
MIN_FRAME_ITEMS = 100_000


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


def unpack_bounded(data: bytes, max_items: int) -> Any:
    """`data` unpacked (strings as str, arrays as lists, map keys str or bytes only) with no
    array or map of more than `max_items` items: msgpack checks a container's length before it
    builds it. Raises TooLarge past the bound, and what msgpack raises for malformed input."""
    try:
        return msgpack.unpackb(
            data, raw=False, strict_map_key=True, use_list=True, max_array_len=max_items, max_map_len=max_items
        )
    except ValueError as exc:
        if "exceeds max_" in str(exc):
            raise TooLarge(f"an array or map holds at most {max_items} items") from exc
        raise


def decode_frame(data: bytes, max_items: int = MIN_FRAME_ITEMS) -> Frame:
    """Decode one binary frame. Raises FrameError (bad_frame or bad_request; too_large for an
    array or map of more than `max_items` items) with the request id when the frame was a map
    that carried a valid one; never any other exception."""
    try:
        obj = unpack_bounded(data, max_items)
    except TooLarge as exc:
        raise FrameError(_request_id_of(data), exc) from exc
    except Exception as exc:  # msgpack raises several unrelated types for malformed input
        raise FrameError(None, BadFrame("frame is not valid msgpack")) from exc
    if not isinstance(obj, dict):
        raise FrameError(None, BadFrame("a frame must be one msgpack map"))
    request_id = obj.get("id")
    if not _valid_request_id(request_id):
        raise FrameError(None, BadRequest("'id' must be an unsigned integer"))
    op = obj.get("op")
    if op is None:
        raise FrameError(request_id, BadRequest("'op' is required"))
    args = {k: v for k, v in obj.items() if k not in RESERVED_KEYS}
    for key in args:
        if not isinstance(key, str):  # msgpack `bin` keys: argument names are strings
            raise FrameError(request_id, BadRequest(f"argument names must be strings, got {echo(key)}"))
    return Frame(request_id, op, args, len(data))


def _request_id_of(data: bytes) -> int | None:
    """The valid request id of a frame that could not be decoded whole, found by skipping over
    the other values of its top-level map (skipping builds nothing); None if there is none."""
    unpacker = msgpack.Unpacker(raw=False, max_buffer_size=max(len(data), 1))
    try:
        unpacker.feed(data)
        for _ in range(unpacker.read_map_header()):
            if unpacker.unpack() == "id":
                found = unpacker.unpack()
                return found if _valid_request_id(found) else None
            unpacker.skip()
    except Exception:  # not a map, or malformed past what was read: no id to answer with
        return None
    return None


def _valid_request_id(value: object) -> TypeGuard[int]:
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value <= MAX_REQUEST_ID


def frame_items(limits: Limits) -> int:
    """The most items an array or map in a frame may hold: `MIN_FRAME_ITEMS`, or more where a
    limit on one argument allows more (`max_filter_values` may be raised to a million)."""
    return max(
        MIN_FRAME_ITEMS,
        limits.max_filter_values,
        limits.max_batch_docs,
        limits.max_ids,
        limits.max_dim,
        limits.max_metadata_keys,
    )


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
