"""A bounded fuzz run against a Shoal server: hostile and valid frames, and what came back.

    python -m load.fuzz [--url URL] [--frames 10000] [--seed 1] [--connections 4] [--json out.json]
    python -m load.fuzz --url URL --replay out.json     # resend the saved failing frames

Several WebSocket connections send generated frames (`load.fuzz_frames.FrameGen`, seeded: the
same seed sends the same frames), one at a time each, so every reply is checked against the frame
that caused it; an HTTP client sends generated bodies and headers to the JSON/msgpack API; a
fixed list of known-hostile frames (`SPECIALS`) goes out at fixed points of the run. Meanwhile a
monitor connection pings every 20 ms. Before the run a canary collection is written; the fuzzer
may read it but never writes it.

Checked: every error code is in the error table and none is `internal`; error messages are bounded
and show no traceback, path or exception name; replies decode, carry the right id and hold only
finite numbers; every frame gets a reply in time and no connection is dropped; HTTP statuses
match their codes and are never 500; afterwards the server answers `/healthz`, its process is
alive, and the canary reads back identical with an unchanged count. Each distinct failure is kept
once, with the smallest frame that caused it (hex, for `--replay`) and what the server answered.
Exit status 1 when anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote

import httpx
import msgpack
import numpy as np
import websockets
from websockets.asyncio.client import ClientConnection
from websockets.typing import Subprotocol

from load.common import Histogram, Progress, check_local, format_table, log, run_async, target, write_json
from load.fuzz_frames import FrameGen, msgpack_f32, pack
from models.errors import ALL_ERRORS

ERROR_STATUS = {e.code: e.http_status for e in ALL_ERRORS}
MAX_MESSAGE_CHARS = 4_096
REPLY_TIMEOUT_S = 10.0
PING_INTERVAL_S = 0.02
PING_P99_LIMIT_MS = 100.0
MAX_FRAME_BYTES = 16 * 1024 * 1024
CANARY_DOCS = 64
DIM = 8
_INTERNALS = re.compile(
    r"Traceback|File \"|\.py\b|/(?:usr|home|work|tmp|opt)/|site-packages|"
    r"\b(?:[A-Z][A-Za-z]*(?:Error|Exception|Warning)|KeyboardInterrupt|StopIteration)\b|"
    r"\b(?:asyncpg|hnswlib|starlette|uvicorn|onnxruntime)\b|"
    # PostgreSQL's own error texts
    r"invalid byte sequence|SQLSTATE|violates .* constraint|syntax error at|relation \"|column \""
)
SUBPROTOCOLS = [Subprotocol("shoal.v1")]


def internals_in(message: str) -> str | None:
    """The first trace of the server's insides in an error message (None when clean)."""
    found = _INTERNALS.search(message)
    return None if found is None else found.group(0)


def short(obj: Any, n: int = 400) -> str:
    try:
        text = repr(obj)
    except RecursionError:
        text = f"<{type(obj).__name__} nested too deep to print>"
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


# Specials that must be refused: an `ok` answer is a failure.
MUST_FAIL = frozenset({"empty_query_text", "http_empty_text"})


def special_frames(collection: str, canary: str, text: str) -> list[tuple[str, bytes]]:
    """Known-hostile WebSocket frames, sent once each per run: (name, bytes)."""
    huge = [3e38] * DIM
    return [
        ("bin_key_top_level", pack({"id": 901, "op": "ping", b"k": 1})),
        ("bin_keys_mixed", pack({"id": 902, "op": "count", "collection": canary, b"k": 1, "z": 2})),
        ("ten_mb_unknown_argument", pack({"id": 903, "op": "ping", "u" * (10 * 1024 * 1024): 1})),
        (
            "in_of_a_million",
            pack(
                {
                    "id": 904,
                    "op": "query",
                    "collection": canary,
                    "vector": [0.5] * DIM,
                    "where": {"n": {"$in": list(range(1_000_000))}},
                }
            ),
        ),
        (
            "huge_finite_vector_query",
            pack({"id": 905, "op": "query", "collection": canary, "vector": huge, "include": ["vector"]}),
        ),
        ("huge_finite_vector_bin", pack({"id": 906, "op": "query", "collection": canary, "vector": msgpack_f32(huge)})),
        (
            "huge_finite_vector_upsert",
            pack({"id": 907, "op": "upsert", "collection": collection, "docs": [{"id": "huge", "vector": huge}]}),
        ),
        # A stored vector of huge finite values must not break the answers of ordinary queries.
        (
            "query_after_huge_upsert",
            pack({"id": 914, "op": "query", "collection": collection, "vector": [0.5] * DIM, "include": ["vector"]}),
        ),
        ("empty_query_text", pack({"id": 908, "op": "query", "collection": text, "text": ""})),
        (
            "after_seq_uint64",
            pack(
                {
                    "id": 909,
                    "op": "subscribe",
                    "collection": canary,
                    "vector": [0.5] * DIM,
                    "threshold": 0.5,
                    "after_seq": 2**64 - 1,
                }
            ),
        ),
        ("where_nul_delete", pack({"id": 910, "op": "delete", "collection": collection, "where": {"t": "a\x00b"}})),
        (
            "where_text_nul_delete",
            pack({"id": 911, "op": "delete", "collection": collection, "where_text": {"$contains": "\x00"}}),
        ),
        (
            "wide_or",
            pack(
                {
                    "id": 912,
                    "op": "query",
                    "collection": canary,
                    "vector": [0.5] * DIM,
                    "where": {"$or": [{"n": i} for i in range(50_000)]},
                }
            ),
        ),
        (
            "k_max_include_vector",
            pack(
                {
                    "id": 913,
                    "op": "query",
                    "collection": canary,
                    "vector": [0.5] * DIM,
                    "k": 1000,
                    "include": ["vector", "text", "metadata"],
                }
            ),
        ),
    ]


