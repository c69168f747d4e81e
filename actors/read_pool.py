"""The worker threads that run shard work (hnswlib searches and writes, numpy over columns).

A fixed pool owned by the catalog, shared by all its shards, so the number of threads doing
search work is bounded however many collections exist. Jobs come from the event loop with the
two callbacks that receive their outcome; a thread runs the job and hands the outcome back with
`call_soon_threadsafe`, so the callbacks run on the event loop and shards keep single-owner state.

Why not `anyio.to_thread.run_sync` per read: each call there takes a capacity limiter, a cancel
scope and a wait in the calling task, and a query pays it once; its round trip cost half again
what this pool's does (README, "Query path"). At thousands of queries a second that Python work on
the event loop is what capped the server (py-spy of `load/query.py`), not the search itself.

CPU pinning. When the process may run on no more CPUs than the pool has threads, every CPU runs
a search thread anyway, and each thread keeps to one of them (`pin`). A search walks megabytes of
graph and vectors; a thread that the scheduler moves to the core the event loop just ran on
starts cold, and one that stays keeps its share of the cache (the gain is in the README, "Query
path"). With more CPUs than threads nothing is pinned: other work could crowd a pinned core
while the rest sit idle. A job that runs threads of its own (a multi-threaded `add_items`) goes
through `spread`, so those threads are not all held on its one CPU.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import queue
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import Any, TypeVar

import anyio

from actors.mailbox import Reply
from models.errors import Unavailable

T = TypeVar("T")
log = logging.getLogger("shoal.read_pool")

# A job: the blocking call, then what receives its result or its error (on the event loop).
_Job = tuple[Callable[[], Any], Callable[[Any], None], Callable[[BaseException], None]]


class ReadPool:
    """`threads` long-lived worker threads. Use `running()` around everything that submits."""

    def __init__(
        self, threads: int, name: str = "shard", *, pin: bool = False, cpus: set[int] | None = None
    ) -> None:
        """`pin`: keep each thread on one CPU when `cpus` (default: the CPUs this process may
        use) are no more than the threads; see the module's note."""
        self.threads = max(1, threads)
        self._name = name
        self.cpu_of_thread = _cpu_plan(self.threads, cpus) if pin else None
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
            threading.Thread(target=self._work, args=(i,), name=f"{self._name}-{i}", daemon=True)
            for i in range(self.threads)
        ]
        if self.cpu_of_thread is not None:
            log.info("%s threads pinned to CPUs %s", self._name, self.cpu_of_thread)
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

    @property
    def queued(self) -> int:
        """Jobs waiting for a thread now (for metrics; the shards bound it: each hands the pool
        at most twice `search_threads` reads at a time, plus its one write)."""
        return self._jobs.qsize()

    def submit(self, fn: Callable[[], T], ok: Callable[[T], None], fail: Callable[[BaseException], None]) -> None:
        """Run `fn` on a worker; then `ok(result)` or `fail(error)` on the event loop."""
        if self._loop is None:
            fail(Unavailable(f"{self._name} threads are not running"))
            return
        self._jobs.put((fn, ok, fail))

    def spread(self, fn: Callable[[], T]) -> Callable[[], T]:
        """`fn`, run with the thread's pin lifted: for a job that starts threads of its own
        (hnswlib with num_threads > 1), which would all inherit the one CPU otherwise."""
        if self.cpu_of_thread is None:
            return fn
        everywhere = set(self.cpu_of_thread)

        def spread_out() -> T:
            pinned = os.sched_getaffinity(0)
            with contextlib.suppress(OSError):
                os.sched_setaffinity(0, everywhere)
            try:
                return fn()
            finally:
                with contextlib.suppress(OSError):
                    os.sched_setaffinity(0, pinned)

        return spread_out

    async def call(self, fn: Callable[[], T]) -> T:
        """Run `fn` on a worker and return its result. Not cancellable once submitted: the
        caller keeps waiting, so state a job mutates is never left half-seen by its owner."""
        reply: Reply[T] = Reply()
        self.submit(fn, reply.set, reply.fail)
        with anyio.CancelScope(shield=True):
            result = await reply.wait()
        return result

    def _work(self, number: int) -> None:
        if self.cpu_of_thread is not None:
            try:
                os.sched_setaffinity(0, {self.cpu_of_thread[number]})  # 0: this thread
            except OSError as exc:  # a sandbox may forbid it: run unpinned
                log.warning("%s thread %d not pinned: %s", self._name, number, exc)
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


def _cpu_plan(threads: int, cpus: set[int] | None) -> list[int] | None:
    """The CPU of each thread, round robin over `cpus`, or None when there are more CPUs than
    threads (or the platform cannot pin threads)."""
    if not hasattr(os, "sched_setaffinity"):
        return None
    allowed = sorted(os.sched_getaffinity(0) if cpus is None else cpus)
    if not allowed or len(allowed) > threads:
        return None
    return [allowed[i % len(allowed)] for i in range(threads)]
