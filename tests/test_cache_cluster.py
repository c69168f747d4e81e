"""The results cache on two nodes of one PostgreSQL, through real servers: an answer node B has
cached ends the moment B applies a write made on node A (never later), B's fresh answer is the
one A computes for the same state, and a collection dropped on A takes exactly its own cached
answers off B, even when A creates it again under the same name."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterator
from typing import Any

import anyio
import pytest

from load.server import PostgresProcess as Postgres
from shoal_client import ShoalClient
from shoal_client.errors import NotFound
from tests.server_process import ServerProcess, metric
from tests.test_cache_e2e import DIM, river_docs, unit
from tests.test_cache_e2e import name as unique
from tests.test_cluster import database, running_nodes

pytestmark = pytest.mark.timeout(240)
__all__ = ["database"]  # the cluster's PostgreSQL fixture, used here by name

# Far more than B needs to follow a write (a notification, else its poll every 0.5 s).
FOLLOW_TIMEOUT_S = 15.0
QUERY_VECTOR_SEED = 100


# One query per mode; the keyword one asks for every holder of its term, so its answer is the
# exact set of live documents holding "delta".
QUERIES: dict[str, dict[str, Any]] = {
    "vector": {"vector": unit(QUERY_VECTOR_SEED), "k": 3},
    "keyword": {"text": "delta", "k": 50, "mode": "keyword"},
    "hybrid": {"text": "delta", "vector": unit(QUERY_VECTOR_SEED), "k": 3, "mode": "hybrid"},
}


@pytest.fixture(scope="module")
def two_nodes(database: Postgres) -> Iterator[list[ServerProcess]]:
    yield from running_nodes(database, 2)


Answer = list[tuple[str, float]]


def answer(reply: dict[str, Any]) -> Answer:
    """What a query answered: ids in order with their scores."""
    return [(h["id"], float(h["score"])) for h in reply["hits"]]


def same(one: Answer, other: Answer) -> bool:
    """The same ids in the same order with the same scores, but for the last bits of a float32
    sum (two processes may add in another order)."""
    return [i for i, _ in one] == [i for i, _ in other] and all(
        abs(x - y) <= 1e-5 * max(1.0, abs(x)) for (_, x), (_, y) in zip(one, other, strict=True)
    )


async def wait_applied(node: ShoalClient, collection: str, seq: int) -> None:
    """Until `node` has applied `collection` through `seq` (a count with `min_seq`, which does
    not touch the results cache)."""
    with anyio.fail_after(FOLLOW_TIMEOUT_S):
        while True:
            try:
                await node.request("count", collection=collection, min_seq=seq)
                return
            except NotFound:  # it has not followed the create yet
                await anyio.sleep(0.05)


async def cache_on_b(cb: ShoalClient, collection: str, query: dict[str, Any]) -> Answer:
    """Ask B twice, so its answer is in B's cache; returns that answer."""
    first = await cb.request("query", collection=collection, **query)
    again = await cb.request("query", collection=collection, **query)
    assert again["cached"] is True and answer(again) == answer(first), query
    return answer(first)


async def truth_on_a(ca: ShoalClient, collection: str, query: dict[str, Any]) -> Answer:
    """A's answer right after its own write: necessarily computed (the write moved A's version),
    so it is the answer of the new state."""
    reply = await ca.request("query", collection=collection, **query)
    assert reply["cached"] is False, query
    return answer(reply)


async def watch_b(cb: ShoalClient, collection: str, query: dict[str, Any], old: Answer) -> list[dict[str, Any]]:
    """B's replies (asked without `min_seq`) up to the first that is not `old`."""
    replies = []
    with anyio.fail_after(FOLLOW_TIMEOUT_S):
        while True:
            reply = await cb.request("query", collection=collection, **query)
            replies.append(reply)
            if not same(answer(reply), old):
                return replies
            await anyio.sleep(0.002)


def old_then_new(replies: list[dict[str, Any]], old: Answer, new: Answer) -> dict[str, int]:
    """Before B applied the write it may answer `old`, from its cache or not; then `new`, and
    nothing else ever. The first `new` reply must be computed: nothing could have cached it
    before B applied the write."""
    *before, first_new = replies
    assert all(same(answer(r), old) for r in before)
    assert same(answer(first_new), new), ("neither the answer before the write nor after it", first_new, old, new)
    assert first_new["cached"] is False, "a cached reply held an answer B had never computed"
    return {"old": len(before), "old_cached": sum(r["cached"] is True for r in before)}


# Every write of the test changes this mode's answer, so B is watched on it from the ack on.
WATCHED = "keyword"


