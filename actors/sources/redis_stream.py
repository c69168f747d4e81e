"""The Redis Streams transport of a broker source (redis-py's asyncio client).

URL: `redis://[USER:PASSWORD@]HOST:PORT/DB?stream=NAME&group=GROUP&collection=DEFAULT&notify=NAME`
(`group` defaults to `shoal`, `notify` to `NAME.indexed`; `consumer` names this reader in the
group, default `shoal`, and should stay the same across restarts so that the entries pending for
it are read again first; `rediss://` for TLS).

- The group is created with `XGROUP CREATE ... 0 MKSTREAM` when missing: a new group reads the
  stream from its first entry.
- Entries are read with `XREADGROUP` in batches (`COUNT`, `BLOCK`); before new entries, the ones
  still pending for this consumer (delivered, never acknowledged: a crash) are read again from
  id 0, and those of other consumers idle for `claim_idle_ms` are taken over with `XAUTOCLAIM`.
- Completion events go to the notify stream with `XADD ... MAXLEN ~ N`, then the entries are
  acknowledged with `XACK`: one script call per batch (`_COMPLETE`), so a batch of n entries is
  one command to pack and one reply to read, not n + 1 (packing was most of the source's own
  CPU). The two keys must live on one server: Redis Cluster is not supported.
- The client's own retries are off: a lost connection surfaces at once, and the source actor
  starts over (backing off) from what PostgreSQL and the group's pending list say.
"""

from __future__ import annotations

import contextlib
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qs, quote, urlsplit

import orjson
import redis.asyncio as aioredis
import redis.exceptions
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff

from actors.sources.base import Completion, RawEntry, SourceInfo
from models.errors import StartupError
from models.requests import COLLECTION_NAME

# KEYS: notify stream, source stream. ARGV: maxlen, group, and one JSON text holding the events
# (each a flat list of field names and values) and the entry ids to acknowledge: one value for
# the client to pack whatever the batch's size, since it packs each value in Python on the event
# loop (one value per field and id was a dozen per entry). XACK goes in chunks: Lua's unpack is
# bounded by its C stack.
_COMPLETE = """
local maxlen, group = ARGV[1], ARGV[2]
local batch = cjson.decode(ARGV[3])
local events, ids = batch[1], batch[2]
for _, fields in ipairs(events) do
  redis.call('XADD', KEYS[1], 'MAXLEN', '~', maxlen, '*', unpack(fields))
end
local i = 1
while i <= #ids do
  local last = math.min(i + 999, #ids)
  redis.call('XACK', KEYS[2], group, unpack(ids, i, last))
  i = last + 1
end
return #events
"""

SCHEMES = ("redis", "rediss")
DEFAULT_GROUP = "shoal"
DEFAULT_CONSUMER = "shoal"
PARAMS = frozenset({"stream", "group", "collection", "notify", "consumer"})
# Redis stream keys and group names are binary-safe; these bounds keep them printable and short.
MAX_NAME = 256
SOCKET_READ_BYTES = 1 << 20


@dataclass(frozen=True, slots=True)
class RedisSourceUrl:
    """A parsed source URL. `safe_url` is the URL without credentials."""

    scheme: str
    host: str
    port: int
    db: int
    username: str | None
    password: str | None
    stream: str
    group: str
    consumer: str
    collection: str | None
    notify: str

    @property
    def safe_url(self) -> str:
        query = f"stream={quote(self.stream)}&group={quote(self.group)}"
        if self.collection:
            query += f"&collection={quote(self.collection)}"
        query += f"&notify={quote(self.notify)}"
        if self.consumer != DEFAULT_CONSUMER:
            query += f"&consumer={quote(self.consumer)}"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}/{self.db}?{query}"


def parse_url(url: str) -> RedisSourceUrl:
    """The URL's parts. Raises StartupError saying what is wrong (the message never repeats a
    password)."""
    parts = urlsplit(url)
    shown = parts._replace(netloc=parts.hostname or "").geturl() if parts.password else url
    where = f"source {shown!r}"
    if parts.scheme not in SCHEMES:
        raise StartupError(f"{where}: must start with redis:// (or rediss://)")
    try:
        port = parts.port or 6379
    except ValueError:
        raise StartupError(f"{where}: the port must be a number 1..65535") from None
    host = parts.hostname or "127.0.0.1"
    path = parts.path.strip("/") or "0"
    if not path.isdigit():
        raise StartupError(f"{where}: the path must be the database number (redis://HOST:PORT/0)")
    params = parse_qs(parts.query, keep_blank_values=True)
    unknown = sorted(set(params) - PARAMS)
    if unknown:
        raise StartupError(f"{where}: unknown parameter(s) {', '.join(unknown)} (known: {', '.join(sorted(PARAMS))})")
    single: dict[str, str] = {}
    for key, values in params.items():
        if len(values) != 1 or not values[0] or len(values[0]) > MAX_NAME:
            raise StartupError(f"{where}: '{key}' must be given once, 1..{MAX_NAME} characters")
        single[key] = values[0]
    stream = single.get("stream")
    if stream is None:
        raise StartupError(f"{where}: needs stream=NAME")
    collection = single.get("collection")
    if collection is not None and not COLLECTION_NAME.fullmatch(collection):
        raise StartupError(f"{where}: collection must match [A-Za-z0-9_-]{{1,64}}")
    notify = single.get("notify", f"{stream}.indexed")
    if notify == stream:
        raise StartupError(f"{where}: notify must name another stream than the one consumed")
    return RedisSourceUrl(
        scheme=parts.scheme,
        host=host,
        port=port,
        db=int(path),
        username=parts.username,
        password=parts.password,
        stream=stream,
        group=single.get("group", DEFAULT_GROUP),
        consumer=single.get("consumer", DEFAULT_CONSUMER),
        collection=collection,
        notify=notify,
    )


