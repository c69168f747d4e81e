"""The client's codec and sans-I/O protocol, by bytes alone: no sockets, no event loop."""

from __future__ import annotations

import json
from typing import Any

import msgpack
import numpy as np
import pytest

from shoal_client import errors
from shoal_client.codec import (
    decode_frame,
    decode_vector,
    encode_request,
    encode_vector,
    json_args,
    vector_to_query_param,
)
from shoal_client.errors import (
    ClientError,
    ConnectionClosed,
    NotFound,
    ProtocolError,
    RateLimited,
    ShoalError,
    error_from_status,
    error_from_wire,
)
from shoal_client.http import error_from_body
from shoal_client.ops import http_base, include_list, ws_url
from shoal_client.protocol import ClientProtocol, Failure, Pushed, Reply, SubscriptionBuffer, Unrouted
from shoal_client.sse import subscribe_params
from shoal_client.types import (
    Hit,
    LaggedEvent,
    MatchEvent,
    parse_collection,
    parse_doc,
    parse_hit,
    parse_push,
    parse_query,
)

PROTOCOL_CODES = {
    "bad_frame": errors.BadFrame,
    "bad_request": errors.BadRequest,
    "unknown_op": errors.UnknownOp,
    "not_found": errors.NotFound,
    "exists": errors.Exists,
    "dimension_mismatch": errors.DimensionMismatch,
    "invalid_vector": errors.InvalidVector,
    "too_large": errors.TooLarge,
    "unauthorized": errors.Unauthorized,
    "forbidden": errors.Forbidden,
    "rate_limited": errors.RateLimited,
    "unavailable": errors.Unavailable,
    "overloaded": errors.Overloaded,
    "internal": errors.Internal,
}


def frame(message: Any) -> bytes:
    return msgpack.packb(message, use_bin_type=True)  # type: ignore[no-any-return]


def unpack(data: bytes) -> Any:
    return msgpack.unpackb(data, raw=False)


def hit_map(doc_id: str = "a", score: float = 0.9, **extra: Any) -> dict[str, Any]:
    return {"id": doc_id, "score": score, "distance": 1 - score, **extra}


def match(sub: str, seq: int, doc_id: str = "a") -> bytes:
    return frame({"event": "match", "sub": sub, "seq": seq, "op": "upsert", "hit": hit_map(doc_id)})


def subscribed(proto: ClientProtocol, sub: str = "s1") -> SubscriptionBuffer:
    """Send a subscribe and feed its reply; return the new subscription's buffer."""
    request_id, _ = proto.request("subscribe", {"collection": "c", "text": "x", "threshold": 0.5})
    (reply,) = proto.receive(frame({"id": request_id, "ok": True, "sub": sub}))
    assert isinstance(reply, Reply) and reply.buffer is not None
    return reply.buffer


def drain(buffer: SubscriptionBuffer) -> list[Any]:
    events = []
    while (event := buffer.pop()) is not None:
        events.append(event)
    return events


# --- vectors ------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16, ">f4"])
def test_vector_bin_round_trip(dtype: Any) -> None:
    vector = np.array([0.5, -1.25, 3.0, 0.0], dtype=dtype)
    data = encode_vector(vector)
    assert data == np.array([0.5, -1.25, 3.0, 0.0], dtype="<f4").tobytes()
    back = decode_vector(data)
    assert back.dtype == np.float32 and back.dtype.isnative
    assert back.flags.writeable
    np.testing.assert_array_equal(back, [0.5, -1.25, 3.0, 0.0])


def test_vector_from_list_bytes_and_json() -> None:
    assert encode_vector([1, 2.5]) == np.array([1, 2.5], "<f4").tobytes()
    raw = np.array([7.0], "<f4").tobytes()
    assert encode_vector(raw) is not None and encode_vector(raw) == raw
    np.testing.assert_array_equal(decode_vector([1.0, 2.0]), np.array([1, 2], np.float32))
    assert vector_to_query_param(np.array([0.1, 2.0], np.float32)) == "0.10000000149011612,2.0"


