"""A bounded live fuzz run through a real `shoal serve`, and the known-hostile frames one by one.

`test_fuzz_*` share one run of `load.fuzz.fuzz` (module fixture): `SHOAL_FUZZ_FRAMES` generated
WebSocket frames (default 10,000) over four connections plus HTTP requests with hostile bodies
and headers, seeded by `SHOAL_FUZZ_SEED` (default 1; the same seed sends the same frames), while
a monitor connection pings every 20 ms. Each test checks one property of that run, so a failure
names what broke; the findings (smallest frame per distinct failure, hex included) are written
to `results/fuzz-live-<seed>.json`, and `python -m load.fuzz --url URL --replay that.json` resends
them. A long soak: `SHOAL_FUZZ_FRAMES=200000 SHOAL_FUZZ_SEED=$RANDOM pytest tests/test_fuzz_live.py`.

`test_hostile_ws[...]` / `test_hostile_http[...]` send each known-hostile input of
`load.fuzz.SPECIALS` alone, so one defect can be re-checked with `-k <name>`.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import shutil
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import msgpack
import pytest

from load import fuzz
from load.common import RESULTS_DIR, write_json
from tests.server_process import ServerProcess, temp_data_dir

FRAMES = int(os.environ.get("SHOAL_FUZZ_FRAMES", "10000"))
SEED = int(os.environ.get("SHOAL_FUZZ_SEED", "1"))
# The run itself must finish well under two minutes at the default size; a soak gets more time.
RUN_SECONDS_LIMIT = 90.0 * max(1.0, FRAMES / 10_000)
pytestmark = pytest.mark.timeout(int(RUN_SECONDS_LIMIT + 60))


@pytest.fixture(scope="module")
def fuzz_server() -> Iterator[ServerProcess]:
    """A server of its own: the fuzz run must not disturb the session server, and its log is read."""
    data_dir = temp_data_dir("shoal-fuzz-")
    proc = ServerProcess(data_dir)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def server_exceptions(log_text: str) -> list[str]:
    """Distinct unexpected exceptions in a server log: 'Type: message @ file:line (function)' of the
    innermost frame in the project's code."""
    found: dict[str, None] = {}
    for block in log_text.split("Traceback (most recent call last):")[1:]:
        lines = block.strip("\n").splitlines()
        frames = re.findall(r'File "([^"]+)", line (\d+), in (\S+)', block)
        ours = [f for f in frames if "/site-packages/" not in f[0] and "<frozen" not in f[0]]
        where = ours[-1] if ours else (frames[-1] if frames else ("?", "?", "?"))
        last = next((ln for ln in lines if re.match(r"^[A-Za-z_.]+(Error|Exception|Overflow)\b", ln)), lines[-1])
        path = where[0].split("/fuzz/")[-1] if "/fuzz/" in where[0] else where[0]
        found[f"{last[:160]} @ {path}:{where[1]} ({where[2]})"] = None
    return list(found)


@pytest.fixture(scope="module")
def fuzz_result(fuzz_server: ServerProcess) -> dict[str, Any]:
    started = time.perf_counter()
    result = asyncio.run(fuzz.fuzz(fuzz_server.url, frames=FRAMES, seed=SEED, server_pid=fuzz_server.pid, quiet=True))
    result["wall_seconds"] = round(time.perf_counter() - started, 2)
    try:
        result["server_exceptions"] = server_exceptions(fuzz_server.log_path.read_text(errors="replace"))
    except OSError:
        result["server_exceptions"] = []
    path = write_json(RESULTS_DIR / f"fuzz-live-{SEED}.json", result)
    result["json_path"] = str(path)
    fuzz.print_summary(result)
    return result


def failures(result: dict[str, Any], *kinds: str) -> list[dict[str, Any]]:
    return [f for f in result["failures"] if f["kind"] in kinds]


def explain(result: dict[str, Any], found: list[dict[str, Any]]) -> str:
    lines = [f"seed {result['seed']}, {result['frames']} frames; all findings in {result['json_path']}"]
    for f in found[:25]:
        tag = f" [{f['special']}]" if f["special"] else ""
        lines.append(f"- {f['kind']} ({f['transport']} {f['op']}, x{f['count']}){tag}: {f['detail'][:200]}")
        lines.append(f"    known defect: {f['defect']}")
        lines.append(f"    input:  {f['example'][:300]}")
        lines.append(f"    answer: {f['answer'][:300]}")
    if result.get("server_exceptions"):
        lines.append("server log exceptions:")
        lines.extend(f"  {e}" for e in result["server_exceptions"][:20])
    return "\n".join(lines)


