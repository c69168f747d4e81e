"""Run a real `shoal serve` process on 127.0.0.1 port 0 (load scripts and end-to-end tests).

    proc = ServerProcess(temp_data_dir())
    url = proc.start()          # "http://127.0.0.1:<port>", once uvicorn listens
    ...
    proc.stop()                 # SIGTERM: graceful shutdown, embedded PostgreSQL stopped

`local_server()` wraps that for the load generators: it starts a server in a fresh data dir under
/tmp, yields it and removes the data dir after the server has stopped.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def temp_data_dir(prefix: str = "shoal-test-") -> Path:
    # Under /tmp: the embedded PostgreSQL (run as root) must be able to open every parent dir.
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


class ServerProcess:
    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.env = {**os.environ, "PYTHONUNBUFFERED": "1", **(env or {})}
        self.proc: subprocess.Popen[str] | None = None
        self.url = ""
        self.log_path = data_dir / "server.log"
        self.lines: list[str] = []

    def start(self, timeout: float = 90.0) -> str:
        log = self.log_path.open("a")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--data-dir", str(self.data_dir)],
            cwd=ROOT,
            env=self.env,
            stdout=subprocess.PIPE,
            stderr=log,
            text=True,
        )
        found = threading.Event()

        def pump() -> None:
            assert self.proc is not None and self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if "listening on " in line and not found.is_set():
                    self.url = line.strip().rsplit(" ", 1)[-1]
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        deadline = time.monotonic() + timeout
        while not found.wait(0.1):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"server did not start:\n{self.log_tail()}")
        return self.url

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc is not None else None

    @property
    def ws_url(self) -> str:
        return self.url.replace("http://", "ws://") + "/v1/ws"

    def log_tail(self, n: int = 60) -> str:
        try:
            return "\n".join(self.log_path.read_text().splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 60.0) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)

    def kill(self) -> None:
        """SIGKILL: no shutdown at all (the embedded PostgreSQL keeps running, as after a crash)."""
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait(10)


@contextmanager
def local_server(env: dict[str, str] | None = None, *, quiet: bool = False) -> Iterator[ServerProcess]:
    """A `shoal serve` on 127.0.0.1 port 0 with a temporary data dir, stopped and removed on exit."""
    data_dir = temp_data_dir("shoal-load-")
    proc = ServerProcess(data_dir, env)
    try:
        if not quiet:
            print(f"[load] starting a local server (data dir {data_dir}) ...", file=sys.stderr, flush=True)
        proc.start()
        if not quiet:
            print(f"[load] server {proc.url} (pid {proc.pid})", file=sys.stderr, flush=True)
        yield proc
    finally:
        if proc.proc is not None:
            code = proc.stop()
            if code not in (0, -signal.SIGTERM):
                print(f"[load] server exited with {code}:\n{proc.log_tail(40)}", file=sys.stderr)
        for _ in range(5):  # PostgreSQL may still be removing its last files
            shutil.rmtree(data_dir, ignore_errors=True)
            if not data_dir.exists():
                break
            time.sleep(0.5)


class PostgresProcess:
    """`shoal postgres --data-dir DIR --port P` as a child process; `url` once it serves."""

    def __init__(self, data_dir: Path, port: int = 0) -> None:
        self.data_dir = data_dir
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "postgres", "--data-dir", str(data_dir), "--port", str(port)],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        self.lines: list[str] = []
        self.url = ""
        found = threading.Event()

        def pump() -> None:
            assert self.proc.stdout is not None
            for line in self.proc.stdout:
                self.lines.append(line)
                if line.startswith("database-url: "):
                    self.url = line.split(" ", 1)[1].strip()
                    found.set()

        threading.Thread(target=pump, daemon=True).start()
        if not found.wait(90):
            self.proc.kill()
            raise RuntimeError("shoal postgres did not start:\n" + "".join(self.lines))

    def stop(self) -> int:
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(10)
