"""What a web page may not do to a Shoal server: the `Origin` and `Host` checks of every request.

A browser lets any page send simple requests (a `text/plain` POST, a WebSocket handshake) to any
address, local ones included, and tells the server only through `Origin` where the page came
from. So an `Origin` header that is neither the server's own (same scheme, host and port as the
request's `Host`), nor a loopback origin (`http(s)://localhost`, `127.0.0.1`, `[::1]`, any port),
nor listed in `SHOAL_ALLOWED_ORIGINS` or `SHOAL_CORS_ORIGINS` (`*` there: any origin) is refused:
403 `forbidden` with the JSON error body on HTTP and SSE, an HTTP 403 to the upgrade on a
WebSocket. Requests without `Origin` (curl, server-side clients) pass.

DNS rebinding (a page whose own name is made to resolve to 127.0.0.1, so it is "same origin")
is caught by `Host`: a name that is not the bind address, a loopback name (with any port) or in
`SHOAL_ALLOWED_HOSTS` (a name, or `name:port`; `*`: any) gets 400 `bad_request`. Bound to every
interface (`0.0.0.0`, `::`) with `SHOAL_ALLOWED_HOSTS` unset, any `Host` passes (the names
clients use are unknown) and `guard_policy` warns at start.

`Guard` is the ASGI middleware in front of everything (see `server.edge.Edge`): it looks at the
headers once per HTTP request or WebSocket handshake, never per frame or event, and remembers
its last verdicts, so a keep-alive client pays a dict lookup per request.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from urllib.parse import urlsplit

from starlette.types import ASGIApp, Receive, Scope, Send

from models.errors import BadRequest, Forbidden, ShoalError
from server.settings import Settings

log = logging.getLogger("shoal.guard")

LOOPBACK_HOSTS = frozenset({"localhost", "127.0.0.1", "::1"})
EVERY_INTERFACE = frozenset({"", "0.0.0.0", "::", "[::]"})
DEFAULT_PORTS = {"http": 80, "https": 443}
# A request's scheme as the page's origin would name it.
PAGE_SCHEME = {"http": "http", "https": "https", "ws": "http", "wss": "https"}
VERDICTS = 1024  # (scheme, host, origin) verdicts remembered; cleared when full
CACHED_HEADER = 256  # longer Host/Origin values are judged every time, never remembered
SHOWN = 100  # characters of a refused header echoed in the error message


def _netloc(name: str, port: int) -> str:
    return f"[{name}]:{port}" if ":" in name else f"{name}:{port}"


def _origin_key(origin: str) -> str | None:
    """`scheme://host:port`, lower-cased with the default port made explicit; None when `origin`
    is not a scheme://host[:port] origin (e.g. the `null` of a sandboxed page)."""
    try:
        parts = urlsplit(origin.strip())
        port = parts.port
    except ValueError:
        return None
    scheme, host = parts.scheme.lower(), parts.hostname
    if not host or scheme not in DEFAULT_PORTS or parts.path not in ("", "/") or parts.query:
        return None
    return f"{scheme}://{_netloc(host, port if port is not None else DEFAULT_PORTS[scheme])}"


def _split_host(host: str) -> tuple[str, int | None]:
    """A Host header as (lower-cased name without brackets, port or None)."""
    host = host.strip().lower()
    if host.startswith("["):
        name, _, rest = host[1:].partition("]")
        port = rest[1:] if rest.startswith(":") else ""
    elif host.count(":") == 1:
        name, _, port = host.partition(":")
    else:
        name, port = host, ""
    return name, int(port) if port.isdigit() else None


def _host_entry(entry: str) -> str:
    """An allowed-hosts entry in the form `_host_allowed` looks up: `name` or `name:port`."""
    name, port = _split_host(entry)
    return name if port is None else f"{name}:{port}"


