"""Paged `get` through a real server: every live document once, in id order, over WebSocket
and HTTP, with filters, with writes between pages, and bad cursors refused."""

from __future__ import annotations

import base64
import random
import shutil
import uuid
from typing import Any

import httpx
import numpy as np
import pytest

from shoal_client import ShoalClient, ShoalHTTP
from shoal_client.errors import BadRequest, TooLarge
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(180)
DIM = 4


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def docs_for(ids: list[str]) -> list[dict[str, Any]]:
    rng = np.random.default_rng(7)
    return [
        {"id": i, "vector": rng.normal(size=DIM).astype(np.float32), "metadata": {"n": n, "even": n % 2 == 0}}
        for n, i in enumerate(ids)
    ]


async def scan_ids(client: ShoalClient | ShoalHTTP, name: str, **kwargs: object) -> list[str]:
    seen: list[str] = []
    async for page in client.scan(name, **kwargs):  # type: ignore[arg-type]
        seen.extend(d["id"] for d in page.docs)
    return seen


async def test_pages_visit_every_document_once_in_id_order(client: ShoalClient) -> None:
    name = unique("page")
    await client.create_collection(name, dim=DIM)
    ids = [f"doc-{n:04d}" for n in range(250)] + ["é-accent", "Z", "a", "ß"]
    random.Random(3).shuffle(ids)
    await client.upsert(name, docs_for(ids))
    seen = await scan_ids(client, name, page=40)
    assert seen == sorted(ids)
    first = await client.get_page(name, limit=40)
    assert len(first.docs) == 40 and first.next_cursor is not None
    assert set(first.docs[0]) == {"id", "text", "metadata"} or set(first.docs[0]) == {"id", "metadata"}
    # The last page: exactly the rest, and no cursor after it.
    everything = await client.get_page(name, limit=len(ids))
    assert [d["id"] for d in everything.docs] == sorted(ids) and everything.next_cursor is None
    # Default page size is 100.
    assert len((await client.get_page(name)).docs) == 100


async def test_vectors_and_filters_in_pages(client: ShoalClient) -> None:
    name = unique("pagef")
    await client.create_collection(name, dim=DIM)
    ids = [f"d{n:03d}" for n in range(120)]
    docs = docs_for(ids)
    await client.upsert(name, docs)
    even = await scan_ids(client, name, page=7, where={"even": True})
    assert even == [i for n, i in enumerate(ids) if n % 2 == 0]
    big = await scan_ids(client, name, page=9, where={"n": {"$gte": 100}})
    assert big == ids[100:]
    assert await scan_ids(client, name, where={"n": {"$gt": 1000}}) == []
    page = await client.get_page(name, limit=3, include=["vector", "metadata"])
    for doc, sent in zip(page.docs, docs[:3], strict=True):
        assert doc["id"] == sent["id"] and doc["metadata"] == sent["metadata"]
        assert np.array_equal(doc["vector"], sent["vector"])


async def test_writes_between_pages_never_repeat_or_lose_a_steady_document(client: ShoalClient) -> None:
    name = unique("pagew")
    await client.create_collection(name, dim=DIM)
    ids = [f"k{n:03d}" for n in range(200)]
    await client.upsert(name, docs_for(ids))
    seen: list[str] = []
    deleted: set[str] = set()
    added: set[str] = set()
    rng = random.Random(11)
    round_ = 0
    async for page in client.scan(name, page=15):
        seen.extend(d["id"] for d in page.docs)
        round_ += 1
        # Delete some ids not yet visited and some visited; replace some; add new ones both
        # before and after the cursor.
        live = [i for i in ids if i not in deleted]
        victims = rng.sample(live, 3)
        deleted.update(victims)
        await client.delete(name, ids=victims)
        await client.upsert(name, docs_for(rng.sample([i for i in ids if i not in deleted], 4)))
        fresh = [f"k{rng.randrange(200):03d}x{round_}", f"a-new-{round_}", f"zz-new-{round_}"]
        added.update(fresh)
        await client.upsert(name, docs_for(fresh))
    assert len(seen) == len(set(seen)), "a document was visited twice"
    assert seen == sorted(seen)
    steady = set(ids) - deleted
    assert steady <= set(seen), "a document live for the whole scan was missed"
    assert set(seen) <= set(ids) | added


async def test_paging_over_http(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("pageh")
    await client.create_collection(name, dim=DIM)
    ids = [f"h{n:02d}" for n in range(30)]
    await client.upsert(name, docs_for(ids))
    async with ShoalHTTP(server.url) as http:
        assert await scan_ids(http, name, page=8, where={"even": False}) == ids[1::2]
    async with httpx.AsyncClient(base_url=server.url) as raw:
        reply = await raw.post(f"/v1/collections/{name}/get", json={"limit": 25, "include": ["vector"]})
        body = reply.json()
        assert reply.status_code == 200 and len(body["docs"]) == 25 and isinstance(body["docs"][0]["vector"], list)
        last = await raw.post(f"/v1/collections/{name}/get", json={"cursor": body["next_cursor"]})
        assert [d["id"] for d in last.json()["docs"]] == ids[25:] and last.json()["next_cursor"] is None


async def test_bad_paging_arguments_are_refused(client: ShoalClient) -> None:
    name = unique("pageb")
    await client.create_collection(name, dim=DIM)
    await client.upsert(name, docs_for(["a", "b"]))
    forged = base64.urlsafe_b64encode(b"\x09abc").decode().rstrip("=")
    for cursor in ["not base64 !", forged, "", "AQ"]:
        with pytest.raises(BadRequest):
            await client.get_page(name, cursor=cursor)
    with pytest.raises(BadRequest):
        await client.get_page(name, limit=0)
    with pytest.raises(TooLarge):
        await client.get_page(name, limit=10_001)
    with pytest.raises(BadRequest):
        await client.request("get", collection=name, ids=["a"], cursor="AWE")
    with pytest.raises(BadRequest):
        await client.request("get", collection=name, limit="3")
    # A cursor naming an id that never existed is still a position in id order.
    cursor = base64.urlsafe_b64encode(b"\x01a").decode().rstrip("=")
    assert [d["id"] for d in (await client.get_page(name, cursor=cursor)).docs] == ["b"]
    # The ids form is unchanged.
    assert [d["id"] for d in await client.get(name, ["b", "zz", "a"])] == ["b", "a"]


async def test_a_page_is_cut_to_fit_the_frame_limit() -> None:
    data_dir = temp_data_dir()
    # A small frame limit (256 KiB): 20 documents of 20,000 characters do not fit in one page.
    proc = ServerProcess(data_dir, env={"SHOAL_MAX_FRAME_BYTES": str(256 * 1024), "SHOAL_SHARDS_PER_COLLECTION": "3"})
    proc.start()
    try:
        async with ShoalClient.connect(proc.ws_url) as c:
            await c.create_collection("big", dim=DIM)
            ids = [f"b{n:02d}" for n in range(20)]
            docs = docs_for(ids)
            for d in docs:
                d["text"] = "x" * 10_000
            for half in (docs[:10], docs[10:]):
                await c.upsert("big", half)
            sizes: list[int] = []
            seen: list[str] = []
            async for page in c.scan("big", page=20):
                sizes.append(len(page.docs))
                seen.extend(d["id"] for d in page.docs)
            assert seen == ids and len(sizes) > 1 and max(sizes) < 20
            # Three shards merge into one id order too.
            small = [f"s{n:03d}" for n in range(100)]
            await c.upsert("big", docs_for(small))
            assert await scan_ids(c, "big", page=7, where={"n": {"$lt": 50}}) == sorted(ids + small[:50])
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)
