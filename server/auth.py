"""API keys with per-collection scopes, and token-bucket rate limits.

Keys come from `SHOAL_API_KEYS`: either a comma-separated list of keys with full access, or a
JSON list of `{"key": "...", "collections": ["a", "b"] | "*", "access": "read"|"write"|"admin",
"metrics": true|false}`. `read` serves list/get/count/query/query_batch/subscribe, `write` adds upsert/delete,
`admin` adds create/drop. `/metrics` names every collection, so it needs `"metrics": true` or an
admin key. With no keys configured, auth is off.

Failed authentications (a key that matches none) are limited per client address whether or not
`SHOAL_RATE_LIMIT` is on: `SHOAL_AUTH_FAILURE_BURST` failures at once, then
`SHOAL_AUTH_FAILURES_PER_MINUTE`. Past that, every key check from that address (a right key
too, or the answer would tell a guesser when it is right) answers `rate_limited` with
`retry_after_ms` until the bucket has refilled a token.

`SHOAL_RATE_LIMIT` (requests per second, 0 = off) and `SHOAL_RATE_BURST` bound each caller: a key,
or the client address when auth is off. Over the rate a request answers `rate_limited` with
`retry_after_ms`, the time until a token is available.
"""

from __future__ import annotations

import enum
import hmac
import ipaddress
import json
import time
from collections import OrderedDict
from dataclasses import dataclass

from models import requests as rq
from models.errors import Forbidden, RateLimited, Unauthorized


class Access(enum.IntEnum):
    NONE = 0
    READ = 1
    WRITE = 2
    ADMIN = 3


@dataclass(frozen=True, slots=True)
class ApiKey:
    key: str
    collections: frozenset[str] | None  # None: every collection
    access: Access
    metrics: bool = False  # may read /metrics (admin keys always may)

    @property
    def reads_metrics(self) -> bool:
        return self.metrics or self.access is Access.ADMIN

    def allows(self, collection: str | None) -> bool:
        return self.collections is None or collection is None or collection in self.collections


def parse_api_keys(raw: str) -> tuple[ApiKey, ...]:
    """Parse SHOAL_API_KEYS. Raises ValueError with a readable reason."""
    raw = raw.strip()
    if not raw:
        return ()
    if not raw.startswith("["):
        return tuple(ApiKey(k.strip(), None, Access.ADMIN) for k in raw.split(",") if k.strip())
    keys = []
    for entry in json.loads(raw):
        if not isinstance(entry, dict) or not isinstance(entry.get("key"), str) or not entry["key"]:
            raise ValueError("each API key entry needs a non-empty 'key'")
        scope = entry.get("collections", "*")
        collections = None if scope == "*" else frozenset(str(c) for c in scope)
        access = Access[str(entry.get("access", "admin")).upper()]
        metrics = entry.get("metrics", False)
        if not isinstance(metrics, bool):
            raise ValueError("an API key's 'metrics' must be true or false")
        keys.append(ApiKey(entry["key"], collections, access, metrics))
    return tuple(keys)


def required_access(request: rq.Request) -> tuple[Access, str | None]:
    """What an op needs, and on which collection."""
    match request:
        case rq.Ping() | rq.Auth() | rq.Unsubscribe():
            return Access.NONE, None
        case rq.CreateCollection(name=name) | rq.DropCollection(name=name):
            return Access.ADMIN, name
        case rq.Upsert(collection=name) | rq.Delete(collection=name):
            return Access.WRITE, name
        case rq.ListCollections():
            return Access.READ, None
        case rq.Get(collection=name) | rq.Count(collection=name) | rq.Query(collection=name):
            return Access.READ, name
        case rq.QueryBatch(collection=name):
            return Access.READ, name
        case rq.Subscribe(collection=name):
            return Access.READ, name
    return Access.ADMIN, None


class TokenBuckets:
    """One token bucket per caller; the table is bounded (least recently seen callers go first)."""

    def __init__(self, rate: float, burst: float, max_callers: int = 10_000) -> None:
        self.rate = rate
        self.burst = max(burst, 1.0)
        self.max_callers = max_callers
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def charge(self, caller: str) -> None:
        if self.rate <= 0:
            return
        now = time.monotonic()
        tokens, last = self._buckets.pop(caller, (self.burst, now))
        tokens = min(self.burst, tokens + (now - last) * self.rate)
        if tokens < 1.0:
            self._buckets[caller] = (tokens, now)
            retry_ms = int((1.0 - tokens) / self.rate * 1000) + 1
            raise RateLimited("request rate over the limit", retry_after_ms=retry_ms)
        self._buckets[caller] = (tokens - 1.0, now)
        while len(self._buckets) > self.max_callers:
            self._buckets.popitem(last=False)


