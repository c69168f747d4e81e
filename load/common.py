"""Shared pieces of the load generators: histogram, progress bar, tables, JSON, targets, CPU.

- `Histogram`: log-linear latency buckets in the manner of HdrHistogram (exact below 512 µs,
  then 256 sub-buckets per power of two: any percentile is within 0.2 % of the recorded value).
- `Progress`: a one-line progress bar on stderr (redrawn in place on a terminal, a line every
  10 s otherwise).
- `ErrorCounts`: failures counted by wire code (`not_found`, `overloaded`, ...) or by client-side
  kind (`connection_closed`, `timeout`, `client_error`).
- `format_table` / `write_json`: the summary printed at the end and the `--json PATH` file.
- `add_target_args` / `target`: `--url URL`, or (default) a local `shoal serve` on 127.0.0.1
  port 0 with a temporary data dir under /tmp, stopped at the end.
- `CpuMeter`: CPU seconds of this process (the load generator) and of the server process and its
  PostgreSQL over a phase, so a throughput figure can be read against who used the cores.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import os
import resource
import sys
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Coroutine, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import numpy as np
from numpy.typing import NDArray

from load.server import ROOT, ServerProcess, local_server
from shoal_client.errors import ClientError, ConnectionClosed, ShoalError

if TYPE_CHECKING:
    from load.dataset import Dataset
    from models.config import EngineConfig

T = TypeVar("T")

RESULTS_DIR = ROOT / "results"
# Upper bound on anything a load run does, so that no run can go on forever.
MAX_SECONDS = 3_600.0


# ----------------------------------------------------------------------------- histogram


class Histogram:
    """Latencies in a log-linear histogram of microseconds.

    Values below 2 * SUB (512 µs) have a bucket each; above that, every power of two is split in
    SUB (256) equal buckets, so a bucket is at most 1/256 of its value wide and the midpoint that
    a percentile reports is within 0.2 % of the true order statistic. Values are clamped to
    [0, 2^32 µs] (~71 minutes). Recording is O(1) and memory is fixed (~6,400 counters), so a
    run of any length keeps every sample's contribution, tails included.
    """

    SUB_BITS = 8
    SUB = 1 << SUB_BITS
    MAX_US = (1 << 32) - 1

    def __init__(self) -> None:
        self._buckets = 2 * self.SUB + (32 - self.SUB_BITS) * self.SUB
        self._counts = [0] * self._buckets
        self.count = 0
        self.total_us = 0
        self.min_us = self.MAX_US
        self.max_us = 0

    @classmethod
    def _index(cls, us: int) -> int:
        if us < 2 * cls.SUB:
            return us
        shift = us.bit_length() - cls.SUB_BITS - 1  # us >> shift is in [SUB, 2 * SUB)
        return 2 * cls.SUB + (shift - 1) * cls.SUB + (us >> shift) - cls.SUB

    @classmethod
    def _bucket_range(cls, index: int) -> tuple[int, int]:
        """[low, high) in µs of the values that land in bucket `index`."""
        if index < 2 * cls.SUB:
            return index, index + 1
        shift = (index - 2 * cls.SUB) // cls.SUB + 1
        mantissa = (index - 2 * cls.SUB) % cls.SUB + cls.SUB
        return mantissa << shift, (mantissa + 1) << shift

    def record(self, seconds: float) -> None:
        us = min(self.MAX_US, max(0, int(seconds * 1e6 + 0.5)))
        self._counts[self._index(us)] += 1
        self.count += 1
        self.total_us += us
        if us < self.min_us:
            self.min_us = us
        if us > self.max_us:
            self.max_us = us

    def record_many(self, seconds: Iterable[float]) -> None:
        for s in seconds:
            self.record(s)

    def merge(self, other: Histogram) -> None:
        for i, c in enumerate(other._counts):
            if c:
                self._counts[i] += c
        self.count += other.count
        self.total_us += other.total_us
        self.min_us = min(self.min_us, other.min_us)
        self.max_us = max(self.max_us, other.max_us)

    def percentile_us(self, q: float) -> float:
        """The value at percentile `q` (0..100): the smallest recorded value with at least q % of
        the samples at or below it (as HdrHistogram), reported as its bucket's midpoint."""
        if self.count == 0:
            return math.nan
        rank = max(1, math.ceil(q / 100.0 * self.count))
        seen = 0
        for index, c in enumerate(self._counts):
            seen += c
            if seen >= rank:
                low, high = self._bucket_range(index)
                value = low if high - low == 1 else (low + high - 1) / 2
                return float(min(max(value, self.min_us), self.max_us))
        return float(self.max_us)

    def percentile_ms(self, q: float) -> float:
        return self.percentile_us(q) / 1000.0

    @property
    def mean_ms(self) -> float:
        return self.total_us / self.count / 1000.0 if self.count else math.nan

    def summary_ms(self) -> dict[str, float | int]:
        """count, mean, min, p50, p90, p99, p99.9 and max in milliseconds (3 decimals)."""
        if self.count == 0:
            return {"count": 0}
        out: dict[str, float | int] = {"count": self.count, "mean": round(self.mean_ms, 3)}
        out["min"] = round(self.min_us / 1000.0, 3)
        for name, q in (("p50", 50.0), ("p90", 90.0), ("p99", 99.0), ("p99_9", 99.9)):
            out[name] = round(self.percentile_ms(q), 3)
        out["max"] = round(self.max_us / 1000.0, 3)
        return out


