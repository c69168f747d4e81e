"""Start-up: the settings model, the one-line start-up errors of `shoal`, and the log format.

Unit tests of `server.settings`; subprocess tests of `python -m server.cli` (mistakes caught
before the database starts, and a StartupError raised inside the lifespan start-up); a real
server with JSON logs, and the session server's text log.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
from dataclasses import dataclass, field
from importlib.metadata import version

import httpx
import msgpack
import pytest
from websockets.asyncio.client import connect
from websockets.typing import Subprotocol

from actors.subscriptions import SubscriptionConfig
from models.config import EngineConfig, Limits, available_cpus, bounds
from models.errors import StartupError
from server import settings as st
from server.settings import Settings, load_settings, unknown_variables
from tests.server_process import ROOT, ServerProcess, temp_data_dir

# --- the settings model ----------------------------------------------------------------------------


def test_defaults_load_and_every_default_is_in_its_own_range() -> None:
    settings = load_settings({})
    assert settings == Settings()
    # Every leaf field given its default as text parses back to the default: a field appended
    # with a default outside the generic range fails here, not at someone's start-up.
    env = {}
    for name, f in st._leaf_fields(Settings):
        default = st._default(f)
        if isinstance(default, int | float | str) and not isinstance(default, bool):
            env[f"SHOAL_{name.upper()}"] = str(default)
    assert load_settings(env) == settings


@pytest.mark.parametrize(
    ("env", "expected"),
    [
        ({"SHOAL_PORT": "abc"}, "SHOAL_PORT=abc: must be an integer in 0..65535"),
        ({"SHOAL_PORT": "99999"}, "SHOAL_PORT=99999: must be an integer in 0..65535"),
        ({"SHOAL_PORT": "-1"}, "SHOAL_PORT=-1: must be an integer in 0..65535"),
        ({"SHOAL_LOG_LEVEL": "verbose"}, "SHOAL_LOG_LEVEL=verbose: must be one of debug, info"),
        ({"SHOAL_LOG_FORMAT": "xml"}, "SHOAL_LOG_FORMAT=xml: must be one of text, json"),
        ({"SHOAL_MAX_K": "-5"}, "SHOAL_MAX_K=-5: must be an integer >= 1"),
        ({"SHOAL_MAX_K": "0"}, "SHOAL_MAX_K=0: must be an integer >= 1"),
        ({"SHOAL_MAX_K": "1.5"}, "SHOAL_MAX_K=1.5: must be an integer >= 1"),
        ({"SHOAL_SEARCH_THREADS": "0"}, "SHOAL_SEARCH_THREADS=0: must be an integer >= 1"),
        ({"SHOAL_HNSW_M": "1"}, "SHOAL_HNSW_M=1: must be an integer in 2..1000"),
        ({"SHOAL_EXACT_SELECTIVITY": "1.5"}, "SHOAL_EXACT_SELECTIVITY=1.5: must be a number in 0..1"),
        ({"SHOAL_HEARTBEAT_S": "inf"}, "SHOAL_HEARTBEAT_S=inf: must be a number >= 0"),
        ({"SHOAL_RATE_LIMIT": "-1"}, "SHOAL_RATE_LIMIT=-1: must be a number >= 0"),
        ({"SHOAL_HEADER_TIMEOUT_S": "0"}, "SHOAL_HEADER_TIMEOUT_S=0: must be a number >= 0.001"),
        ({"SHOAL_PIN_SEARCH_THREADS": "maybe"}, "SHOAL_PIN_SEARCH_THREADS=maybe: must be true or false"),
        ({"SHOAL_SUB_BUFFER": "0"}, "SHOAL_SUB_BUFFER=0: must be an integer >= 1"),
        ({"SHOAL_SSE_SEND_GRACE_S": "soon"}, "SHOAL_SSE_SEND_GRACE_S=soon: must be a number >= 0"),
        ({"SHOAL_HOST": "bad host"}, "SHOAL_HOST=bad host: must be an IP address or a host name"),
        ({"SHOAL_DATA_DIR": " "}, "SHOAL_DATA_DIR= : must be a path"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_variable(env: dict[str, str], expected: str) -> None:
    with pytest.raises(StartupError) as caught:
        load_settings(env)
    message = str(caught.value)
    assert message.startswith(expected), message
    assert "\n" not in message


def test_a_bad_secret_is_not_echoed() -> None:
    with pytest.raises(StartupError) as caught:
        load_settings({"SHOAL_API_KEYS": '[{"key": "sekrit-1234"'})
    assert "SHOAL_API_KEYS=(hidden)" in str(caught.value)
    assert "sekrit" not in str(caught.value)


def test_values_parse_by_type_and_reach_every_section() -> None:
    s = load_settings(
        {
            "SHOAL_MAX_K": "500",
            "SHOAL_SHARDS_PER_COLLECTION": "2",
            "SHOAL_SUB_BUFFER": "200",
            "SHOAL_SSE_SEND_GRACE_S": "0.5",
            "SHOAL_EMBED_EXPRESS_SLOTS": "0",  # its range starts at 0 (metadata)
            "SHOAL_PIN_SEARCH_THREADS": "off",
            "SHOAL_LOG_LEVEL": "DEBUG",
            "SHOAL_CORS_ORIGINS": "http://a.example, http://b.example",
            "SHOAL_DATABASE_URL": "",
            "SHOAL_PORT": "0",
        }
    )
    assert s.limits.max_k == 500
    assert s.engine.shards_per_collection == 2
    assert s.subscriptions == dataclasses.replace(SubscriptionConfig(), sub_buffer=200, sse_send_grace_s=0.5)
    assert s.engine.embed_express_slots == 0 and s.engine.pin_search_threads is False
    assert s.log_level == "debug"
    assert s.cors_origins == ("http://a.example", "http://b.example")
    assert s.database_url is None and s.port == 0


def test_flags_win_over_the_environment_and_are_checked_alike() -> None:
    s = load_settings({"SHOAL_PORT": "1234", "SHOAL_HOST": "::1"}, port="4321", host=None)
    assert (s.port, s.host) == (4321, "::1")
    with pytest.raises(StartupError, match=r"^--port 99999: must be an integer in 0\.\.65535$"):
        load_settings({}, port="99999")
    with pytest.raises(StartupError, match=r"^--port 70000: must be"):
        load_settings({}, port=70000)


class Mode(enum.Enum):
    FAST = "fast"
    SAFE = "safe"


def test_a_plain_new_field_is_checked_without_code() -> None:
    """What another topic appends to a section: the generic ranges apply at once."""

    @dataclass(frozen=True)
    class Appended:
        new_count: int = 3
        new_off_switch: int = 0  # default 0: 0 is allowed
        new_wait_s: float = 2.0
        new_share: float = 0.5  # a fraction by its name
        new_override: int = field(default=5, metadata=bounds(-10, 10))
        new_mode: Mode = Mode.FAST
        new_optional: int | None = None
        new_list: tuple[str, ...] = ()

    env = {
        "SHOAL_NEW_OFF_SWITCH": "0",
        "SHOAL_NEW_OVERRIDE": "-10",
        "SHOAL_NEW_MODE": "Safe",
        "SHOAL_NEW_OPTIONAL": "7",
        "SHOAL_NEW_LIST": "a b,c",
    }
    assert st.build(Appended, env, {}) == Appended(
        new_off_switch=0, new_override=-10, new_mode=Mode.SAFE, new_optional=7, new_list=("a", "b", "c")
    )
    for env, expected in [
        ({"SHOAL_NEW_COUNT": "0"}, ">= 1"),
        ({"SHOAL_NEW_OFF_SWITCH": "-1"}, ">= 0"),
        ({"SHOAL_NEW_WAIT_S": "-0.1"}, ">= 0"),
        ({"SHOAL_NEW_SHARE": "2"}, "in 0..1"),
        ({"SHOAL_NEW_OVERRIDE": "11"}, "in -10..10"),
        ({"SHOAL_NEW_MODE": "slow"}, "must be one of fast, safe"),
        ({"SHOAL_NEW_OPTIONAL": "0"}, ">= 1"),
    ]:
        with pytest.raises(StartupError, match=re.escape(expected)):
            st.build(Appended, env, {})


def test_unknown_variables_are_named_with_the_close_match() -> None:
    warnings = unknown_variables(
        {"SHOAL_SEARCH_THREAD": "2", "SHOAL_ZZZ": "1", "SHOAL_MAX_K": "5", "SHOAL_CACHE_DIR": "/tmp", "HOME": "/"}
    )
    assert warnings == [
        "unknown setting SHOAL_SEARCH_THREAD is ignored (did you mean SHOAL_SEARCH_THREADS?)",
        "unknown setting SHOAL_ZZZ is ignored",
    ]
    names = st.setting_names()
    assert {"SHOAL_SUB_BUFFER", "SHOAL_MAX_K", "SHOAL_PORT", "SHOAL_PG_POOL_SIZE"} <= names


def test_thread_and_pool_defaults_follow_the_cpus(monkeypatch: pytest.MonkeyPatch) -> None:
    assert EngineConfig().search_threads == available_cpus() == len(os.sched_getaffinity(0))
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    two = EngineConfig()
    # The values the figures were measured with on two CPUs.
    assert (two.search_threads, two.embed_workers, two.pg_pool_size, two.embed_express_slots) == (2, 2, 8, 1)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(16)))
    big = EngineConfig()
    assert (big.search_threads, big.embed_workers, big.pg_pool_size) == (16, 16, 32)
    assert Limits() == Limits()  # limits do not depend on the machine


def test_max_connections_default_leaves_descriptors_free() -> None:
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    assert 64 <= Settings().max_connections <= max(64, soft - 256)


# --- the command line ------------------------------------------------------------------------------


def _shoal(*args: str, env: dict[str, str] | None = None, timeout: float = 60) -> subprocess.CompletedProcess[str]:
    full = {k: v for k, v in os.environ.items() if not k.startswith("SHOAL_")}
    return subprocess.run(
        [sys.executable, "-m", "server.cli", *args],
        cwd=ROOT,
        env={**full, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def _one_line(done: subprocess.CompletedProcess[str]) -> str:
    lines = done.stderr.splitlines()
    assert done.returncode == 2, (done.returncode, done.stderr)
    assert len(lines) == 1, done.stderr
    assert "Traceback" not in done.stderr
    assert lines[0].startswith("shoal"), lines
    return lines[0]


@pytest.mark.parametrize(
    ("args", "env", "expected"),
    [
        (["serve", "--port", "99999"], {}, "shoal: --port 99999: must be an integer in 0..65535"),
        (["serve", "--port", "abc"], {}, "shoal: --port abc: must be an integer in 0..65535"),
        (["serve"], {"SHOAL_PORT": "abc"}, "shoal: SHOAL_PORT=abc: must be an integer in 0..65535"),
        (["serve"], {"SHOAL_LOG_LEVEL": "verbose"}, "shoal: SHOAL_LOG_LEVEL=verbose: must be one of debug"),
        (["serve"], {"SHOAL_MAX_K": "-5"}, "shoal: SHOAL_MAX_K=-5: must be an integer >= 1"),
        (["serve", "--host", "no such host!"], {}, "shoal: --host no such host!: must be an IP address"),
        (["serve", "--no-such-flag"], {}, "shoal: unrecognized arguments: --no-such-flag"),
        (["bench", "nosuch"], {}, "shoal: no load generator named 'nosuch'"),
    ],
)
def test_cli_mistakes_are_one_line_and_exit_2(args: list[str], env: dict[str, str], expected: str) -> None:
    line = _one_line(_shoal(*args, env=env))
    assert line.startswith(expected), line


def test_a_port_in_use_is_one_line_before_anything_starts() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        data_dir = temp_data_dir()
        try:
            done = _shoal("serve", "--port", str(port), "--data-dir", str(data_dir))
            line = done.stderr.splitlines()[-1]
            assert done.returncode == 2, done.stderr
            assert "Traceback" not in done.stderr
            assert line.startswith(f"shoal: cannot listen on 127.0.0.1 port {port}: Address already in use"), line
            assert not (data_dir / "pg").exists()  # refused before the database started
        finally:
            shutil.rmtree(data_dir, ignore_errors=True)


def test_version_comes_from_the_package_metadata() -> None:
    done = _shoal("--version")
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == f"shoal {version('shoal')}"


def test_serve_help_names_the_default_data_dir() -> None:
    done = _shoal("serve", "--help")
    assert done.returncode == 0
    text = " ".join(done.stdout.split())
    assert "/var/lib/shoal as root" in text and "~/.local/share/shoal otherwise" in text
    assert str(st.default_data_dir()) in text


_FAILING_LIFESPAN = textwrap.dedent(
    """
    import sys
    from contextlib import asynccontextmanager

    import anyio
    from starlette.applications import Starlette

    import server.cli as cli
    from models.errors import StartupError
    from server.edge import Edge

    async def refuse() -> None:
        await anyio.sleep(0.01)
        raise StartupError("the data directory /x is refused: make it writable")

    def create_app(settings):
        @asynccontextmanager
        async def lifespan(app):
            async with anyio.create_task_group() as tg:  # raised as an exception group
                tg.start_soon(refuse)
                await anyio.sleep(5)
            yield

        return Edge(Starlette(lifespan=lifespan))

    cli.create_app = create_app
    cli.main(sys.argv[1:])
    """
)


def test_a_startup_error_inside_the_lifespan_is_one_line() -> None:
    data_dir = temp_data_dir()
    try:
        done = subprocess.run(
            [sys.executable, "-c", _FAILING_LIFESPAN, "serve", "--port", "0", "--data-dir", str(data_dir)],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
    finally:
        shutil.rmtree(data_dir, ignore_errors=True)
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr, done.stderr
    assert done.stderr.splitlines()[-1] == "shoal: the data directory /x is refused: make it writable"


# --- logs -----------------------------------------------------------------------------------------


async def _open_and_close_ws(url: str) -> int:
    """A WebSocket that sends one ping frame and closes normally; the client's local port."""
    async with connect(url, subprotocols=[Subprotocol("shoal.v1")]) as ws:
        await ws.send(msgpack.packb({"id": 1, "op": "ping"}))
        await asyncio.wait_for(ws.recv(), 10)
        port: int = ws.local_address[1]
    await asyncio.sleep(0.3)  # the close line is written once the server has closed the socket
    return port


