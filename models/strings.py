"""The one check every client string passes: text that PostgreSQL and the tokenizer can hold.

JSON can spell a lone UTF-16 surrogate (`"\\udfff"`) and a NUL (`"\\u0000"`); Python decodes both
into a `str`, but neither can be stored as PostgreSQL `text` or encoded as UTF-8 for the
tokenizer. Caught later, one such string would fail a whole committed batch shared with other
clients, so the request parser applies `check_string` to every string it accepts.
"""

from __future__ import annotations

from collections.abc import Callable

from models.errors import BadRequest


def check_string(value: str, what: str | Callable[[], str]) -> str:
    """`value` unchanged when it holds neither a NUL character nor a lone surrogate.

    Raises BadRequest naming `what` (e.g. "metadata key 'a'") otherwise; pass a callable to build
    that name only on failure (the check runs for every string of every document). Costs one
    memchr and, for non-ASCII text only, one UTF-8 encode.
    """
    if "\x00" in value:
        raise BadRequest(f"{_name(what)} must not contain NUL characters")
    if not value.isascii():
        try:
            value.encode("utf-8")
        except UnicodeEncodeError as exc:
            raise BadRequest(
                f"{_name(what)} is not valid Unicode text (a lone surrogate at character {exc.start})"
            ) from exc
    return value


def _name(what: str | Callable[[], str]) -> str:
    return what if isinstance(what, str) else what()
