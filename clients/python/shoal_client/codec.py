"""Encoding helpers: msgpack frames, vectors as compact float32 `bin`, and the JSON equivalents.

On the WebSocket (msgpack) every vector goes out as `bin` holding little-endian float32 values:
4 bytes a component instead of ~9 for a msgpack float64 or ~20 for JSON text. On HTTP/JSON the
same vectors go out as arrays of numbers.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import msgpack
import numpy as np
from numpy.typing import NDArray

from shoal_client.errors import ClientError, ProtocolError

# The wire dtype of a vector: float32, little-endian whatever the host's byte order.
WIRE_DTYPE = np.dtype("<f4")


def encode_vector(vector: Any) -> bytes:
    """The compact `bin` form of a vector: little-endian float32 bytes.

    Accepts a 1-D numpy array (any float or int dtype), a sequence of numbers, or `bytes` that are
    already in wire form (passed through). Raises `ClientError` for anything that is not 1-D numeric.
    NaN and inf are sent as they are: the server answers `invalid_vector`.
    """
    if isinstance(vector, bytes | bytearray | memoryview):
        return bytes(vector)
    try:
        array = np.asarray(vector, dtype=WIRE_DTYPE)
    except (TypeError, ValueError) as exc:
        raise ClientError(f"vector is not numeric: {exc}") from None
    if array.ndim != 1:
        raise ClientError(f"vector must be 1-D, got shape {array.shape}")
    return array.tobytes()


def decode_vector(value: Any) -> NDArray[np.float32]:
    """A vector as sent by the server (`bin` float32 LE, or an array of numbers) as float32 numpy.

    The result is a fresh, writable array in native byte order. Raises `ProtocolError` otherwise.
    """
    if isinstance(value, bytes | bytearray | memoryview):
        raw = bytes(value)
        if len(raw) % WIRE_DTYPE.itemsize:
            raise ProtocolError(f"vector bin of {len(raw)} bytes is not a whole number of float32")
        return np.frombuffer(raw, dtype=WIRE_DTYPE).astype(np.float32)
    if isinstance(value, list | tuple):
        try:
            return np.asarray(value, dtype=np.float32).reshape(-1)
        except (TypeError, ValueError) as exc:
            raise ProtocolError(f"vector is not numeric: {exc}") from None
    raise ProtocolError(f"vector of unexpected type {type(value).__name__}")


def vector_to_list(vector: Any) -> list[float]:
    """The JSON form of a vector: a list of Python floats (float32 values widened exactly)."""
    if isinstance(vector, bytes | bytearray | memoryview):
        return decode_vector(vector).tolist()  # type: ignore[no-any-return]
    try:
        array = np.asarray(vector, dtype=np.float32)
    except (TypeError, ValueError) as exc:
        raise ClientError(f"vector is not numeric: {exc}") from None
    if array.ndim != 1:
        raise ClientError(f"vector must be 1-D, got shape {array.shape}")
    return array.tolist()  # type: ignore[no-any-return]


def vector_to_query_param(vector: Any) -> str:
    """The SSE query-parameter form of a vector: comma-separated floats (repr, so exact)."""
    return ",".join(repr(x) for x in vector_to_list(vector))


def _convert(args: Mapping[str, Any], vector: Callable[[Any], Any]) -> dict[str, Any]:
    """Copy of `args` with the top-level `vector`, each `docs[i].vector` and each
    `queries[i].vector` replaced by `vector(v)`.

    Only those places hold a VECTOR; a metadata field that happens to be named `vector` is left alone.
    """
    out = dict(args)
    if out.get("vector") is not None:
        out["vector"] = vector(out["vector"])
    for key in ("docs", "queries"):
        items = out.get(key)
        if isinstance(items, list | tuple):
            out[key] = [
                {**d, "vector": vector(d["vector"])} if isinstance(d, Mapping) and d.get("vector") is not None else d
                for d in items
            ]
    return out


def pack_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Request args ready for msgpack: every `vector` (top level, or inside `docs` / `queries`) as
    float32 `bin`."""
    return _convert(args, encode_vector)


def json_args(args: Mapping[str, Any]) -> dict[str, Any]:
    """Request args ready for JSON: every `vector` as a list of floats, numpy scalars as Python ones."""
    return _jsonable(_convert(args, vector_to_list))  # type: ignore[no-any-return]


def _jsonable(value: Any) -> Any:
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    return value


def _msgpack_default(value: Any) -> Any:
    """msgpack fallback: numpy scalars as Python scalars, stray numpy arrays as lists."""
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, set | frozenset):
        return sorted(value)
    raise TypeError(f"cannot encode {type(value).__name__} as msgpack")


def encode_frame(message: Mapping[str, Any]) -> bytes:
    """One msgpack map as bytes (`bin` for bytes, `str` for str). Raises `ClientError` if unencodable."""
    try:
        return msgpack.packb(message, use_bin_type=True, default=_msgpack_default)  # type: ignore[no-any-return]
    except (TypeError, ValueError, OverflowError) as exc:
        raise ClientError(f"cannot encode request: {exc}") from None


def encode_request(request_id: int, op: str, args: Mapping[str, Any]) -> bytes:
    """The frame of request `request_id`: `{"id", "op", ...args}` with vectors as `bin`."""
    if "id" in args or "op" in args:
        raise ClientError("request args must not contain 'id' or 'op'")
    return encode_frame({"id": request_id, "op": op, **pack_args(args)})


def decode_frame(data: bytes | str) -> dict[str, Any]:
    """A received frame as a map. Raises `ProtocolError` for text frames and non-map payloads."""
    if isinstance(data, str):
        raise ProtocolError("text frame received; Shoal sends binary frames only")
    try:
        message = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception as exc:  # msgpack raises several unrelated exception types
        raise ProtocolError(f"frame is not valid msgpack: {exc}") from None
    if not isinstance(message, dict):
        raise ProtocolError(f"frame is not a msgpack map: {type(message).__name__}")
    return message
