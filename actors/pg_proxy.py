"""`shoal postgres`: the embedded PostgreSQL alone, reachable on 127.0.0.1 for a cluster on one machine.

The embedded server listens only on a unix socket in its data directory (see actors/pg_server.py).
Rather than restart it with TCP settings of its own, this relays each TCP connection accepted on
127.0.0.1:PORT to that socket, byte for byte: the PostgreSQL protocol (LISTEN/NOTIFY, COPY,
cancellation) passes unchanged, and the server keeps being started, supervised and stopped by
the same code as under `shoal serve`. Only loopback is ever bound.
"""

from __future__ import annotations

import logging
import signal
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

import anyio
from anyio.abc import ByteStream, SocketStream
from anyio.streams.stapled import MultiListener

from actors.pg_server import open_database
from models.errors import StartupError

log = logging.getLogger("shoal.postgres")

CHUNK = 65_536


def socket_path(dsn: str) -> tuple[Path, int]:
    """The unix socket directory and port of an embedded server's dsn."""
    parts = urlsplit(dsn)
    hosts = parse_qs(parts.query).get("host")
    if not hosts:
        raise StartupError(f"the embedded PostgreSQL gave no socket directory ({dsn})")
    return Path(hosts[0]), parts.port or 5432


def tcp_url(dsn: str, port: int) -> str:
    """The dsn other processes use: same role and database, on 127.0.0.1:port."""
    parts = urlsplit(dsn)
    user = parts.username or "postgres"
    database = parts.path.lstrip("/") or "postgres"
    return f"postgresql://{user}@127.0.0.1:{port}/{database}"


async def _pump(source: ByteStream, sink: ByteStream) -> None:
    try:
        while True:
            await sink.send(await source.receive(CHUNK))
    except (anyio.EndOfStream, anyio.BrokenResourceError, anyio.ClosedResourceError, OSError):
        pass
    finally:
        await sink.aclose()


async def _relay(client: ByteStream, target: Path) -> None:
    async with client:
        try:
            server = await anyio.connect_unix(str(target))
        except OSError as exc:
            log.warning("cannot reach the embedded PostgreSQL at %s: %s", target, exc)
            return
        async with server, anyio.create_task_group() as tg:
            tg.start_soon(_pump, client, server)
            tg.start_soon(_pump, server, client)


async def _listen(port: int) -> MultiListener[SocketStream]:
    try:
        return await anyio.create_tcp_listener(local_host="127.0.0.1", local_port=port, reuse_port=False)
    except OSError as exc:
        raise StartupError(
            f"cannot listen on 127.0.0.1 port {port}: {exc.strerror or exc} (choose another --port)"
        ) from None


async def run_postgres(data_dir: Path, port: int) -> None:
    """Start the embedded server in `data_dir`, print `database-url: ...`, relay until SIGINT or
    SIGTERM, then stop the server. Raises StartupError."""
    listener = await _listen(port)
    async with listener, open_database(data_dir, None) as dsn:
        socket_dir, pg_port = socket_path(dsn)
        target = socket_dir / f".s.PGSQL.{pg_port}"
        bound = listener.extra(anyio.abc.SocketAttribute.local_port)
        print(f"database-url: {tcp_url(dsn, bound)}", flush=True)
        async with anyio.create_task_group() as tg:

            async def serve() -> None:
                await listener.serve(lambda client: _relay(client, target))

            tg.start_soon(serve)
            with anyio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                async for _ in signals:
                    break
            tg.cancel_scope.cancel()
    log.info("embedded PostgreSQL stopped")
