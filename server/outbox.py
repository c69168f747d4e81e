"""The frames going out on one WebSocket, sent by whichever task has one to send.

Why not a writer task: handing every reply to one (a queue put, a task wake, a queue get) cost
more per query than building the reply did (py-spy of `load/query.py`). Here the task that puts a
frame while nobody is sending sends it itself, then sends what others queued meanwhile; while a
send is in progress, others only queue. So frames leave in the order they were put, there is
never more than one sender, and a slow socket (uvicorn waits while its transport is paused) holds
up only that connection's tasks: at most `limit` frames wait, further `put`s wait for room.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

import anyio
from starlette.types import Send


class Outbox:
    def __init__(self, send: Send, limit: int, on_sent: Callable[[bytes], None]) -> None:
        self._send = send
        self._limit = max(1, limit)
        self._on_sent = on_sent
        self._queue: deque[bytes] = deque()
        self._sending = False
        self._room: anyio.Event | None = None  # set when the queue shrinks, if someone waits
        self.closed = False  # the client is gone: frames are dropped from now on

    async def put(self, data: bytes) -> None:
        """Send `data` after every frame put before it; returns once it is sent or queued."""
        if self.closed:
            return
        while self._sending and len(self._queue) >= self._limit:
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()
            if self.closed:
                return
        self._queue.append(data)
        if self._sending:
            return
        # Nobody is sending (if the last sender was cancelled, what it left is sent here too).
        self._sending = True
        try:
            queue = self._queue
            while queue and not self.closed:
                item = queue.popleft()
                self._made_room()
                try:
                    await self._send({"type": "websocket.send", "bytes": item})
                except (RuntimeError, OSError):  # the client is gone (uvicorn: ClientDisconnected)
                    self.closed = True
                    queue.clear()
                    break
                self._on_sent(item)
        finally:
            self._sending = False
            self._made_room()

    def _made_room(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None
