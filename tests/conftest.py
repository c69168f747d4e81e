"""Shared fixtures: one real Shoal server (uvicorn + embedded PostgreSQL) for the session."""

from __future__ import annotations

import shutil
from collections.abc import AsyncIterator, Iterator

import pytest

from client import ShoalClient
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
        shutil.rmtree(data_dir, ignore_errors=True)
        assert code == 0, f"server exited with {code}:\n{proc.log_tail()}"


@pytest.fixture
async def client(server: ServerProcess) -> AsyncIterator[ShoalClient]:
    async with ShoalClient.connect(server.ws_url) as c:
        yield c