@dataclass(frozen=True, slots=True)
class GuardPolicy:
    """Which origins and Host names are served. Built by `guard_policy(settings)`."""

    origins: frozenset[str]  # `_origin_key` forms, plus the raw entries (`null`, ...)
    any_origin: bool
    hosts: frozenset[str]  # lower-cased names and `name:port` entries
    any_host: bool

    def refusal(self, scheme: str, host: str | None, origin: str | None) -> ShoalError | None:
        """The error a request with these headers gets, or None when it is served."""
        name, port = _split_host(host) if host is not None else ("", None)
        if host is not None and not self.any_host and not self._host_allowed(host, name, port):
            return BadRequest(
                f"Host {host[:SHOWN]!r} is not served here (DNS-rebinding guard): "
                "add it to SHOAL_ALLOWED_HOSTS to allow it"
            )
        if origin is not None and not self.any_origin and not self._origin_allowed(scheme, name, port, origin):
            return Forbidden(
                f"requests from the web origin {origin[:SHOWN]!r} are refused: "
                "add it to SHOAL_ALLOWED_ORIGINS to allow it"
            )
        return None

    def _host_allowed(self, host: str, name: str, port: int | None) -> bool:
        if name in LOOPBACK_HOSTS or name in self.hosts:
            return True
        return port is not None and f"{name}:{port}" in self.hosts

    def _origin_allowed(self, scheme: str, name: str, port: int | None, origin: str) -> bool:
        key = _origin_key(origin)
        if key is None:
            return origin.strip().lower() in self.origins
        if key in self.origins:
            return True
        if urlsplit(key).hostname in LOOPBACK_HOSTS:
            return True
        # Same origin: the page was served by this server under the name it now calls.
        own_scheme = PAGE_SCHEME.get(scheme, scheme)
        own_port = port if port is not None else DEFAULT_PORTS.get(own_scheme)
        return bool(name) and own_port is not None and key == f"{own_scheme}://{_netloc(name, own_port)}"


def guard_policy(settings: Settings) -> GuardPolicy:
    """The policy of `settings`; warns when a wildcard bind leaves the Host check off."""
    entries = [*settings.allowed_origins, *settings.cors_origins]
    origins: set[str] = set()
    for entry in entries:
        key = _origin_key(entry)
        origins.add(key if key is not None else entry.strip().lower())
    hosts = {_host_entry(h) for h in settings.allowed_hosts if h.strip()}
    bind = settings.host.strip().lower()
    any_host = "*" in hosts
    if bind in EVERY_INTERFACE and not hosts:
        any_host = True
        log.warning(
            "bound to %s with SHOAL_ALLOWED_HOSTS unset: any Host header is accepted, so web pages "
            "can reach this server by DNS rebinding; set SHOAL_ALLOWED_HOSTS to the names clients use",
            settings.host or "every interface",
        )
    elif bind not in EVERY_INTERFACE:
        hosts.add(bind.strip("[]"))
    return GuardPolicy(frozenset(origins), "*" in origins, frozenset(hosts), any_host)


DUPLICATE_HEADER = BadRequest("a request carries one Host header and at most one Origin header")


def _error_body(error: ShoalError) -> bytes:
    return json.dumps({"error": error.to_wire()}, separators=(",", ":")).encode()


class Guard:
    """ASGI middleware: refuses HTTP requests and WebSocket handshakes that `policy` refuses,
    passes everything else (and the lifespan) to `app` untouched."""

    def __init__(self, app: ASGIApp, policy: GuardPolicy) -> None:
        self.app = app
        self.policy = policy
        self._verdicts: dict[tuple[str, bytes | None, bytes | None], ShoalError | None] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] in ("http", "websocket"):
            error = self._judge(scope)
            if error is not None:
                await self._refuse(error, scope, receive, send)
                return
        await self.app(scope, receive, send)

    def _judge(self, scope: Scope) -> ShoalError | None:
        host = origin = None
        for name, value in scope["headers"]:
            if name == b"host":
                if host is not None:
                    return DUPLICATE_HEADER  # RFC 9112: answer 400; which one counts is unclear
                host = value
            elif name == b"origin":
                if origin is not None:
                    return DUPLICATE_HEADER
                origin = value
        scheme: str = scope.get("scheme", "http")
        key = (scheme, host, origin)
        try:
            return self._verdicts[key]
        except KeyError:
            pass
        verdict = self.policy.refusal(
            scheme,
            host.decode("latin-1") if host is not None else None,
            origin.decode("latin-1") if origin is not None else None,
        )
        if len(host or b"") + len(origin or b"") <= CACHED_HEADER:
            if len(self._verdicts) >= VERDICTS:
                self._verdicts.clear()
            self._verdicts[key] = verdict
        return verdict

    @staticmethod
    async def _refuse(error: ShoalError, scope: Scope, receive: Receive, send: Send) -> None:
        body = _error_body(error)
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]
        log.debug("refused %s %s: %s", scope["type"], scope.get("path"), error.message)
        if scope["type"] == "http":
            await send({"type": "http.response.start", "status": error.http_status, "headers": headers})
            await send({"type": "http.response.body", "body": body})
            return
        message = await receive()
        if message["type"] != "websocket.connect":
            return
        if "websocket.http.response" in scope.get("extensions", {}):
            await send({"type": "websocket.http.response.start", "status": error.http_status, "headers": headers})
            await send({"type": "websocket.http.response.body", "body": body})
        else:  # the server answers 403 to a close before accept
            await send({"type": "websocket.close", "code": 1008})