# ----------------------------------------------------------------------------- progress


class Progress:
    """A progress line on stderr: `label [####------] 42% 4200/10000 req 1830/s 2.3s`.

    Progress is the larger of done/total and elapsed/seconds (whichever bound ends the run).
    On a terminal it is redrawn in place at most 5 times a second; otherwise a line is written
    every 10 s. `enabled=False` makes every call a no-op.
    """

    def __init__(
        self,
        label: str,
        total: int | None = None,
        *,
        seconds: float | None = None,
        unit: str = "req",
        enabled: bool = True,
        stream: Any = None,
    ) -> None:
        self.label = label
        self.total = total
        self.seconds = seconds
        self.unit = unit
        self.stream = stream if stream is not None else sys.stderr
        self.enabled = enabled
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.interval = 0.2 if self.tty else 10.0
        self.done = 0
        self.started = time.monotonic()
        self._next = self.started + self.interval
        self._drawn = False

    def update(self, n: int = 1) -> None:
        self.done += n
        if self.enabled:
            now = time.monotonic()
            if now >= self._next:
                self._next = now + self.interval
                self._draw(now)

    def _draw(self, now: float, final: bool = False) -> None:
        elapsed = max(now - self.started, 1e-9)
        fraction = 0.0
        if self.total:
            fraction = self.done / self.total
        if self.seconds:
            fraction = max(fraction, elapsed / self.seconds)
        fraction = min(1.0, fraction)
        width = 24
        filled = int(width * fraction)
        bar = "#" * filled + "-" * (width - filled)
        count = f"{self.done}/{self.total}" if self.total else f"{self.done}"
        line = (
            f"{self.label} [{bar}] {fraction * 100:3.0f}% {count} {self.unit} "
            f"{self.done / elapsed:,.0f}/s {elapsed:.1f}s"
        )
        if self.tty:
            self.stream.write("\r" + line + ("\n" if final else "\x1b[K"))
        else:
            self.stream.write(line + "\n")
        self.stream.flush()
        self._drawn = True

    def close(self) -> None:
        if self.enabled:
            self._draw(time.monotonic(), final=True)
            self.enabled = False

    def __enter__(self) -> Progress:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


