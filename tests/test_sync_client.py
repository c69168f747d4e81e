"""The blocking wrappers (`shoal_client.sync`) against a real server: WebSocket, HTTP, subscriptions, SSE."""

from __future__ import annotations

import asyncio
import threading
import uuid

import numpy as np
import pytest

from shoal_client import ClientError, ConnectionClosed, Exists, LaggedEvent, MatchEvent, NotFound, Page
from shoal_client.sync import ShoalClient, SyncShoalClient, SyncShoalHTTP
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(120)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def unit(*values: float) -> np.ndarray:
    v = np.asarray(values, np.float32)
    return v / np.linalg.norm(v)


def shoal_threads() -> set[threading.Thread]:
    return {t for t in threading.enumerate() if t.name.startswith("shoal-")}


def test_blocking_round_trip_over_websocket(server: ServerProcess) -> None:
    name = unique("sync")
    assert ShoalClient is SyncShoalClient
    with ShoalClient(server.ws_url) as db:
        db.ping()
        info = db.create_collection(name, dim=3)
        assert (info.dim, info.metric) == (3, "cosine")
        with pytest.raises(Exists):
            db.create_collection(name, dim=3)
        docs = [
            {"id": "x", "vector": unit(1, 0, 0), "text": "x axis", "metadata": {"axis": "x", "n": 1}},
            {"id": "xy", "vector": unit(1, 1, 0), "text": "diagonal", "metadata": {"axis": "xy", "n": 2}},
            {"id": "z", "vector": unit(0, 0, 1), "text": "z axis", "metadata": {"axis": "z", "n": 3}},
        ]
        assert db.upsert(name, docs).count == 3
        hits = db.query(name, vector=unit(1, 0.1, 0), k=3).hits
        assert [h.id for h in hits] == ["x", "xy", "z"]
        assert hits[0].score > hits[1].score > hits[2].score
        assert [h.id for h in db.query(name, vector=unit(1, 0, 0), k=3, where={"n": {"$gte": 2}}).hits] == ["xy", "z"]
        got = db.get(name, ["xy", "missing"], include=["vector", "metadata"])
        assert [d["id"] for d in got] == ["xy"]
        np.testing.assert_allclose(got[0]["vector"], unit(1, 1, 0), rtol=1e-6)
        assert db.count(name) == 3
        assert db.delete(name, ids=["x"]).deleted == 1
        assert db.count(name) == 2
        assert db.request("count", collection=name) == {"count": 2}
        db.drop_collection(name)
        with pytest.raises(NotFound):
            db.query(name, vector=unit(1, 0, 0))
        assert db.in_flight == 0
    assert db.closed and db.connection_closed
    with pytest.raises(ClientError):
        db.count(name)
    db.close()  # idempotent


def test_private_threads_stop_on_close_and_on_failed_connect(server: ServerProcess) -> None:
    before = shoal_threads()
    db = SyncShoalClient(server.ws_url)
    assert len(shoal_threads() - before) == 1
    db.close()
    assert shoal_threads() == before
    # Nothing listens on port 1: the connect fails, and its thread does not stay behind.
    with pytest.raises(ConnectionClosed):
        SyncShoalClient("ws://127.0.0.1:1/v1/ws", open_timeout=5)
    assert shoal_threads() == before


def test_subscription_is_a_blocking_iterator(server: ServerProcess) -> None:
    name = unique("syncsub")
    with SyncShoalClient(server.ws_url) as db, SyncShoalHTTP(server.url) as writer:
        db.create_collection(name, dim=3)
        with db.subscribe(name, vector=unit(1, 0, 0), threshold=0.9, include=["metadata"]) as sub:
            assert sub.collection == name and sub.pending == 0
            with pytest.raises(TimeoutError):
                sub.next_event(timeout=0.3)  # nothing upserted yet; the subscription stays usable
            writer.upsert(
                name,
                [
                    {"id": "far", "vector": unit(0, 1, 0), "metadata": {"k": "far"}},
                    {"id": "near", "vector": unit(1, 0.05, 0), "metadata": {"k": "near"}},
                ],
            )
            event = next(sub)
            assert isinstance(event, MatchEvent) and not isinstance(event, LaggedEvent)
            assert event.hit.id == "near" and event.hit.metadata == {"k": "near"}
            assert event.hit.score >= 0.9
            writer.upsert(name, [{"id": "near2", "vector": unit(1, 0, 0.01)}])
            assert sub.next_event(timeout=10).hit.id == "near2"  # type: ignore[union-attr]
        assert list(sub) == []  # closed: iteration ends at once
        sub.close()  # idempotent
        db.drop_collection(name)


