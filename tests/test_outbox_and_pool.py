"""The connection outbox (one sender at a time, order kept, bounded) and the shard read pool
(results come back on the event loop, errors to the caller, nothing after it stops)."""

from __future__ import annotations

import asyncio
import os
import threading
from typing import Any

import anyio
import pytest

from actors.read_pool import ReadPool
from models.errors import Unavailable
from server.outbox import Outbox

pytestmark = pytest.mark.timeout(30)


class _Socket:
    """An ASGI `send` whose writes can be held, as a paused transport holds uvicorn's."""

    def __init__(self) -> None:
        self.frames: list[bytes] = []
        self.open = asyncio.Event()
        self.open.set()
        self.in_send = 0
        self.most_in_send = 0
        self.fail = False

    async def __call__(self, message: Any) -> None:
        assert message["type"] == "websocket.send"
        self.in_send += 1
        self.most_in_send = max(self.most_in_send, self.in_send)
        try:
            await self.open.wait()
            if self.fail:
                raise OSError("client went away")
            self.frames.append(message["bytes"])
        finally:
            self.in_send -= 1


async def test_outbox_keeps_order_with_one_sender_and_bounds_the_queue() -> None:
    socket = _Socket()
    sent: list[bytes] = []
    outbox = Outbox(socket, limit=4, on_sent=sent.append)
    socket.open.clear()  # the first put becomes the sender and stalls on the socket
    done: list[int] = []

    async def put(i: int) -> None:
        await outbox.put(b"%d" % i)
        done.append(i)

    async with anyio.create_task_group() as tg:
        for i in range(12):
            tg.start_soon(put, i)
            await anyio.sleep(0)  # puts arrive in order
        await anyio.sleep(0.05)
        # One frame in the socket, four queued (those puts returned), the rest wait for room.
        assert len(done) == 4 and socket.most_in_send == 1
        socket.open.set()
    assert socket.frames == [b"%d" % i for i in range(12)] == sent
    assert socket.most_in_send == 1


async def test_outbox_drops_everything_once_the_client_is_gone() -> None:
    socket = _Socket()
    outbox = Outbox(socket, limit=4, on_sent=lambda data: None)
    await outbox.put(b"a")
    socket.fail = True
    await outbox.put(b"b")
    assert outbox.closed
    socket.fail = False
    await outbox.put(b"c")  # returns at once, sends nothing
    assert socket.frames == [b"a"]


async def test_pool_answers_on_the_event_loop_and_hands_errors_back() -> None:
    loop_thread = threading.get_ident()
    seen: list[tuple[str, int]] = []
    finished = anyio.Event()

    def ok(value: int) -> None:
        seen.append(("ok", threading.get_ident()))
        if len(seen) == 2:
            finished.set()

    def fail(error: BaseException) -> None:
        seen.append((type(error).__name__, threading.get_ident()))
        if len(seen) == 2:
            finished.set()

    with ReadPool(2, "test").running() as pool:
        assert await pool.call(lambda: threading.get_ident()) != loop_thread  # ran on a worker
        with pytest.raises(ZeroDivisionError):
            await pool.call(lambda: 1 // 0)
        pool.submit(lambda: 1 // 0, ok, fail)
        pool.submit(lambda: 7, ok, fail)
        with anyio.fail_after(5):
            await finished.wait()
        assert sorted(seen) == [("ZeroDivisionError", loop_thread), ("ok", loop_thread)]
    with pytest.raises(Unavailable):
        await pool.call(lambda: 1)  # stopped: an answer at once, never a hang


async def test_read_pool_pins_each_thread_only_when_cpus_are_no_more_than_threads() -> None:
    """Two threads on a one-CPU set: both keep to it, and the process's own affinity (the event
    loop's thread) is left alone. With more CPUs than threads, nothing is pinned."""
    own = os.sched_getaffinity(0)
    cpu = min(own)
    pinned = ReadPool(2, "pin-test", pin=True, cpus={cpu})
    assert pinned.cpu_of_thread == [cpu, cpu]
    with pinned.running() as pool:
        for _ in range(4):
            assert await pool.call(lambda: os.sched_getaffinity(0)) == {cpu}
    assert os.sched_getaffinity(0) == own

    assert ReadPool(1, pin=True, cpus={0, 1}).cpu_of_thread is None  # more CPUs than threads
    assert ReadPool(2, pin=True, cpus={0, 1}).cpu_of_thread == [0, 1]
    assert ReadPool(3, pin=True, cpus={4, 6}).cpu_of_thread == [4, 6, 4]
    assert ReadPool(2, pin=False, cpus={0, 1}).cpu_of_thread is None
    unpinned = ReadPool(1, "free-test", pin=True, cpus=own | {max(own) + 1})
    with unpinned.running() as pool:
        assert await pool.call(lambda: os.sched_getaffinity(0)) == own


async def test_read_pool_spread_lifts_the_pin_for_one_job() -> None:
    """A job that starts threads of its own (hnswlib's num_threads) runs on every CPU of the
    pool, and the thread is pinned again afterwards. Linux with at least two CPUs, as Shoal's
    machines are."""
    cpus = sorted(os.sched_getaffinity(0))[:2]
    assert len(cpus) == 2, "this test needs two CPUs"
    with ReadPool(2, "spread-test", pin=True, cpus=set(cpus)).running() as pool:
        assert await pool.call(pool.spread(lambda: os.sched_getaffinity(0))) == set(cpus)
        for _ in range(4):
            assert len(await pool.call(lambda: os.sched_getaffinity(0))) == 1