def special_http(collection: str, canary: str, text: str) -> list[tuple[str, str, str, dict[str, str], bytes]]:
    """Known-hostile HTTP requests: (name, method, path, headers, body)."""
    js = {"content-type": "application/json"}
    q = f"/v1/collections/{canary}/query"
    return [
        ("http_lone_surrogate_text", "POST", f"/v1/collections/{text}/query", js, b'{"text": "\\ud800"}'),
        ("http_lone_surrogate_unknown_arg", "POST", q, js, b'{"vector": [1,1,1,1,1,1,1,1], "\\ud800": 1}'),
        (
            "http_lone_surrogate_doc",
            "POST",
            f"/v1/collections/{collection}/upsert",
            js,
            b'{"docs": [{"id": "s", "text": "a\\udc80b"}]}',
        ),
        (
            "http_lone_surrogate_where",
            "POST",
            f"/v1/collections/{collection}/delete",
            js,
            b'{"where": {"t": "\\ud800"}}',
        ),
        ("http_huge_int_k", "POST", q, js, b'{"vector": [1,1,1,1,1,1,1,1], "k": 1' + b"0" * 30 + b"}"),
        ("http_huge_int_vector", "POST", q, js, b'{"vector": [1' + b"0" * 400 + b",1,1,1,1,1,1,1]}"),
        (
            "http_huge_int_threshold_subscribe",
            "GET",
            f"/v1/collections/{canary}/subscribe?vector=1,1,1,1,1,1,1,1&threshold=1" + "0" * 400,
            {},
            b"",
        ),
        ("http_huge_int_last_event_id", "GET", f"/v1/collections/{canary}/changes?last_event_id=1" + "0" * 30, {}, b""),
        (
            "http_huge_int_metadata",
            "POST",
            f"/v1/collections/{collection}/upsert",
            js,
            b'{"docs": [{"id": "m", "vector": [1,1,1,1,1,1,1,1], "metadata": {"n": 1' + b"0" * 30 + b"}}]}",
        ),
        ("http_nan_literal", "POST", q, js, b'{"vector": [NaN,1,1,1,1,1,1,1]}'),
        ("http_inf_literal_alpha", "POST", q, js, b'{"vector": [1,1,1,1,1,1,1,1], "alpha": Infinity}'),
        ("http_1e400", "POST", q, js, b'{"vector": [1e400,1,1,1,1,1,1,1]}'),
        (
            "http_huge_finite_vector",
            "POST",
            q,
            js,
            json.dumps({"vector": [3e38] * DIM, "include": ["vector"]}).encode(),
        ),
        ("http_deep_json", "POST", q, js, b"[" * 100_000 + b"]" * 100_000),
        ("http_5000_digit_int", "POST", q, js, b'{"k": ' + b"9" * 5000 + b"}"),
        ("http_invalid_utf8", "POST", q, js, b'{"text": "\xff\xfe"}'),
        ("http_msgpack_bin_key", "POST", q, {"content-type": "application/msgpack"}, pack({b"k": 1})),
        ("http_msgpack_not_map", "POST", q, {"content-type": "application/msgpack"}, pack([1, 2])),
        ("http_empty_text", "POST", f"/v1/collections/{text}/query", js, b'{"text": ""}'),
        ("http_unknown_op", "POST", f"/v1/collections/{canary}/" + "x" * 5000, js, b"{}"),
        ("http_path_body_conflict", "POST", q, js, b'{"collection": "other", "vector": [1,1,1,1,1,1,1,1]}'),
        (
            "http_sse_bad_where",
            "GET",
            f"/v1/collections/{canary}/subscribe?text=a&threshold=0.5&where=%7B%22"
            + "a" * 5000
            + "%22%3A%7B%22%24x%22%3A1%7D%7D",
            {},
            b"",
        ),
    ]


# ----------------------------------------------------------------------------- findings


@dataclass
class Finding:
    """One distinct failure: how often, and the smallest input that caused it."""

    kind: str
    transport: str
    op: str
    detail: str
    count: int = 0
    example: str = ""
    example_hex: str | None = None
    example_size: int = 0
    answer: str = ""
    special: str | None = None
    defect: str = "new"


@dataclass
class Findings:
    items: dict[tuple[str, str, str, str], Finding] = field(default_factory=dict)

    def add(
        self,
        kind: str,
        transport: str,
        op: Any,
        detail: str,
        *,
        example: Any,
        raw: bytes | None,
        answer: Any,
        special: str | None = None,
        probe: bytes | None = None,
    ) -> None:
        """Count one failure; `probe` (the frame, or the HTTP path and body) names the known defect."""
        op_name = op if isinstance(op, str) and len(op) <= 40 else "-"
        key = (kind, transport, op_name, _normalise(detail))
        size = len(raw) if raw is not None else len(short(example, 10**6))
        found = self.items.get(key)
        if found is None:
            found = self.items[key] = Finding(kind, transport, op_name, detail[:500])
        found.count += 1
        if found.count == 1 or size < found.example_size:
            found.example = short(example, 600)
            found.example_hex = raw.hex() if raw is not None and len(raw) <= 4096 else None
            found.example_size = size
            found.answer = short(answer, 600)
            found.special = special
            found.detail = detail[:500]
            found.defect = known_defect(kind, detail, probe if probe is not None else raw)

    def as_list(self) -> list[dict[str, Any]]:
        return [vars(f) for f in sorted(self.items.values(), key=lambda f: (f.kind, f.op, -f.count))]