COVERED = {
    "stays_up": ("connection_closed", "no_reply", "monitor", "http_transport", "worker_failed"),
    "codes": ("unknown_code", "malformed_error", "http_malformed_error", "http_status_mismatch"),
    "internal": ("internal", "http_5xx", "unavailable"),
    "leaks": ("leak", "long_message"),
    "well_formed": (
        "malformed_reply", "undecodable_reply", "text_reply", "wrong_id", "non_finite_reply",
        "http_undecodable", "http_no_body", "accepted",
    ),
}  # fmt: skip


def test_fuzz_sends_the_frames_in_bounded_time(fuzz_result: dict[str, Any]) -> None:
    assert fuzz_result["frames"] >= FRAMES
    assert fuzz_result["http_requests"] >= 50
    assert fuzz_result["seconds"] < RUN_SECONDS_LIMIT, f"the run took {fuzz_result['seconds']} s"


def test_fuzz_server_stays_up(fuzz_result: dict[str, Any], fuzz_server: ServerProcess) -> None:
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None, fuzz_server.log_tail()
    assert fuzz_result["after"].get("process_alive") is True
    assert fuzz_result["after"].get("healthz_ok") is True
    found = failures(fuzz_result, *COVERED["stays_up"])
    assert not found, explain(fuzz_result, found)


def test_fuzz_error_codes_are_in_the_table(fuzz_result: dict[str, Any]) -> None:
    found = failures(fuzz_result, *COVERED["codes"])
    assert not found, explain(fuzz_result, found)
    unknown = set(fuzz_result["reply_codes"]) - {"ok", *fuzz.ERROR_STATUS}
    assert not unknown, unknown


def test_fuzz_no_internal_errors(fuzz_result: dict[str, Any]) -> None:
    found = failures(fuzz_result, *COVERED["internal"])
    assert not found, explain(fuzz_result, found)


def test_fuzz_nothing_internal_leaks(fuzz_result: dict[str, Any]) -> None:
    found = failures(fuzz_result, *COVERED["leaks"])
    assert not found, explain(fuzz_result, found)


def test_fuzz_replies_are_well_formed(fuzz_result: dict[str, Any]) -> None:
    found = failures(fuzz_result, *COVERED["well_formed"])
    assert not found, explain(fuzz_result, found)


def test_fuzz_no_other_failures(fuzz_result: dict[str, Any]) -> None:
    known = {k for kinds in COVERED.values() for k in kinds}
    found = [f for f in fuzz_result["failures"] if f["kind"] not in known]
    assert not found, explain(fuzz_result, found)


def test_fuzz_canary_is_intact(fuzz_result: dict[str, Any]) -> None:
    after = fuzz_result["after"]
    assert after.get("canary_count") == fuzz.CANARY_DOCS, after
    assert after.get("canary_intact") is True, after


def test_fuzz_monitor_ping_p99_under_100ms(fuzz_result: dict[str, Any]) -> None:
    ping = fuzz_result["ping_ms"]
    assert ping["count"] >= 100, ping
    assert ping["p99"] < fuzz.PING_P99_LIMIT_MS, (
        f"monitor ping p99 {ping['p99']} ms (max {ping['max']} ms); slowest, with what was being served:\n"
        + "\n".join(
            f"  at {at} s: {ms} ms, serving {', '.join(what)}" for at, ms, what in fuzz_result["slow_pings"][:10]
        )
    )


# -- the known-hostile inputs, one at a time --------------------------------------------------

PREFIX = f"rg{SEED % 1000}_{os.getpid() % 100_000}"
NAMES = fuzz.Collections(f"{PREFIX}_canary", [f"{PREFIX}_a", f"{PREFIX}_b"], f"{PREFIX}_s", f"{PREFIX}_t")
WS_SPECIALS = fuzz.special_frames(NAMES.special, NAMES.canary, NAMES.text)
HTTP_SPECIALS = fuzz.special_http(NAMES.special, NAMES.canary, NAMES.text)
# A hostile frame may cost the server some work, but never a stalled event loop.
MAX_PING_WHILE_SERVING_MS = fuzz.PING_P99_LIMIT_MS


