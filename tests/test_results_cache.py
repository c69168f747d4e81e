"""The results cache: hits on repeats, misses after any write, bounded bytes, never stale."""

from __future__ import annotations

import asyncio
import uuid

import numpy as np
import pytest

from actors.results_cache import LruBytes
from shoal_client import ShoalClient
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)
DIM = 8


def unit(seed: int) -> list[float]:
    v = np.random.default_rng(seed).standard_normal(DIM)
    return (v / np.linalg.norm(v)).astype(np.float32).tolist()


def test_lru_bytes_evicts_least_recently_used() -> None:
    lru: LruBytes[str, int] = LruBytes(100)
    lru.put("a", 1, 40)
    lru.put("b", 2, 40)
    assert lru.get("a") == 1  # a is now the most recent
    lru.put("c", 3, 40)  # over 100: b goes
    assert lru.get("b") is None and lru.get("a") == 1 and lru.get("c") == 3
    lru.put("huge", 4, 101)  # larger than the bound: never kept
    assert lru.get("huge") is None
    assert lru.stats.evictions == 1 and lru.stats.bytes == 80 and lru.stats.entries == 2


async def test_repeat_is_cached_and_any_write_invalidates(client: ShoalClient) -> None:
    name = f"rc_{uuid.uuid4().hex[:8]}"
    await client.create_collection(name, dim=DIM)
    await client.upsert(name, [{"id": f"d{i}", "text": f"doc {i} river", "vector": unit(i)} for i in range(10)])
    queries = [
        {"vector": unit(1), "k": 3},
        {"text": "river", "k": 3, "mode": "keyword"},
        {"text": "river", "vector": unit(2), "k": 3, "mode": "hybrid", "fusion": "weighted", "alpha": 0.3},
    ]
    for q in queries:
        first = await client.request("query", collection=name, **q)
        again = await client.request("query", collection=name, **q)
        assert first["cached"] is False and again["cached"] is True, q
        assert again["hits"] == first["hits"]
    # Differences in k, filters or fusion parameters are different queries.
    other = await client.request("query", collection=name, vector=unit(1), k=4)
    assert other["cached"] is False
    writes = [
        lambda: client.upsert(name, [{"id": "new", "text": "new river", "vector": unit(1)}]),
        lambda: client.delete(name, ids=["d1"]),
        lambda: client.upsert(name, [{"id": "d2", "text": "replaced", "vector": unit(50)}]),
    ]
    for write in writes:
        before = [await client.request("query", collection=name, **q) for q in queries]
        assert all(b["cached"] for b in before)
        await write()
        after = [await client.request("query", collection=name, **q) for q in queries]
        assert not any(a["cached"] for a in after)
    hits = (await client.query(name, vector=unit(1), k=3)).hits
    assert hits[0].id == "new" and "d1" not in {h.id for h in hits}


async def test_metrics_count_hits_and_misses(server: ServerProcess, client: ShoalClient) -> None:
    import httpx

    name = f"rcm_{uuid.uuid4().hex[:8]}"
    await client.create_collection(name, dim=DIM)
    await client.upsert(name, [{"id": "a", "vector": unit(0)}])
    async with httpx.AsyncClient(base_url=server.url) as http:

        async def metric(line: str) -> float:
            text = (await http.get("/metrics")).text
            return float(next(x.split()[-1] for x in text.splitlines() if x.startswith(line)))

        hits0 = await metric('shoal_results_cache_lookups_total{outcome="hit"}')
        for _ in range(3):
            await client.query(name, vector=unit(0), k=1)
        assert await metric('shoal_results_cache_lookups_total{outcome="hit"}') == hits0 + 2
        assert await metric("shoal_results_cache_limit_bytes") > 0


async def test_interleaved_writes_and_repeated_queries_never_see_stale_answers(
    server: ServerProcess, client: ShoalClient
) -> None:
    """Several clients write and query one collection at once. Every reply carries the seq of
    the last write its client saw acked; the answer must contain every document that client
    wrote before it (read-your-writes) and none it deleted, and a cached answer must equal the
    answer of an equivalent uncached query (k + 1, cut to k) sent right after it, unless a
    write was acked in between."""
    name = f"rcs_{uuid.uuid4().hex[:8]}"
    await client.create_collection(name, dim=DIM)
    await client.upsert(name, [{"id": f"base{i}", "text": "base", "vector": unit(i)} for i in range(5)])
    errors: list[str] = []
    cached_seen = 0
    write_count = 0

    async def worker(w: int) -> None:
        nonlocal cached_seen, write_count
        async with ShoalClient.connect(server.ws_url) as c:
            mine: set[str] = set()
            for step in range(25):
                doc = f"w{w}-{step % 6}"
                if step % 5 == 4 and doc in mine:
                    await c.delete(name, ids=[doc])
                    mine.discard(doc)
                else:
                    await c.upsert(name, [{"id": doc, "text": f"tag{w} shared", "vector": unit(100 * w + step)}])
                    mine.add(doc)
                write_count += 1
                for _ in range(3):  # repeated: the later ones may be cached
                    got = await c.request("query", collection=name, text=f"tag{w}", mode="keyword", k=20)
                    ids = {h["id"] for h in got["hits"]}
                    if ids != mine:
                        errors.append(f"worker {w} step {step}: {sorted(ids)} != {sorted(mine)} cached={got['cached']}")
                    if got["cached"]:
                        cached_seen += 1
                        writes_before = write_count
                        fresh = await c.request("query", collection=name, text="shared", mode="keyword", k=21)
                        again = await c.request("query", collection=name, text="shared", mode="keyword", k=20)
                        same = [h["id"] for h in fresh["hits"]][:20] == [h["id"] for h in again["hits"]]
                        if again["cached"] and write_count == writes_before and not same:
                            errors.append(f"worker {w}: cached answer differs from a fresh one")

    await asyncio.gather(*(worker(w) for w in range(4)))
    assert not errors, errors[:5]
    assert cached_seen > 0