async def test_works_inside_a_running_event_loop(server: ServerProcess) -> None:
    # As in a Jupyter cell: an event loop runs in this thread, and blocking calls still work
    # because the client's loop is its own.
    asyncio.get_running_loop()
    name = unique("syncloop")
    with SyncShoalClient(server.url) as db:  # an http:// URL is turned into the ws:// endpoint
        db.create_collection(name, dim=2)
        db.upsert(name, [{"id": "a", "vector": [1.0, 0.0]}])
        assert [h.id for h in db.query(name, vector=[1.0, 0.0], k=1).hits] == ["a"]
        # The async escape hatch: the coroutine runs on the private loop, awaited from this one.
        assert await db.arun(lambda c: c.count(name)) == 1
        db.drop_collection(name)


def test_interrupted_call_raises_timeout_and_client_stays_usable(server: ServerProcess) -> None:
    with SyncShoalClient(server.ws_url) as db:

        async def slow(_: object) -> None:
            await asyncio.sleep(30)

        with pytest.raises(TimeoutError):
            db.run(slow, timeout=0.2)
        db.ping()


def test_http_wrapper_and_change_feed(server: ServerProcess) -> None:
    name = unique("synchttp")
    with SyncShoalHTTP(server.url, use_msgpack=True) as db:
        assert db.ready()
        db.create_collection(name, dim=2, metric="l2")
        db.upsert(name, [{"id": "a", "vector": [0.0, 0.0]}, {"id": "b", "vector": [3.0, 4.0]}])
        hits = db.query(name, vector=[0.0, 0.0], k=2).hits
        assert [h.id for h in hits] == ["a", "b"] and hits[1].distance == pytest.approx(5.0)
        with db.changes_sse(name, last_event_id=0) as feed:
            first = next(feed)
            assert first.event == "upsert" and first.seq is not None and first.seq >= 1
        # A standing query resumed from seq 0 replays the matches already written, then blocks.
        with db.subscribe_sse(name, vector=[0.0, 0.0], threshold=-1.0, last_event_id=0) as matches:
            match = next(matches)
            assert match.event == "match" and match.data["hit"]["id"] == "a"
        with pytest.raises(NotFound):
            db.count(unique("missing"))
        db.drop_collection(name)


@pytest.mark.parametrize("transport", ["ws", "http"])
def test_blocking_paging_and_scan(server: ServerProcess, transport: str) -> None:
    name = unique("syncpage")
    client = SyncShoalClient(server.ws_url) if transport == "ws" else SyncShoalHTTP(server.url)
    with client as db:
        db.create_collection(name, dim=2)
        ids = [f"p{i:02d}" for i in range(25)]
        docs = [{"id": i, "vector": unit(1.0, n), "metadata": {"odd": n % 2 == 1}} for n, i in enumerate(ids)]
        db.upsert(name, docs[::-1])  # written out of order: id order is the server's doing
        seen, cursor, pages = [], None, 0
        while True:
            page = db.get_page(name, limit=10, cursor=cursor)
            assert isinstance(page, Page)  # the async client's type, not a look-alike
            seen += [d["id"] for d in page.docs]
            pages += 1
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
        assert seen == ids and pages == 3
        odd = db.get_page(name, where={"odd": True}, limit=100)
        assert [d["id"] for d in odd.docs] == ids[1::2] and odd.next_cursor is None
        with db.scan(name, page=7) as scanned:
            assert [d["id"] for p in scanned for d in p.docs] == ids
        with db.scan(name, page=5, where={"odd": True}) as scanned:  # the filter goes with every page
            assert [len(p.docs) for p in scanned] == [5, 5, 2]
        scanned = db.scan(name, page=4, where={"odd": False})
        first = next(scanned)
        scanned.close()  # stopped early: the pages not read are never fetched
        assert [d["id"] for d in first.docs] == ids[0:8:2]