KNOWN_DEFECTS = {
    "bin_keys": "msgpack binary map keys -> internal",
    "surrogates": "lone surrogates -> internal",
    "huge_ints": "huge JSON integers -> 500",
    "huge_vectors": "huge finite vectors -> broken replies",
    "in_stall": "$in of 10^6 elements stalls the loop",
    "echo": "input echoed back in full",
    "drop_race": "unavailable: shard is shutting down, racing drop_collection",
    "empty_text": "empty query text accepted",
}
_SURROGATE_ESCAPE = re.compile(rb"\\u[dD][89a-fA-F][0-9a-fA-F]{2}|\xed[\xa0-\xbf][\x80-\xbf]")


def _walk(obj: Any) -> Any:
    yield obj
    if isinstance(obj, dict):
        for k, v in obj.items():
            yield from _walk(k)
            yield from _walk(v)
    elif isinstance(obj, list):
        for v in obj:
            yield from _walk(v)


def known_defect(kind: str, detail: str, probe: bytes | None) -> str:
    """Which of the known defects a failure looks like ("new" when none fits): a heuristic over
    the failure and the bytes that caused it, for the report."""
    if "shutting down" in detail:
        return KNOWN_DEFECTS["drop_race"]
    if kind == "long_message":
        return KNOWN_DEFECTS["echo"]
    if kind == "accepted" and "empty" in detail:
        return KNOWN_DEFECTS["empty_text"]
    if probe is None:
        return "new"
    try:
        obj = msgpack.unpackb(probe, raw=False, strict_map_key=False, unicode_errors="surrogatepass")
    except Exception:
        obj = None
    if isinstance(obj, dict) and any(isinstance(k, bytes) for k in obj):
        return KNOWN_DEFECTS["bin_keys"]
    if kind in ("no_reply", "slow_ping") and re.search(rb"\$in", probe):
        return KNOWN_DEFECTS["in_stall"]
    if kind == "non_finite_reply" or b"3e+38" in probe or b"\x7fa\xb1\xe6"[::-1] in probe:
        return KNOWN_DEFECTS["huge_vectors"]
    if any(isinstance(v, float) and abs(v) >= 1e38 for v in _walk(obj)):
        return KNOWN_DEFECTS["huge_vectors"]
    if _SURROGATE_ESCAPE.search(probe):
        return KNOWN_DEFECTS["surrogates"]
    if re.search(rb"\d{20}", probe):
        return KNOWN_DEFECTS["huge_ints"]
    return "new"


def _normalise(detail: str) -> str:
    text = re.sub(r"'[^']*'|\"[^\"]*\"", "'…'", detail)
    text = re.sub(r"\d+", "N", text)
    return text[:80]


# ----------------------------------------------------------------------------- reply checks


def finite_problem(value: Any, path: str = "reply") -> str | None:
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path} is {value}"
    if isinstance(value, dict):
        for k, v in value.items():
            problem = finite_problem(v, f"{path}.{k}")
            if problem:
                return problem
    elif isinstance(value, list):
        for i, v in enumerate(value):
            problem = finite_problem(v, f"{path}[{i}]")
            if problem:
                return problem
    return None


def error_problems(error: Any) -> list[tuple[str, str]]:
    """(kind, detail) for each way an error map breaks the rules."""
    if not isinstance(error, dict):
        return [("malformed_error", f"error is {type(error).__name__}")]
    code, message = error.get("code"), error.get("message")
    out: list[tuple[str, str]] = []
    if code not in ERROR_STATUS:
        out.append(("unknown_code", f"code {short(code, 80)}"))
    elif code == "internal":
        out.append(("internal", f"internal: {short(message, 200)}"))
    elif code == "unavailable":  # the database is up for the whole run: nothing should be unavailable
        out.append(("unavailable", f"unavailable: {short(message, 200)}"))
    if not isinstance(message, str):
        out.append(("malformed_error", f"message is {type(message).__name__}"))
        return out
    if len(message) > MAX_MESSAGE_CHARS:
        out.append(("long_message", f"{code}: {len(message)}-char message starting {message[:60]!r}"))
    leak = internals_in(message)
    if leak is not None:
        out.append(("leak", f"{code}: message shows {leak!r}: {message[:200]!r}"))
    return out


def ws_reply_problems(reply: Any, sent_id: Any) -> list[tuple[str, str]]:
    if not isinstance(reply, dict):
        return [("malformed_reply", f"reply is {type(reply).__name__}")]
    if "id" not in reply or not isinstance(reply.get("ok"), bool):
        return [("malformed_reply", f"reply keys {sorted(map(str, reply))[:8]}")]
    out: list[tuple[str, str]] = []
    if reply["id"] is not None and reply["id"] != sent_id:
        out.append(("wrong_id", f"sent id {short(sent_id, 40)}, reply id {short(reply['id'], 40)}"))
    if reply["ok"]:
        problem = finite_problem(reply)
        if problem:
            out.append(("non_finite_reply", problem))
    else:
        out.extend(error_problems(reply.get("error")))
    return out


def _frame_info(data: bytes | str) -> tuple[Any, Any]:
    """(id, op) of a frame we sent, as far as it decodes."""
    if isinstance(data, str):
        return None, "-"
    try:
        obj = msgpack.unpackb(data, raw=False, strict_map_key=False)
    except Exception:
        return None, "-"
    if not isinstance(obj, dict):
        return None, "-"
    return obj.get("id"), obj.get("op", "-")


# ----------------------------------------------------------------------------- the run


