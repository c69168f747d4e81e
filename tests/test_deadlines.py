"""Request deadlines that fit the work: an upsert's deadline grows with the texts it embeds.

Unit: `deadline_of` for writes, reads and upserts with and without texts to embed; the watch
that cancels a request's scope once it is due (and never one that has ended). End to end
(a real `shoal serve`): with a write deadline far shorter than embedding a batch takes, an
upsert of texts still succeeds, because each text adds `SHOAL_EMBED_DEADLINE_PER_TEXT_S`.
"""

from __future__ import annotations

import asyncio
import time

import anyio
import numpy as np
import pytest

from models.config import Limits
from models.records import DocId, Document
from models.requests import Delete, Upsert
from server.deadlines import WATCH_TICK_S, DeadlineWatch, deadline_of, texts_to_embed
from shoal_client import ShoalClient
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


async def test_a_batch_of_texts_is_embedded_within_its_deadline_not_the_bare_write_deadline() -> None:
    proc = ServerProcess(temp_data_dir(), env={"SHOAL_WRITE_DEADLINE_S": "0.3"})
    proc.start()
    try:
        async with ShoalClient.connect(proc.ws_url) as c:
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
    finally:
        proc.stop()