def log(message: str, *, enabled: bool = True) -> None:
    if enabled:
        print(f"[load] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- errors


class ErrorCounts:
    """Failures by code: a server's wire code, or `connection_closed` / `timeout` / `client_error`
    / `other:<ExceptionType>` for failures on this side."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()

    @staticmethod
    def code_of(exc: BaseException) -> str:
        if isinstance(exc, ShoalError):
            return exc.code
        if isinstance(exc, ConnectionClosed):
            return "connection_closed"
        if isinstance(exc, TimeoutError):
            return "timeout"
        if isinstance(exc, ClientError):
            return "client_error"
        return f"other:{type(exc).__name__}"

    def record(self, exc: BaseException) -> str:
        code = self.code_of(exc)
        self.counts[code] += 1
        return code

    def merge(self, other: ErrorCounts) -> None:
        self.counts.update(other.counts)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def as_dict(self) -> dict[str, int]:
        return dict(sorted(self.counts.items()))


# ----------------------------------------------------------------------------- output


def format_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A plain-text table: first column left-aligned, the others right-aligned."""

    def cell(value: Any) -> str:
        if isinstance(value, float):
            if math.isnan(value):
                return "-"
            return f"{value:,.3f}" if abs(value) < 10 else f"{value:,.1f}"
        return "-" if value is None else str(value)

    table = [[str(h) for h in headers], *[[cell(v) for v in row] for row in rows]]
    widths = [max(len(r[i]) for r in table) for i in range(len(headers))]

    def line(r: list[str]) -> str:
        parts = [r[0].ljust(widths[0]), *(r[i].rjust(widths[i]) for i in range(1, len(r)))]
        return "  ".join(parts).rstrip()

    rule = "  ".join("-" * w for w in widths)
    return "\n".join([line(table[0]), rule, *(line(r) for r in table[1:])])


def write_json(path: Path, data: Any) -> Path:
    """Write `data` as indented JSON (numpy scalars converted, NaN as null), creating parent dirs."""
    path.parent.mkdir(parents=True, exist_ok=True)
    text = json.dumps(_finite(data), indent=2, default=_json_default, allow_nan=False)
    path.write_text(text + "\n", encoding="utf-8")
    return path.resolve()


def _finite(value: Any) -> Any:
    """NaN / infinity (a figure that could not be computed) as null: the file stays strict JSON."""
    if isinstance(value, np.generic):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _finite(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(v) for v in value]
    return value


def _json_default(value: Any) -> Any:
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, np.ndarray):
        return value.tolist()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def machine_info() -> dict[str, Any]:
    """What the figures ran on."""
    info: dict[str, Any] = {
        "cpus": os.cpu_count(),
        "python": sys.version.split()[0],
        "platform": sys.platform,
    }
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                info["cpu"] = line.split(":", 1)[1].strip()
                break
        info["load_avg_1m"] = round(os.getloadavg()[0], 2)
    except OSError:
        pass
    return info


def bench_header(
    benchmark: str, t: Target, ds: Dataset, config: EngineConfig, **server_config: Any
) -> dict[str, Any]:
    """The opening fields of a benchmark's JSON: what ran, against what server, on what corpus;
    `server_config` adds the settings that benchmark depends on to the HNSW and thread ones."""
    return {
        "benchmark": benchmark,
        "url": t.url,
        "machine": machine_info(),
        "corpus": {"source": ds.source, "docs": ds.size, "queries": len(ds.query_vectors), "dim": ds.dim},
        "server_config": {
            "assumed_defaults": t.process is None,
            "hnsw_m": config.hnsw_m,
            "hnsw_ef_construction": config.hnsw_ef_construction,
            "hnsw_ef_search": config.hnsw_ef_search,
            "search_threads": config.search_threads,
            **server_config,
        },
    }


# ----------------------------------------------------------------------------- target server


@dataclass(frozen=True, slots=True)
class Target:
    """The server under load: its URL, and its process when this run started it."""

    url: str
    process: ServerProcess | None = None

    @property
    def pid(self) -> int | None:
        return self.process.pid if self.process is not None else None

    @property
    def postgres_pid(self) -> int | None:
        """The embedded PostgreSQL's postmaster, for a server this run started."""
        if self.process is None:
            return None
        try:
            return int((self.process.data_dir / "pg" / "postmaster.pid").read_text().split()[0])
        except (OSError, ValueError, IndexError):
            return None


def add_target_args(parser: argparse.ArgumentParser) -> None:
    """`--url`, `--json`, `--quiet`: the options every load generator shares."""
    parser.add_argument(
        "--url",
        default=None,
        help="server to load (http://127.0.0.1:8080 or ws://.../v1/ws); default: start a local "
        "`shoal serve` on 127.0.0.1 port 0 with a temporary data dir, stopped at the end",
    )
    parser.add_argument("--json", type=Path, default=None, metavar="PATH", help="write the results here")
    parser.add_argument("--quiet", action="store_true", help="no progress bar or log lines on stderr")


