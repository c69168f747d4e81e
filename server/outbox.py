"""The frames going out on one WebSocket, sent by whichever task has one to send.

Why not a writer task: handing every reply to one (a queue put, a task wake, a queue get) cost
more per query than building the reply did (py-spy of `load/query.py`). Here the task that puts a
frame while nobody is sending sends it itself, then sends what others queued meanwhile; while a
send is in progress, others only queue. So frames leave in the order they were put, there is
never more than one sender, and a slow socket (uvicorn waits while its transport is paused) holds
up only that connection's tasks: at most `limit` frames wait, further `put`s wait for room.

Stuck sockets: with `stuck_after_s`, a send that waits that long with no progress (no frame
went out, and the bytes the transport holds did not shrink: the client reads nothing, so the
transport stays paused) calls `on_stuck` once, from a timer; the outbox is closed from then on.
The timer is armed once per `stuck_after_s` while frames are being sent, not per frame: a timed
scope around every send cost more than the send itself. `buffered` (the bytes written and not
yet taken by the client) lets a client that reads a large frame slowly count as making
progress: the timer then looks four times per `stuck_after_s`, and a socket is called stuck
within a quarter period of `stuck_after_s` after it last took anything.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import Callable

import anyio
from starlette.types import Send

# The most bytes a server frame's header adds to its payload (2, plus 8 for a long length).
_MAX_FRAME_HEADER = 10


class Outbox:
    def __init__(
        self,
        send: Send,
        limit: int,
        on_sent: Callable[[bytes], None],
        *,
        stuck_after_s: float = 0.0,
        on_stuck: Callable[[], None] | None = None,
        buffered: Callable[[], int] | None = None,
    ) -> None:
        """`stuck_after_s` <= 0 or no `on_stuck`: never called stuck."""
        self._send = send
        self._limit = max(1, limit)
        self._on_sent = on_sent
        self._queue: deque[bytes] = deque()
        self._sending = False
        self._room: anyio.Event | None = None  # set when the queue shrinks, if someone waits
        self.closed = False  # the client is gone: frames are dropped from now on
        self._stuck_after = stuck_after_s if on_stuck is not None and stuck_after_s > 0 else 0.0
        self._on_stuck = on_stuck
        self._loop = asyncio.get_running_loop()
        self._progress_at = 0.0  # loop time a frame last went out (or sending began)
        self._watch: asyncio.TimerHandle | None = None
        self._buffered = buffered
        # With `buffered`: bytes handed to the socket so far (counting the most a frame header
        # adds), and how many of them the client had taken at the last look.
        self._written = 0
        self._taken_at_look = 0

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
        if self._stuck_after:
            self._progress_at = self._loop.time()
            if self._watch is None:
                self._watch = self._loop.call_at(self._progress_at + self._look_every(), self._check_stuck)
                if self._buffered is not None:
                    self._taken_at_look = self._written - self._buffered()
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
                if self._stuck_after:
                    self._progress_at = self._loop.time()
                    self._written += len(item) + _MAX_FRAME_HEADER
                self._on_sent(item)
        finally:
            self._sending = False
            self._made_room()

    def close(self) -> None:
        """Drop what is queued and everything put from now on."""
        self.closed = True
        self._queue.clear()
        if self._watch is not None:
            self._watch.cancel()
            self._watch = None
        self._made_room()

    def _check_stuck(self) -> None:
        self._watch = None
        if self.closed or not self._sending:
            return  # idle now: armed again by the next sender
        now = self._loop.time()
        if self._buffered is not None:
            taken = self._written - self._buffered()
            if taken > self._taken_at_look:  # the client took bytes since the last look
                self._progress_at = now
            self._taken_at_look = taken
        due = self._progress_at + self._stuck_after
        if now < due:
            self._watch = self._loop.call_at(min(due, now + self._look_every()), self._check_stuck)
            return
        self.close()
        assert self._on_stuck is not None
        self._on_stuck()

    def _look_every(self) -> float:
        # Without `buffered` only sends mark progress, and each is timed exactly: look when the
        # period is due. With it, progress shows only when looked at: look four times a period.
        return self._stuck_after if self._buffered is None else self._stuck_after / 4

    def _made_room(self) -> None:
        if self._room is not None:
            self._room.set()
            self._room = None
