"""The reply bytes one WebSocket connection may have pending.

Pending bytes are the frames queued in the connection's outbox (waiting for the socket, or being
handed to it) plus what the requests being served have reserved. The connection reads its next
request only while the pending bytes leave room for one more typical reply, or when nothing at
all is pending (so a reply larger than the bound still goes out, alone). A client that does not
read its replies therefore stops being read itself: its requests wait in the kernel's socket
buffers and TCP slows it down, instead of its replies piling up in server memory.

Why requests reserve before they are served: a reply exists only once it is built, and up to
`max_in_flight_per_connection` requests of one connection are served at once; counting replies
only once built would let a burst of large requests all start together. So a request reserves
the larger of what this connection's replies have lately been and what its shape alone promises
(vectors asked for: rows times the vector's bytes), and its reply's real size replaces the
reservation once built.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import anyio

# Before any reply has been seen, a request is guessed at this fraction of the bound.
_FIRST_GUESS_FRACTION = 32
# The typical size follows a larger reply at once and a smaller one by 1/8 of the difference,
# so a run of small replies cannot quickly talk the guess down before a burst of large ones.
_DECAY = 8
# Default `k` of a query (models.requests), for the shape of a query that leaves it out.
_DEFAULT_K = 10


class ReplyBudget:
    """Pending reply bytes of one connection against `limit`. Single-threaded (event loop)."""

    __slots__ = ("_room", "limit", "pending", "typical")

    def __init__(self, limit: int) -> None:
        self.limit = max(1, limit)
        self.pending = 0
        self.typical = max(1, self.limit // _FIRST_GUESS_FRACTION)
        self._room: anyio.Event | None = None  # set when room appears, if someone waits

    def has_room(self) -> bool:
        """True when one more request may be read."""
        return not self.pending or self.pending + self.typical <= self.limit

    def fits(self, size: int) -> bool:
        """True when a frame of `size` bytes may be queued now."""
        return not self.pending or self.pending + size <= self.limit

    async def wait_for_room(self, size: int | None = None) -> None:
        """Return once one more request may be read (`size` None), or a frame of `size` bytes
        may be queued; at once when there is room."""
        while not (self.has_room() if size is None else self.fits(size)):
            if self._room is None:
                self._room = anyio.Event()
            await self._room.wait()

    def reserve(self, floor: int) -> int:
        """Reserve room for a reply about to be built, at least `floor` bytes; returns what was
        reserved, to hand back to `replace`."""
        reserved = max(self.typical, floor)
        self.pending += reserved
        return reserved

    def replace(self, reserved: int, size: int) -> None:
        """The reply is built and about to be queued: its reservation becomes its real `size`,
        counted until `release`; the typical size learns from it."""
        self.pending += size - reserved
        typical = self.typical
        self.typical = size if size > typical else max(1, typical - (typical - size) // _DECAY)
        if size < reserved:
            self._wake()

    def add(self, size: int) -> None:
        """A frame of `size` bytes was queued to be sent."""
        self.pending += size

    def release(self, size: int) -> None:
        """A frame of `size` bytes was handed to the socket."""
        self.pending -= size
        self._wake()

    def _wake(self) -> None:
        # Every waiter checks its own condition again: readers and pushes wait for different room.
        if self._room is not None:
            self._room.set()
            self._room = None


_DEFAULT_GET_LIMIT = 100  # models.requests.DEFAULT_GET_LIMIT


def vector_bytes_floor(op: object, args: Mapping[str, Any], dim_of: Callable[[str], int | None]) -> int:
    """The bytes the vectors of a `query` / `query_batch` / `get` reply are expected to take: its
    rows (`k`, summed over a batch's queries, or the number of ids) times 4 bytes per value of
    the collection's vectors, when it asks for `vector`; 0 for anything else, and for arguments
    that parsing will reject anyway."""
    if op == "query_batch":
        queries = args.get("queries")
        if not isinstance(queries, list):
            return 0
        shared = {"collection": args.get("collection")}
        return sum(
            vector_bytes_floor("query", {**q, **shared}, dim_of)
            for q in queries
            if isinstance(q, Mapping) and isinstance(q.get("include"), list)
        )
    include = args.get("include")
    if not isinstance(include, list) or "vector" not in include:
        return 0
    if op == "query":
        rows = args.get("k", _DEFAULT_K)
    elif op == "get":
        ids = args.get("ids")
        rows = len(ids) if isinstance(ids, list) else args.get("limit", _DEFAULT_GET_LIMIT)  # paged
    else:
        return 0
    collection = args.get("collection")
    if not isinstance(rows, int) or rows <= 0 or not isinstance(collection, str):
        return 0
    return rows * 4 * (dim_of(collection) or 0)
