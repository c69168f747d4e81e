"""Run a real `shoal serve` process on 127.0.0.1 port 0 for end-to-end tests (see `load.server`)."""

from __future__ import annotations

from load.server import ROOT, ServerProcess, local_server, temp_data_dir

__all__ = ["ROOT", "ServerProcess", "local_server", "temp_data_dir"]
