"""`shoal import` / `shoal export` as a user runs them: subprocesses against a real server
(three shards per collection, so pages merge shards)."""

from __future__ import annotations

import base64
import fcntl
import json
import os
import pty
import re
import struct
import subprocess
import sys
import termios
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest

from shoal_client import ShoalClient
from tests.server_process import ROOT, ServerProcess, local_server

pytestmark = pytest.mark.timeout(240)
DIM = 8


@pytest.fixture(scope="module")
def sharded() -> Iterator[ServerProcess]:
    with local_server(env={"SHOAL_SHARDS_PER_COLLECTION": "3"}, quiet=True) as proc:
        yield proc


def shoal(*args: str, stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "clients" / "python"), str(ROOT)])}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        input=stdin,
    )


def write_jsonl(path: Path, n: int, seed: int = 1) -> list[dict[str, object]]:
    rng = np.random.default_rng(seed)
    docs: list[dict[str, object]] = []
    for i in range(n):
        vec = rng.normal(size=DIM).astype(np.float32)
        doc: dict[str, object] = {"id": f"doc-{i:05d}", "vector": vec.tolist(), "metadata": {"i": i, "tag": ["a", "b"]}}
        if i % 3 == 0:
            doc["text"] = f"text number {i} ünïcode"
        if i % 5 == 0:  # the base64 form of the same vector
            doc["vector"] = base64.b64encode(vec.astype("<f4").tobytes()).decode()
        docs.append(doc)
    path.write_text("".join(json.dumps(d) + "\n" for d in docs), encoding="utf-8")
    return docs


async def test_import_export_round_trip_is_byte_identical(sharded: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    docs = write_jsonl(source, 2_345)
    done = shoal("import", str(source), "--collection", "rt1", "--url", sharded.url, "--batch", "200")
    assert done.returncode == 0, done.stderr
    assert "imported 2345 documents into rt1" in done.stderr and "docs/s" in done.stderr
    first, second = tmp_path / "first.jsonl", tmp_path / "second.jsonl"
    out = shoal("export", "rt1", "--url", sharded.url, "--output", str(first), "--page", "333")
    assert out.returncode == 0, out.stderr
    assert shoal("import", str(first), "--collection", "rt2", "--url", sharded.url).returncode == 0
    assert shoal("export", "rt2", "--url", sharded.url, "--output", str(second)).returncode == 0
    assert first.read_bytes() == second.read_bytes()
    lines = [json.loads(line) for line in first.read_text(encoding="utf-8").splitlines()]
    assert [d["id"] for d in lines] == sorted(str(d["id"]) for d in docs)
    # Vectors exactly: the float32 values written, bit for bit.
    rng = np.random.default_rng(1)
    expected = [rng.normal(size=DIM).astype(np.float32) for _ in docs]
    for line, want in zip(lines, expected, strict=True):
        assert np.array_equal(np.asarray(line["vector"], np.float32), want)
    assert lines[3]["text"] == "text number 3 ünïcode" and lines[4]["metadata"] == {"i": 4, "tag": ["a", "b"]}
    # The base64 form exports and imports the same documents.
    b64 = tmp_path / "b64.jsonl"
    assert shoal("export", "rt2", "--url", sharded.url, "--output", str(b64), "--vectors", "base64").returncode == 0
    assert shoal("import", str(b64), "--collection", "rt3", "--url", sharded.url).returncode == 0
    third = shoal("export", "rt3", "--url", sharded.url)
    assert third.stdout.encode() == first.read_bytes()


async def test_rerun_is_idempotent(sharded: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "in.jsonl"
    write_jsonl(source, 500, seed=2)
    assert shoal("import", str(source), "--collection", "idem", "--url", sharded.url).returncode == 0
    async with ShoalClient.connect(sharded.ws_url) as c:
        before = await c.count("idem")
        seq = (await c.delete("idem", ids=["absent"])).seq
        again = shoal("import", str(source), "--collection", "idem", "--url", sharded.url, "--in-flight", "8")
        assert again.returncode == 0, again.stderr
        assert await c.count("idem") == before == 500
        assert f"last seq {seq + 500}" in again.stderr


async def test_bad_lines_are_reported_and_skipped_or_strict(sharded: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "bad.jsonl"
    good = json.dumps({"id": "ok1", "vector": [1.0] * DIM})
    lines = [
        good,
        "{not json",
        json.dumps({"id": "short", "vector": [1.0, 2.0]}),
        "",
        json.dumps({"vector": [1.0] * DIM}),
        json.dumps({"id": "nan", "vector": [1.0] * (DIM - 1) + [float("nan")]}),
        json.dumps({"id": "meta", "vector": [1.0] * DIM, "metadata": {"x": {"nested": 1}}}),
        json.dumps({"id": "b64", "vector": "%%%"}),
        json.dumps({"id": "ok2", "vector": [2.0] * DIM, "metadata": {"k": "v"}}),
    ]
    source.write_text("\n".join(lines) + "\n", encoding="utf-8")
    strict = shoal("import", str(source), "--collection", "badl", "--url", sharded.url, "--strict")
    assert strict.returncode == 1 and "line 2:" in strict.stderr
    async with ShoalClient.connect(sharded.ws_url) as c:
        assert "badl" not in [x.name for x in await c.list_collections()]
        done = shoal("import", str(source), "--collection", "badl", "--url", sharded.url)
        assert done.returncode == 1, done.stderr
        for number in (2, 3, 5, 6, 7, 8):
            assert f"line {number}:" in done.stderr, done.stderr
        assert "line 1:" not in done.stderr and "line 9:" not in done.stderr and "line 4:" not in done.stderr
        assert "dim is 8" in done.stderr and "6 lines skipped" in done.stderr
        assert sorted(d["id"] for d in await c.get("badl", ["ok1", "ok2", "short"])) == ["ok1", "ok2"]


async def test_csv_import(sharded: ServerProcess, tmp_path: Path) -> None:
    source = tmp_path / "docs.csv"
    source.write_text(
        'key,body,colour,size\nc1,"A red apple, crisp",red,3\nc2,,green,\nc3,A lemon,yellow,1,extra\n',
        encoding="utf-8",
    )
    done = shoal(
        "import",
        str(source),
        "--collection",
        "csvc",
        "--url",
        sharded.url,
        "--id-column",
        "key",
        "--text-column",
        "body",
    )
    assert done.returncode == 1 and "line 3:" in done.stderr and "line 4:" in done.stderr, done.stderr
    async with ShoalClient.connect(sharded.ws_url) as c:
        got = await c.get("csvc", ["c1", "c2", "c3"])
        assert [(d["id"], d["text"], d["metadata"]) for d in got] == [
            ("c1", "A red apple, crisp", {"colour": "red", "size": "3"})
        ]
    missing = shoal("import", str(source), "--collection", "csvc", "--url", sharded.url)
    assert missing.returncode == 2 and missing.stderr.strip().count("\n") == 0 and "'id' column" in missing.stderr


def test_a_terminal_sees_the_progress_bar_with_docs_per_second(sharded: ServerProcess, tmp_path: Path) -> None:
    """The bar shows only on a terminal (every other test pipes stderr): run the import with a
    pseudo-terminal as its stderr and read what a user would see."""
    source = tmp_path / "bar.jsonl"
    write_jsonl(source, 1_500)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "clients" / "python"), str(ROOT)])}
    master, slave = pty.openpty()
    # A new pty is 0 columns wide, and tqdm fits its bar to the width: give it a terminal's.
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    try:
        proc = subprocess.Popen(
            [sys.executable, "-m", "server.cli", "import", str(source), "--collection", "bar", "--url", sharded.url,
             "--batch", "100"],
            cwd=ROOT, env=env, stdout=subprocess.DEVNULL, stderr=slave,
        )  # fmt: skip
        os.close(slave)
        seen = b""
        while True:
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: the child closed its side
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=120) == 0, seen.decode(errors="replace")
    finally:
        os.close(master)
    screen = seen.decode(errors="replace")
    assert re.search(r"1500docs \[[0-9:]+, *[0-9.]+docs/s\]", screen), screen  # the bar's last state
    assert "imported 1500 documents into bar" in screen