TEXT_LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) [\w.]+: ")


async def test_text_log_one_format_ws_open_and_close_once_no_access_log(server: ServerProcess) -> None:
    # Only the lines written meanwhile: the session server's log holds every other test's too.
    before = len(server.log_path.read_text().splitlines())
    async with httpx.AsyncClient(base_url=server.url) as http:
        assert (await http.get("/healthz")).status_code == 200
    port = await _open_and_close_ws(server.ws_url)
    log = server.log_path.read_text().splitlines()[before:]
    for line in log:
        assert TEXT_LINE.match(line), line
    mine = [line for line in log if f":{port} - " in line]
    assert len(mine) == 2, mine
    assert mine[0].endswith('"WebSocket /v1/ws" [accepted]'), mine
    assert mine[1].endswith('"WebSocket /v1/ws" [closed 1000]'), mine
    assert not any(line.endswith(("connection open", "connection closed")) for line in log)
    assert not any('"GET /healthz' in line for line in log), "access log at info level"


async def test_json_logs_one_object_per_line() -> None:
    data_dir = temp_data_dir()
    env = {"SHOAL_LOG_FORMAT": "json", "SHOAL_LOG_LEVEL": "debug", "SHOAL_SEARCH_THREAD": "3"}
    proc = ServerProcess(data_dir, env)
    try:
        proc.start()
        async with httpx.AsyncClient(base_url=proc.url) as http:
            assert (await http.get("/healthz")).status_code == 200
        port = await _open_and_close_ws(proc.ws_url)
        assert proc.stop(signal.SIGINT) == 0
        records = []
        for line in proc.log_path.read_text().splitlines():
            record = json.loads(line)  # every line is one JSON object
            assert set(record) >= {"time", "level", "logger", "message"}, record
            records.append(record)
        messages = [r["message"] for r in records]
        typo = "unknown setting SHOAL_SEARCH_THREAD is ignored (did you mean SHOAL_SEARCH_THREADS?)"
        assert any(r["level"] == "warning" and r["message"] == typo for r in records), messages
        assert any('"GET /healthz HTTP/1.1" 200' in m for m in messages), "access log at debug level"
        mine = [m for m in messages if f":{port} - " in m]
        prefix = f'127.0.0.1:{port} - "WebSocket /v1/ws"'
        assert mine == [f"{prefix} [accepted]", f"{prefix} [closed 1000]"], mine
        assert "engine stopped" in messages
    finally:
        if proc.proc is not None and proc.proc.poll() is None:
            proc.kill()
        shutil.rmtree(data_dir, ignore_errors=True)
