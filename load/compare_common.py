"""What every system in `load.compare` shares: result records, sweep points, closed-loop timing.

A sweep point is measured the same way for every system: `clients` workers in a closed loop (each
sends its next query when the previous one is answered), worker `w` taking queries w, w + clients,
... round the query set. A point lasts at least `seconds` and then until every query has been
answered once (so recall is over the whole query set), but never past `max_seconds`. Recall@k is
over the first answer to each query; QPS and latency over every answer.
"""

from __future__ import annotations

import asyncio
import os
import socket
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from load.common import recall_at_k, self_cpu_seconds, tree_cpu_seconds

K = 10
RECALL_TARGETS = (0.90, 0.95, 0.99)
DEFAULT_EFS = (10, 16, 24, 32, 48, 64, 96, 128, 256)
INGEST_BATCH = 500
# The index parameters every HNSW system gets: Shoal's defaults (models/config.py).
HNSW_M = 16
HNSW_EF_CONSTRUCTION = 200


@dataclass(frozen=True, slots=True)
class Ingest:
    """`docs` written in `seconds`; `durable` when every acknowledged batch was committed."""

    docs: int
    seconds: float
    batch: int
    durable: bool
    note: str = ""
    # CPU over the ingest, as `CpuWindow.stop()` gives it (seconds; cores for `other_cores`).
    server_cpu: float | None = None
    client_cpu: float | None = None
    other_cores: float | None = None

    @property
    def docs_per_s(self) -> float:
        return self.docs / self.seconds if self.seconds > 0 else 0.0

    def to_json(self) -> dict[str, Any]:
        out = {k: round(v, 3) if isinstance(v, float) else v for k, v in asdict(self).items()}
        return out | {"docs_per_s": round(self.docs_per_s, 1)}


@dataclass(frozen=True, slots=True)
class Point:
    """One sweep point. `ef` is None for exact search. Latencies are None where one call answers
    the whole query set (a per-query latency would mean nothing there)."""

    ef: int | None
    recall: float
    answered: int
    queries: int
    seconds: float
    qps: float
    p50_ms: float | None
    p99_ms: float | None
    server_cpu_ms_per_query: float | None = None
    client_cpu_ms_per_query: float | None = None
    # Cores that other processes on this (shared) machine kept busy during the point, on average.
    other_cores: float | None = None

    def to_json(self) -> dict[str, Any]:
        return {k: round(v, 4 if k == "recall" else 3) if isinstance(v, float) else v for k, v in asdict(self).items()}


@dataclass(slots=True)
class SystemResult:
    """One system's figures. A failed system keeps what was measured before the failure."""

    key: str
    label: str
    status: str = "ok"  # ok | failed
    error: str | None = None
    ingest: Ingest | None = None
    sweep: list[Point] = field(default_factory=list)
    info: dict[str, Any] = field(default_factory=dict)
    seconds: float = 0.0

    def at_recall(self, target: float) -> Point | None:
        """The point with the lowest ef (exact search: its only point) whose recall >= target."""
        reached = [p for p in self.sweep if p.recall >= target]
        return min(reached, key=lambda p: p.ef or 0) if reached else None

    def to_json(self) -> dict[str, Any]:
        best = max((p.recall for p in self.sweep), default=None)
        return {
            "label": self.label,
            "status": self.status,
            "error": self.error,
            "seconds": round(self.seconds, 1),
            "ingest": self.ingest.to_json() if self.ingest else None,
            "sweep": [p.to_json() for p in self.sweep],
            "max_recall": round(best, 4) if best is not None else None,
            "at_recall": {f"{t:.2f}": (p.to_json() if (p := self.at_recall(t)) else None) for t in RECALL_TARGETS},
            "info": self.info,
        }


