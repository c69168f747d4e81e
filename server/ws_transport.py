"""Closing a WebSocket whose client reads nothing, which ASGI alone cannot do.

uvicorn's `send` waits until the socket's transport is writable before it writes anything, a
close frame included; a client that never reads never lets it become writable again. So a stuck
connection's close frame is written straight to the transport, behind the bytes already there
(what the client will read first, should it ever read), as uvicorn itself does on shutdown; the
closing handshake then runs as uvicorn's own, and the socket is dropped `abort_after_s` later
if the client never completes it.
This reaches into uvicorn's websockets-sansio protocol, the one `shoal serve` runs (the
end-to-end tests exercise it); with any other server, `close_now` does nothing and says so.
"""

from __future__ import annotations

import asyncio
import fcntl
import logging
import struct
import termios
from collections.abc import Callable
from typing import cast

from starlette.types import Send

log = logging.getLogger("shoal.ws")


def close_now(send: Send, code: int, reason: str, abort_after_s: float) -> bool:
    """Write a close frame (`code`, `reason`) on `send`'s connection now, even while its transport
    is paused, and let the closing handshake run as uvicorn runs it (what the client sends is read
    and discarded; its close reply closes the socket), dropping the socket `abort_after_s` later
    if it has not ended by then. Returns False, doing nothing, when `send` is not uvicorn's
    websockets-sansio protocol."""
    protocol = getattr(send, "__self__", None)
    conn = getattr(protocol, "conn", None)
    transport = getattr(protocol, "transport", None)
    if not (
        hasattr(conn, "send_close")
        and hasattr(conn, "data_to_send")
        and hasattr(transport, "abort")
        and hasattr(protocol, "close_timer")
    ):
        return False
    assert protocol is not None and conn is not None and transport is not None
    if getattr(protocol, "close_sent", False) or transport.is_closing():
        return True
    try:
        conn.send_close(code, reason)
        transport.write(b"".join(conn.data_to_send()))
    except Exception:  # the protocol is already past its open state: just drop the socket
        log.debug("close frame not written", exc_info=True)
        transport.abort()
        return True
    # As after an ASGI `websocket.close`: uvicorn discards frames from now on, and closes the
    # socket when the client's close reply comes (cancelling this timer) or the timer fires.
    # Reading again matters: closing a socket with unread bytes in its receive queue resets
    # the connection, and the client would lose what it had not read yet, the close frame too.
    protocol.close_sent = True
    if getattr(protocol, "read_paused", False):
        protocol.read_paused = False
        transport.resume_reading()
    protocol.close_timer = asyncio.get_running_loop().call_later(max(0.0, abort_after_s), transport.abort)
    return True


def unsent_bytes(send: Send) -> Callable[[], int] | None:
    """A function giving the bytes written on `send`'s connection that the client has not taken
    yet: what its transport holds plus what the kernel's send queue holds (Linux `TIOCOUTQ`).
    Both are needed: while the kernel's queue drains, the transport's buffer may not move for
    seconds. None when `send` is not uvicorn's websockets-sansio protocol."""
    transport = getattr(getattr(send, "__self__", None), "transport", None)
    buffered = getattr(transport, "get_write_buffer_size", None)
    if transport is None or not callable(buffered):
        return None
    sock = transport.get_extra_info("socket")
    fd = sock.fileno() if sock is not None else -1
    request = getattr(termios, "TIOCOUTQ", None)
    if fd < 0 or request is None:
        return cast(Callable[[], int], buffered)

    def unsent() -> int:
        try:
            queued = struct.unpack("i", fcntl.ioctl(fd, request, b"\0\0\0\0"))[0]
        except OSError:  # the socket is gone: nothing more will drain
            queued = 0
        return int(buffered()) + int(queued)

    return unsent
