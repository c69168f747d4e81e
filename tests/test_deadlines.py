"""Request deadlines that fit the work, and a WebSocket worker's one scope for many requests.

Unit: `deadline_of` for writes, reads and upserts with and without texts to embed; the watch
that cancels a request's scope once it is due (and never one that has ended); `SharedDeadlines`
serving requests one after another under one scope, a late one (also one whose shielded wait
completed after its deadline) raising `DeadlinePassed`. End to end (a real `shoal serve` with
short deadlines): an upsert of texts succeeds although embedding it takes longer than the write
deadline, because each text adds `SHOAL_EMBED_DEADLINE_PER_TEXT_S`; a read past its deadline
answers `unavailable` over WebSocket and HTTP while other requests on the same connection are
answered, and the connection serves on under a new scope.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any, cast

import anyio
import httpx
import numpy as np
import pytest

from models.config import Limits
from models.records import DocId, Document
from models.requests import Delete, Upsert
from server.deadlines import (
    WATCH_TICK_S,
    DeadlinePassed,
    DeadlineWatch,
    SharedDeadlines,
    deadline_of,
    texts_to_embed,
)
from server.state import AppState
from shoal_client import ShoalClient
from shoal_client.errors import Unavailable
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(180)


def _upsert(texts: int, vectors: int) -> Upsert:
    docs = [Document(id=DocId(f"t{i}"), text=f"text {i}", vector=None) for i in range(texts)]
    docs += [Document(id=DocId(f"v{i}"), text="with a vector", vector=np.ones(4, np.float32)) for i in range(vectors)]
    return Upsert("c", tuple(docs))


def test_an_upserts_deadline_grows_with_the_texts_it_embeds() -> None:
    limits = Limits(write_deadline_s=5.0, read_deadline_s=30.0, embed_deadline_per_text_s=0.05)
    assert texts_to_embed(_upsert(3, 2)) == 3
    assert deadline_of(limits, "upsert", _upsert(0, 10)) == (5.0, "SHOAL_WRITE_DEADLINE_S")
    seconds, setting = deadline_of(limits, "upsert", _upsert(500, 10))
    assert seconds == pytest.approx(5.0 + 500 * 0.05) and "SHOAL_EMBED_DEADLINE_PER_TEXT_S" in setting
    assert deadline_of(limits, "delete", Delete("c", (DocId("a"),), None, None))[0] == 5.0
    assert deadline_of(limits, "query")[0] == 30.0
    no_allowance = Limits(write_deadline_s=5.0, embed_deadline_per_text_s=0.0)
    assert deadline_of(no_allowance, "upsert", _upsert(500, 0))[0] == 5.0


async def test_the_watch_cancels_a_due_scope_within_a_tick_and_forgets_ended_ones() -> None:
    watch = DeadlineWatch(asyncio.get_running_loop())
    started = time.perf_counter()
    with anyio.CancelScope() as due:
        watch.add(due, 0.1)
        await anyio.sleep(5)
    took = time.perf_counter() - started
    assert due.cancelled_caught and 0.1 <= took < 0.1 + WATCH_TICK_S + 0.2
    assert len(watch) == 0
    with anyio.CancelScope() as ended:
        watch.add(ended, 0.05)
        watch.discard(ended)  # the request finished first
    await anyio.sleep(0.05 + 2 * WATCH_TICK_S)
    assert not ended.cancel_called and len(watch) == 0


def _state(read_deadline_s: float) -> AppState:
    """What `SharedDeadlines` reads of the server's state: the limits and the database's health."""
    health = SimpleNamespace(up=True, reason="")
    state = SimpleNamespace(
        settings=SimpleNamespace(limits=Limits(read_deadline_s=read_deadline_s)),
        engine=SimpleNamespace(database_health=health),
    )
    return cast(AppState, state)


async def test_shared_deadlines_serve_requests_under_one_scope_until_one_is_late() -> None:
    state = _state(read_deadline_s=0.1)
    with SharedDeadlines(state) as deadlines:
        for _ in range(50):  # on time: the scope stays usable
            deadlines.arm("query")
            try:
                await anyio.sleep(0)
            finally:
                deadlines.disarm()
        started = time.perf_counter()
        with pytest.raises(DeadlinePassed) as late:
            deadlines.arm("query")
            try:
                await anyio.sleep(5)
            finally:
                deadlines.disarm()
        took = time.perf_counter() - started
    assert 0.1 <= took < 0.1 + WATCH_TICK_S + 0.2
    assert late.value.error.code == "unavailable" and "SHOAL_READ_DEADLINE_S" in late.value.error.message
    # A wait the deadline could not interrupt (shielded) completes, and is late all the same:
    # the scope stays cancelled, so its holder must leave it.
    with SharedDeadlines(state) as deadlines, pytest.raises(DeadlinePassed):
        deadlines.arm("count")
        try:
            with anyio.CancelScope(shield=True):
                await anyio.sleep(0.1 + 2 * WATCH_TICK_S)
        finally:
            deadlines.disarm()
    # A new scope serves on.
    with SharedDeadlines(state) as deadlines:
        deadlines.arm("query")
        try:
            await anyio.sleep(0.01)
        finally:
            deadlines.disarm()


@pytest.fixture(scope="module")
def short_deadlines() -> Iterator[ServerProcess]:
    """A server whose writes and reads have short deadlines, and whose `min_seq` waits outlast
    the read deadline (a read of a seq never written waits until the deadline ends it)."""
    env = {"SHOAL_WRITE_DEADLINE_S": "0.3", "SHOAL_READ_DEADLINE_S": "0.5", "SHOAL_MIN_SEQ_WAIT_MS": "20000"}
    proc = ServerProcess(temp_data_dir(), env=env)
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()


async def test_a_late_read_answers_unavailable_and_its_connection_serves_on(short_deadlines: ServerProcess) -> None:
    never = 10**15  # a seq no write reaches
    vector = [1.0, 0.0, 0.0, 0.0]
    async with ShoalClient.connect(short_deadlines.ws_url) as c:
        await c.create_collection("late", dim=4)
        await c.upsert("late", [{"id": f"d{i}", "vector": [1.0, float(i), 0.0, 0.0]} for i in range(20)])

        async def late_query() -> float:
            started = time.monotonic()
            with pytest.raises(Unavailable) as late:
                await c.request("query", collection="late", vector=vector, k=3, min_seq=never)
            assert "SHOAL_READ_DEADLINE_S" in late.value.message, late.value.message
            return time.monotonic() - started

        async def on_time() -> int:
            served = 0
            for _ in range(40):
                served += len((await c.query("late", vector=vector, k=3)).hits) == 3
                await asyncio.sleep(0.01)
            return served

        # Two late reads and a stream of others, in flight together on one connection.
        first, second, served = await asyncio.gather(late_query(), late_query(), on_time())
        print(f"\nlate reads answered after {first:.2f} and {second:.2f} s (read deadline 0.5 s)")
        assert 0.5 <= first < 2.0 and 0.5 <= second < 2.0
        assert served == 40
        # The workers that answered them serve on, and a later late read is cut again.
        for _ in range(20):
            assert len((await c.query("late", vector=vector, k=3)).hits) == 3
        assert 0.5 <= await late_query() < 2.0
        assert await c.count("late") == 20
    async with httpx.AsyncClient(base_url=short_deadlines.url) as http:
        body: dict[str, Any] = {"vector": vector, "k": 3, "min_seq": never}
        response = await http.post("/v1/collections/late/query", json=body, timeout=10)
        assert response.status_code == 503 and response.json()["error"]["code"] == "unavailable"


async def test_a_batch_of_texts_is_embedded_within_its_deadline_not_the_bare_write_deadline(
    short_deadlines: ServerProcess,
) -> None:
    async with ShoalClient.connect(short_deadlines.ws_url) as c:
        await c.create_collection("notes")
        docs = [{"id": f"n{i}", "text": f"note {i}: the quarterly report is due on day {i}"} for i in range(300)]
        started = time.monotonic()
        await c.upsert("notes", docs)
        took = time.monotonic() - started
        print(f"\n300 texts embedded and committed in {took:.2f} s against a write deadline of 0.3 s")
        assert await c.count("notes") == 300
        # Without texts to embed, the bare write deadline still holds every write.
        await c.upsert("notes", [{"id": "v", "vector": [0.1] * 384}])
        assert await c.count("notes") == 301
