"""Top-k subscriptions end to end: every `topk` push equals an exact numpy search over the
collection's state at the push's seq, under random upserts, re-upserts and deletes.

The randomized run is bounded (`SHOAL_LIVE_SECONDS`, default 30 s); `SHOAL_SOAK=1` makes it the
10-minute soak (as `SHOAL_FUZZ_FRAMES` does for tests/test_fuzz_live.py)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import httpx
import msgpack
import numpy as np
import pytest
import websockets

from shoal_client import ShoalClient
from shoal_client.errors import Overloaded, TooLarge
from shoal_client.sse import subscribe_sse
from shoal_client.types import LaggedEvent, TopkEvent
from tests.server_process import ServerProcess, temp_data_dir

SOAK = os.environ.get("SHOAL_SOAK") == "1"
SECONDS = float(os.environ.get("SHOAL_LIVE_SECONDS", "600" if SOAK else "30"))
pytestmark = pytest.mark.timeout(int(SECONDS) + 240)

DIM = 16
TIE = 1e-5  # scores closer than this may come in either order


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def unit(v: np.ndarray) -> np.ndarray:
    out: np.ndarray = (v / np.linalg.norm(v)).astype(np.float32)
    return out


@dataclass(frozen=True)
class Doc:
    vector: np.ndarray
    g: int
    text: str


State = dict[str, Doc]


@dataclass
class Spec:
    vector: np.ndarray
    k: int
    threshold: float | None = None
    where: dict[str, Any] | None = None
    where_text: dict[str, Any] | None = None

    def passes(self, d: Doc) -> bool:
        if self.where is not None and not d.g < self.where["g"]["$lt"]:
            return False
        return not (self.where_text is not None and self.where_text["$contains"] not in d.text)

    def exact(self, state: State) -> list[tuple[str, float]]:
        """What a query answers: the k best by cosine among the passing documents, cut at the threshold."""
        ids = [i for i, d in state.items() if self.passes(d)]
        if not ids:
            return []
        m = np.stack([state[i].vector for i in ids])
        scores = (m @ self.vector) / (np.linalg.norm(m, axis=1) * np.linalg.norm(self.vector))
        order = np.argsort(-scores, kind="stable")[: self.k]
        out = [(ids[j], float(scores[j])) for j in order]
        if self.threshold is not None:
            out = [(i, s) for i, s in out if s >= self.threshold]
        return out


def same_list(got: list[tuple[str, float]], want: list[tuple[str, float]]) -> str | None:
    """None when `got` is `want` (ids in order; near-equal scores may swap), else why not."""
    if len(got) != len(want):
        return f"{len(got)} hits, want {len(want)}"
    for (gi, gs), (wi, ws) in zip(got, want, strict=True):
        if abs(gs - ws) > 1e-4:
            return f"score {gi}={gs} vs {wi}={ws}"
    if [i for i, _ in got] != [i for i, _ in want]:
        # Only ties may reorder: the same ids within each group of equal scores.
        for (gi, gs), (wi, _) in zip(got, want, strict=True):
            if gi != wi and not any(abs(gs - s) <= TIE and i == gi for i, s in want):
                return f"ids {[i for i, _ in got]} vs {[i for i, _ in want]}"
        if sorted(i for i, _ in got) != sorted(i for i, _ in want):
            return "different ids"
    return None


@dataclass
class Recorder:
    """The pushes of one top-k subscription, as (seq, [(id, score)])."""

    spec: Spec
    pushes: list[tuple[int, list[tuple[str, float]]]] = field(default_factory=list)
    lagged: int = 0

    async def follow(self, sub: Any) -> None:
        async for event in sub:
            if isinstance(event, LaggedEvent):
                self.lagged += 1
                continue
            assert isinstance(event, TopkEvent), event
            self.pushes.append((event.seq, [(h.id, h.score) for h in event.hits]))


class World:
    """The writer's view of the collection: its state after each acked change."""

    def __init__(self, rng: np.random.Generator) -> None:
        self.rng = rng
        self.state: State = {}
        self.states: dict[int, State] = {}
        self.changed: dict[int, set[str]] = {}  # seq -> ids the op ending at it changed
        self.n = 0

    def new_doc(self, near: np.ndarray | None = None) -> Doc:
        base = self.rng.normal(size=DIM).astype(np.float32)
        if near is not None:
            base = near + 0.3 * base / np.sqrt(DIM)
        return Doc(unit(base), int(self.rng.integers(0, 4)), str(self.rng.choice(["red fox", "blue jay", ""])))

    def record(self, seq: int, ids: set[str]) -> None:
        self.states[seq] = dict(self.state)
        self.changed[seq] = ids


