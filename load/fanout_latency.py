"""Subscription fan-out and latency: `python -m load.fanout_latency [options]`.

Phase A — ack -> delivered latency of standing queries under steady ingest:
  `--subs` WebSocket subscriptions (default 1,000, spread over `--sub-conns` connections, a fifth
  of them with a metadata filter) on one 384-d collection while a writer upserts `--rate`
  documents per second (default 500, in batches of `--batch`) for `--seconds`. Every document is
  built near one subscription's query, so it matches that one (unless its filter says no) and
  practically no other; the expected (subscription, document) pairs are computed with numpy and
  compared with what arrived. Latency is the time from the writer receiving the ack of a
  document's batch to a subscriber receiving its push (both in this process, one clock).
  Target: p99 <= 50 ms.

Phase B — SSE fan-out: `--sse-clients` (default 10,000) concurrent `GET .../subscribe` streams,
  all on 127.0.0.1, spread over `--sse-procs` client processes (raw asyncio sockets, a few
  hundred bytes of parsing per event). Then `--sse-docs` documents that match every stream are
  upserted one by one; for each, the time from its ack to each stream receiving it (clock:
  CLOCK_MONOTONIC, shared by the processes). Target: all received, p99 <= 250 ms. Memory per
  connection = (server RSS with the streams open - RSS before) / streams, from /proc/<pid>/status
  (needs the server's pid: a local server, or `--server-pid` with `--url`).

Phase C — live top-k lists: `--topk-subs` top-`--topk-k` subscriptions (default 1,000 top-10,
  over `--sub-conns` connections) on a collection of `--topk-base` random documents, while a
  writer upserts `--rate` documents per second near one list's query each (so each enters that
  list), and one batch in ten deletes a current member of some list (a refill through the
  planner). Latency: a batch's ack -> the `topk` push carrying its seq. A sample of the pushes
  (`--topk-check`) is checked against an exact numpy top-k over the written state at its seq:
  a list is exact unless a refill was answered by the HNSW index (over `SHOAL_EXACT_MAX_ROWS`
  documents), which the recall figure then shows. Target: p99 <= 50 ms.

Phase D — leave events: `--leave-subs` threshold subscriptions; the writer upserts documents near
  one query each, and about a second later deletes or re-upserts (far away) each of them. Latency:
  the ack of the delete / re-upsert batch -> the `leave` push of that seq; expected leaves (which
  subscription each removed document matched) are computed with numpy. Target: p99 <= 50 ms.

Without `--url` the script starts its own `shoal serve` (embedded PostgreSQL in a temp dir) and
raises its own and the server's open-file limit first. Bounded: every phase has a deadline, and
the whole run stops after `--max-seconds`. Prints a summary table; `--json PATH` writes it all.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import resource
import sys
import time
import uuid
from collections.abc import Coroutine, Sequence
from dataclasses import dataclass, field
from multiprocessing.connection import Connection
from pathlib import Path
from typing import Any, TypeVar, cast
from urllib.parse import urlsplit

import httpx
import numpy as np
from numpy.typing import NDArray

from load.server import local_server
from shoal_client import ShoalClient
from shoal_client.types import LeaveEvent, MatchEvent, TopkEvent

T = TypeVar("T")

DIM = 384
SSE_DIM = 16
THRESHOLD = 0.6


def run_loop(coro: Coroutine[Any, Any, T]) -> T:
    """Run `coro` on uvloop when it is installed (as the server does), else asyncio's loop."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


def raise_fd_limit() -> int:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < hard:
        resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
    return resource.getrlimit(resource.RLIMIT_NOFILE)[0]


