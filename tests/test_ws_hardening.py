"""No client hurts another through its connection: reply size bounds, re-authentication and
collections dropped under concurrent reads, end to end through real servers.

`hardened` is a server of our own with scoped API keys, two shards per collection (so reads fan
out over shards) and a 1 MiB frame limit (so a reply over the limit is cheap to build).
"""

from __future__ import annotations

import asyncio
import json
import random
import shutil
import uuid
from collections import Counter
from collections.abc import Iterator
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import websockets

from models.config import Limits
from models.errors import TooLarge
from models.records import DocId, Hit, Include, Seq, StoredDoc
from models.reply_size import check_rows_fit
from shoal_client import ShoalClient
from shoal_client.errors import ShoalError
from tests.server_process import ServerProcess, temp_data_dir

pytestmark = pytest.mark.timeout(240)

FRAME_LIMIT = 1024 * 1024
ADMIN = "admin-key"
OTHER_READER = "reads-other-only"
READER = "reads-everything"
KEYS = [
    {"key": ADMIN, "collections": "*", "access": "admin"},
    {"key": OTHER_READER, "collections": ["other"], "access": "read"},
    {"key": READER, "collections": "*", "access": "read"},
]


@pytest.fixture(scope="module")
def hardened() -> Iterator[ServerProcess]:
    data_dir = temp_data_dir("shoal-hard-")
    proc = ServerProcess(
        data_dir,
        env={
            "SHOAL_API_KEYS": json.dumps(KEYS),
            "SHOAL_SHARDS_PER_COLLECTION": "2",
            "SHOAL_MAX_FRAME_BYTES": str(FRAME_LIMIT),
        },
    )
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def headers(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


# -- replies over the frame limit ------------------------------------------------------------------


async def test_a_reply_over_the_frame_limit_answers_too_large(hardened: ServerProcess) -> None:
    name = unique("big")
    text = "t" * 90_000
    async with ShoalClient.connect(hardened.ws_url, ADMIN) as admin:
        await admin.create_collection(name, dim=4)
        for start in range(0, 30, 5):
            docs = [{"id": f"d{i}", "text": text, "vector": [1.0, float(i), 0.0, 0.0]} for i in range(start, start + 5)]
            await admin.upsert(name, docs)
    ids = [f"d{i}" for i in range(30)]
    # A raw client without a size limit of its own: it sees whatever the server sends.
    async with websockets.connect(
        hardened.ws_url,
        subprotocols=[websockets.Subprotocol("shoal.v1")],
        additional_headers=headers(ADMIN),
        max_size=None,
    ) as ws:

        async def call(request_id: int, **request: Any) -> tuple[int, dict[str, Any]]:
            await ws.send(msgpack.packb({"id": request_id, **request}))
            data = await asyncio.wait_for(ws.recv(), 30)
            assert isinstance(data, bytes)
            return len(data), msgpack.unpackb(data)

        size, reply = await call(1, op="get", collection=name, ids=ids, include=["text", "vector"])
        assert size <= FRAME_LIMIT
        assert reply["ok"] is False and reply["error"]["code"] == "too_large", reply
        assert "fewer ids" in reply["error"]["message"] and reply["error"]["max_frame_bytes"] == FRAME_LIMIT
        assert reply["error"]["reply_bytes"] > FRAME_LIMIT
        assert "at least" in reply["error"]["message"], "refused from the rows, before any encoding"
        size, reply = await call(2, op="query", collection=name, vector=[1.0, 0, 0, 0], k=30, include=["text"])
        assert size <= FRAME_LIMIT and reply["error"]["code"] == "too_large"
        # Paged, the same documents come back, and the connection is still fine.
        size, reply = await call(3, op="get", collection=name, ids=ids[:5], include=["text", "vector"])
        assert reply["ok"] is True and [d["id"] for d in reply["docs"]] == ids[:5]
        size, reply = await call(4, op="query", collection=name, vector=[1.0, 0, 0, 0], k=30, include=[])
        assert reply["ok"] is True and len(reply["hits"]) == 30

    async with httpx.AsyncClient(timeout=30.0, headers=headers(ADMIN)) as http:
        url = f"{hardened.url}/v1/collections/{name}/get"
        response = await http.post(url, json={"ids": ids, "include": ["text"]})
        assert response.status_code == 413 and len(response.content) <= FRAME_LIMIT
        assert response.json()["error"]["code"] == "too_large"
        packed = await http.post(
            url,
            content=msgpack.packb({"ids": ids, "include": ["text", "vector"]}),
            headers={"content-type": "application/msgpack"},
        )
        assert packed.status_code == 413 and msgpack.unpackb(packed.content)["error"]["code"] == "too_large"
        response = await http.post(url, json={"ids": ids[:5], "include": ["text"]})
        assert response.status_code == 200 and len(response.json()["docs"]) == 5
        await http.delete(f"{hardened.url}/v1/collections/{name}")


def test_rows_are_measured_only_when_they_could_reach_the_limit() -> None:
    limits = Limits(max_frame_bytes=10_000, max_text_chars=1_000, max_id_chars=10)
    vector = np.zeros(4, dtype=np.float32)
    docs = [StoredDoc(DocId(f"d{i}"), "x" * 900, vector, {}, Seq(i)) for i in range(12)]
    check_rows_fit(docs[:9], frozenset({Include.TEXT}), 4, limits)  # 9 x 1,010 could not exceed
    check_rows_fit(docs, frozenset({Include.METADATA}), 4, limits)  # nothing large asked for
    with pytest.raises(TooLarge, match="at least 10826 bytes"):
        check_rows_fit(docs, frozenset({Include.TEXT}), 4, limits)  # ids of 2-3 characters, 12 x 900 of text
    hits = [Hit(DocId(f"h{i}"), 1.0, 0.0, None, None, vector) for i in range(700)]
    with pytest.raises(TooLarge):
        check_rows_fit(hits, frozenset({Include.VECTOR}), 4, limits)  # 700 x (2 + 16)
    check_rows_fit(hits[:500], frozenset({Include.VECTOR}), 4, limits)


# -- re-authentication -------------------------------------------------------------------------


async def test_reauth_as_a_key_that_may_not_read_ends_the_subscriptions(hardened: ServerProcess) -> None:
    name = unique("reauth")
    async with ShoalClient.connect(hardened.ws_url, ADMIN) as admin:
        await admin.create_collection(name, dim=2)
        async with websockets.connect(
            hardened.ws_url, subprotocols=[websockets.Subprotocol("shoal.v1")], additional_headers=headers(ADMIN)
        ) as ws:
            frames: list[dict[str, Any]] = []

            async def call(request_id: int, **request: Any) -> dict[str, Any]:
                await ws.send(msgpack.packb({"id": request_id, **request}))
                async with asyncio.timeout(20):
                    while True:
                        frame = msgpack.unpackb(await ws.recv())
                        frames.append(frame)
                        if frame.get("id") == request_id:
                            return dict(frame)

            async def pushes(until: Any) -> None:
                async with asyncio.timeout(20):
                    while not until():
                        frames.append(msgpack.unpackb(await ws.recv()))

            sub = (await call(1, op="subscribe", collection=name, vector=[1.0, 0.0], threshold=0.5))["sub"]
            await admin.upsert(name, [{"id": "before", "vector": [1.0, 0.0]}])
            await pushes(lambda: any(f.get("event") == "match" for f in frames))
            # Re-authenticating with a key that may still read the collection keeps it.
            assert (await call(2, op="auth", key=READER))["ok"] is True
            await admin.upsert(name, [{"id": "still", "vector": [1.0, 0.0]}])
            await pushes(lambda: any(f.get("hit", {}).get("id") == "still" for f in frames))
            # A key without access to it ends it: an `ended` push with code forbidden.
            assert (await call(3, op="auth", key=OTHER_READER))["ok"] is True
            await pushes(lambda: any(f.get("event") == "ended" for f in frames))
            ended = next(f for f in frames if f.get("event") == "ended")
            assert ended["sub"] == sub and ended["code"] == "forbidden", ended
            await admin.upsert(name, [{"id": "after", "vector": [1.0, 0.0]}])
            with pytest.raises(TimeoutError):  # nothing more for that subscription
                async with asyncio.timeout(1.0):
                    frames.append(msgpack.unpackb(await ws.recv()))
            assert not [f for f in frames if f.get("hit", {}).get("id") == "after"]
            denied = await call(4, op="subscribe", collection=name, vector=[1.0, 0.0], threshold=0.5)
            assert denied["error"]["code"] == "forbidden"
            assert (await call(5, op="unsubscribe", sub=sub))["error"]["code"] == "not_found"
        await admin.drop_collection(name)


# -- collections dropped under concurrent reads and writes ---------------------------------------


async def race_against_drop(url: str, key: str | None, rounds: int = 12) -> Counter[str]:
    """Queries (text and vector), gets, counts, upserts and listings hammer a collection that is
    dropped and re-created `rounds` times; the answer codes seen."""
    name = unique("race")
    rng = np.random.default_rng(1)
    vectors = rng.normal(size=(64, 384)).astype(np.float32)
    docs = [{"id": f"d{i}", "vector": vectors[i], "text": f"doc {i}"} for i in range(64)]
    codes: Counter[str] = Counter()
    stop = asyncio.Event()
    async with ShoalClient.connect(url, key) as admin, ShoalClient.connect(url, key) as reader:
        await admin.create_collection(name)
        await admin.upsert(name, docs)

        async def dropper() -> None:
            try:
                for _ in range(rounds):
                    await asyncio.sleep(random.uniform(0.05, 0.15))
                    await admin.drop_collection(name)
                    await asyncio.sleep(random.uniform(0.0, 0.02))
                    await admin.create_collection(name)
                    await admin.upsert(name, docs)
            finally:
                stop.set()

        async def hammer(op: str) -> None:
            i = 0
            while not stop.is_set():
                i += 1
                try:
                    if op == "text":
                        await reader.query(name, text=f"doc {i}", k=5)
                    elif op == "vector":
                        await reader.query(name, vector=vectors[i % 64], k=5, include=["vector"])
                    elif op == "get":
                        await reader.get(name, [f"d{j}" for j in range(i % 64)], include=["text"])
                    elif op == "count":
                        await reader.count(name)
                    elif op == "list":
                        await reader.list_collections()
                    else:
                        await reader.upsert(name, [docs[i % 64]])
                    codes[f"{op}:ok"] += 1
                except ShoalError as exc:
                    codes[f"{op}:{exc.code}"] += 1

        async with asyncio.TaskGroup() as tg:
            tg.create_task(dropper())
            for op in ("text", "text", "vector", "get", "get", "count", "count", "list", "upsert"):
                tg.create_task(hammer(op))
        await admin.drop_collection(name)
    return codes


@pytest.mark.parametrize("which", ["one shard", "two shards"])
async def test_reads_racing_a_drop_answer_ok_or_not_found(
    which: str, server: ServerProcess, hardened: ServerProcess
) -> None:
    url, key = (server.ws_url, None) if which == "one shard" else (hardened.ws_url, ADMIN)
    codes = await race_against_drop(url, key)
    print(which, dict(sorted(codes.items())))
    unexpected = {k: v for k, v in codes.items() if not k.endswith((":ok", ":not_found"))}
    assert not unexpected, f"only ok / not_found expected: {dict(codes)}"
    assert sum(v for k, v in codes.items() if k.endswith(":not_found")) > 0, "the race never hit"
    assert all(codes[f"{op}:ok"] > 0 for op in ("text", "vector", "get", "count", "list", "upsert"))


async def test_a_match_too_large_to_push_is_reported_dropped(hardened: ServerProcess) -> None:
    name = unique("bigpush")
    async with ShoalClient.connect(hardened.ws_url, ADMIN) as admin:
        await admin.create_collection(name)  # the embedding model's 384 dimensions
        async with websockets.connect(
            hardened.ws_url,
            subprotocols=[websockets.Subprotocol("shoal.v1")],
            additional_headers=headers(ADMIN),
            max_size=None,
        ) as ws:
            request = {
                "id": 1,
                "op": "subscribe",
                "collection": name,
                "text": "anything",
                "threshold": -1.0,
                "include": ["metadata", "vector"],
            }
            await ws.send(msgpack.packb(request))
            assert msgpack.unpackb(await asyncio.wait_for(ws.recv(), 20))["ok"] is True
            # Its upsert frame fits the limit; its push adds the 1,536-byte vector and does not.
            filler = "m" * (FRAME_LIMIT - 1_000)
            await admin.upsert(name, [{"id": "huge", "text": "x", "metadata": {"blob": filler}}])
            await admin.upsert(name, [{"id": "small", "text": "y", "metadata": {"blob": "z"}}])
            sizes: list[int] = []
            frames: list[dict[str, Any]] = []
            async with asyncio.timeout(20):
                while len(frames) < 2:
                    data = await ws.recv()
                    assert isinstance(data, bytes)
                    sizes.append(len(data))
                    frames.append(msgpack.unpackb(data))
            # Its metadata and vector come to more than a frame: only the encoded reply shows it.
            await ws.send(
                msgpack.packb(
                    {"id": 2, "op": "get", "collection": name, "ids": ["huge"], "include": ["metadata", "vector"]}
                )
            )
            data = await asyncio.wait_for(ws.recv(), 20)
            assert isinstance(data, bytes) and len(data) <= FRAME_LIMIT
            assert msgpack.unpackb(data)["error"]["code"] == "too_large"
        assert max(sizes) <= FRAME_LIMIT
        assert frames[0]["event"] == "lagged" and frames[0]["dropped"] == 1
        assert frames[1]["event"] == "match" and frames[1]["hit"]["id"] == "small"
        got = await admin.get(name, ["huge"], include=["metadata"])  # without the vector it fits
        assert got[0]["metadata"]["blob"] == filler
        await admin.drop_collection(name)