# The collection stays below the server's exact-search bound (SHOAL_EXACT_MAX_ROWS, 4,096), so
# a query, and so each refill, is answered exactly: "what a query answers at that seq" is then
# the exact top k this test computes. Past it, refills have the index's recall (a long run grew
# to that and a k=1 refill picked the runner-up by 0.004).
LIVE_DOCS_CAP = 3_000


def wire(doc_id: str, d: Doc) -> dict[str, Any]:
    out: dict[str, Any] = {"id": doc_id, "vector": d.vector.tolist(), "metadata": {"g": d.g}}
    if d.text:
        out["text"] = d.text
    return out


async def write_randomly(client: ShoalClient, name: str, world: World, specs: list[Spec], seconds: float) -> None:
    rng = world.rng
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        roll = rng.random()
        ids = list(world.state)
        if (roll < 0.35 and len(ids) < LIVE_DOCS_CAP) or len(ids) < 60:  # new documents, some near a query
            docs = {}
            for _ in range(int(rng.integers(1, 6))):
                near = specs[int(rng.integers(0, len(specs)))].vector if rng.random() < 0.5 else None
                docs[f"n{world.n}"] = world.new_doc(near)
                world.n += 1
            seq = (await client.upsert(name, [wire(i, d) for i, d in docs.items()])).seq
            world.state.update(docs)
            world.record(seq, set(docs))
        elif roll < 0.65:  # re-upserts, often of a current member of some list
            chosen: set[str] = set()
            for _ in range(int(rng.integers(1, 4))):
                spec = specs[int(rng.integers(0, len(specs)))]
                members = [i for i, _ in spec.exact(world.state)]
                chosen.add(str(rng.choice(members)) if members and rng.random() < 0.7 else str(rng.choice(ids)))
            docs = {}
            for i in chosen:
                old = world.state[i]
                if rng.random() < 0.5:  # moved
                    docs[i] = world.new_doc(None if rng.random() < 0.5 else old.vector)
                else:  # same vector, other metadata / text (in or out of the filters)
                    docs[i] = Doc(old.vector, int(rng.integers(0, 4)), str(rng.choice(["red fox", "blue jay", ""])))
            seq = (await client.upsert(name, [wire(i, d) for i, d in docs.items()])).seq
            world.state.update(docs)
            world.record(seq, set(docs))
        elif roll < 0.95:  # deletes by id, often of members
            chosen = set()
            for _ in range(int(rng.integers(1, 4))):
                spec = specs[int(rng.integers(0, len(specs)))]
                members = [i for i, _ in spec.exact(world.state)]
                chosen.add(str(rng.choice(members)) if members and rng.random() < 0.7 else str(rng.choice(ids)))
            result = await client.delete(name, ids=sorted(chosen))
            for i in chosen:
                world.state.pop(i, None)
            world.record(result.seq, chosen)
        else:  # delete by filter: a group of text
            gone = {i for i, d in world.state.items() if d.g == 3 and d.text == "blue jay"}
            if not gone:
                continue
            reply = await client.request(
                "delete", collection=name, where={"g": 3}, where_text={"$contains": "blue jay"}
            )
            assert reply["deleted"] == len(gone)
            for i in gone:
                del world.state[i]
            world.record(reply["seq"], gone)