@dataclass(slots=True)
class Raw:
    """What a run observed: latencies (s) of every answer, the first answer (corpus rows) per query."""

    latencies: list[float] = field(default_factory=list)
    first: dict[int, list[int]] = field(default_factory=dict)
    seconds: float = 0.0


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _busy_seconds() -> float | None:
    """CPU seconds the whole machine has spent not idle since boot (None without /proc/stat)."""
    try:
        with open("/proc/stat") as f:
            ticks = [int(x) for x in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    # user nice system idle iowait irq softirq steal ...: idle and iowait are not busy.
    return (sum(ticks[:8]) - ticks[3] - ticks[4]) / _TICK


class CpuWindow:
    """CPU used over a phase by the server (the process trees of `server_pids`), the client (this
    process, or the tree of `client_pid`) and everything else on this shared machine. Create it
    just before the phase."""

    def __init__(self, *server_pids: int | None, client_pid: int | None = None) -> None:
        self.server_pids = [p for p in server_pids if p is not None]
        self.client_pid = client_pid
        self.start = self._sample()

    def _sample(self) -> tuple[float, float | None, float | None, float | None]:
        client = self_cpu_seconds() if self.client_pid is None else tree_cpu_seconds(self.client_pid)
        servers = [tree_cpu_seconds(p) for p in self.server_pids]
        server = None if not servers or None in servers else sum(s for s in servers if s is not None)
        return time.perf_counter(), server, client, _busy_seconds()

    def stop(self) -> dict[str, float | None]:
        """CPU seconds of `server_cpu` and `client_cpu`; the average busy cores of `other_cores`."""
        end = self._sample()
        wall = end[0] - self.start[0]
        server, client, busy = (cpu_delta(end[i], self.start[i]) for i in (1, 2, 3))
        other = None
        if busy is not None and client is not None and wall > 0:
            other = max(0.0, busy - client - (server or 0.0)) / wall
        return {"server_cpu": server, "client_cpu": client, "other_cores": other}


def point_of(
    ef: int | None,
    raw: Raw,
    truth: NDArray[np.int64],
    *,
    server_cpu: float | None = None,
    client_cpu: float | None = None,
    other_cores: float | None = None,
) -> Point:
    """The sweep point of a closed-loop run; CPU arguments are seconds over the run."""
    n = len(raw.latencies)
    answered = sorted(raw.first)
    lat = np.asarray(raw.latencies) * 1000.0
    per_query = 1000.0 / n if n else 0.0
    return Point(
        ef=ef,
        recall=recall_at_k([raw.first[q] for q in answered], truth[answered], K) if answered else 0.0,
        answered=len(answered),
        queries=n,
        seconds=raw.seconds,
        qps=n / raw.seconds if raw.seconds > 0 else 0.0,
        p50_ms=float(np.percentile(lat, 50)) if n else None,
        p99_ms=float(np.percentile(lat, 99)) if n else None,
        server_cpu_ms_per_query=server_cpu * per_query if server_cpu is not None else None,
        client_cpu_ms_per_query=client_cpu * per_query if client_cpu is not None else None,
        other_cores=other_cores,
    )


async def closed_loop(
    workers: Sequence[Callable[[int], Awaitable[list[int]]]], n_queries: int, seconds: float, max_seconds: float
) -> Raw:
    """Run each worker (query index -> corpus rows of the answer) in a closed loop on the running
    event loop; see the module docstring for when it stops."""
    raw = Raw()
    n = len(workers)
    start = time.perf_counter()

    def more() -> bool:
        elapsed = time.perf_counter() - start
        return elapsed < max_seconds and (elapsed < seconds or len(raw.first) < n_queries)

    async def work(w: int, query: Callable[[int], Awaitable[list[int]]]) -> None:
        i = w
        while more():
            q = i % n_queries
            t0 = time.perf_counter()
            rows = await query(q)
            raw.latencies.append(time.perf_counter() - t0)
            raw.first.setdefault(q, rows)
            i += n

    await asyncio.gather(*(work(w, fn) for w, fn in enumerate(workers)))
    raw.seconds = time.perf_counter() - start
    return raw


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def cpu_delta(after: float | None, before: float | None) -> float | None:
    return after - before if after is not None and before is not None else None
