"""Broker sources end to end: a real `shoal serve --source redis://...` consuming real
`redis-server`s (tests/redis_server.py) over a test-owned PostgreSQL, whose change log the
tests read directly to count what was applied.

One server for the module consumes three sources: `main` (default collection `vec`), `flaky`
on a second Redis that the restart test kills and starts again, and `nowhere` on a port where
nothing listens (with a password in its URL, which must never show). The SIGKILL test runs
servers of its own, the database-outage test its own PostgreSQL too.

`SHOAL_SOURCE_BURST` sets the burst test's size (default 20,000; the soak: 100000).
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import signal
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import anyio
import httpx
import numpy as np
import pytest

from actors.pg_server import _restart
from shoal_client import ShoalClient
from tests.redis_server import RedisServer, free_port
from tests.server_process import ServerProcess, temp_data_dir
from tests.source_helpers import (
    OwnDatabase,
    by_entry,
    committed_position,
    group_info,
    kill_postmaster,
    log_figures,
    remove_tree,
    rss_kib,
    shoal,
    source,
    sources,
    vector_doc,
    wait_for,
    xadd_all,
)

BURST = int(os.environ.get("SHOAL_SOURCE_BURST", "20000"))
pytestmark = pytest.mark.timeout(240 + BURST // 200)
DIM = 8
B64_VECTOR = np.arange(1, DIM + 1, dtype="<f4") / 4


@dataclass
class Rig:
    db: OwnDatabase
    dsn: str
    main: RedisServer
    flaky: RedisServer
    proc: ServerProcess
    http: httpx.AsyncClient
    ws: ShoalClient


@pytest.fixture(scope="module")
async def rig() -> AsyncIterator[Rig]:
    db = OwnDatabase()
    await db.start()
    main = RedisServer(appendonly=True)
    flaky = RedisServer(appendonly=True)
    main.start()
    flaky.start()
    dsn = await db.create("module")
    nowhere = f"redis://user:hunter2@127.0.0.1:{free_port()}/0?stream=nowhere"
    data_dir = temp_data_dir("shoal-test-src-")
    proc = shoal(data_dir, dsn, [main.url("main", collection="vec"), flaky.url("flaky", collection="flaky"), nowhere])
    try:
        proc.start()
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as http, ShoalClient.connect(proc.ws_url) as ws:
            await ws.create_collection("vec", dim=DIM, metric="cosine")
            await ws.create_collection("text")  # the model's width: documents with text only
            await ws.create_collection("flaky", dim=DIM, metric="l2")
            await ws.create_collection("burst", dim=DIM, metric="l2")
            yield Rig(db, dsn, main, flaky, proc, http, ws)
    finally:
        if proc.proc is not None:
            code = proc.stop()
            log = proc.log_tail(200)
            assert code in (0, -signal.SIGTERM), log
            assert "hunter2" not in (data_dir / "server.log").read_text()
        remove_tree(data_dir)
        main.stop()
        flaky.stop()
        await db.stop()


def text_doc(doc_id: str, text: str) -> str:
    return json.dumps({"id": doc_id, "text": text})


async def test_upserts_deletes_and_rejections_with_their_codes(rig: Rig) -> None:
    r = rig.main.client()
    too_long = json.dumps({"id": "long", "text": "x" * 2001})
    entries: list[tuple[dict[str, str], str, str | None]] = [  # fields, status, code
        ({"doc": vector_doc("v1", 1, DIM)}, "indexed", None),
        ({"doc": vector_doc("v2", 2, DIM)}, "indexed", None),
        ({"collection": "text", "doc": text_doc("t1", "a heron stands in the reeds")}, "indexed", None),
        ({"collection": "text", "doc": text_doc("t2", "stock markets fell sharply")}, "indexed", None),
        ({"op": "delete", "id": "v2"}, "indexed", None),
        ({"doc": "{not json"}, "rejected", "bad_request"),
        ({"collection": "missing", "doc": vector_doc("m1", 1, DIM)}, "rejected", "not_found"),
        ({"doc": json.dumps({"id": "short", "vector": [1.0, 2.0]})}, "rejected", "dimension_mismatch"),
        ({"doc": json.dumps({"id": "zero", "vector": [0.0] * DIM})}, "rejected", "invalid_vector"),
        ({"collection": "text", "doc": too_long}, "rejected", "too_large"),
        ({"op": "merge", "id": "v1"}, "rejected", "unknown_op"),
        ({"doc": vector_doc("v3", 3, DIM), "colection": "vec"}, "rejected", "bad_request"),
        ({"doc": json.dumps({"id": "nothing"})}, "rejected", "bad_request"),
        ({"collection": "vec", "doc": vector_doc("v4", 4, DIM)}, "indexed", None),
        (
            {"doc": json.dumps({"id": "b64", "vector": base64.b64encode(B64_VECTOR.tobytes()).decode()})},
            "indexed",
            None,
        ),
    ]
    ids = xadd_all(r, "main", [fields for fields, _, _ in entries])
    seen = await wait_for(
        lambda: (found := by_entry(r, "main.indexed")) and all(i in found for i in ids) and found,
        30,
        "a completion event for every entry",
    )
    for entry_id, (_, status, code) in zip(ids, entries, strict=True):
        event = seen[entry_id]
        assert event["status"] == status, event
        assert event.get("code") == code, event
        if status == "indexed":
            assert int(event["seq"]) >= 1
        else:
            assert event["message"]
    assert seen[ids[0]]["id"] == "v1" and seen[ids[0]]["collection"] == "vec"
    assert seen[ids[6]]["collection"] == "missing" and seen[ids[6]]["id"] == "m1"
    # vec: v1, v2, delete v2, v4, b64 -> seqs 1..5, three live documents.
    assert [int(seen[ids[i]]["seq"]) for i in (0, 1, 4, 13, 14)] == [1, 2, 3, 4, 5]
    assert await rig.ws.count("vec") == 3
    (stored,) = await rig.ws.get("vec", ["b64"], include=["vector"])
    assert stored["vector"].tolist() == B64_VECTOR.tolist()
    assert await rig.ws.count("text") == 2
    hits = (await rig.ws.query("text", text="birds by the water", k=1)).hits
    assert hits[0].id == "t1"
    # The position row is the last entry; nothing is pending, the stream is not held up.
    assert await committed_position(rig.dsn, "main") == ids[-1]
    assert group_info(r, "main")["pending"] == 0
    figures = await source(rig.http, "main")
    assert (figures["processed"], figures["rejected"]) == (7, 8)


async def test_sources_endpoint_and_metrics_report_each_source(rig: Rig) -> None:
    items = await sources(rig.http)
    assert [s["stream"] for s in items] == ["main", "flaky", "nowhere"]
    main, _, nowhere = items
    assert main["group"] == "shoal" and main["state"] == "running"
    assert main["url"].startswith(f"redis://127.0.0.1:{rig.main.port}/0?stream=main&group=shoal")
    for key in ("processed", "rejected", "lag", "retries", "in_flight", "max_in_flight", "position", "last_error"):
        assert key in main
    assert main["lag"] == 0
    assert main["max_in_flight"] == 1000
    # Nothing listens for `nowhere`: it retries, says why, and never shows its password.
    await wait_for(lambda: source(rig.http, "nowhere"), 5, "nowhere's figures")
    nowhere = await wait_for(lambda: _retried(rig.http, "nowhere"), 20, "the unreachable source to report its retries")
    assert nowhere["state"] == "retrying" and nowhere["last_error"]
    assert "hunter2" not in json.dumps(items) and "user" not in nowhere["url"]
    # A source is not the server's health.
    assert (await rig.http.get("/readyz")).status_code == 200
    metrics = (await rig.http.get("/metrics")).text
    assert 'shoal_source_up{group="shoal",stream="main"} 1.0' in metrics
    assert 'shoal_source_up{group="shoal",stream="nowhere"} 0.0' in metrics
    assert 'shoal_source_state{group="shoal",state="retrying",stream="nowhere"} 1.0' in metrics
    assert 'shoal_source_lag{group="shoal",stream="main"} 0.0' in metrics
    assert 'shoal_source_in_flight_limit{group="shoal",stream="main"} 1000.0' in metrics
    wanted = 'shoal_source_processed_total{group="shoal",stream="main"}'
    processed = next(line for line in metrics.splitlines() if line.startswith(wanted))
    assert float(processed.rsplit(" ", 1)[1]) == main["processed"]
    assert (await rig.http.post("/v1/sources")).status_code == 405
    documented = (await rig.http.get("/openapi.json")).json()["paths"]["/v1/sources"]["get"]
    assert documented["operationId"] == "list_sources"


async def _retried(http: httpx.AsyncClient, stream: str) -> dict[str, Any] | None:
    item = await source(http, stream)
    return item if item["retries"] >= 2 else None


async def test_a_burst_is_consumed_with_bounded_entries_in_flight(rig: Rig) -> None:
    r = rig.main.client()
    pid = rig.proc.pid
    assert pid is not None
    rss_before = rss_kib(pid)
    entries = [{"collection": "burst", "doc": vector_doc(f"b{i}", i, DIM)} for i in range(BURST)]
    written = await anyio.to_thread.run_sync(xadd_all, r, "main", entries)
    peak_in_flight, peak_lag, peak_rss = 0, 0, rss_before
    while True:
        item = await source(rig.http, "main")
        peak_in_flight = max(peak_in_flight, item["in_flight"])
        peak_lag = max(peak_lag, item["lag"] or 0)
        peak_rss = max(peak_rss, rss_kib(pid))
        assert item["in_flight"] <= item["max_in_flight"] == 1000
        if await rig.ws.count("burst") == BURST and item["in_flight"] == 0:
            break
        await asyncio.sleep(0.05)
    assert peak_in_flight > 0
    assert peak_lag > 1000  # the burst waited in Redis, not in the server
    figures = await log_figures(rig.dsn, "burst")
    assert figures.changes == figures.distinct_ids == figures.last_seq == BURST
    assert await committed_position(rig.dsn, "main") == written[-1]
    # Entries in flight are bounded; memory must not grow with the burst (generous bound: the
    # index and the shard's arrays grow with the documents themselves).
    assert peak_rss - rss_before < 150_000 + BURST * 2, (rss_before, peak_rss)
    print(f"burst {BURST}: peak in flight {peak_in_flight}, peak lag {peak_lag}, rss +{peak_rss - rss_before} KiB")


async def test_a_collection_dropped_under_a_stream_rejects_its_entries_and_nothing_stalls(rig: Rig) -> None:
    """Jobs that fail at commit for a reason of their own (their collection is gone) are retried
    entry by entry; each is rejected `not_found` with its position committed, and the entries
    after them still commit."""
    r = rig.main.client()
    await rig.ws.create_collection("doomed", dim=DIM, metric="l2")
    entries = [{"collection": "doomed", "doc": vector_doc(f"d{i}", i, DIM)} for i in range(3000)]
    written = await anyio.to_thread.run_sync(xadd_all, r, "main", entries)
    await wait_for(lambda: rig.ws.count("doomed"), 30, "the first entries")
    await rig.ws.drop_collection("doomed")
    after = xadd_all(r, "main", [{"doc": vector_doc(f"after{i}", i, DIM)} for i in range(50)])
    seen = await wait_for(
        lambda: (found := by_entry(r, "main.indexed")) and all(i in found for i in written + after) and found,
        60,
        "an event for every entry",
    )
    statuses = [seen[i]["status"] for i in written]
    first_rejected = statuses.index("rejected")
    assert 0 < first_rejected < len(written)
    assert set(statuses[first_rejected:]) == {"rejected"}  # in stream order: indexed, then rejected
    assert {seen[i]["code"] for i in written[first_rejected:]} == {"not_found"}
    assert all(seen[i]["status"] == "indexed" for i in after)
    # Jobs were in flight when the collection went: they were retried entry by entry.
    assert "retrying its entries one by one" in rig.proc.log_path.read_text()
    assert await committed_position(rig.dsn, "main") == after[-1]
    assert group_info(r, "main")["pending"] == 0


async def test_a_redis_restart_mid_stream_is_retried_and_resumed(rig: Rig) -> None:
    r = rig.flaky.client()
    first = [{"doc": vector_doc(f"f{i}", i, DIM)} for i in range(1500)]
    written = await anyio.to_thread.run_sync(xadd_all, r, "flaky", first)
    await wait_for(lambda: rig.ws.count("flaky"), 30, "the first entries")
    await anyio.to_thread.run_sync(rig.flaky.kill)  # appendfsync always: the stream survives
    down = await wait_for(lambda: _state(rig.http, "flaky", "retrying"), 20, "the source to notice Redis is gone")
    assert down["last_error"]
    assert (await rig.http.get("/readyz")).status_code == 200  # the server keeps serving
    assert await rig.ws.count("vec") >= 1
    await anyio.to_thread.run_sync(rig.flaky.start)
    r = rig.flaky.client()
    second = [{"doc": vector_doc(f"f{i}", i, DIM)} for i in range(1500, 3000)]
    written += await anyio.to_thread.run_sync(xadd_all, r, "flaky", second)
    await wait_for(lambda: _count_is(rig.ws, "flaky", 3000), 60, "every entry after the restart")
    await wait_for(lambda: group_info(r, "flaky")["pending"] == 0, 10, "every entry acknowledged")
    figures = await log_figures(rig.dsn, "flaky")
    assert figures.changes == figures.distinct_ids == figures.last_seq == 3000, figures
    item = await source(rig.http, "flaky")
    assert item["state"] == "running" and item["retries"] >= 1
    assert await committed_position(rig.dsn, "flaky") == written[-1]


async def _state(http: httpx.AsyncClient, stream: str, state: str) -> dict[str, Any] | None:
    item = await source(http, stream)
    return item if item["state"] == state else None


async def _count_is(ws: ShoalClient, collection: str, n: int) -> bool:
    return await ws.count(collection) == n


# --- a crash of Shoal in the middle of a stream ------------------------------------------------


async def test_sigkill_mid_stream_applies_every_good_entry_exactly_once(rig: Rig) -> None:
    total, bad_every = 4000, 40
    entries: list[dict[str, str]] = []
    good = 0
    for i in range(total):
        if i % bad_every == 7:
            entries.append({"collection": "crash", "doc": "{broken"})
        else:
            entries.append({"collection": "crash", "doc": vector_doc(f"c{i}", i, DIM)})
            good += 1
    dsn = await rig.db.create("crash")
    data_dir = temp_data_dir("shoal-test-src-crash-")
    url = rig.main.url("crash")
    proc = shoal(data_dir, dsn, [url], SHOAL_SOURCE_READ_BATCH="50", SHOAL_SOURCE_MAX_IN_FLIGHT="400")
    r = rig.main.client()
    try:
        proc.start()
        async with ShoalClient.connect(proc.ws_url) as ws:
            await ws.create_collection("crash", dim=DIM, metric="l2")
        written = await anyio.to_thread.run_sync(xadd_all, r, "crash", entries)
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as http:
            await wait_for(lambda: _processed_at_least(http, "crash", 800), 60, "a part of the stream")
        proc.kill()  # SIGKILL: entries in flight, some committed and not acknowledged
        at_kill = await log_figures(dsn, "crash")
        assert 0 < at_kill.last_seq < good, "the kill must land in the middle of the stream"
        assert group_info(r, "crash")["pending"] > 0
        # Restarted under another consumer name (a replaced node): the killed consumer's pending
        # entries are taken over with XAUTOCLAIM once idle for SHOAL_SOURCE_CLAIM_IDLE_MS.
        pending_of_dead = group_info(r, "crash")["pending"]
        proc = ServerProcess(data_dir, env={**proc.env, "SHOAL_SOURCES": url + "&consumer=second"})
        proc.start()
        async with httpx.AsyncClient(base_url=proc.url, timeout=30) as http:
            await wait_for(
                lambda: group_info(r, "crash")["pending"] == 0 and group_info(r, "crash")["lag"] == 0,
                90,
                "the rest of the stream",
                every=0.2,
            )
            after = await source(http, "crash")
            consumers = {c["name"].decode(): c["pending"] for c in r.xinfo_consumers("crash", "shoal")}
            assert consumers == {"shoal": 0, "second": 0}
        figures = await log_figures(dsn, "crash")
        events = by_entry(r, "crash.indexed")
        rejected = [e for e in events.values() if e["status"] == "rejected"]
        indexed_ids = {e["id"] for e in events.values() if e["status"] == "indexed"}
        lost = good - figures.distinct_ids
        print(
            f"sigkill: written {total}, good {good}, committed at kill {at_kill.last_seq}, indexed"
            f" {figures.distinct_ids}, rejected {len(rejected)}, applied twice {len(figures.twice)},"
            f" lost {lost}, pending at kill {pending_of_dead}, skipped after restart {after['skipped']}"
        )
        assert figures.twice == []
        assert lost == 0
        assert figures.changes == figures.distinct_ids == figures.last_seq == good
        assert len(rejected) == total - good
        assert all(e["code"] == "bad_request" for e in rejected)
        assert set(events) == set(written)  # every entry has its completion event
        assert len(indexed_ids) == good
        assert await committed_position(dsn, "crash") == written[-1]
    finally:
        if proc.proc is not None:
            proc.stop()
        remove_tree(data_dir)


async def _processed_at_least(http: httpx.AsyncClient, stream: str, n: int) -> bool:
    return bool((await source(http, stream))["processed"] >= n)


# --- a database outage ------------------------------------------------------------------------


async def test_a_database_outage_pauses_the_source_and_acknowledges_nothing_uncommitted() -> None:
    db = OwnDatabase()
    await db.start()
    data_dir = temp_data_dir("shoal-test-src-dbdown-")
    with RedisServer() as redis_server:
        proc = shoal(data_dir, db.dsn, [redis_server.url("feed", collection="feed")])
        r = redis_server.client()
        try:
            proc.start()
            async with (
                httpx.AsyncClient(base_url=proc.url, timeout=30) as http,
                ShoalClient.connect(proc.ws_url) as ws,
            ):
                await ws.create_collection("feed", dim=DIM, metric="l2")
                xadd_all(r, "feed", [{"doc": vector_doc(f"a{i}", i, DIM)} for i in range(200)])
                await wait_for(lambda: _count_is(ws, "feed", 200), 30, "the first entries")
                acked_before = len(by_entry(r, "feed.indexed"))
                kill_postmaster(db.pgdata)
                await asyncio.sleep(0.5)
                xadd_all(r, "feed", [{"doc": vector_doc(f"b{i}", i, DIM)} for i in range(300)])
                down = await wait_for(lambda: _state(http, "feed", "retrying"), 30, "the source to pause")
                assert "navailable" in (down["last_error"] or "")
                await asyncio.sleep(2)
                # Nothing new committed, so nothing new acknowledged and no new event.
                info = group_info(r, "feed")
                assert info["pending"] + info["lag"] == 300, info
                assert len(by_entry(r, "feed.indexed")) == acked_before
                assert await ws.count("feed") == 200  # reads keep serving
                assert await anyio.to_thread.run_sync(_restart, db.pgdata)
                await wait_for(lambda: _count_is(ws, "feed", 500), 60, "the paused entries")
                await wait_for(lambda: group_info(r, "feed")["pending"] == 0, 20, "every entry acknowledged")
                figures = await log_figures(db.dsn, "feed")
                assert figures.changes == figures.distinct_ids == figures.last_seq == 500, figures
                assert (await source(http, "feed"))["state"] == "running"
        finally:
            if proc.proc is not None:
                proc.stop()
            remove_tree(data_dir)
            await db.stop()


def test_bad_source_urls_stop_the_start_with_one_line(tmp_path: Path) -> None:
    import subprocess
    import sys

    from tests.server_process import ROOT

    for url, expected in [
        ("http://127.0.0.1:1/0?stream=a", "must start with redis://"),
        ("redis://127.0.0.1:1/0", "needs stream=NAME"),
        ("redis://127.0.0.1:1/0?stream=a&colection=x", "unknown parameter(s) colection"),
        ("redis://u:sekret@127.0.0.1:1/x?stream=a", "database number"),
        ("redis://127.0.0.1:1/0?stream=a redis://127.0.0.1:2/0?stream=a", "same stream and group"),
    ]:
        flags = [arg for one in url.split() for arg in ("--source", one)]
        done = subprocess.run(
            [sys.executable, "-m", "server.cli", "serve", "--port", "0", "--data-dir", str(tmp_path), *flags],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert done.returncode != 0
        lines = done.stderr.strip().splitlines()
        assert len(lines) == 1 and expected in lines[0], done.stderr
        assert "sekret" not in done.stderr