def check_source_url(url: str) -> tuple[str, str]:
    """The (stream, group) `url` consumes. Raises ValueError (for the settings' check) unless it
    is a valid source URL."""
    try:
        parts = parse_url(url)
    except StartupError as exc:
        raise ValueError(str(exc)) from None
    return parts.stream, parts.group


def _order(entry_id: str) -> tuple[int, ...]:
    ms, _, seq = entry_id.partition("-")
    return int(ms), int(seq or 0)


def _text(value: Any) -> str:
    return value.decode("utf-8", "replace") if isinstance(value, bytes) else str(value)


class RedisStream:
    """One consumer of a consumer group on one Redis stream (see the module docstring)."""

    initial_position = "0-0"

    def __init__(
        self, url: str, *, block_ms: int, notify_maxlen: int, timeout_s: float, url_parts: RedisSourceUrl | None = None
    ) -> None:
        self.url = url_parts or parse_url(url)
        self.key = f"redis:{self.url.stream}:{self.url.group}"
        self.info = SourceInfo(
            self.url.safe_url, self.url.stream, self.url.group, self.url.consumer, self.url.notify, self.url.collection
        )
        self._block_ms = block_ms
        self._notify_maxlen = notify_maxlen
        self._timeout_s = timeout_s
        self._client: aioredis.Redis | None = None
        self._complete: Any = None  # the completion script, registered on the current client

    def order(self, entry_id: str) -> tuple[int, ...]:
        return _order(entry_id)

    def is_outage(self, exc: BaseException) -> bool:
        return isinstance(exc, redis.exceptions.ConnectionError | redis.exceptions.TimeoutError | OSError)

    def _redis(self) -> aioredis.Redis:
        if self._client is None:
            raise ConnectionError("not connected")
        return self._client

    async def connect(self) -> None:
        await self.aclose()
        self._complete = None
        u = self.url
        self._client = aioredis.Redis(
            host=u.host,
            port=u.port,
            db=u.db,
            username=u.username,
            password=u.password,
            ssl=u.scheme == "rediss",
            socket_connect_timeout=self._timeout_s,
            # A blocking read holds its connection for block_ms; anything longer is a dead peer.
            socket_timeout=self._timeout_s + self._block_ms / 1000,
            retry=Retry(NoBackoff(), 0),
            # A batch of entries is megabytes: read what the socket holds in a few calls, not in
            # dozens of 64 KiB ones (each a trip through the event loop).
            socket_read_size=SOCKET_READ_BYTES,
            client_name=f"shoal-source-{u.consumer}",
        )
        try:
            await self._client.xgroup_create(u.stream, u.group, id="0", mkstream=True)
        except redis.exceptions.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    async def claim(self, min_idle_ms: int) -> int:
        r, u = self._redis(), self.url
        start = "0-0"
        while True:
            # (Without JUSTID: with it, redis-py drops the cursor from the reply.)
            reply: Any = await r.xautoclaim(u.stream, u.group, u.consumer, min_idle_ms, start, count=1000)
            start = _text(reply[0])
            if start == "0-0":
                break
        summary = await r.xpending(u.stream, u.group)
        others = 0
        for consumer in summary.get("consumers") or []:
            if _text(consumer["name"]) != u.consumer:
                others += int(consumer["pending"])
        return others

    async def _read(self, start: str, count: int, block: int | None) -> list[RawEntry]:
        u = self.url
        reply: Any = await self._redis().xreadgroup(u.group, u.consumer, {u.stream: start}, count=count, block=block)
        out: list[RawEntry] = []
        for _stream, entries in reply or []:
            for entry_id, fields in entries:
                # (No fields: pending, but deleted from the stream meanwhile: XDEL, MAXLEN.)
                out.append(RawEntry(_text(entry_id), fields or {}))
        return out

    async def read_pending(self, after: str, count: int) -> Sequence[RawEntry]:
        return await self._read(after, count, None)

    async def read_new(self, count: int, block_ms: int) -> Sequence[RawEntry]:
        return await self._read(">", count, block_ms)

    async def complete(self, completions: Sequence[Completion], ack: Sequence[str]) -> None:
        u = self.url
        events = [completion.event() for completion in completions]
        batch = orjson.dumps([events, list(ack)])
        if self._complete is None:
            self._complete = self._redis().register_script(_COMPLETE)
        await self._complete(keys=[u.notify, u.stream], args=[self._notify_maxlen, u.group, batch])

    async def lag(self) -> int | None:
        r, u = self._redis(), self.url
        for group in await r.xinfo_groups(u.stream):
            if _text(group.get("name")) == u.group:
                lag = group.get("lag")
                if lag is not None:
                    return int(lag)
                # Redis < 7, or a lag Redis cannot tell (entries deleted): length minus read.
                read = group.get("entries-read")
                if read is not None:
                    return max(0, int(await r.xlen(u.stream)) - int(read))
                return None
        return None

    async def aclose(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            with contextlib.suppress(Exception):  # closing a dead connection
                await client.aclose()