def test_vector_nan_is_sent_as_is() -> None:
    # The server answers invalid_vector; the client does not second-guess it.
    assert np.isnan(decode_vector(encode_vector([float("nan")]))).all()


@pytest.mark.parametrize("bad", [np.zeros((2, 2)), ["a", "b"], 3.0])
def test_vector_that_is_not_1d_numeric_is_a_client_error(bad: Any) -> None:
    with pytest.raises(ClientError):
        encode_vector(bad)


@pytest.mark.parametrize("bad", [b"\x00\x00\x80", "abc", {"x": 1}])
def test_received_vector_that_is_malformed_is_a_protocol_error(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        decode_vector(bad)


# --- request framing ----------------------------------------------------------------------------


def test_request_frame_carries_id_op_and_vectors_as_bin() -> None:
    docs: list[dict[str, Any]] = [
        {"id": "a", "vector": np.ones(3, np.float64), "metadata": {"vector": "kept", "n": np.int64(4)}},
        {"id": "b", "text": "hello"},
    ]
    message = unpack(encode_request(7, "upsert", {"collection": "c", "docs": docs}))
    assert message["id"] == 7 and message["op"] == "upsert" and message["collection"] == "c"
    first, second = message["docs"]
    assert first["vector"] == np.ones(3, "<f4").tobytes()
    assert first["metadata"] == {"vector": "kept", "n": 4}
    assert second == {"id": "b", "text": "hello"}
    # The caller's docs are not modified.
    assert isinstance(docs[0]["vector"], np.ndarray)


def test_query_vector_is_bin_and_json_args_use_lists() -> None:
    args = {"collection": "c", "vector": [0.5, 1.0], "k": np.int32(3)}
    message = unpack(encode_request(1, "query", args))
    assert message["vector"] == np.array([0.5, 1.0], "<f4").tobytes() and message["k"] == 3
    body = json_args({**args, "docs": [{"id": "a", "vector": np.array([2.0], np.float32)}]})
    assert json.loads(json.dumps(body)) == {
        "collection": "c",
        "vector": [0.5, 1.0],
        "k": 3,
        "docs": [{"id": "a", "vector": [2.0]}],
    }


def test_request_args_cannot_override_id_or_op() -> None:
    with pytest.raises(ClientError):
        encode_request(1, "ping", {"id": 5})
    with pytest.raises(ClientError):
        encode_request(1, "ping", {"x": object()})


def test_decode_frame_rejects_text_garbage_and_non_maps() -> None:
    assert decode_frame(frame({"id": 1, "ok": True})) == {"id": 1, "ok": True}
    bad_frames: list[bytes | str] = ["{}", b"\xc1", frame([1, 2])]
    for bad in bad_frames:
        with pytest.raises(ProtocolError):
            decode_frame(bad)


# --- errors -------------------------------------------------------------------------------------


@pytest.mark.parametrize(("code", "cls"), sorted(PROTOCOL_CODES.items()))
def test_every_protocol_code_has_its_class(code: str, cls: type[ShoalError]) -> None:
    error = error_from_wire({"code": code, "message": "nope"})
    assert type(error) is cls and isinstance(error, ShoalError)
    assert error.code == code and error.message == "nope" and error.extra == {}
    assert cls.code == code


def test_error_extra_fields_and_unknown_codes() -> None:
    error = error_from_wire({"code": "rate_limited", "message": "slow down", "retry_after_ms": 250})
    assert isinstance(error, RateLimited) and error.retry_after_ms == 250
    future = error_from_wire({"code": "quota_exceeded", "message": "m"})
    assert type(future) is ShoalError and future.code == "quota_exceeded"
    assert isinstance(error_from_wire("garbage"), errors.Internal)
    assert isinstance(error_from_wire(None, 404), NotFound)


def test_http_error_bodies() -> None:
    body = json.dumps({"error": {"code": "not_found", "message": "no collection 'x'"}}).encode()
    error = error_from_body(404, body, "application/json")
    assert isinstance(error, NotFound) and error.message == "no collection 'x'"
    packed = frame({"error": {"code": "exists", "message": "m"}})
    assert isinstance(error_from_body(409, packed, "application/msgpack"), errors.Exists)
    proxy = error_from_body(502, b"<html>Bad Gateway</html>", "text/html")
    assert isinstance(proxy, errors.Internal) and proxy.extra["http_status"] == 502
    assert isinstance(error_from_status(401, "x"), errors.Unauthorized)


def test_server_errors_and_client_errors_are_separate_families() -> None:
    assert not issubclass(ConnectionClosed, ShoalError)
    assert issubclass(ConnectionClosed, ClientError) and issubclass(ProtocolError, ClientError)
    assert ConnectionClosed("closed", 1009, "too big").code == 1009


# --- replies ------------------------------------------------------------------------------------


def test_ids_increase_and_replies_resolve_in_any_order() -> None:
    proto = ClientProtocol()
    ids = [proto.request("ping")[0] for _ in range(3)]
    assert ids == [1, 2, 3] and proto.in_flight == 3
    happenings = [h for i in reversed(ids) for h in proto.receive(frame({"id": i, "ok": True, "n": i}))]
    assert [(h.id, h.result) for h in happenings if isinstance(h, Reply)] == [
        (3, {"n": 3}),
        (2, {"n": 2}),
        (1, {"n": 1}),
    ]
    assert proto.in_flight == 0


def test_error_reply_becomes_failure_with_mapped_class() -> None:
    proto = ClientProtocol()
    request_id, _ = proto.request("count", {"collection": "nope"})
    (failure,) = proto.receive(
        frame({"id": request_id, "ok": False, "error": {"code": "not_found", "message": "m"}})
    )
    assert isinstance(failure, Failure) and failure.op == "count"
    assert isinstance(failure.error, NotFound)


def test_frames_for_nobody_are_unrouted() -> None:
    proto = ClientProtocol()
    (bad_frame,) = proto.receive(
        frame({"id": None, "ok": False, "error": {"code": "bad_frame", "message": ""}})
    )
    assert isinstance(bad_frame, Unrouted) and isinstance(bad_frame.error, errors.BadFrame)
    stray: list[bytes | str] = [frame({"id": 99, "ok": True}), "text", b"\xc1", frame(5)]
    for data in stray:
        (happening,) = proto.receive(data)
        assert isinstance(happening, Unrouted) and isinstance(happening.error, ProtocolError)


def test_reply_without_ok_fails_its_request() -> None:
    proto = ClientProtocol()
    request_id, _ = proto.request("ping")
    (failure,) = proto.receive(frame({"id": request_id}))
    assert isinstance(failure, Failure) and isinstance(failure.error, ProtocolError)


def test_connection_lost_fails_everything_and_refuses_new_requests() -> None:
    proto = ClientProtocol()
    buffer = subscribed(proto)
    buffer.push(MatchEvent("s1", 1, "upsert", Hit("a", 1.0, 0.0)))
    ids = [proto.request("ping")[0], proto.request("count", {"collection": "c"})[0]]
    lost = ConnectionClosed("gone", 1006)
    assert proto.connection_lost(lost) == ids
    # Events already received stay readable, then the stream ends with the error.
    assert buffer.closed and buffer.error is lost and isinstance(buffer.pop(), MatchEvent)
    with pytest.raises(ConnectionClosed):
        proto.request("ping")


def test_forgotten_request_is_not_in_flight() -> None:
    proto = ClientProtocol()
    request_id, _ = proto.request("ping")
    proto.forget(request_id)
    assert proto.in_flight == 0
    assert isinstance(proto.receive(frame({"id": request_id, "ok": True}))[0], Unrouted)


# --- results ------------------------------------------------------------------------------------


def test_parse_hits_with_bin_and_list_vectors() -> None:
    vector = np.array([0.25, 0.5], np.float32)
    result = parse_query(
        {
            "hits": [
                hit_map("a", 0.75, text="t", metadata={"k": ["x"]}, vector=vector.tobytes()),
                hit_map("b", 0.5, vector=[0.25, 0.5]),
            ],
            "took_ms": 1.5,
        }
    )
    first, second = result.hits
    assert result.took_ms == 1.5
    assert (first.id, first.score, first.distance, first.text, first.metadata) == (
        "a",
        0.75,
        0.25,
        "t",
        {"k": ["x"]},
    )
    assert first.vector is not None and second.vector is not None
    np.testing.assert_array_equal(first.vector, vector)
    np.testing.assert_array_equal(second.vector, vector)
    assert parse_hit(hit_map()).vector is None


@pytest.mark.parametrize("bad", [{"score": 1.0, "distance": 0.0}, hit_map(score=True), "hit"])
def test_malformed_hits_are_protocol_errors(bad: Any) -> None:
    with pytest.raises(ProtocolError):
        parse_hit(bad)


def test_parse_collection_and_docs() -> None:
    info = parse_collection({"name": "c", "dim": 384, "metric": "cosine", "count": 2})
    assert (info.name, info.dim, info.metric, info.count) == ("c", 384, "cosine", 2)
    doc = parse_doc({"id": "a", "vector": np.ones(2, "<f4").tobytes(), "metadata": {}})
    assert doc["vector"].dtype == np.float32 and doc["vector"].tolist() == [1.0, 1.0]


def test_parse_push_kinds() -> None:
    event = parse_push({"event": "match", "sub": "s", "seq": 4, "op": "upsert", "hit": hit_map()})
    assert isinstance(event, MatchEvent) and event.seq == 4 and event.hit.id == "a"
    assert parse_push({"event": "lagged", "sub": "s", "dropped": 3}) == LaggedEvent("s", 3)
    assert parse_push({"event": "future_kind", "sub": "s"}) is None


# --- push routing -------------------------------------------------------------------------------


def test_pushes_route_to_their_subscription_and_wake_it() -> None:
    proto = ClientProtocol()
    one, two = subscribed(proto, "s1"), subscribed(proto, "s2")
    woken: list[str] = []
    one.waker = lambda: woken.append("s1")
    assert proto.receive(match("s1", 1)) == [Pushed("s1")]
    assert proto.receive(match("s2", 2)) == [Pushed("s2")]
    assert proto.receive(match("s1", 3)) == [Pushed("s1")]
    assert [e.seq for e in drain(one)] == [1, 3] and [e.seq for e in drain(two)] == [2]
    assert woken == ["s1", "s1"]


def test_pushes_before_the_subscribe_reply_are_kept_in_order() -> None:
    proto = ClientProtocol()
    request_id, _ = proto.request("subscribe", {"collection": "c", "text": "x", "threshold": 0.1})
    assert proto.receive(match("s9", 1)) == [] and proto.receive(match("s9", 2)) == []
    (reply,) = proto.receive(frame({"id": request_id, "ok": True, "sub": "s9"}))
    assert isinstance(reply, Reply) and reply.buffer is not None
    proto.receive(match("s9", 3))
    assert [e.seq for e in drain(reply.buffer)] == [1, 2, 3]


def test_pushes_for_no_pending_subscribe_are_dropped() -> None:
    proto = ClientProtocol()
    assert proto.receive(match("ghost", 1)) == []
    request_id, _ = proto.request("subscribe", {"collection": "c", "text": "x", "threshold": 0.1})
    proto.receive(match("ghost", 2))
    # The subscribe fails: nothing can claim the early push any more.
    proto.receive(frame({"id": request_id, "ok": False, "error": {"code": "not_found", "message": ""}}))
    assert proto.orphan_pushes == 2
    buffer = subscribed(proto, "ghost")
    assert drain(buffer) == []


def test_unsubscribe_stops_routing_at_once() -> None:
    proto = ClientProtocol()
    buffer = subscribed(proto)
    proto.receive(match("s1", 1))
    request_id, _ = proto.request("unsubscribe", {"sub": "s1"})
    assert buffer.closed and buffer.error is None and "s1" not in proto.subscriptions
    # A push already in flight when the unsubscribe was sent is dropped, not buffered.
    assert proto.receive(match("s1", 2)) == []
    proto.receive(frame({"id": request_id, "ok": True}))
    assert [e.seq for e in drain(buffer)] == [1]


def test_full_buffer_drops_and_reports_the_gap_where_it_is() -> None:
    buffer = SubscriptionBuffer("s", maxsize=2)
    pushed = [buffer.push(MatchEvent("s", seq, "upsert", Hit("a", 1.0, 0.0))) for seq in range(1, 5)]
    assert pushed == [True, True, False, False] and buffer.dropped_total == 2
    # A server lagged push that cannot be queued adds its count to the local gap.
    assert not buffer.push(LaggedEvent("s", 10))
    assert buffer.pop() == MatchEvent("s", 1, "upsert", Hit("a", 1.0, 0.0))
    assert buffer.push(MatchEvent("s", 9, "upsert", Hit("b", 1.0, 0.0)))
    events = drain(buffer)
    assert [(type(e).__name__, getattr(e, "seq", None)) for e in events] == [
        ("MatchEvent", 2),
        ("LaggedEvent", None),
        ("MatchEvent", 9),
    ]
    assert events[1] == LaggedEvent("s", 12) and buffer.dropped_total == 12


def test_local_and_server_gaps_in_a_row_are_one_lagged_event() -> None:
    buffer = SubscriptionBuffer("s", maxsize=1)
    buffer.push(MatchEvent("s", 1, "upsert", Hit("a", 1.0, 0.0)))
    buffer.push(MatchEvent("s", 2, "upsert", Hit("a", 1.0, 0.0)))
    buffer.pop()
    assert buffer.push(LaggedEvent("s", 5))
    assert drain(buffer) == [LaggedEvent("s", 6)]


def test_gap_at_the_end_is_reported_when_the_buffer_drains() -> None:
    buffer = SubscriptionBuffer("s", maxsize=1)
    buffer.push(MatchEvent("s", 1, "upsert", Hit("a", 1.0, 0.0)))
    buffer.push(MatchEvent("s", 2, "upsert", Hit("a", 1.0, 0.0)))
    assert [type(e) for e in drain(buffer)] == [MatchEvent, LaggedEvent]
    buffer.close()
    assert buffer.pop() is None and not buffer.push(MatchEvent("s", 3, "upsert", Hit("a", 1.0, 0.0)))


def test_buffer_is_bounded_under_a_flood() -> None:
    proto = ClientProtocol(queue_size=100)
    buffer = subscribed(proto)
    for seq in range(10_000):
        proto.receive(match("s1", seq))
        if seq % 7 == 0:
            buffer.pop()
        assert len(buffer) <= 101
    assert buffer.dropped_total > 0


# --- URLs and SSE parameters --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("url", "expected"),
    [
        ("ws://127.0.0.1:8080/v1/ws", "ws://127.0.0.1:8080/v1/ws"),
        ("http://127.0.0.1:8080", "ws://127.0.0.1:8080/v1/ws"),
        ("https://h/", "wss://h/v1/ws"),
        ("http://h/shoal/v1", "ws://h/shoal/v1/ws"),
        ("wss://h:9/v1/ws/", "wss://h:9/v1/ws"),
    ],
)
def test_ws_url(url: str, expected: str) -> None:
    assert ws_url(url) == expected


def test_http_base() -> None:
    assert http_base("ws://127.0.0.1:8080/v1/ws") == "http://127.0.0.1:8080"
    assert http_base("https://h/shoal/v1/") == "https://h/shoal"
    with pytest.raises(ClientError):
        http_base("ftp://h")
    with pytest.raises(ClientError):
        ws_url("127.0.0.1:8080")


def test_subscribe_params() -> None:
    params = subscribe_params(
        text=None,
        vector=[0.5, 1.0],
        threshold=0.8,
        where={"lang": {"$in": ["en", "fr"]}},
        where_text={"$contains": "x"},
        include=["text", "vector"],
    )
    assert params == {
        "threshold": "0.8",
        "vector": "0.5,1.0",
        "where": '{"lang":{"$in":["en","fr"]}}',
        "where_text": '{"$contains":"x"}',
        "include": "text,vector",
    }
    assert include_list("vector") == ["vector"]
