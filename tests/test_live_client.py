"""The Python client's handling of live result set pushes: typed events, and top-k lists that
coalesce in a full client buffer instead of being dropped."""

from __future__ import annotations

from shoal_client.protocol import SubscriptionBuffer
from shoal_client.types import LaggedEvent, LeaveEvent, MatchEvent, TopkEvent, parse_push


def test_pushes_parse_into_typed_events() -> None:
    leave = parse_push({"event": "leave", "sub": "s1", "seq": 7, "id": "doc"})
    assert leave == LeaveEvent("s1", 7, "doc")
    topk = parse_push({"event": "topk", "sub": "s1", "seq": 8, "hits": [{"id": "a", "score": 0.9, "distance": 0.1}]})
    assert isinstance(topk, TopkEvent) and topk.seq == 8 and [h.id for h in topk.hits] == ["a"]


def test_a_full_buffer_keeps_the_newest_list_and_counts_the_skipped_ones() -> None:
    buffer = SubscriptionBuffer("s1", 2)
    for seq in range(5):
        assert buffer.push(TopkEvent("s1", seq, []))
    got = []
    while (event := buffer.pop()) is not None:
        got.append(event)
    assert got == [LaggedEvent("s1", 4), TopkEvent("s1", 4, [])]


def test_a_full_buffer_still_drops_matches_into_one_gap() -> None:
    buffer = SubscriptionBuffer("s1", 1)
    hit = parse_push({"event": "match", "sub": "s1", "seq": 1, "op": "upsert", "hit": {"id": "a", "score": 1.0}})
    assert isinstance(hit, MatchEvent)
    assert buffer.push(hit)
    assert not buffer.push(hit)
    assert buffer.pop() == hit
    assert buffer.pop() == LaggedEvent("s1", 1)
