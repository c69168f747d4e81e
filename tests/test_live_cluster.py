"""Live result sets across a cluster: two real `shoal serve` on one PostgreSQL; top-k and
threshold subscriptions on one node follow writes made on the other (the follower's applier reads
the replaced versions from its own shards, as the committing node's does)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import anyio
import numpy as np
import pytest

from shoal_client import ShoalClient
from shoal_client.types import LeaveEvent, MatchEvent, TopkEvent
from tests.server_process import ServerProcess
from tests.test_cluster import Postgres, database, running_nodes, wait_ready

pytestmark = pytest.mark.timeout(240)
__all__ = ["database"]  # the module's PostgreSQL fixture, shared with tests/test_cluster.py

HOT = np.array([1.0, 0.0, 0.0, 0.0], np.float32)
WARM = np.array([1.0, 0.3, 0.0, 0.0], np.float32)
COLD = np.array([0.0, 1.0, 0.0, 0.0], np.float32)


@pytest.fixture(scope="module")
def pair(database: Postgres) -> Iterator[list[ServerProcess]]:
    yield from running_nodes(database, 2)


async def next_event(sub: Any, timeout: float = 20.0) -> Any:
    with anyio.fail_after(timeout):
        return await sub.__aiter__().__anext__()


async def test_topk_and_leave_on_one_node_follow_writes_on_the_other(pair: list[ServerProcess]) -> None:
    a, b = pair
    await wait_ready(a)
    await wait_ready(b)
    async with ShoalClient.connect(a.ws_url) as ca, ShoalClient.connect(b.ws_url) as cb:
        await ca.create_collection("live", dim=4)
        seq = (await ca.upsert("live", [{"id": "w", "vector": WARM}, {"id": "c", "vector": COLD}])).seq
        with anyio.fail_after(30):  # b follows the collection and its first writes
            while True:
                try:
                    if (await cb.request("count", collection="live", min_seq=seq))["count"] == 2:
                        break
                except Exception:
                    pass
                await anyio.sleep(0.2)
        top = await cb.subscribe("live", HOT, k=2)
        first = await next_event(top)
        assert isinstance(first, TopkEvent) and [h.id for h in first.hits] == ["w", "c"]
        watch = await cb.subscribe("live", HOT, threshold=0.9)

        s = (await ca.upsert("live", [{"id": "h", "vector": HOT}])).seq  # written on a
        pushed = await next_event(top)
        assert isinstance(pushed, TopkEvent) and pushed.seq == s and [h.id for h in pushed.hits] == ["h", "w"]
        match = await next_event(watch)
        assert isinstance(match, MatchEvent) and match.seq == s and match.hit.id == "h"

        s = (await ca.upsert("live", [{"id": "w", "vector": COLD}])).seq  # out of the threshold
        leave = await next_event(watch)
        assert isinstance(leave, LeaveEvent) and (leave.seq, leave.id) == (s, "w")
        pushed = await next_event(top)  # a member moved: refilled on b
        assert isinstance(pushed, TopkEvent) and pushed.seq == s and pushed.hits[0].id == "h"

        s = (await ca.delete("live", ids=["h"])).seq
        leave = await next_event(watch)
        assert isinstance(leave, LeaveEvent) and (leave.seq, leave.id) == (s, "h")
        pushed = await next_event(top)
        assert isinstance(pushed, TopkEvent) and pushed.seq == s and sorted(h.id for h in pushed.hits) == ["c", "w"]
        await top.close()
        await watch.close()