@dataclass
class Run:
    url: str
    frames: int
    seed: int
    connections: int
    http_requests: int
    findings: Findings = field(default_factory=Findings)
    codes: Counter[str] = field(default_factory=Counter)
    http_statuses: Counter[int] = field(default_factory=Counter)
    sent: int = 0
    http_sent: int = 0
    reconnects: int = 0
    client_refused: int = 0
    messages: Counter[str] = field(default_factory=Counter)
    pings: Histogram = field(default_factory=Histogram)
    slow_pings: list[tuple[float, float, list[str]]] = field(default_factory=list)
    # What each fuzzing connection has in flight (op or special name, and size): a slow ping names
    # the frames that were being served while it waited.
    in_flight: dict[int, tuple[int, str]] = field(default_factory=dict)
    specials: dict[str, str] = field(default_factory=dict)
    created: set[str] = field(default_factory=set)

    @property
    def ws_url(self) -> str:
        base = self.url.rstrip("/")
        if base.endswith("/v1/ws"):
            return base
        return base.replace("http://", "ws://", 1).replace("https://", "wss://", 1) + "/v1/ws"

    @property
    def http_url(self) -> str:
        return self.ws_url.replace("ws://", "http://", 1).removesuffix("/v1/ws")


async def _connect(url: str) -> ClientConnection:
    return await websockets.connect(url, subprotocols=SUBPROTOCOLS, max_size=None, ping_interval=None)


async def _call(ws: ClientConnection, request_id: int, op: str, **args: Any) -> dict[str, Any]:
    """One request on a quiet connection; raises RuntimeError on an error reply."""
    await ws.send(pack({"id": request_id, "op": op, **args}))
    while True:
        reply = msgpack.unpackb(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S), raw=False)
        if isinstance(reply, dict) and reply.get("id") == request_id:
            if not reply.get("ok"):
                raise RuntimeError(f"{op} failed: {reply.get('error')}")
            return dict(reply)


def canary_docs(seed: int) -> list[dict[str, Any]]:
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((CANARY_DOCS, DIM)).astype(np.float32)
    docs = []
    for i in range(CANARY_DOCS):
        docs.append(
            {
                "id": f"c{i}",
                "text": f"canary {i} \u00e9\u00e8 😀",
                "vector": vectors[i].astype("<f4").tobytes(),
                "metadata": {"n": i, "tag": f"t{i % 4}", "tags": [f"a{i % 3}", "z"], "ok": i % 2 == 0, "x": i / 7},
            }
        )
    return docs


async def read_canary(ws: ClientConnection, name: str) -> tuple[int, list[dict[str, Any]]]:
    count = (await _call(ws, 3, "count", collection=name))["count"]
    got = await _call(
        ws, 4, "get", collection=name, ids=[f"c{i}" for i in range(CANARY_DOCS)], include=["text", "metadata", "vector"]
    )
    docs = sorted(got["docs"], key=lambda d: d["id"])
    return int(count), docs


@dataclass(frozen=True, slots=True)
class Collections:
    """canary: written before the run, only read during it. fuzz: what generated frames write
    (and drop, and re-create). special: the known-hostile writes (kept, so they reach a shard).
    text: the embedding model's width, for text queries."""

    canary: str
    fuzz: list[str]
    special: str
    text: str


async def setup(run: Run, prefix: str) -> tuple[Collections, list[dict[str, Any]]]:
    """Create the canary and the other collections; returns them and the canary as read back."""
    ws = await _connect(run.ws_url)
    try:
        canary = f"{prefix}_canary"
        await _call(ws, 1, "create_collection", name=canary, dim=DIM, metric="cosine")
        await _call(ws, 2, "upsert", collection=canary, docs=canary_docs(run.seed))
        targets = [f"{prefix}_a", f"{prefix}_b"]
        names = Collections(canary, targets, f"{prefix}_s", f"{prefix}_t")
        for i, (name, metric) in enumerate(zip([*targets, names.special], ("cosine", "l2", "cosine"), strict=True)):
            await _call(ws, 10 + i, "create_collection", name=name, dim=DIM, metric=metric)
            run.created.add(name)
        await _call(ws, 15, "create_collection", name=names.text)
        run.created.add(names.text)
        await _call(
            ws,
            20,
            "upsert",
            collection=targets[0],
            docs=[
                {"id": f"d{i}", "vector": [math.sin(i + j) for j in range(DIM)], "metadata": {"n": i, "tag": "a"}}
                for i in range(100)
            ],
        )
        _, before = await read_canary(ws, canary)
        return names, before
    finally:
        await ws.close()


async def monitor(run: Run, stop: asyncio.Event) -> None:
    """Ping every PING_INTERVAL_S on its own connection; record round trips."""
    ws = await _connect(run.ws_url)
    started = time.perf_counter()
    try:
        n = 0
        while not stop.is_set():
            n += 1
            t0 = time.perf_counter()
            serving = set(run.in_flight.values())
            try:
                await _call(ws, n, "ping")
            except (TimeoutError, websockets.ConnectionClosed, RuntimeError) as exc:
                run.findings.add(
                    "monitor",
                    "ws",
                    "ping",
                    f"monitor ping failed: {type(exc).__name__}",
                    example="ping",
                    raw=None,
                    answer=str(exc),
                )
                try:
                    ws = await _reconnect(run, ws)
                except (OSError, websockets.WebSocketException):
                    return  # the server is gone: the checks after the run report it
                continue
            rtt = time.perf_counter() - t0
            run.pings.record(rtt)
            if rtt * 1000 > PING_P99_LIMIT_MS:
                serving |= set(run.in_flight.values())
                largest = [f"{what} ({size} B)" for size, what in sorted(serving, reverse=True)[:4]]
                run.slow_pings.append((round(t0 - started, 3), round(rtt * 1000, 1), largest))
            await asyncio.sleep(max(0.0, PING_INTERVAL_S - rtt))
    finally:
        await ws.close()


