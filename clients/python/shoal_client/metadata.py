"""Framework metadata <-> Shoal's flat metadata, for the LangChain and LlamaIndex stores.

Shoal metadata is flat: str -> str | int (64-bit) | finite float | bool | list of str, and only
those values can be filtered on. Framework metadata is any JSON-like map. `encode_metadata` keeps
every value Shoal can hold as its own key, and JSON-encodes all the others together (nested maps,
lists of non-strings, None, ...) as one string under the reserved key `_shoal_json`;
`decode_metadata` merges them back, so a JSON-typed map comes back equal. The JSON-encoded values
cannot be filtered on. Keys must be non-empty strings not starting with `$`; a value JSON cannot
encode (a datetime, bytes, ...) is refused with `ValueError`, never stored as something else.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

JSON_KEY = "_shoal_json"
_INT64_MIN, _INT64_MAX = -(2**63), 2**63 - 1


def is_flat_value(value: object) -> bool:
    """True when Shoal stores `value` as a metadata value of its own (and can filter on it)."""
    if isinstance(value, bool | str):
        return True
    if isinstance(value, int):
        return _INT64_MIN <= value <= _INT64_MAX
    if isinstance(value, float):
        return math.isfinite(value)
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def check_key(key: object) -> str:
    """`key` if Shoal accepts it as a metadata key; else `ValueError` saying why."""
    if not isinstance(key, str) or not key:
        raise ValueError(f"metadata keys must be non-empty strings, not {key!r}")
    if key.startswith("$"):
        raise ValueError(f"metadata key {key!r} starts with '$', which Shoal reserves for filter operators")
    if key == JSON_KEY:
        raise ValueError(f"metadata key {JSON_KEY!r} is reserved for values Shoal cannot store flat")
    return key


def encode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """Shoal metadata for a framework map: flat values as they are, the rest JSON-encoded under
    `_shoal_json`. Raises `ValueError` for a bad key or a value JSON cannot encode."""
    flat: dict[str, Any] = {}
    rest: dict[str, Any] = {}
    for key, value in (metadata or {}).items():
        (flat if is_flat_value(value) else rest)[check_key(key)] = value
    if rest:
        try:
            flat[JSON_KEY] = json.dumps(rest, ensure_ascii=False, allow_nan=False, separators=(",", ":"))
        except (TypeError, ValueError) as exc:
            raise ValueError(
                f"metadata {sorted(rest)} cannot be stored: values must be str, int, float, bool, list of str,"
                f" or JSON-encodable ({exc})"
            ) from None
    return flat


def decode_metadata(metadata: Mapping[str, Any] | None) -> dict[str, Any]:
    """The framework map back from Shoal metadata: `_shoal_json` decoded and merged in. A
    `_shoal_json` that is not a JSON object (written by something else) is left as it is."""
    decoded = dict(metadata or {})
    packed = decoded.get(JSON_KEY)
    if isinstance(packed, str):
        try:
            rest = json.loads(packed)
        except ValueError:
            return decoded
        if isinstance(rest, dict):
            del decoded[JSON_KEY]
            decoded.update(rest)
    return decoded
