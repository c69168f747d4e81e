"""The worker threads that run shard work (hnswlib searches and writes, numpy over columns).

A fixed pool owned by the catalog, shared by all its shards, so the number of threads doing
search work is bounded however many collections exist. Jobs come from the event loop with the
two callbacks that receive their outcome; a thread runs the job and hands the outcome back with
`call_soon_threadsafe`, so the callbacks run on the event loop and shards keep single-owner state.

Why not `anyio.to_thread.run_sync` per read: each call there takes a capacity limiter, a cancel
scope and a wait in the calling task (about 110 µs per round trip against 70 µs here, measured on
uvloop), and a query pays it once. At thousands of queries a second that Python work on the event
loop is what capped the server (py-spy of `load/query.py`), not the search itself.
"""

from __future__ import annotations

import asyncio
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio

from actors.mailbox import Reply
from models.errors import Unavailable

T = TypeVar("T")

# A job: the blocking call, then what receives its result or its error (on the event loop).
_Job = tuple[Callable[[], Any], Callable[[Any], None], Callable[[BaseException], None]]


class ReadPool:
    """`threads` long-lived worker threads. Use `running()` around everything that submits."""

    def __init__(self, threads: int, name: str = "shard") -> None:
        self.threads = max(1, threads)
        self._name = name
        self._jobs: queue.SimpleQueue[_Job | None] = queue.SimpleQueue()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._workers: list[threading.Thread] = []

    @contextmanager
    def running(self) -> Iterator[ReadPool]:
        """Start the threads bound to the running event loop; stop them on exit.

        Stop only once nothing waits on a job any more (the shards have finished their reads):
        a job still queued then is dropped with the thread that would have run it.
        """
        self._loop = asyncio.get_running_loop()
        self._workers = [
            threading.Thread(target=self._work, name=f"{self._name}-{i}", daemon=True) for i in range(self.threads)
        ]
        for worker in self._workers:
            worker.start()
        try:
            yield self
        finally:
            for _ in self._workers:
                self._jobs.put(None)
            for worker in self._workers:
                worker.join(timeout=5.0)
            self._loop = None

    def submit(self, fn: Callable[[], T], ok: Callable[[T], None], fail: Callable[[BaseException], None]) -> None:
        """Run `fn` on a worker; then `ok(result)` or `fail(error)` on the event loop."""
        if self._loop is None:
            fail(Unavailable(f"{self._name} threads are not running"))
            return
        self._jobs.put((fn, ok, fail))

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a worker and return its result. Not cancellable once submitted: the
        caller keeps waiting, so state a job mutates is never left half-seen by its owner."""
        reply: Reply[T] = Reply()
        self.submit(fn, reply.set, reply.fail)
        with anyio.CancelScope(shield=True):
            result = await reply.wait()
        return result

    def _work(self) -> None:
        while True:
            job = self._jobs.get()
            if job is None:
                return
            fn, ok, fail = job
            outcome: Callable[[Any], None]
            try:
                value: Any = fn()
                outcome = ok
            except BaseException as exc:  # handed to the caller, who owns the error
                value, outcome = exc, fail
            loop = self._loop
            if loop is None:
                return
            try:
                loop.call_soon_threadsafe(outcome, value)
            except RuntimeError:  # the loop has closed: nobody waits for this any more
                return