@pytest.fixture(scope="module")
def hostile_targets(fuzz_server: ServerProcess) -> fuzz.Run:
    run = fuzz.Run(fuzz_server.url, 0, SEED, 1, 0)

    async def make() -> None:
        ws = await fuzz._connect(run.ws_url)
        try:
            await fuzz._call(ws, 1, "create_collection", name=NAMES.canary, dim=fuzz.DIM)
            await fuzz._call(ws, 2, "upsert", collection=NAMES.canary, docs=fuzz.canary_docs(SEED))
            await fuzz._call(ws, 3, "create_collection", name=NAMES.special, dim=fuzz.DIM)
            await fuzz._call(ws, 4, "create_collection", name=NAMES.text)
        finally:
            await ws.close()

    asyncio.run(make())
    return run


async def _send_with_pings(run: fuzz.Run, frame: bytes) -> tuple[Any, float, float]:
    """Send `frame`; while its reply is awaited, ping on a second connection every 10 ms.
    Returns (reply, seconds to the reply, slowest ping round trip in ms)."""
    ws = await fuzz._connect(run.ws_url)
    mon = await fuzz._connect(run.ws_url)
    slowest = 0.0
    try:
        await fuzz._call(mon, 1, "ping")
        t0 = time.perf_counter()
        await ws.send(frame)
        reply_task = asyncio.ensure_future(asyncio.wait_for(ws.recv(), fuzz.REPLY_TIMEOUT_S))
        n = 1
        while not reply_task.done():
            n += 1
            p0 = time.perf_counter()
            await fuzz._call(mon, n, "ping")
            slowest = max(slowest, (time.perf_counter() - p0) * 1000)
            await asyncio.sleep(0.01)
        message = await reply_task
        elapsed = time.perf_counter() - t0
        return msgpack.unpackb(message, raw=False, strict_map_key=False), elapsed, slowest
    finally:
        await ws.close()
        await mon.close()


@pytest.mark.parametrize("name, frame", WS_SPECIALS, ids=[n for n, _ in WS_SPECIALS])
def test_hostile_ws(name: str, frame: bytes, hostile_targets: fuzz.Run, fuzz_server: ServerProcess) -> None:
    reply, elapsed, slowest_ping = asyncio.run(_send_with_pings(hostile_targets, frame))
    sent_id, _ = fuzz._frame_info(frame)
    problems = fuzz.ws_reply_problems(reply, sent_id)
    if name in fuzz.MUST_FAIL and isinstance(reply, dict) and reply.get("ok"):
        problems.append(("accepted", f"{name} was accepted"))
    assert not problems, f"{name}: {problems}\n  answer: {fuzz.short(reply, 600)}"
    assert slowest_ping < MAX_PING_WHILE_SERVING_MS, (
        f"{name}: a ping waited {slowest_ping:.0f} ms while the server served it (reply after {elapsed * 1000:.0f} ms)"
    )
    assert fuzz_server.proc is not None and fuzz_server.proc.poll() is None


@pytest.mark.parametrize(
    "name, method, path, headers, body", HTTP_SPECIALS, ids=[s[0] for s in HTTP_SPECIALS]
)  # fmt: skip
def test_hostile_http(
    name: str, method: str, path: str, headers: dict[str, str], body: bytes, hostile_targets: fuzz.Run
) -> None:
    url = hostile_targets.http_url + path
    route = path.split("?", 1)[0]
    with httpx.Client(timeout=fuzz.REPLY_TIMEOUT_S) as client:
        if route.endswith(("/subscribe", "/changes")):
            with client.stream(method, url, headers=headers, content=body or None) as response:
                if response.status_code != 200:
                    response.read()
                problems = fuzz.http_problems(response, stream=True)
                status = response.status_code
                answer = response.content[:600] if status != 200 else b"(stream)"
        else:
            response = client.request(method, url, headers=headers, content=body or None)
            problems = fuzz.http_problems(response, stream=False)
            status, answer = response.status_code, response.content[:600]
    if name in fuzz.MUST_FAIL and status == 200:
        problems.append(("accepted", f"{name} was accepted"))
    assert not problems, f"{name}: HTTP {status} {problems}\n  answer: {answer!r}"


def test_saved_findings_replay(fuzz_result: dict[str, Any]) -> None:
    """The JSON a run writes is what `--replay` reads: every WebSocket finding small enough keeps its
    frame as hex that decodes back to bytes."""
    saved = json.loads(Path(fuzz_result["json_path"]).read_text())
    for f in saved["failures"]:
        if f["transport"] == "ws" and f["example_size"] <= 4096:
            assert f["example_hex"] is not None and bytes.fromhex(f["example_hex"])