async def ws_worker(
    run: Run, index: int, gen: FrameGen, count: int, specials: list[tuple[str, bytes]], progress: Progress
) -> None:
    """Send `count` frames one at a time, checking each reply; `specials` go out at even spacing."""
    ws = await _connect(run.ws_url)
    every = max(1, count // (len(specials) + 1))
    pending = list(specials)
    try:
        for i in range(count):
            special: str | None = None
            if pending and i % every == every - 1:
                special, data = pending.pop(0)
                frame: bytes | str = data
            else:
                frame = gen.raw_frame()
            ws = await _send_one(run, ws, frame, special)
            progress.update()
    finally:
        await ws.close()


async def _send_one(run: Run, ws: ClientConnection, frame: bytes | str, special: str | None) -> ClientConnection:
    sent_id, op = _frame_info(frame)
    raw = frame if isinstance(frame, bytes) else frame.encode("utf-8", "surrogatepass")
    run.sent += 1
    t0 = time.perf_counter()
    slot = id(ws)
    run.in_flight[slot] = (len(raw), special or short(op, 40))
    try:
        await ws.send(frame)
        while True:
            message = await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S)
            if isinstance(message, str):
                run.findings.add(
                    "text_reply",
                    "ws",
                    op,
                    "the server sent a text frame",
                    example=frame,
                    raw=raw,
                    answer=message,
                    special=special,
                )
                break
            try:
                reply = msgpack.unpackb(message, raw=False, strict_map_key=False)
            except Exception:
                run.findings.add(
                    "undecodable_reply",
                    "ws",
                    op,
                    "reply is not msgpack",
                    example=frame,
                    raw=raw,
                    answer=message[:200],
                    special=special,
                )
                break
            if isinstance(reply, dict) and "id" not in reply and "event" in reply:
                continue  # a subscription push
            code = "ok" if isinstance(reply, dict) and reply.get("ok") else _code_of(reply)
            run.codes[code] += 1
            if code != "ok":
                run.messages[f"{code}: {_normalise(_message_of(reply))}"] += 1
            if special in MUST_FAIL and code == "ok":
                run.findings.add(
                    "accepted",
                    "ws",
                    op,
                    f"{special} was accepted",
                    example=frame,
                    raw=raw,
                    answer=reply,
                    special=special,
                )
            if special is not None:
                run.specials[special] = (
                    f"{code}: {_message_of(reply)[:160]} ({(time.perf_counter() - t0) * 1000:.0f} ms)"
                )
            for kind, detail in ws_reply_problems(reply, sent_id):
                run.findings.add(kind, "ws", op, detail, example=frame, raw=raw, answer=reply, special=special)
            if isinstance(reply, dict) and reply.get("ok") and op == "create_collection":
                name = reply.get("collection", {}).get("name")
                if isinstance(name, str):
                    run.created.add(name)
            break
    except TimeoutError:
        run.findings.add(
            "no_reply",
            "ws",
            op,
            f"no reply within {REPLY_TIMEOUT_S:.0f} s",
            example=frame,
            raw=raw,
            answer=None,
            special=special,
        )
        if special is not None:
            run.specials[special] = "no reply"
        return await _reconnect(run, ws)
    except websockets.ConnectionClosed as exc:
        if len(raw) <= MAX_FRAME_BYTES:
            run.findings.add(
                "connection_closed",
                "ws",
                op,
                f"closed {exc.rcvd.code if exc.rcvd else '-'}",
                example=frame,
                raw=raw,
                answer=str(exc),
                special=special,
            )
        if special is not None:
            run.specials[special] = f"connection closed: {exc}"
        return await _reconnect(run, ws)
    finally:
        run.in_flight.pop(slot, None)
    return ws


async def _reconnect(run: Run, ws: ClientConnection) -> ClientConnection:
    """A new connection after one was lost; raises OSError when the server is gone for good."""
    run.reconnects += 1
    await ws.close()
    for attempt in range(5):
        try:
            return await _connect(run.ws_url)
        except (OSError, websockets.WebSocketException):
            if attempt == 4:
                raise
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


def _code_of(reply: Any) -> str:
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        return str(reply["error"].get("code"))[:40]
    return "malformed"


def _message_of(reply: Any) -> str:
    if isinstance(reply, dict) and isinstance(reply.get("error"), dict):
        return str(reply["error"].get("message"))
    return ""


# ----------------------------------------------------------------------------- HTTP

HTTP_CONTENT_TYPES = (
    "application/json",
    "application/msgpack",
    "text/plain",
    "",
    "application/json; charset=latin-1",
    "application/msgpack+x",
    "multipart/form-data; boundary=x",
)
RAW_BODIES = (
    b"{",
    b"[1, 2]",
    b"null",
    b'"s"',
    b"\xff\xfe\x00",
    b'{"k": 1e400}',
    b'{"vector": [NaN]}',
    b"{}" * 1000,
    b'{"a": 1, "a": 2}',
    b" ",
    b'{"ids": ["\\u0000"]}',
    b'{"where": {"\\ud800": 1}}',
)


def _json_default(value: Any) -> Any:
    if isinstance(value, bytes | bytearray):
        return value.decode("latin-1")
    if isinstance(value, msgpack.ExtType):
        return None
    raise TypeError


