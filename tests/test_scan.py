"""Paging pieces by themselves: the shard's id-ordered scan (through its mailbox) and cursors."""

from __future__ import annotations

import random

import numpy as np
import pytest

from models.cursor import decode_cursor, encode_cursor
from models.errors import BadRequest
from models.filters import parse_where, parse_where_text
from models.records import DocId, Seq, StoredDoc
from tests.test_shard import running

pytestmark = pytest.mark.timeout(60)


def doc(i: str, n: int) -> StoredDoc:
    return StoredDoc(DocId(i), f"text {n}", np.full(4, n + 1, np.float32), {"n": n}, Seq(n + 1))


async def test_scan_pages_in_id_order_after_writes() -> None:
    ids = [f"{random.Random(1).randrange(10**6):06d}-{n}" for n in range(300)]
    async with running(4) as shard:
        await shard.apply_upserts([doc(i, n) for n, i in enumerate(ids)])
        live = sorted(ids)
        assert [d.id for d in await shard.scan(None, 1_000, None, None)] == live
        # After deletes and inserts the sorted index is rebuilt; a replace keeps it.
        gone = live[10:20]
        await shard.apply_deletes([DocId(i) for i in gone])
        await shard.apply_upserts([doc("0-new", 5), doc(live[0], 999)])
        live = sorted((set(live) - set(gone)) | {"0-new"})
        pages: list[str] = []
        after: DocId | None = None
        while True:
            page = await shard.scan(after, 17, None, None)
            pages.extend(d.id for d in page)
            if len(page) < 17:
                break
            after = page[-1].id
        assert pages == live
        first = (await shard.scan(None, 2, None, None))[1]
        assert first.id == live[1]
        replaced = next(d for d in await shard.scan(None, 1_000, None, None) if d.id == sorted(ids)[0])
        assert replaced.metadata == {"n": 999} and replaced.vector[0] == 1000.0 and replaced.seq == 1000


async def test_scan_with_filters() -> None:
    async with running(4) as shard:
        await shard.apply_upserts([doc(f"d{n:03d}", n) for n in range(100)])
        where = parse_where({"n": {"$gte": 90}}, 8)
        got = await shard.scan(DocId("d094"), 3, where, None)
        assert [d.id for d in got] == ["d095", "d096", "d097"]
        text = parse_where_text({"$contains": "text 5"}, 1_000)
        found = [d.id for d in await shard.scan(None, 100, None, text)]
        assert found == ["d005"] + [f"d{n:03d}" for n in range(50, 60)]
        assert await shard.scan(DocId("zzz"), 10, None, None) == []


def test_cursor_round_trip_and_refusals() -> None:
    for last in ["a", "é-ß-漢字", "x" * 256, "🙂"]:
        assert decode_cursor(encode_cursor(DocId(last))) == last
    for bad in ["", "!!", "AQ", "Ag" + "YQ", "AgFh", "A" * 5000]:
        with pytest.raises(BadRequest):
            decode_cursor(bad)
