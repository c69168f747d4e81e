"""The `shoal` command: `shoal serve` runs the server; load generators live under `shoal bench`.

A start-up mistake (a bad flag or `SHOAL_*` value, a port in use, a `StartupError` raised while
the database and engine start) ends as one line on stderr, `shoal: <what to fix>`, and exit
status 2; no traceback. SIGINT/SIGTERM stop the server in order (`server.lifecycle.drain`, then
uvicorn's shutdown) and exit 0.
"""

from __future__ import annotations

import argparse
import contextlib
import gc
import importlib.util
import logging
import math
import runpy
import socket
import sys
import time
from collections.abc import Iterator, Sequence
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, NoReturn

import uvicorn
from threadpoolctl import threadpool_limits

from models.errors import StartupError
from server import logs
from server.app import create_app
from server.lifecycle import LifespanGuard, drain
from server.protocols import WebSocketProtocol, http_protocol
from server.settings import Settings, default_data_dir, load_settings, unknown_variables

log = logging.getLogger("shoal.cli")

EXIT_STARTUP = 2


def _version() -> str:
    try:
        return version("shoal")
    except PackageNotFoundError:  # run from a checkout that was never installed
        return "unknown"


class _Server(uvicorn.Server):
    """uvicorn, announcing the bound address (useful with --port 0) once it listens, draining
    subscriptions and writes before its shutdown, and exiting 0 after a signal."""

    def __init__(self, config: uvicorn.Config, settings: Settings, app: Any) -> None:
        super().__init__(config)
        self.settings = settings
        self.shoal_app = app  # the Starlette app: its state holds the engine once started

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets=sockets)
        for server in getattr(self, "servers", []):
            for sock in server.sockets:
                host, port = sock.getsockname()[:2]
                print(f"shoal: listening on http://{host}:{port}", flush=True)

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        # uvicorn waits for open responses before the lifespan ends, and closes WebSockets at
        # once: SSE streams never end on their own, and a WebSocket must get its acks and
        # `ended` pushes first. So: no new connections, then drain, then uvicorn's shutdown.
        for server in getattr(self, "servers", []):
            server.close()
        state = getattr(self.shoal_app.state, "shoal", None)
        if state is not None and not self.force_exit:
            started = time.monotonic()
            await drain(state.engine, self.shoal_app.state.sse, self.settings.shutdown_grace_s)
            # One grace period in all: uvicorn's wait for open responses gets what is left.
            left = self.settings.shutdown_grace_s - (time.monotonic() - started)
            self.config.timeout_graceful_shutdown = max(1, math.ceil(left))
        await super().shutdown(sockets=sockets)

    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        # uvicorn re-raises a caught SIGINT/SIGTERM once it has shut down, which ends the
        # process with a KeyboardInterrupt traceback or -SIGTERM. The shutdown is complete by
        # then: exit normally instead.
        with super().capture_signals():
            yield
            self._captured_signals.clear()


def _bind(settings: Settings) -> socket.socket:
    """The listening socket, bound before anything starts, so that a port in use or an address
    that is not this machine's is a one-line StartupError rather than a failure after the
    database has started."""
    try:
        infos = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as exc:
        raise StartupError(f"--host {settings.host}: cannot resolve it ({exc.strerror})") from None
    family, kind, proto, _, address = infos[0]
    sock = socket.socket(family, kind, proto)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        if family == socket.AF_INET6:
            sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
        sock.bind(address)
        sock.listen(2048)
    except OSError as exc:
        sock.close()
        raise StartupError(
            f"cannot listen on {settings.host} port {settings.port}: {exc.strerror} "
            "(choose another --port / SHOAL_PORT, or stop what uses it)"
        ) from None
    sock.set_inheritable(True)
    return sock


