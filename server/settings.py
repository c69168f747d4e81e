"""Server settings: command-line flags over `SHOAL_*` environment variables over defaults.

One model for every knob: each field of `Settings`, and of the dataclasses nested in it
(`Limits`, `EngineConfig`, `SubscriptionConfig`), is set as `SHOAL_<FIELD>` (`SHOAL_MAX_K=500`,
`SHOAL_SUB_BUFFER=200`), parsed by its type and range-checked here, so a new field needs no code
here. The generic ranges: an int is a count, >= 1 (>= 0 when its default is 0, which then means
"off"); a float is finite and >= 0, and in 0..1 when its name says it is a fraction; a bool is
one of 1/0, true/false, yes/no, on/off; a `Literal` or an `Enum` is one of its values; a tuple is a comma- or
space-separated list. A field whose range differs says so in its metadata: `bounds(lo, hi)`
(models/config.py), `{"check": fn}` (fn raises ValueError with what is wrong).

Every mistake raises `StartupError` with one line naming the variable (or flag), what it was
given and what it must be.
"""

from __future__ import annotations

import dataclasses
import difflib
import enum
import ipaddress
import math
import os
import re
import resource
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from actors.sources.redis_stream import check_source_url
from actors.subscriptions import SubscriptionConfig
from models.config import EngineConfig, Limits, bounds
from models.errors import StartupError
from server.auth import parse_api_keys

ENV_PREFIX = "SHOAL_"
# Read by the load tools, not by the server: never warned about.
OTHER_VARIABLES = frozenset({"SHOAL_CACHE_DIR"})
FRACTION_SUFFIXES = ("_fraction", "_ratio", "_selectivity", "_share")
LogLevel = Literal["debug", "info", "warning", "error", "critical"]
LogFormat = Literal["text", "json"]
_LABEL = r"[A-Za-z0-9]([A-Za-z0-9-]{0,61}[A-Za-z0-9])?"
_HOSTNAME = re.compile(rf"(?=.{{1,253}}$){_LABEL}(\.{_LABEL})*\.?")
# File descriptors kept free of connections: the database pool, model and log files, epoll.
_RESERVED_FDS = 256


def default_data_dir() -> Path:
    # The embedded PostgreSQL, run as root, opens o+rx on every parent of its data dir, so as
    # root the default lives under /var/lib rather than /root.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/shoal")
    return Path.home() / ".local" / "share" / "shoal"


