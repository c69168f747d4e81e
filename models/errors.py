"""The one exception hierarchy of Shoal and the one place that maps it to wire codes.

Every error a client can see is a `ShoalError` with a stable `code` from PROTOCOL.md.
Anything else that escapes is reported as `internal` with a fixed message: the details of an
unexpected exception may be security-sensitive, so they go to the log, never to the client.
"""

from __future__ import annotations

from typing import Any

# How much of a client's own input an error message may quote (see `echo`).
ECHO_CHARS = 64
# The longest message any error carries: a last bound for messages that quote input.
MAX_MESSAGE_CHARS = 1_024
ELLIPSIS = "\u2026"


def echo(value: object, limit: int = ECHO_CHARS) -> str:
    """A short, printable quotation of a client-supplied value for an error message.

    Strings and bytes are quoted like `repr` (so control characters and lone surrogates come
    out escaped) and cut after `limit` characters with an ellipsis; huge integers are described
    by their size (printing one costs time quadratic in its length); containers by their type
    and length. Never raises, never returns more than about `limit` + 8 characters.
    """
    if isinstance(value, str | bytes | bytearray):
        cut = value[:limit]
        return repr(cut) + (ELLIPSIS if len(value) > limit else "")
    if isinstance(value, bool) or value is None:
        return repr(value)
    if isinstance(value, int):
        if value.bit_length() > 3 * limit:
            return f"<a {value.bit_length()}-bit integer>"
        return str(value)
    if isinstance(value, float):
        return repr(value)
    if isinstance(value, list | tuple | dict | set | frozenset):
        return f"<{type(value).__name__} of {len(value)}>"
    return f"<{type(value).__name__}>"


def _wire_safe(message: str) -> str:
    """`message` cut to MAX_MESSAGE_CHARS, with anything UTF-8 cannot carry (lone surrogates)
    backslash-escaped, so every encoder (JSON, msgpack, SSE) can send it."""
    if len(message) > MAX_MESSAGE_CHARS:
        message = message[:MAX_MESSAGE_CHARS] + ELLIPSIS
    if not message.isascii():
        message = message.encode("utf-8", "backslashreplace").decode("utf-8")
    return message


class ShoalError(Exception):
    """Base of every client-visible error. Subclasses fix `code` and `http_status`.

    The message is made wire-safe on construction (bounded length, valid UTF-8), so an error
    that quotes hostile input can always be sent; quote input through `echo`.
    """

    code: str = "internal"
    http_status: int = 500

    def __init__(self, message: str, **extra: Any) -> None:
        message = _wire_safe(message)
        super().__init__(message)
        self.message = message
        # Extra fields travel inside the error map (e.g. retry_after_ms for rate_limited).
        self.extra = extra

    def to_wire(self) -> dict[str, Any]:
        """The `error` map of a reply or an HTTP error body."""
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        body.update(self.extra)
        return body


class BadFrame(ShoalError):
    code, http_status = "bad_frame", 400


class BadRequest(ShoalError):
    code, http_status = "bad_request", 400


class UnknownOp(ShoalError):
    code, http_status = "unknown_op", 400


class NotFound(ShoalError):
    code, http_status = "not_found", 404


class Exists(ShoalError):
    code, http_status = "exists", 409


class DimensionMismatch(ShoalError):
    code, http_status = "dimension_mismatch", 422


class InvalidVector(ShoalError):
    code, http_status = "invalid_vector", 422


class TooLarge(ShoalError):
    code, http_status = "too_large", 413


class Unauthorized(ShoalError):
    code, http_status = "unauthorized", 401


class Forbidden(ShoalError):
    code, http_status = "forbidden", 403


class RateLimited(ShoalError):
    code, http_status = "rate_limited", 429


class Unavailable(ShoalError):
    code, http_status = "unavailable", 503


class Overloaded(ShoalError):
    code, http_status = "overloaded", 503


class Gone(ShoalError):
    """A resume point (`after_seq`, `Last-Event-ID`) older than the compacted change log: the
    changes after it are no longer kept. Subscribe again without one."""

    code, http_status = "gone", 410


class Internal(ShoalError):
    code, http_status = "internal", 500


class MethodNotAllowed(ShoalError):
    """An HTTP method the path does not answer (an addition to the contract's table); the
    response's `Allow` header lists the ones it does."""

    code, http_status = "method_not_allowed", 405


INTERNAL_MESSAGE = "internal error"


class StartupError(Exception):
    """A mistake that stops the server from starting (bad setting, unreachable database, refused
    data directory). `shoal serve` prints its message as one line and exits non-zero, with no
    traceback, so the message must say what to fix."""


def as_shoal_error(exc: BaseException) -> ShoalError:
    """Map any exception to the error the client sees; unexpected ones become `internal`."""
    if isinstance(exc, ShoalError):
        return exc
    return Internal(INTERNAL_MESSAGE)


ALL_ERRORS: tuple[type[ShoalError], ...] = (
    BadFrame,
    BadRequest,
    UnknownOp,
    NotFound,
    Exists,
    DimensionMismatch,
    InvalidVector,
    TooLarge,
    Unauthorized,
    Forbidden,
    RateLimited,
    Unavailable,
    Overloaded,
    Internal,
    MethodNotAllowed,
    Gone,
)