def serve(settings: Settings) -> None:
    """Run the server until SIGINT/SIGTERM. Raises StartupError for a start-up mistake."""
    logs.configure(settings.log_level, settings.log_format)
    for warning in unknown_variables():
        log.warning("%s", warning)
    # Garbage collection: with 10,000 open streams a full collection walks ~1M objects, and
    # CPython's defaults (700, 10, 10) ran several of them per document fanned out to every
    # stream (load/fanout_latency.py). Young collections every 50k allocations and old ones
    # 1,000x rarer keep the pauses out of the delivery path; reference counting still frees
    # everything that is not in a cycle at once.
    gc.set_threshold(50_000, 50, 20)
    # numpy work already runs in our own worker threads (a bounded pool); a BLAS pool per call
    # on top of that oversubscribes the cores (load/compare.py measures exact search both ways).
    threadpool_limits(limits=1, user_api="blas")
    sock = _bind(settings)
    edge = create_app(settings)
    guard = LifespanGuard(edge)
    config = uvicorn.Config(
        guard,
        log_config=None,  # server.logs owns the handlers
        log_level=settings.log_level,
        access_log=settings.log_level == "debug",
        ws=WebSocketProtocol,
        ws_max_size=settings.limits.max_frame_bytes,
        ws_per_message_deflate=False,
        lifespan="on",
        timeout_graceful_shutdown=max(1, math.ceil(settings.shutdown_grace_s)),
        loop="uvloop",
        http=http_protocol(settings),
        proxy_headers=bool(settings.forwarded_allow_ips),
        forwarded_allow_ips=list(settings.forwarded_allow_ips) or None,
    )
    server = _Server(config, settings, edge.app)
    try:
        server.run(sockets=[sock])
    except SystemExit:
        # uvicorn exits this way when the lifespan start-up failed.
        if guard.startup_error is not None:
            raise guard.startup_error from None
        raise
    finally:
        sock.close()
    if guard.startup_error is not None:
        raise guard.startup_error


class _Parser(argparse.ArgumentParser):
    """argparse, with its errors as one line (no usage block)."""

    def error(self, message: str) -> NoReturn:
        print(f"{self.prog}: {message} (see {self.prog} --help)", file=sys.stderr)
        raise SystemExit(EXIT_STARTUP)


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="shoal", description="Real-time semantic search server.")
    parser.add_argument("--version", action="version", version=f"shoal {_version()}")
    sub = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)
    run = sub.add_parser(
        "serve",
        help="run the server (embedded PostgreSQL unless --database-url)",
        description="Run the server. Every SHOAL_<FIELD> setting is read from the environment; flags win.",
    )
    run.add_argument("--host", help="bind address (SHOAL_HOST, default 127.0.0.1)")
    run.add_argument("--port", help="port 0..65535, 0 picks a free one (SHOAL_PORT, default 8080)")
    run.add_argument(
        "--data-dir",
        help="data directory for the embedded PostgreSQL (SHOAL_DATA_DIR; default /var/lib/shoal as root, "
        f"~/.local/share/shoal otherwise: here {default_data_dir()})",
    )
    run.add_argument(
        "--database-url", help="use this PostgreSQL (with pgvector) instead (SHOAL_DATABASE_URL)"
    )
    run.add_argument("--log-level", help="debug, info, warning, error (SHOAL_LOG_LEVEL, default info)")
    run.add_argument("--log-format", help="text or json, one object per line (SHOAL_LOG_FORMAT, default text)")
    run.add_argument(
        "--source",
        action="append",
        help="consume a Redis stream, repeatable (SHOAL_SOURCES, space-separated): "
        "redis://HOST:PORT/DB?stream=NAME&group=GROUP&collection=DEFAULT",
    )
    pg = sub.add_parser(
        "postgres",
        help="run the embedded PostgreSQL alone on 127.0.0.1, for several `shoal serve` on one machine",
        description="Run the embedded PostgreSQL in DIR, reachable on 127.0.0.1; prints its database-url.",
    )
    pg.add_argument("--data-dir", required=True, help="data directory of the embedded PostgreSQL")
    pg.add_argument("--port", type=int, default=5432, help="TCP port on 127.0.0.1, 0 picks a free one (default 5432)")
    _transfer_parsers(sub)
    bench = sub.add_parser(
        "bench", help="run a load generator: shoal bench NAME [args] (python -m load.NAME)"
    )
    bench.add_argument("name")
    bench.add_argument("args", nargs=argparse.REMAINDER)
    return parser