def default_max_connections() -> int:
    """As many connections as the open-file limit leaves room for (each one is a descriptor),
    at most 100,000; a connection past it would fail in accept() instead of getting a 503."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY:
        return 100_000
    return max(64, min(100_000, soft - _RESERVED_FDS))


def check_host(value: str) -> None:
    """Raises ValueError unless `value` is an IP address or a well-formed host name."""
    try:
        ipaddress.ip_address(value)
    except ValueError:
        if not _HOSTNAME.fullmatch(value) or value.replace(".", "").isdigit():
            raise ValueError("must be an IP address or a host name (e.g. 127.0.0.1, ::1, localhost)") from None


def _check_api_keys(value: str) -> None:
    try:
        parse_api_keys(value)
    except (ValueError, KeyError, TypeError) as exc:  # JSONDecodeError is a ValueError
        raise ValueError(f"must be comma-separated keys or a JSON list of key entries ({exc})") from None


def _check_sources(urls: tuple[str, ...]) -> None:
    keys = [check_source_url(url) for url in urls]
    if len(set(keys)) != len(keys):  # their positions would be one row
        raise ValueError("two sources name the same stream and group")


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = field(default="127.0.0.1", metadata={"check": check_host})
    port: int = field(default=8080, metadata=bounds(0, 65_535))
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = field(default=None, metadata={"secret": True})
    log_level: LogLevel = "info"
    cors_origins: tuple[str, ...] = ()
    heartbeat_s: float = 15.0
    api_keys: str = field(default="", metadata={"check": _check_api_keys, "secret": True})
    rate_limit: float = 0.0
    rate_burst: float = 0.0
    limits: Limits = field(default_factory=Limits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # startup: the subscription bounds; process lifecycle, logs and HTTP connection bounds.
    subscriptions: SubscriptionConfig = field(default_factory=SubscriptionConfig)
    log_format: LogFormat = "text"
    # A connection must send a request's headers within this (from connect, or on a kept-alive
    # connection from the next request's first byte), and its body within `body_timeout_s`
    # after the headers. Range > 0.
    header_timeout_s: float = field(default=10.0, metadata=bounds(0.001))
    body_timeout_s: float = field(default=30.0, metadata=bounds(0.001))
    # Open connections (HTTP, SSE, WebSocket); past it a request is answered 503 `overloaded`.
    max_connections: int = field(default_factory=default_max_connections)
    # On SIGINT/SIGTERM, requests and streams still open after this are cancelled. Range >= 0.
    shutdown_grace_s: float = 5.0
    # guard (browsers, origins, hosts; failed authentications): see server/guard.py, server/auth.py
    allowed_origins: tuple[str, ...] = ()  # extra origins a page may call from; "*" = any
    allowed_hosts: tuple[str, ...] = ()  # extra Host names (beyond the bind address and loopback); "*" = any
    auth_failures_per_minute: float = 10.0  # failed key checks per client address, >= 0 (0 = unlimited)
    # failures allowed at once before the rate applies, >= 1
    auth_failure_burst: float = field(default=5.0, metadata=bounds(1))
    auth_failure_addresses: int = 10_000  # client addresses remembered, >= 1 (least recent forgotten)
    # failed `auth` ops that close a WebSocket (1008), >= 0 (0 = never)
    ws_auth_failures_close: int = field(default=5, metadata=bounds(0))
    # Proxies whose X-Forwarded-For / X-Forwarded-Proto are believed (addresses; "*" = any). Empty:
    # none, so no local process can borrow another client address (auth-failure limits, logs).
    forwarded_allow_ips: tuple[str, ...] = ()
    # broker sources: one consumer per URL (`--source`, repeatable; SHOAL_SOURCES space-separated),
    # redis://HOST:PORT/DB?stream=NAME&group=GROUP&collection=DEFAULT&notify=NAME
    sources: tuple[str, ...] = field(default=(), metadata={"check": _check_sources, "secret": True})


# --- loading -------------------------------------------------------------------------------------


def load_settings(env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
    """Settings from `env` (default: the process environment), with explicit (non-None) flags,
    keyed by field name, taking precedence. Raises StartupError naming the first bad value."""
    env = os.environ if env is None else env
    unused = set(flags) - {f.name for f in dataclasses.fields(Settings)}
    if unused:
        raise TypeError(f"no such setting: {', '.join(sorted(unused))}")
    settings: Settings = build(Settings, env, {k: v for k, v in flags.items() if v is not None})
    return settings


def setting_names() -> frozenset[str]:
    """Every `SHOAL_*` variable the settings read."""
    return frozenset(ENV_PREFIX + name.upper() for name, _ in _leaf_fields(Settings))


def unknown_variables(env: Mapping[str, str] | None = None) -> list[str]:
    """One warning per `SHOAL_*` variable in `env` that no setting reads, with the closest
    known name when one is close (a typo must not pass silently)."""
    env = os.environ if env is None else env
    known = setting_names() | OTHER_VARIABLES
    warnings = []
    for name in sorted(env):
        if name.startswith(ENV_PREFIX) and name not in known:
            close = difflib.get_close_matches(name, sorted(known), n=1, cutoff=0.75)
            hint = f" (did you mean {close[0]}?)" if close else ""
            warnings.append(f"unknown setting {name} is ignored{hint}")
    return warnings


def _leaf_fields(cls: type[Any]) -> list[tuple[str, dataclasses.Field[Any]]]:
    hints = typing.get_type_hints(cls)
    out: list[tuple[str, dataclasses.Field[Any]]] = []
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            out.extend(_leaf_fields(kind))  # type: ignore[arg-type]
        else:
            out.append((f.name, f))
    return out


def build(cls: type[Any], env: Mapping[str, str], flags: Mapping[str, Any]) -> Any:
    """An instance of the settings dataclass `cls` from `env` and `flags` (field name -> value;
    a string is parsed like an environment value), nested dataclasses built the same way.
    Raises StartupError for a bad value."""
    hints = typing.get_type_hints(cls)
    values: dict[str, Any] = {}
    for f in dataclasses.fields(cls):
        kind = hints[f.name]
        if dataclasses.is_dataclass(kind):
            if f.name in flags:  # a whole section given programmatically
                values[f.name] = flags[f.name]
            else:
                values[f.name] = build(kind, env, {})  # type: ignore[arg-type]
            continue
        env_name = ENV_PREFIX + f.name.upper()
        if f.name in flags:
            source, raw = f"--{f.name.replace('_', '-')}", flags[f.name]
        elif env_name in env:
            source, raw = env_name, env[env_name]
        else:
            continue
        shown = "(hidden)" if f.metadata.get("secret") else raw
        try:
            value = _parse(kind, raw) if isinstance(raw, str) else raw
        except ValueError as exc:
            raise _fail(source, shown, _expected(f, kind) or str(exc)) from None
        _check(f, value, source, shown)
        values[f.name] = value
    try:
        return cls(**values)
    except ValueError as exc:  # a section's own check of how its values fit together
        raise StartupError(f"{cls.__name__}: {exc}") from None


def _fail(source: str, raw: Any, expected: str) -> StartupError:
    shown = raw if isinstance(raw, str) else repr(raw)
    joiner = " " if source.startswith("--") else "="
    return StartupError(f"{source}{joiner}{shown}: {expected}")


def _parse(kind: Any, raw: str) -> Any:
    """`raw` as a value of `kind`; raises ValueError saying what was expected."""
    origin, args = typing.get_origin(kind), typing.get_args(kind)
    text = raw.strip()
    if origin in (types.UnionType, typing.Union):
        inner = [a for a in args if a is not type(None)]
        if type(None) in args and not text:
            return None
        return _parse(inner[0], raw)
    if origin is Literal:
        if text.lower() in args:
            return text.lower()
        raise ValueError("must be one of " + ", ".join(str(a) for a in args))
    if kind is bool:
        lowered = text.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        raise ValueError("must be true or false (1/0, yes/no, on/off)")
    if kind is int:
        try:
            return int(text)
        except ValueError:
            raise ValueError("must be an integer") from None
    if kind is float:
        try:
            return float(text)
        except ValueError:
            raise ValueError("must be a number") from None
    if kind is Path:
        if not text:
            raise ValueError("must be a path")
        return Path(text).expanduser()
    if kind is str:
        return raw
    if isinstance(kind, type) and issubclass(kind, enum.Enum):
        for member in kind:
            if text.lower() in (str(member.value).lower(), member.name.lower()):
                return member
        raise ValueError("must be one of " + ", ".join(str(m.value) for m in kind))
    if origin in (tuple, list, frozenset, set):
        item = args[0] if args else str
        parts = [p for p in re.split(r"[,\s]+", text) if p]
        return origin(_parse(item, p) for p in parts)
    raise ValueError(f"cannot be set from text (type {kind})")


def _default(f: dataclasses.Field[Any]) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _range(f: dataclasses.Field[Any], kind: Any) -> tuple[float | None, float | None]:
    """The field's lo..hi: its metadata, else the generic range of its type."""
    meta = f.metadata
    lo, hi = meta.get("min"), meta.get("max")
    if "min" not in meta:
        if kind is int:
            default = _default(f)
            lo = 0 if isinstance(default, int) and default <= 0 else 1
        else:
            lo = 0.0
    if "max" not in meta and kind is float and f.name.endswith(FRACTION_SUFFIXES):
        hi = 1.0
    return lo, hi


def _expected(f: dataclasses.Field[Any], kind: Any) -> str | None:
    """What a numeric field must be, in words; None for other kinds."""
    if kind not in (int, float):
        return None
    what = "an integer" if kind is int else "a number"
    lo, hi = _range(f, kind)
    if lo is not None and hi is not None:
        return f"must be {what} in {_num(lo)}..{_num(hi)}"
    if lo is not None:
        return f"must be {what} >= {_num(lo)}"
    if hi is not None:
        return f"must be {what} <= {_num(hi)}"
    return f"must be {what}"


def _check(f: dataclasses.Field[Any], value: Any, source: str, shown: Any) -> None:
    """Raises StartupError unless `value` is in the field's range (metadata, else generic)."""
    if isinstance(value, int | float) and not isinstance(value, bool):
        kind = int if isinstance(value, int) else float
        lo, hi = _range(f, kind)
        if not math.isfinite(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
            raise _fail(source, shown, _expected(f, kind) or "out of range")
    check = f.metadata.get("check")
    if check is not None and value is not None:
        try:
            check(value)
        except ValueError as exc:
            raise _fail(source, shown, str(exc)) from None


def _num(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)