def check(recorder: Recorder, world: World, start_seq: int, final_seq: int) -> None:
    spec = recorder.spec
    pushes = recorder.pushes
    assert pushes, "no topk push at all"
    assert pushes[0][0] >= start_seq
    seqs = [s for s, _ in pushes]
    assert seqs == sorted(seqs), f"pushes out of seq order: {seqs}"
    boundaries = sorted(world.states)
    previous: tuple[int, list[tuple[str, float]]] | None = None
    for seq, hits in pushes:
        assert seq in world.states or seq == start_seq, f"push at seq {seq}, which no acked change ends at"
        state = world.states.get(seq)
        if state is None:  # the first list, as of the subscription's start
            state = world.states[max(b for b in boundaries if b <= seq)]
        why = same_list(hits, spec.exact(state))
        assert why is None, f"k={spec.k} push at seq {seq}: {why}"
        if previous is not None:
            # A push only when the list or its order changed, or a member was re-upserted.
            prev_seq, prev_hits = previous
            touched = set().union(*(world.changed.get(s, set()) for s in range(prev_seq + 1, seq + 1)))
            same_ids = [i for i, _ in hits] == [i for i, _ in prev_hits]
            assert not same_ids or touched & {i for i, _ in hits}, f"k={spec.k}: push at {seq} changed nothing"
        previous = (seq, hits)
    _, last_hits = pushes[-1]
    assert same_list(last_hits, spec.exact(world.states[final_seq])) is None, "the last list is not the final state"


async def test_topk_pushes_equal_exact_search_under_random_changes(client: ShoalClient) -> None:
    name = unique("topk")
    await client.create_collection(name, dim=DIM)
    rng = np.random.default_rng(int(os.environ.get("SHOAL_LIVE_SEED", "13")))
    world = World(rng)
    docs = {f"p{i}": world.new_doc() for i in range(150)}
    seq = (await client.upsert(name, [wire(i, d) for i, d in docs.items()])).seq
    world.state.update(docs)
    world.record(seq, set(docs))
    specs = [
        Spec(unit(rng.normal(size=DIM)), 1),
        Spec(unit(rng.normal(size=DIM)), 5),
        Spec(unit(rng.normal(size=DIM)), 10, where={"g": {"$lt": 2}}),
        Spec(unit(rng.normal(size=DIM)), 20, threshold=0.3),
        Spec(unit(rng.normal(size=DIM)), 3, where_text={"$contains": "red"}),
        Spec(unit(rng.normal(size=DIM)), 100),
    ]
    recorders = [Recorder(s) for s in specs]
    tasks = []
    for spec, recorder in zip(specs, recorders, strict=True):
        sub = await client.subscribe(
            name, spec.vector, k=spec.k, threshold=spec.threshold, where=spec.where, where_text=spec.where_text
        )
        tasks.append(asyncio.create_task(recorder.follow(sub)))
    start = seq
    await write_randomly(client, name, world, specs, SECONDS)
    final = max(world.states)
    # Quiet now: every list settles on the final state.
    async with asyncio.timeout(30):
        while not all((r.pushes and r.pushes[-1][0] >= final) or _settled(r, world, final) for r in recorders):
            await asyncio.sleep(0.2)
    await asyncio.sleep(0.5)
    for task in tasks:
        task.cancel()
    for recorder in recorders:
        check(recorder, world, start, final)
    pushes = sum(len(r.pushes) for r in recorders)
    print(f"{len(world.states)} changes, {pushes} topk pushes, lagged {sum(r.lagged for r in recorders)}")


def _settled(recorder: Recorder, world: World, final: int) -> bool:
    """The last push already equals the final state (later changes did not alter the list)."""
    if not recorder.pushes:
        return False
    return same_list(recorder.pushes[-1][1], recorder.spec.exact(world.states[final])) is None