def _transfer_parsers(sub: Any) -> None:
    """`shoal import` and `shoal export` (server/transfer.py)."""
    from server import transfer

    load = sub.add_parser(
        "import",
        help="upsert a JSONL or CSV file into a collection",
        description="Upsert a JSONL file (one Document per line) or a CSV file (.csv: an id column, a text "
        "column, the rest metadata) into a collection, creating it when missing. Bad lines are reported "
        "with their numbers and skipped. Exit status 0: all imported, 1: some skipped, 2: nothing done.",
    )
    load.add_argument("path")
    load.add_argument("--collection", required=True)
    load.add_argument("--url", default=transfer.DEFAULT_URL, help=f"server (default {transfer.DEFAULT_URL})")
    load.add_argument("--key", help="API key, sent as Authorization: Bearer KEY")
    load.add_argument("--batch", type=int, default=transfer.DEFAULT_BATCH, help="documents per upsert (1..10000)")
    load.add_argument("--in-flight", type=int, default=transfer.DEFAULT_IN_FLIGHT, help="upserts awaiting acks")
    load.add_argument("--strict", action="store_true", help="any bad line fails the import before anything is sent")
    load.add_argument("--id-column", default="id", help="CSV: the id column (default id)")
    load.add_argument("--text-column", default="text", help="CSV: the text column (default text)")
    load.add_argument("--metric", help="metric of a collection created by the import (default cosine)")
    load.add_argument("--no-progress", action="store_true", help="no progress bar")
    dump = sub.add_parser(
        "export",
        help="write a collection as JSONL (with vectors) that import reads back",
        description="Write every document of a collection, in id order, as JSONL with vectors.",
    )
    dump.add_argument("collection")
    dump.add_argument("--url", default=transfer.DEFAULT_URL, help=f"server (default {transfer.DEFAULT_URL})")
    dump.add_argument("--key", help="API key, sent as Authorization: Bearer KEY")
    dump.add_argument("--output", help="file to write (default: stdout)")
    dump.add_argument("--page", type=int, default=transfer.DEFAULT_PAGE, help="documents per get page (1..10000)")
    dump.add_argument("--vectors", choices=["array", "base64"], default="array", help="vector encoding")


def _transfer(args: argparse.Namespace) -> int:
    from server import transfer  # the client and tqdm: loaded only for these commands

    if args.command == "export":
        if not 1 <= args.page <= 10_000:
            raise StartupError("--page must be 1..10000")
        return transfer.run_export(
            args.collection, args.output, url=args.url, key=args.key, page=args.page, vectors=args.vectors
        )
    if not 1 <= args.batch <= 10_000 or args.in_flight < 1:
        raise StartupError("--batch must be 1..10000 and --in-flight at least 1")
    options = transfer.ImportOptions(
        path=Path(args.path),
        collection=args.collection,
        url=args.url,
        key=args.key,
        batch=args.batch,
        in_flight=args.in_flight,
        strict=args.strict,
        id_column=args.id_column,
        text_column=args.text_column,
        metric=args.metric,
        progress=not args.no_progress,
    )
    return transfer.run_import(options)


def _bench(name: str, args: list[str]) -> None:
    module = f"load.{name}"
    if not name.isidentifier() or importlib.util.find_spec(module) is None:
        raise StartupError(f"no load generator named {name!r} (the modules of load/ are the names)")
    sys.argv = [module, *args]
    runpy.run_module(module, run_name="__main__")


def _postgres(data_dir: str, port: int) -> None:
    import anyio

    from actors.pg_proxy import run_postgres

    if not 0 <= port <= 65535:
        raise StartupError(f"--port {port}: must be 0..65535")
    logs.configure("info", "text")
    anyio.run(run_postgres, Path(data_dir), port, backend="asyncio")


def main(argv: Sequence[str] | None = None) -> None:
    args = _parser().parse_args(argv)
    try:
        if args.command == "serve":
            serve(
                load_settings(
                    host=args.host,
                    port=args.port,
                    data_dir=args.data_dir,
                    database_url=args.database_url,
                    log_level=args.log_level,
                    log_format=args.log_format,
                    sources=tuple(args.source) if args.source else None,
                )
            )
        elif args.command == "postgres":
            _postgres(args.data_dir, args.port)
        elif args.command in ("import", "export"):
            code = _transfer(args)
            if code:
                raise SystemExit(code)
        else:
            _bench(args.name, args.args)
    except StartupError as exc:
        print(f"shoal: {exc}", file=sys.stderr, flush=True)
        raise SystemExit(EXIT_STARTUP) from None
    except KeyboardInterrupt:  # a second Ctrl-C, or one before the server ran
        raise SystemExit(130) from None


if __name__ == "__main__":
    main()
