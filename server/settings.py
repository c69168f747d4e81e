"""Server settings: command-line flags over `SHOAL_*` environment variables over defaults.

Every field of `Limits` and `EngineConfig` can be set as `SHOAL_<FIELD>` (e.g.
`SHOAL_MAX_K=500`, `SHOAL_SHARDS_PER_COLLECTION=2`), so each bound is configurable without code.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from models.config import EngineConfig, Limits

T = TypeVar("T")


def default_data_dir() -> Path:
    # The embedded PostgreSQL, run as root, opens o+rx on every parent of its data dir, so as
    # root the default lives under /var/lib rather than /root.
    if hasattr(os, "geteuid") and os.geteuid() == 0:
        return Path("/var/lib/shoal")
    return Path.home() / ".local" / "share" / "shoal"


@dataclass(frozen=True, slots=True)
class Settings:
    host: str = "127.0.0.1"
    port: int = 8080
    data_dir: Path = field(default_factory=default_data_dir)
    database_url: str | None = None
    log_level: str = "info"
    cors_origins: tuple[str, ...] = ()
    heartbeat_s: float = 15.0
    api_keys: str = ""
    rate_limit: float = 0.0
    rate_burst: float = 0.0
    limits: Limits = field(default_factory=Limits)
    engine: EngineConfig = field(default_factory=EngineConfig)
    # guard (browsers, origins, hosts; failed authentications): see server/guard.py, server/auth.py
    allowed_origins: tuple[str, ...] = ()  # extra origins a page may call from; "*" = any
    allowed_hosts: tuple[str, ...] = ()  # extra Host names (beyond the bind address and loopback); "*" = any
    auth_failures_per_minute: float = 10.0  # failed key checks per client address, >= 0 (0 = unlimited)
    auth_failure_burst: float = 5.0  # failures allowed at once before the rate applies, >= 1
    auth_failure_addresses: int = 10_000  # client addresses remembered, >= 1 (least recent forgotten)
    ws_auth_failures_close: int = 5  # failed `auth` ops that close a WebSocket (1008), >= 0 (0 = never)


def _coerce(value: str, kind: Any, name: str) -> Any:
    try:
        if kind in (int, "int"):
            return int(value)
        if kind in (float, "float"):
            return float(value)
        if kind in (bool, "bool"):
            return value.strip().lower() in ("1", "true", "yes", "on")
    except ValueError as exc:
        raise SystemExit(f"invalid value for {name}: {value!r}") from exc
    return value


def _from_env(cls: type[T], env: Mapping[str, str]) -> T:
    overrides: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        name = f"SHOAL_{f.name.upper()}"
        if name in env:
            overrides[f.name] = _coerce(env[name], f.type, name)
    return cls(**overrides)


def load_settings(env: Mapping[str, str] | None = None, **flags: Any) -> Settings:
    """Settings from the environment, with explicit (non-None) flags taking precedence."""
    env = os.environ if env is None else env
    base: dict[str, Any] = {}
    if "SHOAL_HOST" in env:
        base["host"] = env["SHOAL_HOST"]
    if "SHOAL_PORT" in env:
        base["port"] = int(env["SHOAL_PORT"])
    if "SHOAL_DATA_DIR" in env:
        base["data_dir"] = Path(env["SHOAL_DATA_DIR"])
    if env.get("SHOAL_DATABASE_URL"):
        base["database_url"] = env["SHOAL_DATABASE_URL"]
    if "SHOAL_LOG_LEVEL" in env:
        base["log_level"] = env["SHOAL_LOG_LEVEL"]
    if env.get("SHOAL_CORS_ORIGINS"):
        base["cors_origins"] = tuple(o.strip() for o in env["SHOAL_CORS_ORIGINS"].split(",") if o.strip())
    if "SHOAL_API_KEYS" in env:
        base["api_keys"] = env["SHOAL_API_KEYS"]
    if "SHOAL_RATE_LIMIT" in env:
        base["rate_limit"] = float(env["SHOAL_RATE_LIMIT"])
    if "SHOAL_RATE_BURST" in env:
        base["rate_burst"] = float(env["SHOAL_RATE_BURST"])
    if "SHOAL_HEARTBEAT_S" in env:
        base["heartbeat_s"] = float(env["SHOAL_HEARTBEAT_S"])
    # guard settings (server/guard.py, server/auth.py)
    for name in ("allowed_origins", "allowed_hosts"):
        if env.get(var := f"SHOAL_{name.upper()}"):
            base[name] = tuple(x.strip() for x in env[var].split(",") if x.strip())
    guard_numbers = {
        "auth_failures_per_minute": float,
        "auth_failure_burst": float,
        "auth_failure_addresses": int,
        "ws_auth_failures_close": int,
    }
    for name, kind in guard_numbers.items():
        if (var := f"SHOAL_{name.upper()}") in env:
            base[name] = _coerce(env[var], kind, var)
    base["limits"] = _from_env(Limits, env)
    base["engine"] = _from_env(EngineConfig, env)
    for key, value in flags.items():
        if value is not None:
            base[key] = Path(value) if key == "data_dir" else value
    return Settings(**base)