def failure_address(address: str) -> str:
    """The address failures are counted against: an IPv4 address as it is (IPv4-mapped IPv6
    too), an IPv6 address by its /64 (one host commonly holds a whole /64, so counting single
    addresses would give it 2^64 buckets)."""
    if ":" not in address:
        return address
    try:
        ip = ipaddress.IPv6Address(address.partition("%")[0])
    except ValueError:
        return address
    if ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    if ip.is_loopback:
        return str(ip)
    return str(ipaddress.IPv6Network((ip, 64), strict=False))


class AuthFailures:
    """Failed key checks per client address (see `failure_address`): a token bucket of `burst`
    failures refilled at `per_minute`; `per_minute <= 0` leaves failures unlimited. The table holds
    at most `max_addresses` addresses (the least recently seen are forgotten first)."""

    def __init__(self, per_minute: float = 10.0, burst: float = 5.0, max_addresses: int = 10_000) -> None:
        self.rate = per_minute / 60.0
        self.burst = max(burst, 1.0)
        self.max_addresses = max(1, max_addresses)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()

    def _tokens(self, address: str, now: float) -> float:
        entry = self._buckets.get(address)
        if entry is None:
            return self.burst
        tokens, last = entry
        return min(self.burst, tokens + (now - last) * self.rate)

    def admit(self, address: str) -> None:
        """Raise RateLimited while `address` has no failure left to spend."""
        if self.rate <= 0 or not self._buckets:
            return
        address = failure_address(address)
        if address not in self._buckets:
            return
        tokens = self._tokens(address, time.monotonic())
        if tokens < 1.0:
            retry_ms = int((1.0 - tokens) / self.rate * 1000) + 1
            raise RateLimited("too many failed authentications from this address", retry_after_ms=retry_ms)

    def failed(self, address: str) -> None:
        """Spend one failure of `address`."""
        if self.rate <= 0:
            return
        address = failure_address(address)
        now = time.monotonic()
        tokens = self._tokens(address, now)
        self._buckets.pop(address, None)
        self._buckets[address] = (max(0.0, tokens - 1.0), now)
        while len(self._buckets) > self.max_addresses:
            self._buckets.popitem(last=False)


class Authenticator:
    def __init__(
        self,
        keys: tuple[ApiKey, ...],
        rate: float = 0.0,
        burst: float = 0.0,
        failures: AuthFailures | None = None,
        ws_failures_close: int = 5,
    ) -> None:
        self.keys = keys
        self.buckets = TokenBuckets(rate, burst or rate)
        self.failures = failures if failures is not None else AuthFailures()
        # Failed `auth` ops after which a WebSocket is closed with 1008 (0: never).
        self.ws_failures_close = ws_failures_close

    @property
    def enabled(self) -> bool:
        return bool(self.keys)

    def lookup(self, key: str | None, caller: str = "-") -> ApiKey | None:
        """The key's grant; None when auth is off. Raises Unauthorized for a missing/unknown key
        (an unknown one counts as a failure of `caller`, the client address), RateLimited while
        `caller` has spent its failures (whatever the key)."""
        if not self.enabled:
            return None
        if not key:
            raise Unauthorized("a valid API key is required")
        self.failures.admit(caller)
        presented = key.encode()
        for candidate in self.keys:
            if hmac.compare_digest(candidate.key.encode(), presented):
                return candidate
        self.failures.failed(caller)
        raise Unauthorized("a valid API key is required")

    def check_metrics(self, grant: ApiKey | None) -> None:
        """Raise Forbidden unless `grant` may read /metrics (None: auth is off, anyone may)."""
        if grant is not None and not grant.reads_metrics:
            raise Forbidden("reading /metrics needs an admin key or a key with \"metrics\": true")

    def check(self, grant: ApiKey | None, caller: str, request: rq.Request) -> None:
        """Raise Forbidden if `grant` may not run `request`, RateLimited if over the rate."""
        needed, collection = required_access(request)
        if grant is not None and needed is not Access.NONE:
            if grant.access < needed:
                raise Forbidden(f"this key allows {grant.access.name.lower()} access only")
            if not grant.allows(collection):
                raise Forbidden(f"this key has no access to collection {collection!r}")
        self.buckets.charge(grant.key if grant is not None else caller)


def bearer(header: str | None) -> str | None:
    if header and header[:7].lower() == "bearer ":
        return header[7:].strip()
    return None