def http_request(gen: FrameGen, rng: random.Random) -> tuple[str, str, dict[str, str], bytes, Any]:
    """(method, path, headers, body, the args as sent) for one generated HTTP request."""
    op, args = gen.request()
    name = args.pop("name", None) if op in ("create_collection", "drop_collection") else args.pop("collection", None)
    seg = quote(name if isinstance(name, str) else str(name), safe="", errors="surrogatepass")[:300] or "x"
    if op == "create_collection":
        method, path = "POST", "/v1/collections"
        if name is not None:
            args["name"] = name
    elif op == "list_collections":
        method, path = rng.choice(["GET", "POST"]), "/v1/collections"
    elif op == "drop_collection":
        method, path = "DELETE", f"/v1/collections/{seg}"
    elif op in ("upsert", "delete", "get", "query", "count"):
        method, path = "POST", f"/v1/collections/{seg}/{op}"
    else:
        method, path = "POST", f"/v1/collections/{seg}/{quote(str(op), safe='', errors='surrogatepass')[:200] or 'x'}"
    headers: dict[str, str] = {}
    roll = rng.random()
    body = b""
    if roll < 0.1:
        body = rng.choice(RAW_BODIES)
        headers["content-type"] = rng.choice(HTTP_CONTENT_TYPES)
    elif roll < 0.4:
        headers["content-type"] = "application/msgpack"
        try:
            body = pack(args)
        except (OverflowError, ValueError, TypeError):  # integers past 64 bits: send it as JSON
            headers["content-type"] = "application/json"
    else:
        headers["content-type"] = rng.choice(["application/json", "application/json", ""])
    if not body:
        try:
            body = json.dumps(args, default=_json_default).encode("utf-8", "surrogatepass")
        except (TypeError, ValueError, RecursionError):
            body = b"{}"
    if rng.random() < 0.3:
        headers["accept"] = rng.choice(["application/msgpack", "*/*", "text/html", "application/json;q=0"])
    if rng.random() < 0.1:
        headers["authorization"] = rng.choice(["Bearer", "Basic eA==", "Bearer " + "k" * 5000, "Bearer \x7f"])
    return method, path, headers, body, args


def _parse_http_body(response: httpx.Response) -> Any:
    ctype = response.headers.get("content-type", "")
    if ctype.startswith("application/msgpack"):
        return msgpack.unpackb(response.content, raw=False, strict_map_key=False)
    if ctype.startswith("application/json"):
        return json.loads(response.content)
    return None


def http_problems(response: httpx.Response, stream: bool) -> list[tuple[str, str]]:
    status = response.status_code
    out: list[tuple[str, str]] = []
    if status >= 500 and status != 503:
        out.append(("http_5xx", f"status {status}"))
    if stream and status == 200:
        return out
    try:
        body = _parse_http_body(response)
    except Exception:
        return [*out, ("http_undecodable", f"status {status}: body does not decode as its content-type")]
    if body is None:
        if status not in (404, 405) and not response.headers.get("content-type", "").startswith("text/"):
            out.append(("http_no_body", f"status {status} with content-type {response.headers.get('content-type')}"))
        return out
    if status >= 400:
        if not isinstance(body, dict) or "error" not in body:
            return [*out, ("http_malformed_error", f"status {status}: {short(body, 120)}")]
        out.extend(error_problems(body["error"]))
        code = body["error"].get("code") if isinstance(body["error"], dict) else None
        if code in ERROR_STATUS and ERROR_STATUS[code] != status:
            out.append(("http_status_mismatch", f"code {code} with status {status}"))
    else:
        problem = finite_problem(body)
        if problem:
            out.append(("non_finite_reply", problem))
    return out


