"""Shared fixtures: one real Shoal server (uvicorn + embedded PostgreSQL) for the session."""

from __future__ import annotations

import shutil
import signal
from collections.abc import AsyncIterator, Iterator

import pytest

from shoal_client import ShoalClient
from tests.server_process import ServerProcess, temp_data_dir


@pytest.fixture(scope="session")
def server() -> Iterator[ServerProcess]:
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir)
    proc.start()
    try:
        yield proc
    finally:
        code = proc.stop()
        log = proc.log_tail(400)
        shutil.rmtree(data_dir, ignore_errors=True)
        # uvicorn re-raises SIGTERM after its graceful shutdown, so the exit status is -SIGTERM.
        assert code in (0, -signal.SIGTERM), f"server exited with {code}:\n{log}"
        assert "engine stopped" in log, log


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[ShoalClient]:
    async with ShoalClient.connect(server.ws_url) as c:
        yield c