async def check_write_reaches_b(
    ca: ShoalClient,
    cb: ShoalClient,
    collection: str,
    write: Callable[[], Awaitable[int]],
    expect: Callable[[str, Answer], None],
) -> dict[str, int]:
    """Cache every query's answer on B, run `write` on A (it returns the ack's seq) and watch B
    at once, while it may not have applied the write yet; then check B's replies against A's
    answers of the new state. `expect(mode, answer)` checks A's answer against what the test
    knows it must be. Returns how many old answers B gave before it applied the write."""
    old = {mode: await cache_on_b(cb, collection, q) for mode, q in QUERIES.items()}
    seq = await write()
    watched = await watch_b(cb, collection, QUERIES[WATCHED], old[WATCHED])
    new = {mode: await truth_on_a(ca, collection, q) for mode, q in QUERIES.items()}
    for mode in QUERIES:
        expect(mode, new[mode])
    assert not same(old[WATCHED], new[WATCHED])
    seen = old_then_new(watched, old[WATCHED], new[WATCHED])
    for mode, query in QUERIES.items():
        if mode != WATCHED and not same(old[mode], new[mode]):
            old_then_new(await watch_b(cb, collection, query, old[mode]), old[mode], new[mode])
    await wait_applied(cb, collection, seq)
    # B has applied the write: every reply now (the first computed, the next from the cache) is
    # A's new answer, whether or not the answer changed.
    for mode, query in QUERIES.items():
        after = await cb.request("query", collection=collection, **query)
        repeat = await cb.request("query", collection=collection, **query)
        assert answer(after) == answer(repeat) and same(answer(after), new[mode]), mode
        assert repeat["cached"] is True, mode
        if same(old[mode], new[mode]):  # the version moved all the same: B's old entry is gone
            assert after["cached"] is False, mode
    return seen


def ids(hits: Answer) -> list[str]:
    return [doc_id for doc_id, _ in hits]


async def test_a_write_on_a_ends_b_cached_answers_as_soon_as_b_applies_it(two_nodes: list[ServerProcess]) -> None:
    a, b = two_nodes
    coll = unique("follow")
    docs = river_docs(12)
    delta_holders = {d["id"] for d in docs if "delta" in d["text"]}
    async with ShoalClient.connect(a.ws_url) as ca, ShoalClient.connect(b.ws_url) as cb:
        await ca.create_collection(coll, dim=DIM)
        await wait_applied(cb, coll, (await ca.upsert(coll, docs)).seq)
        seen = {"old": 0, "old_cached": 0}

        async def upsert_top() -> int:  # a document that tops every query
            top = {"id": "top", "text": "delta delta delta", "vector": unit(QUERY_VECTOR_SEED)}
            return (await ca.upsert(coll, [top])).seq

        def top_leads(mode: str, hits: Answer) -> None:
            assert ids(hits)[0] == "top", mode
            if mode == "keyword":
                assert set(ids(hits)) == delta_holders | {"top"}

        async def delete_top() -> int:
            return (await ca.delete(coll, ids=["top"])).seq

        def top_gone(mode: str, hits: Answer) -> None:
            assert "top" not in ids(hits), mode
            if mode == "keyword":
                assert set(ids(hits)) == delta_holders

        async def retext_d0() -> int:  # the same vector, a text without "delta"
            d0 = {**docs[0], "text": "doc 0 river bank meadow"}
            return (await ca.upsert(coll, [d0])).seq

        def d0_left_keyword(mode: str, hits: Answer) -> None:
            if mode == "keyword":
                assert set(ids(hits)) == delta_holders - {"d0"}

        for write, expect in ((upsert_top, top_leads), (delete_top, top_gone), (retext_d0, d0_left_keyword)):
            for key, value in (await check_write_reaches_b(ca, cb, coll, write, expect)).items():
                seen[key] += value
    # How often B still served the old answer while following (allowed until it applied).
    print(f"B before applying: {seen}")


async def test_a_drop_on_a_frees_only_that_collection_on_b_and_a_recreate_starts_afresh(
    two_nodes: list[ServerProcess],
) -> None:
    a, b = two_nodes
    keep, gone = unique("keep"), unique("gone")
    entries_line, bytes_line = "shoal_results_cache_entries ", "shoal_results_cache_bytes "
    invalidated_line = 'shoal_results_cache_dropped_total{reason="invalidated"}'
    async with ShoalClient.connect(a.ws_url) as ca, ShoalClient.connect(b.ws_url) as cb:
        for coll in (keep, gone):
            await ca.create_collection(coll, dim=DIM)
            await wait_applied(cb, coll, (await ca.upsert(coll, river_docs(12))).seq)
            for query in QUERIES.values():
                await cache_on_b(cb, coll, query)
        entries0, bytes0 = await metric(b.url, entries_line), await metric(b.url, bytes_line)
        invalidated0 = await metric(b.url, invalidated_line)
        await ca.drop_collection(gone)
        with anyio.fail_after(FOLLOW_TIMEOUT_S):
            while True:
                try:
                    await cb.count(gone)
                except NotFound:
                    break
                await anyio.sleep(0.05)
        # The dropped collection's answers, and only those, left B's cache when B followed.
        assert await metric(b.url, entries_line) == entries0 - len(QUERIES)
        assert await metric(b.url, invalidated_line) == invalidated0 + len(QUERIES)
        assert 0 < await metric(b.url, bytes_line) < bytes0
        for query in QUERIES.values():
            assert (await cb.request("query", collection=keep, **query))["cached"] is True, query
        # The same name again, other documents: B's first answers are computed from them.
        await ca.create_collection(gone, dim=DIM)
        fresh = [{"id": f"f{i}", "text": f"fresh delta {i}", "vector": unit(500 + i)} for i in range(4)]
        await wait_applied(cb, gone, (await ca.upsert(gone, fresh)).seq)
        for mode, query in QUERIES.items():
            reply = await cb.request("query", collection=gone, **query)
            assert reply["cached"] is False, mode
            assert {h["id"] for h in reply["hits"]} <= {d["id"] for d in fresh}, mode
        keyword = await cb.request("query", collection=gone, **QUERIES["keyword"])
        assert sorted(h["id"] for h in keyword["hits"]) == [d["id"] for d in fresh]
