"""Errors the Shoal client raises.

Two families, kept apart on purpose:

* `ShoalError` — the server answered and said no. It carries the wire `code`, the server's
  `message` and any `extra` fields of the error map (e.g. `retry_after_ms`). There is one subclass
  per code of PROTOCOL.md, so callers can write `except NotFound:`. A code this client does not
  know yet becomes a plain `ShoalError` with that code.
* `ClientError` — nothing usable came back: the connection is gone (`ConnectionClosed`), the server
  sent something that breaks the protocol (`ProtocolError`), or the client was misused.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any


class ShoalError(Exception):
    """The server rejected a request. `code` is the stable wire code; `message` is for humans."""

    code: str = "internal"
    http_status: int = 500

    def __init__(self, code: str, message: str, extra: Mapping[str, Any] | None = None) -> None:
        super().__init__(f"{code}: {message}")
        self.code = code
        self.message = message
        # Any further fields of the error map, e.g. retry_after_ms for rate_limited.
        self.extra: dict[str, Any] = dict(extra or {})

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.code!r}, {self.message!r}, {self.extra!r})"


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

    @property
    def retry_after_ms(self) -> int | None:
        """How long the server asks the caller to wait before retrying, when it said so."""
        value = self.extra.get("retry_after_ms")
        return int(value) if isinstance(value, int | float) else None


class Unavailable(ShoalError):
    code, http_status = "unavailable", 503


class Overloaded(ShoalError):
    code, http_status = "overloaded", 503


class Internal(ShoalError):
    code, http_status = "internal", 500


class MethodNotAllowed(ShoalError):
    code, http_status = "method_not_allowed", 405


class Gone(ShoalError):
    """The resume point (after_seq / Last-Event-ID) predates the compacted change log:
    subscribe again without one."""

    code, http_status = "gone", 410


ERROR_CLASSES: dict[str, type[ShoalError]] = {
    cls.code: cls
    for cls in (
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
}

# Used only when an HTTP error has no readable `{"error": ...}` body (e.g. a proxy answered).
_STATUS_CLASSES: dict[int, type[ShoalError]] = {
    400: BadRequest,
    401: Unauthorized,
    403: Forbidden,
    404: NotFound,
    405: MethodNotAllowed,
    409: Exists,
    410: Gone,
    413: TooLarge,
    422: BadRequest,
    429: RateLimited,
    503: Unavailable,
}


class ClientError(Exception):
    """A failure on the client side: no server verdict is available."""


class ConnectionClosed(ClientError):
    """The connection is closed or was lost; requests in flight have no answer.

    Whether a write in flight was applied is unknown: reconnect, then read back if it matters.
    """

    def __init__(self, message: str = "connection closed", code: int | None = None, reason: str = "") -> None:
        super().__init__(
            message if code is None else f"{message} (code {code}{', ' if reason else ''}{reason})"
        )
        self.code = code
        self.reason = reason
        self._message = message

    def again(self) -> ConnectionClosed:
        """A fresh instance with the same details, for each caller that must see this closure
        (raising one instance from many places piles up tracebacks)."""
        return ConnectionClosed(self._message, self.code, self.reason)


class ProtocolError(ClientError):
    """The server sent something that does not follow the Shoal wire protocol."""


def error_from_wire(body: object, http_status: int | None = None) -> ShoalError:
    """Build the exception for an `error` map (`{"code", "message", ...extra}`).

    Never raises: a malformed map becomes `Internal` (or the class for `http_status`, when given).
    """
    if isinstance(body, Mapping):
        code = body.get("code")
        message = body.get("message")
        if isinstance(code, str):
            extra = {str(k): v for k, v in body.items() if k not in ("code", "message")}
            cls = ERROR_CLASSES.get(code, ShoalError)
            return cls(code, message if isinstance(message, str) else "", extra)
    return error_from_status(http_status or 500, "malformed error body")


def error_from_status(http_status: int, message: str) -> ShoalError:
    """The best-matching exception for an HTTP error status that came without a Shoal error body."""
    cls = _STATUS_CLASSES.get(http_status, Internal)
    return cls(cls.code, message, {"http_status": http_status})