async def test_topk_pushes_only_when_the_list_changes(client: ShoalClient) -> None:
    name = unique("topk_quiet")
    await client.create_collection(name, dim=4)
    q = [1.0, 0.0, 0.0, 0.0]
    await client.upsert(
        name,
        [{"id": f"m{i}", "vector": [1.0, 0.1 * (i + 1), 0.0, 0.0]} for i in range(3)]
        + [{"id": "low", "vector": [0.0, 1.0, 0.0, 0.0]}],
    )
    sub = await client.subscribe(name, q, k=3, include=["metadata"])
    events = sub.__aiter__()
    first = await asyncio.wait_for(events.__anext__(), 10)
    assert isinstance(first, TopkEvent)
    assert [h.id for h in first.hits] == ["m0", "m1", "m2"]
    # Documents that do not reach the k-th score, and changes to a non-member: no push.
    await client.upsert(name, [{"id": "far", "vector": [0.0, 0.0, 1.0, 0.0]}])
    await client.upsert(name, [{"id": "low", "vector": [0.0, 1.0, 0.1, 0.0]}])
    await client.delete(name, ids=["far"])
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(events.__anext__(), 1.5)
    # A better document enters at the top; the old k-th member drops out.
    s = (await client.upsert(name, [{"id": "best", "vector": [1.0, 0.0, 0.0, 0.0], "metadata": {"a": 1}}])).seq
    pushed = await asyncio.wait_for(events.__anext__(), 10)
    assert isinstance(pushed, TopkEvent) and pushed.seq == s
    assert [h.id for h in pushed.hits] == ["best", "m0", "m1"]
    assert pushed.hits[0].metadata == {"a": 1} and pushed.hits[0].score == pytest.approx(1.0)
    # A member deleted: the list is refilled from the index (m2 comes back).
    s = (await client.delete(name, ids=["m0"])).seq
    pushed = await asyncio.wait_for(events.__anext__(), 10)
    assert isinstance(pushed, TopkEvent) and pushed.seq == s
    assert [h.id for h in pushed.hits] == ["best", "m1", "m2"]
    # A member re-upserted to the same place with other metadata: a push (its content changed).
    s = (await client.upsert(name, [{"id": "m1", "vector": [1.0, 0.2, 0.0, 0.0], "metadata": {"b": 2}}])).seq
    pushed = await asyncio.wait_for(events.__anext__(), 10)
    assert isinstance(pushed, TopkEvent) and pushed.seq == s
    assert [h.id for h in pushed.hits] == ["best", "m1", "m2"] and pushed.hits[1].metadata == {"b": 2}
    # Resume: any after_seq gets the current list first.
    again = await client.subscribe(name, q, k=3, after_seq=1)
    current = await asyncio.wait_for(again.__aiter__().__anext__(), 10)
    assert isinstance(current, TopkEvent) and [h.id for h in current.hits] == ["best", "m1", "m2"]
    assert current.seq >= s
    await again.close()
    await sub.close()


async def test_topk_over_sse_and_resume(server: ServerProcess, client: ShoalClient) -> None:
    name = unique("topk_sse")
    await client.create_collection(name, dim=4)
    s = (
        await client.upsert(
            name, [{"id": "a", "vector": [1.0, 0.5, 0.0, 0.0]}, {"id": "b", "vector": [0.0, 1.0, 0, 0]}]
        )
    ).seq
    stream = subscribe_sse(server.url, name, vector=[1.0, 0.0, 0.0, 0.0], k=2)
    async with asyncio.timeout(20):
        first = await stream.__anext__()
        assert first.event == "topk" and first.seq == s and first.data["seq"] == s
        assert [h["id"] for h in first.data["hits"]] == ["a", "b"]
        s2 = (await client.upsert(name, [{"id": "c", "vector": [1.0, 0.0, 0.0, 0.0], "text": "hello"}])).seq
        second = await stream.__anext__()
        assert second.event == "topk" and second.seq == s2
        assert [h["id"] for h in second.data["hits"]] == ["c", "a"] and second.data["hits"][0]["text"] == "hello"
        await stream.aclose()  # type: ignore[attr-defined]
        resumed = subscribe_sse(server.url, name, vector=[1.0, 0.0, 0.0, 0.0], k=2, last_event_id=s)
        current = await resumed.__anext__()
        assert current.event == "topk" and current.seq == s2 and [h["id"] for h in current.data["hits"]] == ["c", "a"]
        await resumed.aclose()  # type: ignore[attr-defined]


async def test_topk_argument_errors(client: ShoalClient) -> None:
    name = unique("topk_bad")
    await client.create_collection(name, dim=4)
    with pytest.raises(TooLarge):
        await client.subscribe(name, [1.0, 0, 0, 0], k=101)
    from shoal_client.errors import BadRequest

    with pytest.raises(BadRequest):
        await client.subscribe(name, [1.0, 0, 0, 0], k=0)
    with pytest.raises(BadRequest):
        await client.request("subscribe", collection=name, vector=[1.0, 0, 0, 0], k="3")