def check_local(url: str) -> None:
    """Load only ever goes to this machine: refuse any host outside the loopback range."""
    from urllib.parse import urlsplit

    host = (urlsplit(url).hostname or "").lower()
    if not (host == "localhost" or host.startswith("127.") or host in ("::1", "[::1]")):
        raise SystemExit(f"refusing to load {host!r}: load generators target 127.0.0.1 / localhost only")


@contextmanager
def target(url: str | None, *, quiet: bool = False, env: dict[str, str] | None = None) -> Iterator[Target]:
    """The server at `url`, or a local one started (and stopped) around the block."""
    if url is not None:
        check_local(url)
        yield Target(url)
        return
    with local_server(env, quiet=quiet) as proc:
        yield Target(proc.url, proc)


def unique_name(prefix: str) -> str:
    """A collection name no other run uses: `<prefix>_<pid>_<random>`."""
    return f"{prefix}_{os.getpid()}_{os.urandom(3).hex()}"


def positive_bounds(requests: int | None, seconds: float | None) -> tuple[int, float]:
    """Every run is bounded in count and time: fill in whichever bound was not given."""
    n = requests if requests is not None and requests > 0 else 10**9
    s = seconds if seconds is not None and seconds > 0 else MAX_SECONDS
    return n, min(s, MAX_SECONDS)


# ----------------------------------------------------------------------------- CPU accounting


_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _proc_stats() -> dict[int, tuple[int, float]]:
    """pid -> (ppid, utime + stime seconds) for every process we can read in /proc."""
    stats: dict[int, tuple[int, float]] = {}
    try:
        entries = os.listdir("/proc")
    except OSError:
        return stats
    for entry in entries:
        if not entry.isdigit():
            continue
        try:
            raw = Path("/proc", entry, "stat").read_text()
        except OSError:
            continue
        # The command name (field 2) may hold spaces and parentheses: split after its last ')'.
        fields = raw[raw.rfind(")") + 2 :].split()
        try:
            stats[int(entry)] = (int(fields[1]), (int(fields[11]) + int(fields[12])) / _TICK)
        except (IndexError, ValueError):
            continue
    return stats


def tree_cpu_seconds(root: int | None, stats: dict[int, tuple[int, float]] | None = None) -> float | None:
    """CPU seconds used so far by process `root` and its live descendants (None if unknown)."""
    if root is None:
        return None
    stats = stats if stats is not None else _proc_stats()
    if root not in stats:
        return None
    children: dict[int, list[int]] = {}
    for pid, (ppid, _) in stats.items():
        children.setdefault(ppid, []).append(pid)
    total, stack = 0.0, [root]
    while stack:
        pid = stack.pop()
        total += stats[pid][1]
        stack.extend(children.get(pid, ()))
    return total


def machine_busy_seconds() -> float | None:
    """CPU seconds all processes of the machine have used (busy time summed over cores)."""
    try:
        with open("/proc/stat") as f:
            fields = f.readline().split()
    except OSError:
        return None
    if not fields or fields[0] != "cpu":
        return None
    values = [int(v) for v in fields[1:]]
    idle = values[3] + (values[4] if len(values) > 4 else 0)  # idle + iowait
    guest = sum(values[8:10])  # already counted in user / nice
    return (sum(values) - idle - guest) / _TICK


def self_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


