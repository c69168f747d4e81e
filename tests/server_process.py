"""Run a real `shoal serve` process on 127.0.0.1 port 0 for end-to-end tests (see `load.server`)."""

from __future__ import annotations

import httpx

from load.server import ROOT, ServerProcess, local_server, temp_data_dir

__all__ = ["ROOT", "ServerProcess", "local_server", "metric", "temp_data_dir"]


async def metric(url: str, line_start: str) -> float:
    """The value of the first /metrics line of the server at `url` that starts with
    `line_start` (a name with its labels, or a name and a space)."""
    async with httpx.AsyncClient(base_url=url) as http:
        text = (await http.get("/metrics")).text
    return float(next(x.split()[-1] for x in text.splitlines() if x.startswith(line_start)))