# --- limits and slow readers, on a server of our own -------------------------------------------

PAYLOAD = "x" * 16_000


@pytest.fixture(scope="module")
def small() -> Iterator[ServerProcess]:
    data_dir = temp_data_dir("shoal-topk-")
    proc = ServerProcess(data_dir, env={"SHOAL_MAX_TOPK_SUBSCRIPTIONS": "4", "SHOAL_MAX_TOPK_PER_CONNECTION": "3"})
    proc.start()
    try:
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_topk_limits_per_connection_and_server(small: ServerProcess) -> None:
    name = unique("topk_lim")
    async with ShoalClient.connect(small.ws_url) as a, ShoalClient.connect(small.ws_url) as b:
        await a.create_collection(name, dim=2)
        subs = [await a.subscribe(name, [1.0, 0.0], k=2) for _ in range(3)]
        with pytest.raises(TooLarge):
            await a.subscribe(name, [1.0, 0.0], k=2)
        # Threshold subscriptions are not top-k ones: still allowed on that connection.
        plain = await a.subscribe(name, [1.0, 0.0], threshold=0.5)
        subs.append(await b.subscribe(name, [1.0, 0.0], k=2))
        with pytest.raises(Overloaded):
            await b.subscribe(name, [1.0, 0.0], k=2)
        await subs[0].close()
        await asyncio.sleep(0.2)
        subs[0] = await b.subscribe(name, [1.0, 0.0], k=2)  # room again
        for sub in [*subs, plain]:
            await sub.close()


async def test_slow_topk_reader_gets_lagged_then_the_newest_list(small: ServerProcess) -> None:
    name = unique("topk_slow")
    async with ShoalClient.connect(small.ws_url) as c:
        await c.create_collection(name, dim=2)
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        host, port = small.url.split("//")[1].rsplit(":", 1)
        sock.connect((host, int(port)))
        async with websockets.connect(
            small.ws_url, sock=sock, subprotocols=[websockets.Subprotocol("shoal.v1")], max_queue=1
        ) as slow:
            request = {
                "id": 1,
                "op": "subscribe",
                "collection": name,
                "vector": [1.0, 0.0],
                "k": 5,
                "include": ["text"],
            }
            await slow.send(msgpack.packb(request))
            reply = msgpack.unpackb(await slow.recv())
            assert reply["ok"] is True
            # Every upsert beats the whole list (each is closer to the query than the last).
            last_id = ""
            async with httpx.AsyncClient() as http:
                for i in range(400):
                    last_id = f"d{i}"
                    await c.upsert(name, [{"id": last_id, "vector": [1.0, 1.0 / (i + 1)], "text": PAYLOAD}])
                    if i % 20 == 19:
                        text = (await http.get(f"{small.url}/metrics")).text
                        dropped = [ln for ln in text.splitlines() if ln.startswith("shoal_subscription_dropped_total ")]
                        if dropped and float(dropped[0].split()[1]) > 0:
                            break
            assert float(dropped[0].split()[1]) > 0, "the reader never fell behind"
            # The reader catches up: some lists, a lagged where lists were skipped, the newest last.
            frames: list[dict[str, Any]] = []
            async with asyncio.timeout(60):
                while True:
                    frame = msgpack.unpackb(await slow.recv())
                    frames.append(frame)
                    if frame["event"] == "topk" and frame["hits"] and frame["hits"][0]["id"] == last_id:
                        break
            with contextlib.suppress(TimeoutError):
                extra = await asyncio.wait_for(slow.recv(), 0.5)
                raise AssertionError(f"a push after the newest list: {msgpack.unpackb(extra)}")
    kinds = [f["event"] for f in frames]
    assert "lagged" in kinds and kinds[-1] == "topk"
    assert kinds[kinds.index("lagged") + 1] == "topk", "a lagged push is followed by the newest list"
    seqs = [f["seq"] for f in frames if f["event"] == "topk"]
    assert seqs == sorted(seqs) and len(seqs) < i + 2, "old lists were coalesced, not queued"
    assert [h["id"] for h in frames[-1]["hits"]] == [f"d{j}" for j in range(i, i - 5, -1)]
