"""The two primitives every actor is built from: a bounded mailbox and a one-shot reply.

A caller builds a frozen message carrying a `Reply`, puts it in the actor's mailbox and awaits
the reply. The actor owns its state and is the only task that touches it. An actor's dispatch
ends in `unknown_message`: a message of a type it does not handle raises, never falls into some
other branch.
"""

from __future__ import annotations

import asyncio
from typing import Generic, Never, NoReturn, TypeVar

import anyio
from anyio.streams.memory import MemoryObjectReceiveStream, MemoryObjectSendStream

from models.errors import Overloaded, Unavailable

T = TypeVar("T")
M = TypeVar("M")


class Reply(Generic[T]):
    """A one-shot slot the actor fills with a value or an exception; the caller awaits it.

    An asyncio future underneath (the engine runs on the server's asyncio loop): every query
    makes one, and an `anyio.Event` costs several times more to create and wait on. Create it,
    fill it and await it on the event loop; filling it again, or after the caller gave up, is a
    no-op.
    """

    __slots__ = ("_future",)

    def __init__(self) -> None:
        self._future: asyncio.Future[T] = asyncio.get_running_loop().create_future()

    def set(self, value: T) -> None:
        if not self._future.done():
            self._future.set_result(value)

    def fail(self, error: BaseException) -> None:
        if not self._future.done():
            self._future.set_exception(error)

    @property
    def done(self) -> bool:
        return self._future.done()

    async def wait(self) -> T:
        """The value, or raises the exception the actor failed the reply with."""
        return await self._future


def unknown_message(actor: str, message: Never) -> NoReturn:
    """Raise TypeError naming the message's type: end an actor's dispatch with this, after the
    branch of every message type it handles (mypy then checks that none is left out)."""
    raise TypeError(f"{actor} got a message it does not handle: {type(message).__name__}")


class Mailbox(Generic[M]):
    """A bounded stream of messages for one actor.

    `send` waits while the mailbox is full (back-pressure for writers); `offer` fails fast with
    `overloaded` (for reads, which should not queue without bound behind a stalled actor).
    """

    def __init__(self, size: int, name: str) -> None:
        self.name = name
        self.size = size
        send, receive = anyio.create_memory_object_stream[M](size)
        self._send: MemoryObjectSendStream[M] = send
        self.receive: MemoryObjectReceiveStream[M] = receive

    @property
    def depth(self) -> int:
        """Messages queued now (at most `size`), for metrics."""
        return self.receive.statistics().current_buffer_used

    async def send(self, message: M) -> None:
        try:
            await self._send.send(message)
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise Unavailable(f"{self.name} is shutting down") from exc

    def offer(self, message: M) -> None:
        try:
            self._send.send_nowait(message)
        except anyio.WouldBlock as exc:
            raise Overloaded(f"{self.name} queue is full") from exc
        except (anyio.ClosedResourceError, anyio.BrokenResourceError) as exc:
            raise Unavailable(f"{self.name} is shutting down") from exc

    def close(self) -> None:
        """No more messages: the actor drains what is queued, then its loop ends."""
        self._send.close()