def rss_bytes(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmRSS")


def cpu_seconds(pid: int) -> tuple[float, float]:
    """(user, system) CPU time of a process so far (all its threads)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    tick = os.sysconf("SC_CLK_TCK")
    return int(fields[11]) / tick, int(fields[12]) / tick


def pct(values: Sequence[float], q: float) -> float | None:
    return float(np.percentile(np.asarray(values), q)) if len(values) else None


def ms(value: float | None) -> str:
    return "-" if value is None else f"{value * 1000:.1f} ms"


def unit_rows(m: NDArray[np.float32]) -> NDArray[np.float32]:
    out: NDArray[np.float32] = (m / np.linalg.norm(m, axis=1, keepdims=True)).astype(np.float32)
    return out


# --- phase A: WebSocket subscriptions under ingest --------------------------------------------------


@dataclass
class PhaseA:
    subs: int
    rate: float
    seconds: float
    docs_written: int = 0
    expected: int = 0
    delivered: int = 0
    missing: int = 0
    unexpected: int = 0
    duplicates: int = 0
    lagged: int = 0
    latencies: list[float] = field(default_factory=list)
    from_send: list[float] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)
    achieved_rate: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat, ack = self.latencies, self.ack_latencies
        return {
            "subscriptions": self.subs,
            "target_rate_docs_s": self.rate,
            "achieved_rate_docs_s": round(self.achieved_rate, 1),
            "seconds": self.seconds,
            "docs_written": self.docs_written,
            "expected_pushes": self.expected,
            "delivered_pushes": self.delivered,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "duplicates": self.duplicates,
            "lagged_events": self.lagged,
            "ack_to_delivered_ms": {k: _ms(pct(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
            | {"max": _ms(max(lat) if lat else None)},
            "send_to_delivered_ms": {k: _ms(pct(self.from_send, q)) for k, q in (("p50", 50), ("p99", 99))},
            "write_ack_ms": {"p50": _ms(pct(ack, 50)), "p99": _ms(pct(ack, 99))},
        }


def _ms(value: float | None) -> float | None:
    return None if value is None else round(value * 1000, 3)


async def phase_a(url: str, args: argparse.Namespace) -> PhaseA:
    result = PhaseA(args.subs, args.rate, args.seconds)
    rng = np.random.default_rng(1)
    name = f"fanout_{uuid.uuid4().hex[:8]}"
    queries = unit_rows(rng.normal(size=(args.subs, DIM)).astype(np.float32))
    filtered = rng.random(args.subs) < 0.2  # these want lang == "en"
    ws = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/ws"
    conns = [await ShoalClient.open(ws) for _ in range(args.sub_conns)]
    received: list[tuple[int, int, float]] = []  # (sub index, seq, time)
    try:
        await conns[0].create_collection(name, dim=DIM)
        subs = []
        for i in range(args.subs):
            where = {"lang": "en"} if filtered[i] else None
            subs.append(
                await conns[i % len(conns)].subscribe(name, vector=queries[i], threshold=THRESHOLD, where=where)
            )

        async def listen(i: int) -> None:
            async for event in subs[i]:
                if isinstance(event, MatchEvent):
                    received.append((i, event.seq, time.monotonic()))
                else:
                    result.lagged += 1

        listeners = [asyncio.create_task(listen(i)) for i in range(args.subs)]
        written: list[tuple[int, int, str, float, float]] = []  # (seq, origin, lang, sent, acked)
        doc_vectors: list[NDArray[np.float32]] = []
        in_flight = asyncio.Semaphore(16)
        writer = conns[-1]
        noise = 0.75 / np.sqrt(DIM)

        async def write(batch_no: int) -> None:
            origins = rng.integers(0, args.subs, size=args.batch)
            vectors = unit_rows(queries[origins] + rng.normal(scale=noise, size=(args.batch, DIM)).astype(np.float32))
            langs = ["en" if rng.random() < 0.5 else "de" for _ in range(args.batch)]
            docs = [
                {"id": f"b{batch_no}_{k}", "vector": vectors[k], "metadata": {"lang": langs[k]}}
                for k in range(args.batch)
            ]
            async with in_flight:
                sent = time.monotonic()
                ack = await writer.upsert(name, docs)
                now = time.monotonic()
            result.ack_latencies.append(now - sent)
            for k in range(args.batch):
                written.append((ack.seq - args.batch + 1 + k, int(origins[k]), langs[k], sent, now))
                doc_vectors.append(vectors[k])

        interval = args.batch / args.rate
        started = time.monotonic()
        tasks = []
        batch_no = 0
        while time.monotonic() - started < args.seconds:
            tasks.append(asyncio.create_task(write(batch_no)))
            batch_no += 1
            await asyncio.sleep(max(0.0, started + batch_no * interval - time.monotonic()))
        result.achieved_rate = batch_no * args.batch / (time.monotonic() - started)
        await asyncio.wait_for(asyncio.gather(*tasks), 60)
        result.docs_written = len(written)

        # Expected pairs, independently: cosine >= threshold and the filter.
        by_seq = {seq: (sent, ack) for seq, _, _, sent, ack in written}
        seqs = np.array([w[0] for w in written])
        scores = queries @ np.stack(doc_vectors).T  # (subs, docs)
        en = np.array([w[2] == "en" for w in written])
        ok = (scores >= THRESHOLD) & (~filtered[:, None] | en[None, :])
        expected = {(int(i), int(seqs[j])) for i, j in zip(*np.nonzero(ok), strict=True)}
        result.expected = len(expected)
        deadline = time.monotonic() + 30
        while len({(i, s) for i, s, _ in received} & expected) < len(expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        for task in listeners:
            task.cancel()
        got = [(i, s) for i, s, _ in received]
        result.delivered = len(got)
        result.duplicates = len(got) - len(set(got))
        result.missing = len(expected - set(got))
        result.unexpected = len(set(got) - expected)
        # Latency of the steady state: the first second is warm-up.
        warm = started + 1.0
        for i, seq, t in received:
            times = by_seq.get(seq)
            if times is not None and times[0] >= warm and (i, seq) in expected:
                result.latencies.append(max(0.0, t - times[1]))
                result.from_send.append(t - times[0])
        await conns[0].drop_collection(name)
    finally:
        for c in conns:
            await c.close()
    return result


# --- phase C: live top-k lists ---------------------------------------------------------------------


@dataclass
class PhaseC:
    subs: int
    k: int
    rate: float
    seconds: float
    docs_written: int = 0
    pushes: int = 0
    unmapped: int = 0  # pushes whose seq is no batch's last seq
    checked: int = 0
    wrong: int = 0
    lagged: int = 0
    deletes: int = 0
    recall: float | None = None  # of the checked lists against exact search
    latencies: list[float] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)
    achieved_rate: float = 0.0

    def summary(self) -> dict[str, Any]:
        lat, ack = self.latencies, self.ack_latencies
        return {
            "subscriptions": self.subs,
            "k": self.k,
            "recall_vs_exact": None if self.recall is None else round(self.recall, 4),
            "target_rate_docs_s": self.rate,
            "achieved_rate_docs_s": round(self.achieved_rate, 1),
            "seconds": self.seconds,
            "docs_written": self.docs_written,
            "member_deletes": self.deletes,
            "topk_pushes": self.pushes,
            "pushes_not_at_a_batch_end": self.unmapped,
            "pushes_checked_exact": self.checked,
            "pushes_wrong": self.wrong,
            "lagged_events": self.lagged,
            "ack_to_topk_ms": {k: _ms(pct(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
            | {"max": _ms(max(lat) if lat else None)},
            "write_ack_ms": {"p50": _ms(pct(ack, 50)), "p99": _ms(pct(ack, 99))},
        }


async def phase_c(url: str, args: argparse.Namespace) -> PhaseC:
    result = PhaseC(args.topk_subs, args.topk_k, args.rate, args.seconds)
    rng = np.random.default_rng(3)
    name = f"topk_{uuid.uuid4().hex[:8]}"
    queries = unit_rows(rng.normal(size=(args.topk_subs, DIM)).astype(np.float32))
    ws = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/ws"
    conns = [await ShoalClient.open(ws) for _ in range(args.sub_conns)]
    # Every acked change batch: (its last seq, upserted {id: vector} or deleted ids); the state at
    # any seq is rebuilt from these in seq order afterwards (writes overlap, as in phase A).
    ops: list[tuple[int, dict[str, NDArray[np.float32]] | list[str]]] = []
    acked: dict[int, float] = {}  # batch-end seq -> ack time
    latest: dict[int, list[str]] = {}
    received: list[tuple[int, int, list[str], list[float], float]] = []
    try:
        await conns[0].create_collection(name, dim=DIM)
        base = unit_rows(rng.normal(size=(args.topk_base, DIM)).astype(np.float32))
        for start in range(0, args.topk_base, 1000):
            chunk = {f"base{i}": base[i] for i in range(start, min(start + 1000, args.topk_base))}
            seq = (await conns[0].upsert(name, [{"id": k, "vector": v} for k, v in chunk.items()])).seq
            ops.append((seq, chunk))
        subs = [
            await conns[i % len(conns)].subscribe(name, vector=queries[i], k=args.topk_k, include=[])
            for i in range(args.topk_subs)
        ]

        async def listen(i: int) -> None:
            async for event in subs[i]:
                if isinstance(event, TopkEvent):
                    ids = [h.id for h in event.hits]
                    latest[i] = ids
                    received.append((i, event.seq, ids, [h.score for h in event.hits], time.monotonic()))
                else:
                    result.lagged += 1

        listeners = [asyncio.create_task(listen(i)) for i in range(args.topk_subs)]
        await asyncio.sleep(2.0)  # the first lists
        first_lists = len(received)
        writer = conns[-1]
        noise = 0.75 / np.sqrt(DIM)
        in_flight = asyncio.Semaphore(16)

        async def write(batch_no: int) -> None:
            members = latest.get(int(rng.integers(0, args.topk_subs))) if batch_no % 10 == 9 else None
            async with in_flight:
                sent = time.monotonic()
                if members:
                    victim = members[int(rng.integers(0, len(members)))]
                    deleted = await writer.delete(name, ids=[victim])
                    now = time.monotonic()
                    if deleted.deleted:  # (another batch may have deleted it first)
                        ops.append((deleted.seq, [victim]))
                        acked[deleted.seq] = now
                        result.deletes += 1
                else:
                    origins = rng.integers(0, args.topk_subs, size=args.batch)
                    noisy = queries[origins] + rng.normal(scale=noise, size=(args.batch, DIM)).astype(np.float32)
                    vectors = unit_rows(noisy)
                    docs = {f"b{batch_no}_{j}": vectors[j] for j in range(args.batch)}
                    seq = (await writer.upsert(name, [{"id": k, "vector": v} for k, v in docs.items()])).seq
                    now = time.monotonic()
                    ops.append((seq, docs))
                    acked[seq] = now
                    result.docs_written += args.batch
            result.ack_latencies.append(now - sent)

        interval = args.batch / args.rate
        started = time.monotonic()
        tasks = []
        batch_no = 0
        while time.monotonic() - started < args.seconds:
            tasks.append(asyncio.create_task(write(batch_no)))
            batch_no += 1
            await asyncio.sleep(max(0.0, started + batch_no * interval - time.monotonic()))
        await asyncio.wait_for(asyncio.gather(*tasks), 120)
        result.achieved_rate = result.docs_written / (time.monotonic() - started)
        await asyncio.sleep(2.0)
        for task in listeners:
            task.cancel()
        live = received[first_lists:]
        result.pushes = len(live)
        warm = started + 1.0
        for _, seq, _, _, t in live:
            ack_at = acked.get(seq)
            if ack_at is None:
                result.unmapped += 1
            elif ack_at >= warm:
                result.latencies.append(max(0.0, t - ack_at))
        # Check a sample of the pushes against exact search over the state at their seq.
        sample = [live[int(j)] for j in rng.choice(len(live), size=min(args.topk_check, len(live)), replace=False)]
        wanted = {seq for _, seq, _, _, _ in sample}
        states: dict[int, dict[str, NDArray[np.float32]]] = {}
        state: dict[str, NDArray[np.float32]] = {}
        for seq, change in sorted(ops, key=lambda op: op[0]):
            if isinstance(change, dict):
                state.update(change)
            else:
                for doc_id in change:
                    state.pop(doc_id, None)
            if seq in wanted:
                states[seq] = dict(state)
        recalls = []
        for i, seq, ids, scores, _ in sample:
            snapshot = states.get(seq)
            if snapshot is None:
                continue
            result.checked += 1
            keys = list(snapshot)
            exact = np.stack([snapshot[key] for key in keys]) @ queries[i]
            order = np.argsort(-exact, kind="stable")[: args.topk_k]
            want = [keys[j] for j in order]
            recalls.append(len(set(ids) & set(want)) / max(1, len(want)))
            if len(want) != len(scores) or not np.allclose([float(exact[j]) for j in order], scores, atol=1e-4):
                result.wrong += 1
        result.recall = float(np.mean(recalls)) if recalls else None
        await conns[0].drop_collection(name)
    finally:
        for c in conns:
            await c.close()
    return result


# --- phase D: leave events -------------------------------------------------------------------------


@dataclass
class PhaseD:
    subs: int
    rate: float
    seconds: float
    docs_written: int = 0
    removed: int = 0
    expected: int = 0
    delivered: int = 0
    missing: int = 0
    unexpected: int = 0
    lagged: int = 0
    latencies: list[float] = field(default_factory=list)
    ack_latencies: list[float] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        lat, ack = self.latencies, self.ack_latencies
        return {
            "subscriptions": self.subs,
            "target_rate_docs_s": self.rate,
            "seconds": self.seconds,
            "docs_written": self.docs_written,
            "docs_removed": self.removed,
            "expected_leaves": self.expected,
            "delivered_leaves": self.delivered,
            "missing": self.missing,
            "unexpected": self.unexpected,
            "lagged_events": self.lagged,
            "ack_to_leave_ms": {k: _ms(pct(lat, q)) for k, q in (("p50", 50), ("p90", 90), ("p99", 99))}
            | {"max": _ms(max(lat) if lat else None)},
            "write_ack_ms": {"p50": _ms(pct(ack, 50)), "p99": _ms(pct(ack, 99))},
        }


async def phase_d(url: str, args: argparse.Namespace) -> PhaseD:
    result = PhaseD(args.leave_subs, args.rate, args.seconds)
    rng = np.random.default_rng(4)
    name = f"leave_{uuid.uuid4().hex[:8]}"
    queries = unit_rows(rng.normal(size=(args.leave_subs, DIM)).astype(np.float32))
    ws = url.replace("http://", "ws://").replace("https://", "wss://") + "/v1/ws"
    conns = [await ShoalClient.open(ws) for _ in range(args.sub_conns)]
    leaves: list[tuple[int, int, str, float]] = []  # (sub, seq, id, time)
    try:
        await conns[0].create_collection(name, dim=DIM)
        subs = [
            await conns[i % len(conns)].subscribe(name, vector=queries[i], threshold=THRESHOLD, include=[])
            for i in range(args.leave_subs)
        ]

        async def listen(i: int) -> None:
            async for event in subs[i]:
                if isinstance(event, LeaveEvent):
                    leaves.append((i, event.seq, event.id, time.monotonic()))
                elif not isinstance(event, MatchEvent):
                    result.lagged += 1

        listeners = [asyncio.create_task(listen(i)) for i in range(args.leave_subs)]
        writer = conns[-1]
        noise = 0.75 / np.sqrt(DIM)
        alive: list[tuple[str, NDArray[np.float32], float]] = []  # (id, vector, written at)
        removed_at: dict[int, tuple[str, NDArray[np.float32], float]] = {}  # seq -> (id, old vector, ack)
        interval = args.batch / args.rate
        started = time.monotonic()
        batch_no = 0
        while time.monotonic() - started < args.seconds:
            now = time.monotonic()
            if alive and now - alive[0][2] >= 1.0 and batch_no % 2 == 1:  # a removal batch
                due = alive[: args.batch]
                del alive[: args.batch]
                ids = [d[0] for d in due]
                sent = time.monotonic()
                if batch_no % 4 == 1:
                    last = (await writer.delete(name, ids=ids)).seq
                else:  # re-upserted far from every query: out of the threshold
                    last = (await writer.upsert(name, [{"id": d[0], "vector": -d[1]} for d in due])).seq
                first = last - len(ids) + 1
                acked = time.monotonic()
                for j, d in enumerate(due):
                    removed_at[first + j] = (d[0], d[1], acked)
                result.removed += len(due)
            else:
                origins = rng.integers(0, args.leave_subs, size=args.batch)
                noisy = queries[origins] + rng.normal(scale=noise, size=(args.batch, DIM)).astype(np.float32)
                vectors = unit_rows(noisy)
                docs = [{"id": f"b{batch_no}_{j}", "vector": vectors[j]} for j in range(args.batch)]
                sent = time.monotonic()
                await writer.upsert(name, docs)
                acked = time.monotonic()
                alive.extend((d["id"], vectors[j], acked) for j, d in enumerate(docs))
                result.docs_written += args.batch
            result.ack_latencies.append(acked - sent)
            batch_no += 1
            await asyncio.sleep(max(0.0, started + batch_no * interval - time.monotonic()))
        seqs = sorted(removed_at)
        expected: set[tuple[int, int]] = set()
        if seqs:
            old = np.stack([removed_at[s][1] for s in seqs])
            hit = (queries @ old.T) >= THRESHOLD
            expected = {(int(i), seqs[j]) for i, j in zip(*np.nonzero(hit), strict=True)}
        result.expected = len(expected)
        deadline = time.monotonic() + 30
        while len({(i, s) for i, s, _, _ in leaves} & expected) < len(expected) and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        await asyncio.sleep(0.5)
        for task in listeners:
            task.cancel()
        got = {(i, s) for i, s, _, _ in leaves}
        result.delivered = len(leaves)
        result.missing = len(expected - got)
        result.unexpected = len(got - expected)
        warm = started + 2.0
        for i, seq, _, t in leaves:
            removal = removed_at.get(seq)
            if removal is not None and removal[2] >= warm and (i, seq) in expected:
                result.latencies.append(max(0.0, t - removal[2]))
        await conns[0].drop_collection(name)
    finally:
        for c in conns:
            await c.close()
    return result


# --- phase B: many SSE streams ---------------------------------------------------------------------


class _Stream(asyncio.Protocol):
    """One SSE stream: notes when it is live (`retry:` seen) and when each match id arrives."""

    def __init__(self, ready: asyncio.Future[bool], times: dict[int, list[float]]) -> None:
        self.ready = ready
        self.times = times
        self.buffer = b""
        self.current: int | None = None
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = cast(asyncio.Transport, transport)  # uvloop's are not asyncio subclasses

    def data_received(self, data: bytes) -> None:
        now = time.monotonic()
        self.buffer += data
        *lines, self.buffer = self.buffer.split(b"\n")
        for line in lines:
            if line.startswith(b"retry:") and not self.ready.done():
                self.ready.set_result(True)
            elif line.startswith(b"id: "):
                self.current = int(line[4:].strip())
            elif line.startswith(b"event: match") and self.current is not None:
                self.times.setdefault(self.current, []).append(now)
            elif line.startswith(b"HTTP/1.1 ") and b" 200 " not in line and not self.ready.done():
                self.ready.set_result(False)

    def connection_lost(self, exc: Exception | None) -> None:
        if not self.ready.done():
            self.ready.set_result(False)


async def _sse_worker(host: str, port: int, path: str, count: int, pipe: Connection) -> None:
    loop = asyncio.get_running_loop()
    times: dict[int, list[float]] = {}
    gate = asyncio.Semaphore(200)  # connects in flight (the server's accept backlog is finite)
    transports: list[asyncio.Transport] = []
    request = f"GET {path} HTTP/1.1\r\nHost: {host}:{port}\r\nAccept: text/event-stream\r\n\r\n".encode()

    async def one() -> bool:
        async with gate:
            ready: asyncio.Future[bool] = loop.create_future()
            try:
                transport, _ = await loop.create_connection(lambda: _Stream(ready, times), host, port)
            except OSError:
                return False
            transports.append(transport)
            transport.write(request)
            try:
                return await asyncio.wait_for(ready, 60)
            except TimeoutError:
                return False

    results = await asyncio.gather(*(one() for _ in range(count)))
    pipe.send(("ready", sum(results), count - sum(results)))
    stop = asyncio.Event()
    loop.add_reader(pipe.fileno(), stop.set)
    await stop.wait()
    loop.remove_reader(pipe.fileno())
    os.set_blocking(pipe.fileno(), True)  # the loop made it non-blocking; a big send needs blocking
    pipe.recv()
    pipe.send(("times", times))
    for transport in transports:
        transport.close()


def _sse_worker_main(host: str, port: int, path: str, count: int, pipe: Connection) -> None:
    raise_fd_limit()
    run_loop(_sse_worker(host, port, path, count, pipe))


@dataclass
class PhaseB:
    clients: int
    connected: int = 0
    failed: int = 0
    connect_seconds: float = 0.0
    rss_before: int | None = None
    rss_after: int | None = None
    per_doc: list[dict[str, Any]] = field(default_factory=list)
    latencies: list[float] = field(default_factory=list)
    cpu_per_doc: list[tuple[float, float]] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        per_conn = None
        if self.rss_before is not None and self.rss_after is not None and self.connected:
            per_conn = round((self.rss_after - self.rss_before) / self.connected)
        return {
            "clients": self.clients,
            "connected": self.connected,
            "failed": self.failed,
            "connect_seconds": round(self.connect_seconds, 2),
            "server_rss_before_mib": None if self.rss_before is None else round(self.rss_before / 2**20, 1),
            "server_rss_after_mib": None if self.rss_after is None else round(self.rss_after / 2**20, 1),
            "server_bytes_per_connection": per_conn,
            "docs": self.per_doc,
            "server_cpu_s_per_doc": [{"user": round(u, 3), "system": round(s, 3)} for u, s in self.cpu_per_doc],
            "delivery_ms": {
                "p50": _ms(pct(self.latencies, 50)),
                "p99": _ms(pct(self.latencies, 99)),
                "max": _ms(max(self.latencies) if self.latencies else None),
            },
        }


async def phase_b(url: str, server_pid: int | None, args: argparse.Namespace) -> PhaseB:
    result = PhaseB(args.sse_clients)
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    name = f"ssefan_{uuid.uuid4().hex[:8]}"
    query = np.zeros(SSE_DIM, np.float32)
    query[0] = 1.0
    vector = ",".join(repr(float(x)) for x in query)
    path = f"/v1/collections/{name}/subscribe?vector={vector}&threshold=0.9&include=metadata"
    async with httpx.AsyncClient(base_url=url, timeout=60.0) as http:
        (await http.post("/v1/collections", json={"name": name, "dim": SSE_DIM})).raise_for_status()
        if server_pid is not None:
            result.rss_before = rss_bytes(server_pid)
        ctx = mp.get_context("spawn")
        procs = max(1, args.sse_procs)
        shares = [args.sse_clients // procs + (1 if i < args.sse_clients % procs else 0) for i in range(procs)]
        pipes: list[Connection] = []
        workers = []
        started = time.monotonic()
        for share in shares:
            mine, theirs = ctx.Pipe()
            proc = ctx.Process(target=_sse_worker_main, args=(host, port, path, share, theirs), daemon=True)
            proc.start()
            pipes.append(mine)
            workers.append(proc)
        try:
            for pipe in pipes:
                if not await asyncio.to_thread(pipe.poll, 300):
                    raise RuntimeError("an SSE client process did not report in 300 s")
                _, ok, bad = pipe.recv()
                result.connected += ok
                result.failed += bad
            result.connect_seconds = time.monotonic() - started
            await asyncio.sleep(1.0)  # let the server settle before reading its memory
            if server_pid is not None:
                result.rss_after = rss_bytes(server_pid)
            acks: dict[int, float] = {}
            for k in range(args.sse_docs):
                doc = {"id": f"hot{k}", "vector": query.tolist(), "metadata": {"k": k}}
                cpu = cpu_seconds(server_pid) if server_pid is not None else None
                reply = await http.post(f"/v1/collections/{name}/upsert", json={"docs": [doc]})
                acks[reply.json()["seq"]] = time.monotonic()
                await asyncio.sleep(args.sse_gap)
                if server_pid is not None and cpu is not None:
                    # The server's CPU for one upsert and its fan-out to every stream (plus idle
                    # heartbeat work): a cost that does not depend on who else uses the cores.
                    after = cpu_seconds(server_pid)
                    result.cpu_per_doc.append((after[0] - cpu[0], after[1] - cpu[1]))
            await asyncio.sleep(2.0)
            merged: dict[int, list[float]] = {}
            for pipe in pipes:
                pipe.send("stop")
            for pipe in pipes:
                if not await asyncio.to_thread(pipe.poll, 120):
                    raise RuntimeError("an SSE client process did not answer in 120 s")
                _, times = pipe.recv()
                for seq, ts in times.items():
                    merged.setdefault(seq, []).extend(ts)
        finally:
            for proc in workers:
                proc.join(30)
                if proc.is_alive():
                    proc.terminate()
        for seq, ack in sorted(acks.items()):
            lat = [max(0.0, t - ack) for t in merged.get(seq, [])]
            result.latencies.extend(lat)
            result.per_doc.append(
                {
                    "seq": seq,
                    "received": len(lat),
                    "p50_ms": _ms(pct(lat, 50)),
                    "p99_ms": _ms(pct(lat, 99)),
                    "all_received_ms": _ms(max(lat)) if lat and len(lat) == result.connected else None,
                }
            )
        await http.delete(f"/v1/collections/{name}")
    return result


# --- main ------------------------------------------------------------------------------------------


def table(rows: list[tuple[str, str]]) -> str:
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"  {k.ljust(width)}  {v}" for k, v in rows)


async def run(url: str, server_pid: int | None, args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {"url": url, "started": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if args.subs > 0:
        print(f"[fanout] phase A: {args.subs} subscriptions, {args.rate:g} docs/s for {args.seconds:g} s", flush=True)
        a = await asyncio.wait_for(phase_a(url, args), args.seconds + 300)
        out["phase_a"] = a.summary()
    if args.topk_subs > 0:
        print(f"[fanout] phase C: {args.topk_subs} top-{args.topk_k} subscriptions, {args.rate:g} docs/s", flush=True)
        c = await asyncio.wait_for(phase_c(url, args), args.seconds + 300)
        out["phase_c"] = c.summary()
    if args.leave_subs > 0:
        print(f"[fanout] phase D: {args.leave_subs} threshold subscriptions, leaves", flush=True)
        d = await asyncio.wait_for(phase_d(url, args), args.seconds + 300)
        out["phase_d"] = d.summary()
    if args.sse_clients > 0:
        print(f"[fanout] phase B: {args.sse_clients} SSE streams over {args.sse_procs} processes", flush=True)
        b = await asyncio.wait_for(phase_b(url, server_pid, args), 900)
        out["phase_b"] = b.summary()
    return out


def report(out: dict[str, Any]) -> None:
    rows: list[tuple[str, str]] = []
    if "phase_a" in out:
        a = out["phase_a"]
        lat = a["ack_to_delivered_ms"]
        rows += [
            ("A: standing queries", str(a["subscriptions"])),
            ("A: ingest (target / achieved)", f"{a['target_rate_docs_s']:g} / {a['achieved_rate_docs_s']:g} docs/s"),
            ("A: pushes expected / delivered", f"{a['expected_pushes']} / {a['delivered_pushes']}"),
            ("A: missing / unexpected / dup", f"{a['missing']} / {a['unexpected']} / {a['duplicates']}"),
            ("A: ack->delivered p50 / p99", f"{lat['p50']} / {lat['p99']} ms (target p99 <= 50)"),
            ("A: ack->delivered p90 / max", f"{lat['p90']} / {lat['max']} ms"),
            (
                "A: upsert sent->delivered p50 / p99",
                f"{a['send_to_delivered_ms']['p50']} / {a['send_to_delivered_ms']['p99']} ms",
            ),
            ("A: write ack p50 / p99", f"{a['write_ack_ms']['p50']} / {a['write_ack_ms']['p99']} ms"),
        ]
    if "phase_c" in out:
        c = out["phase_c"]
        lat = c["ack_to_topk_ms"]
        rows += [
            ("C: top-k subscriptions", f"{c['subscriptions']} x top-{c['k']}"),
            ("C: ingest (target / achieved)", f"{c['target_rate_docs_s']:g} / {c['achieved_rate_docs_s']:g} docs/s"),
            ("C: topk pushes / member deletes", f"{c['topk_pushes']} / {c['member_deletes']}"),
            (
                "C: pushes checked / not exact / recall",
                f"{c['pushes_checked_exact']} / {c['pushes_wrong']} / {c['recall_vs_exact']}",
            ),
            ("C: pushes not at a batch end / lagged", f"{c['pushes_not_at_a_batch_end']} / {c['lagged_events']}"),
            ("C: ack->topk p50 / p99", f"{lat['p50']} / {lat['p99']} ms (target p99 <= 50)"),
            ("C: ack->topk p90 / max", f"{lat['p90']} / {lat['max']} ms"),
            ("C: write ack p50 / p99", f"{c['write_ack_ms']['p50']} / {c['write_ack_ms']['p99']} ms"),
        ]
    if "phase_d" in out:
        d = out["phase_d"]
        lat = d["ack_to_leave_ms"]
        rows += [
            ("D: threshold subscriptions", str(d["subscriptions"])),
            ("D: docs written / removed", f"{d['docs_written']} / {d['docs_removed']}"),
            ("D: leaves expected / delivered", f"{d['expected_leaves']} / {d['delivered_leaves']}"),
            ("D: missing / unexpected", f"{d['missing']} / {d['unexpected']}"),
            ("D: ack->leave p50 / p99", f"{lat['p50']} / {lat['p99']} ms (target p99 <= 50)"),
            ("D: ack->leave p90 / max", f"{lat['p90']} / {lat['max']} ms"),
            ("D: write ack p50 / p99", f"{d['write_ack_ms']['p50']} / {d['write_ack_ms']['p99']} ms"),
        ]
    if "phase_b" in out:
        b = out["phase_b"]
        worst = [d["all_received_ms"] for d in b["docs"]]
        rows += [
            ("B: SSE streams (connected / failed)", f"{b['connected']} / {b['failed']} in {b['connect_seconds']} s"),
            ("B: delivery p50 / p99", f"{b['delivery_ms']['p50']} / {b['delivery_ms']['p99']} ms (target p99 <= 250)"),
            ("B: all received, per doc", ", ".join("-" if w is None else f"{w:.0f}" for w in worst) + " ms"),
            ("B: server RSS before / after", f"{b['server_rss_before_mib']} / {b['server_rss_after_mib']} MiB"),
            ("B: server memory per connection", f"{b['server_bytes_per_connection']} bytes"),
            (
                "B: server CPU per doc (user+sys)",
                ", ".join(f"{c['user']:.2f}+{c['system']:.2f}" for c in b["server_cpu_s_per_doc"]) + " s",
            ),
        ]
    print(table(rows))


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m load.fanout_latency", description="Subscription fan-out and latency (see the module doc)."
    )
    parser.add_argument("--url", help="a running server (default: start a local one)")
    parser.add_argument("--server-pid", type=int, help="with --url: the server's pid, to read its memory")
    parser.add_argument("--subs", type=int, default=1000, help="phase A standing queries (0 skips phase A)")
    parser.add_argument("--sub-conns", type=int, default=10, help="WebSocket connections holding them")
    parser.add_argument("--rate", type=float, default=500.0, help="documents per second written in phase A")
    parser.add_argument("--batch", type=int, default=5, help="documents per upsert in phase A")
    parser.add_argument("--seconds", type=float, default=20.0, help="phase A duration")
    parser.add_argument("--topk-subs", type=int, default=1000, help="phase C top-k subscriptions (0 skips)")
    parser.add_argument("--topk-k", type=int, default=10, help="phase C: k of each list")
    parser.add_argument("--topk-base", type=int, default=2000, help="phase C: documents before the lists start")
    parser.add_argument("--topk-check", type=int, default=200, help="phase C: pushes checked against exact search")
    parser.add_argument("--leave-subs", type=int, default=1000, help="phase D threshold subscriptions (0 skips)")
    parser.add_argument("--sse-clients", type=int, default=10_000, help="phase B streams (0 skips phase B)")
    parser.add_argument("--sse-procs", type=int, default=4, help="client processes holding the streams")
    parser.add_argument("--sse-docs", type=int, default=5, help="matching documents sent in phase B")
    parser.add_argument("--sse-gap", type=float, default=1.0, help="seconds between them")
    parser.add_argument("--max-seconds", type=float, default=1800.0, help="stop the whole run after this")
    parser.add_argument("--json", type=Path, help="write the results here")
    args = parser.parse_args(argv)
    limit = raise_fd_limit()
    if args.sse_clients and limit < args.sse_clients // max(1, args.sse_procs) + 100:
        sys.exit(f"open-file limit {limit} is too low for {args.sse_clients} streams")

    async def bounded(url: str, pid: int | None) -> dict[str, Any]:
        return await asyncio.wait_for(run(url, pid, args), args.max_seconds)

    if args.url:
        out = run_loop(bounded(args.url.rstrip("/"), args.server_pid))
    else:
        with local_server() as server:
            out = run_loop(bounded(server.url, server.pid))
    report(out)
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(out, indent=2))
        print(f"[fanout] wrote {args.json}")


if __name__ == "__main__":
    main()
