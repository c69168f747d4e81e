"""Chroma in `load.compare`: installed into its own virtualenv, run as a server, driven by its
HttpClient from that virtualenv (`load/compare_chroma_driver.py`), so none of Chroma's dependencies
ever enter Shoal's environment.

This process owns every Chroma process: the server (`chroma run --path <tmp> --host 127.0.0.1
--port <free>`, telemetry off) and the driver, which takes JSON commands on stdin. Changing
`ef_search` with `collection.modify` does not reach an index the server has already loaded (seen
with chromadb 1.5: recall did not move until a restart), so every sweep point is: modify, restart
the server on the same data, warm up for a second, measure.
"""

from __future__ import annotations

import json
import queue
import shutil
import signal
import subprocess
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

import numpy as np

from load.common import log, unique_name
from load.compare_common import (
    HNSW_EF_CONSTRUCTION,
    HNSW_M,
    INGEST_BATCH,
    CpuWindow,
    Ingest,
    Raw,
    SystemResult,
    free_port,
    point_of,
)
from load.compare_venv import ensure_venv, side_env
from load.corpus import Corpus

DRIVER = Path(__file__).with_name("compare_chroma_driver.py")


class ChromaServer:
    def __init__(self, chroma: Path, data: Path, log_path: Path) -> None:
        self.chroma = chroma
        self.data = data
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.port = 0

    def start(self, timeout: float = 120.0) -> None:
        self.port = free_port()
        with self.log_path.open("ab") as out:
            self.proc = subprocess.Popen(
                [str(self.chroma), "run", "--path", str(self.data), "--host", "127.0.0.1", "--port", str(self.port)],
                stdout=out,
                stderr=subprocess.STDOUT,
                env=side_env(),
                cwd=self.data.parent,
            )
        deadline = time.monotonic() + timeout
        url = f"http://127.0.0.1:{self.port}/api/v2/heartbeat"
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"chroma server exited with {self.proc.returncode}:\n{self.log_tail()}")
            try:
                with urllib.request.urlopen(url, timeout=2) as response:
                    if response.status == 200:
                        return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"chroma server did not answer in {timeout:.0f}s:\n{self.log_tail()}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        self.proc = None

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    def log_tail(self, lines: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


class Driver:
    """The driver process: one JSON command in, one JSON reply out, each with a timeout."""

    def __init__(self, python: Path) -> None:
        self.proc = subprocess.Popen(
            [str(python), str(DRIVER)],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=side_env(),
            cwd=tempfile.gettempdir(),
        )
        self._replies: queue.Queue[str | None] = queue.Queue()
        assert self.proc.stdout is not None
        threading.Thread(target=self._pump, args=(self.proc.stdout,), daemon=True).start()

    def _pump(self, stdout: IO[str]) -> None:
        for line in stdout:
            self._replies.put(line)
        self._replies.put(None)

    def call(self, timeout: float, **cmd: Any) -> dict[str, Any]:
        assert self.proc.stdin is not None
        self.proc.stdin.write(json.dumps(cmd) + "\n")
        self.proc.stdin.flush()
        try:
            line = self._replies.get(timeout=timeout)
        except queue.Empty:
            raise RuntimeError(f"chroma driver: {cmd['cmd']} took over {timeout:.0f}s") from None
        if line is None:
            raise RuntimeError(f"chroma driver exited with {self.proc.wait(10)} during {cmd['cmd']}")
        reply: dict[str, Any] = json.loads(line)
        if not reply.pop("ok", False):
            raise RuntimeError(f"chroma {cmd['cmd']}: {reply.get('error')}")
        return reply

    def close(self) -> None:
        if self.proc.stdin is not None:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)


def run_chroma(
    result: SystemResult,
    corpus: Corpus,
    efs: list[int],
    clients: int,
    seconds: float,
    max_seconds: float,
    spec: str,
) -> None:
    """Fill `result`; raises on failure, leaving in `result` what was measured before."""
    started = time.perf_counter()
    python = ensure_venv("chroma", [spec], ["chromadb"])
    chroma = python.parent / "chroma"
    work = Path(tempfile.mkdtemp(prefix="shoal-compare-chroma-"))
    server = ChromaServer(chroma, work / "db", work / "server.log")
    driver = Driver(python)
    name = unique_name("compare")
    common = {"collection": name, "corpus": str(corpus.path)}
    try:
        server.start()
        log(f"chroma: server pid {server.pid} on port {server.port}")
        cpu = CpuWindow(server.pid, client_pid=driver.proc.pid)
        reply = driver.call(
            600 + len(corpus.ids) / 20,
            cmd="ingest",
            port=server.port,
            batch=INGEST_BATCH,
            m=HNSW_M,
            ef_construction=HNSW_EF_CONSTRUCTION,
            **common,
        )
        if reply["count"] != len(corpus.ids):
            raise RuntimeError(f"collection holds {reply['count']} documents after ingest")
        note = "one client, each add() awaited; ack = written to Chroma's SQLite log"
        result.ingest = Ingest(reply["docs"], reply["seconds"], INGEST_BATCH, True, note, **cpu.stop())
        ack_ms = np.asarray(reply["acks"]) * 1000
        result.info |= {
            "chromadb": reply["version"],
            "configuration": reply["configuration"],
            "ingest_ack_ms": {
                "p50": round(float(np.percentile(ack_ms, 50)), 1),
                "p99": round(float(np.percentile(ack_ms, 99)), 1),
            },
            "ef_change": "collection.modify(configuration={'hnsw': {'ef_search': ef}}) + server restart",
        }
        log(f"chroma {reply['version']}: ingested {reply['count']} at {result.ingest.docs_per_s:.0f} docs/s")
        for ef in efs:
            driver.call(120, cmd="set_ef", port=server.port, ef=ef, **common)
            server.stop()
            server.start()
            query = {"cmd": "query", "port": server.port, "clients": clients, **common}
            driver.call(120, **query, seconds=min(1.0, seconds), max_seconds=max(1.0, seconds))
            cpu = CpuWindow(server.pid, client_pid=driver.proc.pid)
            reply = driver.call(max_seconds + 120, **query, seconds=seconds, max_seconds=max_seconds)
            raw = Raw(reply["latencies"], {int(q): rows for q, rows in reply["first"].items()}, reply["seconds"])
            point = point_of(ef, raw, corpus.ground_truth, **cpu.stop())
            result.sweep.append(point)
            log(f"chroma ef={ef}: recall {point.recall:.4f}, {point.qps:.0f} q/s, p99 {point.p99_ms:.1f} ms")
    except Exception as exc:
        tail = server.log_tail(5)
        raise RuntimeError(f"{exc}\n(chroma server log tail:\n{tail})" if tail else str(exc)) from exc
    finally:
        driver.close()
        server.stop()
        shutil.rmtree(work, ignore_errors=True)
        result.seconds = time.perf_counter() - started
