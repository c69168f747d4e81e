"""`leave` events of threshold subscriptions, end to end: live over WebSocket and SSE, in seq order
with the matches, and replayed on resume from the durable log."""

from __future__ import annotations

import asyncio
import json
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from shoal_client import ShoalClient
from shoal_client.sse import subscribe_sse
from shoal_client.types import LeaveEvent, MatchEvent
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(180)

DIM = 8


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = (v / np.linalg.norm(v)).astype(np.float32)
    return out


Q = unit(np.ones(DIM, np.float32))
NEAR = unit(Q + 0.05 * np.eye(DIM, dtype=np.float32)[0])  # cosine ~0.998 with Q
FAR = unit(-Q + 0.3 * np.eye(DIM, dtype=np.float32)[1])  # cosine < 0 with Q


def doc(doc_id: str, vector: np.ndarray, **metadata: Any) -> dict[str, Any]:
    return {"id": doc_id, "vector": vector.tolist(), "metadata": metadata}


def shape(event: Any) -> tuple[str, int, str]:
    if isinstance(event, MatchEvent):
        return ("match", event.seq, event.hit.id)
    assert isinstance(event, LeaveEvent), event
    return ("leave", event.seq, event.id)


async def take(sub: Any, until_seq: int, timeout: float = 20.0) -> list[tuple[str, int, str]]:
    out: list[tuple[str, int, str]] = []
    async with asyncio.timeout(timeout):
        async for event in sub:
            out.append(shape(event))
            if out[-1][1] >= until_seq:
                return out
    raise AssertionError(f"subscription ended early after {out}")


async def run_writes(client: ShoalClient, name: str) -> list[tuple[str, int, str]]:
    """The writes after the subscription, and the events a subscription to Q (threshold 0.9, where
    tag == "x") must get for them, in order."""
    expected: list[tuple[str, int, str]] = []
    s = (await client.upsert(name, [doc("a", NEAR, tag="x"), doc("b", FAR, tag="x")])).seq
    expected.append(("match", s - 1, "a"))
    s = (await client.upsert(name, [doc("a", FAR, tag="x")])).seq  # re-upserted out of the score
    expected.append(("leave", s, "a"))
    s = (await client.upsert(name, [doc("c", NEAR, tag="x")])).seq
    expected.append(("match", s, "c"))
    s = (await client.upsert(name, [doc("c", NEAR, tag="y")])).seq  # out of the filter
    expected.append(("leave", s, "c"))
    s = (await client.upsert(name, [doc("d", NEAR, tag="x"), doc("d", NEAR, tag="x")])).seq  # twice in a batch
    expected += [("match", s - 1, "d"), ("match", s, "d")]
    s = (await client.delete(name, ids=["d", "b"])).seq  # delete by id: d matched, b never did
    expected.append(("leave", s - 1, "d"))
    s = (await client.delete(name, ids=["old"])).seq  # matched before the subscription, never pushed
    expected.append(("leave", s, "old"))
    s = (await client.upsert(name, [doc("e", NEAR, tag="x"), doc("f", FAR, tag="x")])).seq
    expected.append(("match", s - 1, "e"))
    s = (await client.delete(name, where={"tag": "x"})).seq  # delete by where: ids in sorted order
    expected.append(("leave", s - 2, "e"))  # deleted: e, f, never
    return expected


async def test_leave_live_and_replayed_over_websocket(client: ShoalClient) -> None:
    name = unique("leave")
    await client.create_collection(name, dim=DIM)
    start = (await client.upsert(name, [doc("old", NEAR, tag="x"), doc("never", FAR, tag="x")])).seq
    sub = await client.subscribe(name, Q, threshold=0.9, where={"tag": "x"})
    expected = await run_writes(client, name)
    got = await take(sub, expected[-1][1])
    assert got == expected
    await sub.close()

    # A resume from before the writes replays the same events from the log, leaves included.
    again = await client.subscribe(name, Q, threshold=0.9, where={"tag": "x"}, after_seq=start)
    assert await take(again, expected[-1][1]) == expected
    await again.close()

    # A resume from the middle starts right after it.
    middle = expected[3][1]
    third = await client.subscribe(name, Q, threshold=0.9, where={"tag": "x"}, after_seq=middle)
    assert await take(third, expected[-1][1]) == [e for e in expected if e[1] > middle]
    await third.close()


async def test_leave_over_sse_live_and_on_resume(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("leave_sse")
    await client.create_collection(name, dim=DIM)
    start = (await client.upsert(name, [doc("old", NEAR, tag="x"), doc("never", FAR, tag="x")])).seq

    async def collect(after: int | None, until: list[int]) -> list[tuple[str, int, str]]:
        """Events until the one with seq `until[0]` (set by the writer once it knows it)."""
        out: list[tuple[str, int, str]] = []
        stream = subscribe_sse(server.url, name, vector=Q, threshold=0.9, where={"tag": "x"}, last_event_id=after)
        async with asyncio.timeout(30):
            async for event in stream:
                body = event.data
                if event.event == "match":
                    out.append(("match", body["seq"], body["hit"]["id"]))
                elif event.event == "leave":
                    assert set(body) == {"seq", "id"}
                    assert event.seq == body["seq"]
                    out.append(("leave", body["seq"], body["id"]))
                else:
                    raise AssertionError(event)
                if until and out[-1][1] >= until[0]:
                    await stream.aclose()  # type: ignore[attr-defined]
                    return out
        raise AssertionError(out)

    # Live: the stream is open before the writes.
    until: list[int] = []
    live_task = asyncio.create_task(collect(None, until))
    await asyncio.sleep(1.0)
    expected = await run_writes(client, name)
    until.append(expected[-1][1])
    assert await live_task == expected
    # Resumed: the same events, from the durable log.
    assert await collect(start, until) == expected


async def test_leave_needs_no_push_of_the_match(client: ShoalClient) -> None:
    """A document that matched before the subscription and is re-upserted out of the filter
    leaves, though this subscriber never saw it match; one that never matched does not."""
    name = unique("leave_prior")
    await client.create_collection(name, dim=DIM)
    await client.upsert(name, [doc("p", NEAR, tag="x"), doc("q", FAR, tag="x")])
    sub = await client.subscribe(name, Q, threshold=0.9)
    await client.upsert(name, [doc("q", FAR, tag="z")])  # never matched: nothing
    s = (await client.upsert(name, [doc("p", FAR, tag="x")])).seq
    assert await take(sub, s) == [("leave", s, "p")]
    await sub.close()


async def test_bad_subscribe_arguments_are_typed_errors(server: ServerProcess) -> None:
    async with httpx.AsyncClient() as http:
        name = unique("leave_bad")
        await http.post(f"{server.url}/v1/collections", json={"name": name, "dim": DIM})
        base = f"{server.url}/v1/collections/{name}/subscribe"
        vec = ",".join(str(x) for x in Q.tolist())
        for params, code in [
            ({"vector": vec}, "bad_request"),  # neither threshold nor k
            ({"vector": vec, "k": "0"}, "bad_request"),
            ({"vector": vec, "k": "101"}, "too_large"),
            ({"vector": vec, "k": "ten"}, "bad_request"),
        ]:
            r = await http.get(base, params=params)
            assert r.status_code in (400, 413), (params, r.text)
            assert json.loads(r.text)["error"]["code"] == code, (params, r.text)
