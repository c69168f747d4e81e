"""How large a reply may be: the one bound every transport holds replies to (`max_frame_bytes`).

A reply larger than the frame limit is never sent; it answers `too_large` with a hint to page.
The edges check the encoded size; the engine checks first, before anything is encoded, what the
rows' texts and vectors alone must take, so a request for thousands of large documents is
refused without the server building a reply of hundreds of megabytes only to throw it away.
"""

from __future__ import annotations

from collections.abc import Sequence

from models.config import Limits
from models.errors import TooLarge
from models.records import Hit, Include, StoredDoc

_HINT = "ask for less per request (fewer ids, a smaller k) or leave 'vector' (or 'text') out of 'include'"


def reply_too_large(size: int, limit: int, *, at_least: bool = False) -> TooLarge:
    """The error that stands in for a reply of `size` bytes (`at_least`: of more than that) over
    the `limit`-byte frame bound."""
    amount = f"at least {size}" if at_least else str(size)
    return TooLarge(
        f"the reply would be {amount} bytes, over the {limit}-byte frame limit: {_HINT}",
        reply_bytes=size,
        max_frame_bytes=limit,
    )


def check_rows_fit(
    rows: Sequence[Hit] | Sequence[StoredDoc], include: frozenset[Include], dim: int, limits: Limits
) -> None:
    """Raise `too_large` when the ids, texts and vectors of `rows` alone take more than
    `limits.max_frame_bytes` (every character is at least one byte, every vector value four).
    Cheap when the rows cannot get near the limit: then nothing is counted."""
    limit = limits.max_frame_bytes
    text = Include.TEXT in include
    vector_bytes = 4 * dim if Include.VECTOR in include else 0
    most_per_row = limits.max_id_chars + vector_bytes + (limits.max_text_chars if text else 0)
    if len(rows) * most_per_row <= limit:
        return
    size = len(rows) * vector_bytes
    for row in rows:
        size += len(row.id)
        if text and row.text is not None:
            size += len(row.text)
    if size > limit:
        raise reply_too_large(size, limit, at_least=True)