class CpuMeter:
    """CPU used over a phase by this process (the load generator), the server and its PostgreSQL,
    and by the whole machine (`others`: everything else, e.g. a neighbour on a shared host).

    `start()` then `stop()`; `result()` gives seconds and shares of the machine's cores over the
    phase's wall time (1.0 = every core busy for the whole phase).
    """

    def __init__(self, server_pid: int | None = None, postgres_pid: int | None = None) -> None:
        self.server_pid = server_pid
        self.postgres_pid = postgres_pid
        self.cores = os.cpu_count() or 1
        self._start: list[float | None] = []
        self._delta: list[float | None] = []

    def _sample(self) -> list[float | None]:
        stats = _proc_stats() if self.server_pid or self.postgres_pid else {}
        return [
            time.perf_counter(),
            self_cpu_seconds(),
            tree_cpu_seconds(self.server_pid, stats),
            tree_cpu_seconds(self.postgres_pid, stats),
            machine_busy_seconds(),
        ]

    def start(self) -> CpuMeter:
        self._start = self._sample()
        return self

    def stop(self) -> dict[str, float | None]:
        assert self._start, "start() first"
        end = self._sample()
        self._delta = [None if a is None or b is None else b - a for a, b in zip(self._start, end, strict=True)]
        return self.result()

    def result(self) -> dict[str, float | None]:
        assert self._delta, "stop() first"
        wall, client, server, pg, machine = self._delta
        assert wall is not None and client is not None
        capacity = max(wall * self.cores, 1e-9)

        def r3(v: float | None) -> float | None:
            return None if v is None else round(v, 3)

        def share(v: float | None) -> float | None:
            return None if v is None else round(v / capacity, 3)

        # Everything else the machine ran (includes the server when its pid is unknown).
        others = None if machine is None else max(0.0, machine - client - (server or 0.0) - (pg or 0.0))
        return {
            "wall_s": r3(wall),
            "client_cpu_s": r3(client),
            "server_cpu_s": r3(server),
            "postgres_cpu_s": r3(pg),
            "machine_cpu_s": r3(machine),
            "client_share": share(client),
            "server_share": share(server),
            "postgres_share": share(pg),
            "others_share": share(others),
            "machine_share": share(machine),
        }


# ----------------------------------------------------------------------------- event loop


def run_async(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run a coroutine on uvloop when available (less client CPU per request), else asyncio."""
    try:
        import uvloop

        factory: Callable[[], asyncio.AbstractEventLoop] | None = uvloop.new_event_loop
    except ImportError:
        factory = None
    with asyncio.Runner(loop_factory=factory) as runner:
        return runner.run(main())


async def gather_limited(coros: Iterable[Awaitable[T]], limit: int) -> list[T]:
    """Await `coros` with at most `limit` running at once; results in input order."""
    semaphore = asyncio.Semaphore(max(1, limit))

    async def one(coro: Awaitable[T]) -> T:
        async with semaphore:
            return await coro

    return list(await asyncio.gather(*(one(c) for c in coros)))


# ----------------------------------------------------------------------------- data


def unit_rows(n: int, dim: int, seed: int) -> NDArray[np.float32]:
    """`n` random unit vectors (synthetic data for quick runs and tests)."""
    rng = np.random.default_rng(seed)
    rows = rng.standard_normal((n, dim)).astype(np.float32)
    rows /= np.linalg.norm(rows, axis=1, keepdims=True)
    return rows


def recall_at_k(
    found: Sequence[Sequence[int]], truth: Sequence[NDArray[np.int64]] | NDArray[np.int64], k: int
) -> float:
    """Mean over queries of |found[q][:k] ∩ truth[q][:k]| / min(k, len(truth[q])): a query whose
    filter matches fewer than k documents is judged on the ones that exist."""
    if len(found) == 0:
        return math.nan
    total = 0.0
    for q, rows in enumerate(found):
        expected = [int(x) for x in truth[q][:k].tolist()]
        if expected:
            total += len(set(rows[:k]) & set(expected)) / len(expected)
        else:
            total += 1.0 if len(rows) == 0 else 0.0
    return total / len(found)


def print_report(rows: list[list[Any]], result: Mapping[str, Any]) -> None:
    """Print a generator's metric/value table, with the CPU shares and the errors by code."""
    cpu = result.get("cpu") or {}
    for who in ("client", "server", "postgres", "others"):
        share = cpu.get(f"{who}_share")
        if share is not None:
            rows.append([f"{who} CPU (share of cores)", share])
    print(format_table(["metric", "value"], rows))
    if result["errors"]:
        print("errors by code: " + ", ".join(f"{k}={v}" for k, v in result["errors"].items()))


def run_and_report(
    args: argparse.Namespace,
    bench: Callable[[Target], Coroutine[Any, Any, dict[str, Any]]],
    print_summary: Callable[[dict[str, Any]], None],
) -> int:
    """The common `main` tail: run `bench` against --url (or a local server), print the summary,
    write --json; exit status 1 when any request failed."""
    with target(args.url, quiet=args.quiet) as t:
        result = run_async(lambda: bench(t))
    print_summary(result)
    if args.json is not None:
        print(f"results written to {write_json(Path(args.json), result)}")
    return 1 if result["error_count"] else 0
