"""Paging cursors of `get`: an opaque string naming the last document id of a page.

A cursor is URL-safe base64 (no padding) of one version byte followed by the id in UTF-8. The
version byte lets a later format be told apart; clients treat the string as opaque.
"""

from __future__ import annotations

import base64
import binascii

from models.errors import BadRequest
from models.records import DocId
from models.strings import check_string

CURSOR_VERSION = 1
# A cursor holds one id (at most 256 characters, 4 bytes each in UTF-8) and its version byte.
MAX_CURSOR_CHARS = 2_048


def encode_cursor(last_id: DocId) -> str:
    """The cursor that continues a scan after `last_id`."""
    raw = bytes([CURSOR_VERSION]) + last_id.encode("utf-8")
    return base64.urlsafe_b64encode(raw).decode("ascii").rstrip("=")


def decode_cursor(cursor: str) -> DocId:
    """The id a cursor continues after. Raises BadRequest for anything `encode_cursor` did not
    make (bad base64, an unknown version, an id that is not valid text)."""
    if len(cursor) > MAX_CURSOR_CHARS:
        raise BadRequest("'cursor' is not a cursor from a get reply")
    try:
        raw = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4))
        if len(raw) < 2 or raw[0] != CURSOR_VERSION:
            raise ValueError("unknown cursor version")
        last_id = raw[1:].decode("utf-8")
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise BadRequest("'cursor' is not a cursor from a get reply") from exc
    return DocId(check_string(last_id, "'cursor'"))