async def http_worker(
    run: Run,
    gen: FrameGen,
    rng: random.Random,
    count: int,
    specials: list[tuple[str, str, str, dict[str, str], bytes]],
    progress: Progress,
) -> None:
    every = max(1, count // (len(specials) + 1))
    pending = list(specials)
    last: dict[str, Any] | None = None
    async with httpx.AsyncClient(base_url=run.http_url, timeout=REPLY_TIMEOUT_S) as client:
        for i in range(count):
            special: str | None = None
            if pending and i % every == every - 1:
                special, method, path, headers, body = pending.pop(0)
            else:
                method, path, headers, body, _ = http_request(gen, rng)
            run.http_sent += 1
            example = {"method": method, "path": path[:300], "headers": headers, "body": short(body, 400)}
            previous, last = last, example
            route = path.split("?", 1)[0]
            stream = route.endswith(("/subscribe", "/changes"))
            run.in_flight[-1] = (len(body), f"http {special or route[-40:]}")
            try:
                if stream:
                    async with client.stream(method, path, headers=headers, content=body or None) as response:
                        if response.status_code != 200:
                            await response.aread()
                        status = response.status_code
                        problems = http_problems(response, stream=True)
                        answer = response.content[:300] if response.status_code != 200 else "stream"
                else:
                    response = await client.request(method, path, headers=headers, content=body or None)
                    status = response.status_code
                    problems = http_problems(response, stream=False)
                    answer = response.content[:300]
            except (httpx.LocalProtocolError, httpx.InvalidURL, UnicodeError):
                run.client_refused += 1  # the client would not send it: nothing reached the server
                continue
            except httpx.HTTPError as exc:
                run.findings.add(
                    "http_transport",
                    "http",
                    path.rsplit("/", 1)[-1],
                    type(exc).__name__,
                    # a dropped keep-alive connection may be the previous request's doing
                    example={**example, "previous_request": previous},
                    raw=None,
                    answer=str(exc),
                    special=special,
                )
                if special is not None:
                    run.specials[special] = f"transport error: {exc!r}"
                continue
            run.http_statuses[status] += 1
            if special in MUST_FAIL and status == 200:
                run.findings.add(
                    "accepted",
                    "http",
                    "query",
                    f"{special} was accepted",
                    example=example,
                    raw=None,
                    answer=answer,
                    special=special,
                )
            if special is not None:
                run.specials[special] = f"HTTP {status}: {answer!r}"[:200]
            op = path.rsplit("/", 1)[-1] if path.count("/") >= 4 else method.lower()
            for kind, detail in problems:
                run.findings.add(
                    kind,
                    "http",
                    op,
                    detail,
                    example=example,
                    raw=None,
                    answer=answer,
                    special=special,
                    probe=path.encode("utf-8", "surrogatepass") + b" " + body,
                )
            progress.update()
    run.in_flight.pop(-1, None)


# ----------------------------------------------------------------------------- driver


async def fuzz(
    url: str,
    *,
    frames: int = 10_000,
    seed: int = 1,
    connections: int = 4,
    http_requests: int | None = None,
    server_pid: int | None = None,
    quiet: bool = False,
) -> dict[str, Any]:
    """Run the fuzz against `url` and return the result map (see the module docstring)."""
    check_local(url)
    http_n = max(50, frames // 20) if http_requests is None else http_requests
    run = Run(url, frames, seed, max(1, connections), http_n)
    prefix = f"fz{seed % 1000}_{os.getpid() % 100_000}_{os.urandom(2).hex()}"
    names, before = await setup(run, prefix)
    canary, targets = names.canary, names.fuzz
    readable = [canary, names.text]
    log(
        f"fuzzing {run.ws_url}: {frames} frames on {run.connections} connections, {http_n} HTTP requests, seed {seed}",
        enabled=not quiet,
    )
    stop = asyncio.Event()
    started = time.perf_counter()
    mon = asyncio.create_task(monitor(run, stop))
    share = [frames // run.connections + (1 if i < frames % run.connections else 0) for i in range(run.connections)]
    specials = special_frames(names.special, canary, names.text)
    with Progress("fuzz", frames + http_n, unit="frames", enabled=not quiet) as progress:
        workers = [
            ws_worker(
                run,
                i,
                FrameGen(random.Random(f"{seed}:{i}"), wire="msgpack", collections=targets, readable=readable, dim=DIM),
                share[i],
                specials if i == 0 else [],
                progress,
            )
            for i in range(run.connections)
        ]
        http_gen = FrameGen(random.Random(f"{seed}:http"), wire="json", collections=targets, readable=readable, dim=DIM)
        workers.append(
            http_worker(
                run,
                http_gen,
                random.Random(f"{seed}:headers"),
                http_n,
                special_http(names.special, canary, names.text),
                progress,
            )
        )
        outcomes = await asyncio.gather(*workers, return_exceptions=True)
    for outcome in outcomes:
        if isinstance(outcome, BaseException):  # the server went away under a worker
            run.findings.add(
                "worker_failed",
                "ws",
                "-",
                f"{type(outcome).__name__}: {outcome}"[:300],
                example="-",
                raw=None,
                answer=None,
            )
    seconds = time.perf_counter() - started
    stop.set()
    await mon
    after = await check_after(run, canary, before, server_pid)
    await cleanup(run)
    result = summarize(run, seconds, after, canary)
    result["collections"] = {"canary": canary, "fuzz": targets, "special": names.special, "text": names.text}
    return result


async def check_after(run: Run, canary: str, before: list[dict[str, Any]], server_pid: int | None) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if server_pid is not None:
        try:
            os.kill(server_pid, 0)
            out["process_alive"] = True
        except OSError:
            out["process_alive"] = False
    try:
        async with httpx.AsyncClient(timeout=REPLY_TIMEOUT_S) as client:
            response = await client.get(run.http_url + "/healthz")
            out["healthz_ok"] = response.status_code == 200 and response.json().get("status") == "ok"
    except httpx.HTTPError:
        out["healthz_ok"] = False
    try:
        ws = await _connect(run.ws_url)
        try:
            count, docs = await read_canary(ws, canary)
        finally:
            await ws.close()
        out["canary_count"] = count
        out["canary_intact"] = count == CANARY_DOCS and docs == before
        if not out["canary_intact"]:
            changed = [d["id"] for d, b in zip(docs, before, strict=False) if d != b]
            out["canary_changed"] = changed[:20] + (["(missing docs)"] if len(docs) != len(before) else [])
    except Exception as exc:  # the server may be gone: that is what this reports
        out["canary_intact"] = False
        out["canary_error"] = short(exc, 300)
    return out


async def cleanup(run: Run) -> None:
    try:
        ws = await _connect(run.ws_url)
    except (OSError, websockets.WebSocketException):
        return
    try:
        for i, name in enumerate(sorted(run.created)):
            with contextlib.suppress(RuntimeError, TimeoutError):
                await _call(ws, 100 + i, "drop_collection", name=name)
    finally:
        await ws.close()


def summarize(run: Run, seconds: float, after: dict[str, Any], canary: str) -> dict[str, Any]:
    pings = run.pings.summary_ms()
    p99 = pings.get("p99")
    findings = run.findings.as_list()
    checks = {
        "server_up": bool(after.get("healthz_ok")) and after.get("process_alive", True),
        "canary_intact": bool(after.get("canary_intact")),
        "ping_p99_ok": isinstance(p99, float | int) and p99 < PING_P99_LIMIT_MS,
        "no_failures": not findings,
    }
    return {
        "seed": run.seed,
        "frames": run.sent,
        "http_requests": run.http_sent,
        "connections": run.connections,
        "seconds": round(seconds, 2),
        "frames_per_s": round((run.sent + run.http_sent) / seconds, 1) if seconds > 0 else None,
        "reply_codes": dict(run.codes.most_common()),
        "top_error_messages": dict(run.messages.most_common(40)),
        "http_statuses": {str(k): v for k, v in sorted(run.http_statuses.items())},
        "reconnects": run.reconnects,
        "http_refused_by_client": run.client_refused,
        "ping_ms": pings,
        "slow_pings": sorted(run.slow_pings, key=lambda p: -p[1])[:50],
        "canary": canary,
        "after": after,
        "specials": run.specials,
        "checks": checks,
        "ok": all(checks.values()),
        "failures": findings,
    }


def print_summary(r: dict[str, Any]) -> None:
    print(
        f"\nfuzz: {r['frames']} WebSocket frames on {r['connections']} connections + {r['http_requests']} HTTP "
        f"requests in {r['seconds']} s (seed {r['seed']})"
    )
    ping = r["ping_ms"]
    rows: list[list[Any]] = [
        ["frames + requests per s", r["frames_per_s"]],
        ["monitor ping p50 / p99 / max ms", f"{ping.get('p50')} / {ping.get('p99')} / {ping.get('max')}"],
        ["reconnects", r["reconnects"]],
        ["canary intact", r["after"].get("canary_intact")],
        ["healthz after", r["after"].get("healthz_ok")],
        ["distinct failures", len(r["failures"])],
    ]
    print(format_table(["metric", "value"], rows))
    print("reply codes: " + ", ".join(f"{k}={v}" for k, v in r["reply_codes"].items()))
    slow = sorted(r["slow_pings"], key=lambda p: -p[1])[:5]
    for at, ms, serving in slow:
        print(f"slow ping at {at} s: {ms} ms while serving {', '.join(serving)[:200]}")
    for f in r["failures"]:
        tag = f" [{f['special']}]" if f["special"] else ""
        print(f"- {f['kind']} ({f['transport']} {f['op']}, x{f['count']}){tag}: {f['detail'][:160]}")
        print(f"    defect: {f['defect']}")
        print(f"    frame:  {f['example'][:200]}")
        print(f"    answer: {f['answer'][:200]}")


async def replay(url: str, path: Path) -> int:
    """Resend every saved WebSocket failure example (hex), print what the server answers now and
    whether that still fails the checks; exit status 1 when any does. Races (the `unavailable` of a
    concurrent drop) and stalls need the whole run to show again."""
    check_local(url)
    saved = json.loads(path.read_text())
    run = Run(url, 0, 0, 1, 0)
    ws = await _connect(run.ws_url)
    names = saved.get("collections") or {}
    failing = 0
    try:
        # The saved frames name the run's collections: make them again (the canary with its docs).
        made = [names.get("canary"), *names.get("fuzz", []), names.get("special")]
        for i, name in enumerate(n for n in made if n):
            await _call(ws, 1_000 + i, "create_collection", name=name, dim=DIM, if_not_exists=True)
        if names.get("text"):
            await _call(ws, 1_100, "create_collection", name=names["text"], if_not_exists=True)
        if names.get("canary"):
            await _call(ws, 1_101, "upsert", collection=names["canary"], docs=canary_docs(int(saved.get("seed", 1))))
        for f in saved.get("failures", []):
            if not f.get("example_hex"):
                continue
            frame = bytes.fromhex(f["example_hex"])
            try:
                await ws.send(frame)
                answer = msgpack.unpackb(await asyncio.wait_for(ws.recv(), REPLY_TIMEOUT_S), raw=False)
            except (TimeoutError, websockets.ConnectionClosed) as exc:
                answer, ws = repr(exc), await _reconnect(run, ws)
            sent_id, _ = _frame_info(frame)
            problems = ws_reply_problems(answer, sent_id)
            if f.get("special") in MUST_FAIL and isinstance(answer, dict) and answer.get("ok"):
                problems.append(("accepted", "accepted"))
            failing += bool(problems)
            verdict = "STILL FAILS " + ", ".join(k for k, _ in problems) if problems else "passes now"
            print(f"{f['kind']} ({f['op']}): {verdict}: {short(answer, 240)}")
    finally:
        await ws.close()
    return 1 if failing else 0


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m load.fuzz", description=__doc__.split("\n")[0])
    p.add_argument("--url", default=None, help="server (http://127.0.0.1:PORT); default: start a local one")
    p.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results here")
    p.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")
    p.add_argument("--frames", type=int, default=10_000, help="WebSocket frames to send (default 10,000)")
    p.add_argument("--http", type=int, default=None, help="HTTP requests (default frames / 20, at least 50)")
    p.add_argument("--connections", type=int, default=4, help="fuzzing WebSocket connections (default 4)")
    p.add_argument("--seed", type=int, default=1, help="the same seed sends the same frames (default 1)")
    p.add_argument("--replay", type=Path, default=None, metavar="JSON", help="resend the failures saved in JSON")
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if args.frames < 1 or args.connections < 1:
        raise SystemExit("--frames and --connections must be >= 1")
    with target(args.url, quiet=args.quiet) as t:
        if args.replay is not None:
            return run_async(lambda: replay(t.url, args.replay))
        result = run_async(
            lambda: fuzz(
                t.url,
                frames=args.frames,
                seed=args.seed,
                connections=args.connections,
                http_requests=args.http,
                server_pid=t.pid,
                quiet=args.quiet,
            )
        )
    print_summary(result)
    if args.json is not None:
        print(f"results written to {write_json(Path(args.json), result)}")
    return 0 if result["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