def test_one_line_errors(sharded: ServerProcess, tmp_path: Path) -> None:
    missing = shoal("import", str(tmp_path / "nope.jsonl"), "--collection", "x", "--url", sharded.url)
    assert missing.returncode == 2 and missing.stderr.strip() == f"shoal: no such file: {tmp_path / 'nope.jsonl'}"
    source = tmp_path / "one.jsonl"
    source.write_text(json.dumps({"id": "a", "vector": [1.0] * DIM}) + "\n", encoding="utf-8")
    with_socket = __import__("socket").socket()
    with_socket.bind(("127.0.0.1", 0))
    port = with_socket.getsockname()[1]
    with_socket.close()
    down = shoal("import", str(source), "--collection", "x", "--url", f"http://127.0.0.1:{port}")
    assert down.returncode == 2 and down.stderr.count("\n") == 1 and "cannot reach" in down.stderr, down.stderr
    gone = shoal("export", "no_such_collection", "--url", sharded.url)
    assert gone.returncode == 2 and "no collection named" in gone.stderr and gone.stderr.count("\n") == 1


def test_import_bench_smoke(sharded: ServerProcess, tmp_path: Path) -> None:
    out = tmp_path / "bench.json"
    command = [sys.executable, "-m", "load.import_bench", "--docs", "300", "--dim", "8", "--batch", "100"]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "clients" / "python"), str(ROOT)])}
    done = subprocess.run(
        [*command, "--url", sharded.url, "--json", str(out), "--quiet"],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
    )
    assert done.returncode == 0, done.stderr
    result = json.loads(out.read_text(encoding="utf-8"))
    assert result["docs"] == 300 and result["ratio"] > 0 and "docs/s" in done.stdout
