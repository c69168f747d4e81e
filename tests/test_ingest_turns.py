"""Text upserts of two clients at once, through a real server: each is embedded, committed and
acknowledged in turn, not coalesced into one batch that both wait for (while both clients then
sent their next batches, the model threads had nothing to do)."""

from __future__ import annotations

import asyncio
import random
import time
import uuid

import pytest

from shoal_client import ShoalClient, UpsertResult
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)
TEXTS = 200  # per client: more than a batch is coalesced up to (4 rounds of the model threads)
WORDS = [
    "index", "shard", "vector", "query", "commit", "stream", "replica", "durable", "cosine",
    "graph", "search", "batch", "token", "embedding", "latency", "server", "client", "socket",
    "table", "column", "filter", "metadata", "snapshot", "restart",
]


def passages(n: int, seed: int) -> list[str]:
    """Sentences of 30 to 60 words: about the length of the passages users index."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(30, 60))) + f" ({i})." for i in range(n)]


async def test_two_clients_text_upserts_are_acknowledged_in_turn(server: ServerProcess) -> None:
    name = f"turns_{uuid.uuid4().hex[:8]}"
    texts = passages(2 * TEXTS, seed=1)
    async with (
        ShoalClient.connect(server.ws_url) as a,
        ShoalClient.connect(server.ws_url) as b,
        ShoalClient.connect(server.ws_url) as busy,
    ):
        await a.create_collection(name)
        await a.upsert(name, [{"id": "warm", "text": "warm the model up"}])
        # A batch in the works first, so both clients' upserts are queued when the next is made.
        ahead = asyncio.create_task(busy.upsert(name, [{"id": f"w{i}", "text": t} for i, t in enumerate(texts[:100])]))
        await asyncio.sleep(0.1)
        acked: dict[str, float] = {}
        started = time.monotonic()

        async def send(client: ShoalClient, who: str, part: list[str]) -> UpsertResult:
            result = await client.upsert(name, [{"id": f"{who}{i}", "text": t} for i, t in enumerate(part)])
            acked[who] = time.monotonic() - started
            return result

        first, second = await asyncio.gather(send(a, "a", texts[:TEXTS]), send(b, "b", texts[TEXTS:]))
        await ahead
        # Two transactions, not one: the seqs of the two batches do not end together.
        assert first.count == second.count == TEXTS
        assert abs(first.seq - second.seq) == TEXTS
        early, late = sorted(acked.values())
        # In turn, the first is acknowledged well before the second; coalesced, both came at the end.
        assert early <= 0.8 * late, acked
        assert (await a.count(name)) == 2 * TEXTS + 100 + 1
        await a.drop_collection(name)
