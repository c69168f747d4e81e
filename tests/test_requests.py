"""Request validation and the frame codec, with values and bytes alone."""

from __future__ import annotations

import contextlib
import struct

import msgpack
import numpy as np
import pytest

from models import requests as rq
from models.codec import FrameError, decode_frame, encode_error, encode_push, encode_reply
from models.config import Limits
from models.errors import (
    ALL_ERRORS,
    BadRequest,
    Internal,
    InvalidVector,
    ShoalError,
    TooLarge,
    UnknownOp,
    as_shoal_error,
)
from models.records import DEFAULT_INCLUDE, Include, Metric
from server.auth import Access, ApiKey, Authenticator, TokenBuckets, parse_api_keys

LIMITS = Limits()


def parse(op: str, **args: object) -> rq.Request:
    return rq.parse_request(op, args, LIMITS)


def test_query_defaults_and_vector_forms() -> None:
    q = parse("query", collection="c", vector=struct.pack("<2f", 1.5, -2.0))
    assert isinstance(q, rq.Query)
    assert q.k == rq.DEFAULT_K and q.include == DEFAULT_INCLUDE and q.mode == "vector" and q.ef is None
    assert q.vector is not None and q.vector.dtype == np.float32 and q.vector.tolist() == [1.5, -2.0]
    q2 = parse("query", collection="c", vector=[1, 2.5], k=3, include=["vector"], where={}, ef=50)
    assert isinstance(q2, rq.Query) and q2.where is None and q2.include == frozenset({Include.VECTOR})


@pytest.mark.parametrize(
    ("args", "error"),
    [
        ({"collection": "c"}, BadRequest),  # neither vector nor text
        ({"collection": "c", "vector": [1.0], "text": "t"}, BadRequest),
        ({"collection": "c", "vector": b"\x00\x00\x80"}, BadRequest),  # not a multiple of 4 bytes
        ({"collection": "c", "vector": [True, 1.0]}, BadRequest),
        ({"collection": "c", "vector": []}, BadRequest),
        ({"collection": "c", "vector": [float("nan")]}, InvalidVector),
        ({"collection": "c", "vector": [1.0] * 4097}, TooLarge),
        ({"collection": "c", "vector": [1.0], "k": 1001}, TooLarge),
        ({"collection": "c", "vector": [1.0], "k": True}, BadRequest),
        ({"collection": "c", "vector": [1.0], "mode": "hybrid"}, BadRequest),
        ({"collection": "c", "vector": [1.0], "alpha": 2}, BadRequest),
        ({"collection": "c", "text": "x" * 100_001}, TooLarge),
        ({"collection": "c" * 65, "vector": [1.0]}, BadRequest),
        ({"collection": "c", "vector": [1.0], "extra": 1}, BadRequest),
    ],
)
def test_query_rejects(args: dict[str, object], error: type[Exception]) -> None:
    with pytest.raises(error):
        rq.parse_request("query", args, LIMITS)


def test_documents_are_validated() -> None:
    up = parse(
        "upsert",
        collection="c",
        docs=[{"id": "a", "text": "hi", "metadata": {"s": "x", "n": 1, "f": 1.5, "b": True, "l": ["p", "q"]}}],
    )
    assert isinstance(up, rq.Upsert) and up.docs[0].vector is None and up.docs[0].metadata["l"] == ["p", "q"]
    bad_docs: list[object] = [
        {"id": "", "text": "t"},
        {"id": "a"},
        {"id": "a", "text": 3},
        {"id": "a", "text": "t", "metadata": {"nested": {"x": 1}}},
        {"id": "a", "text": "t", "metadata": {"l": [1, 2]}},
        {"id": "a", "text": "t", "metadata": {"$bad": 1}},
        {"id": "a", "text": "t", "metadata": {"big": 2**70}},
        {"id": "a", "text": "nul \x00 inside"},
        {"id": "a", "text": "t", "metdata": {}},
        "not a map",
    ]
    for doc in bad_docs:
        with pytest.raises(BadRequest):
            parse("upsert", collection="c", docs=[doc])
    with pytest.raises(BadRequest):
        parse("upsert", collection="c", docs=[])
    with pytest.raises(TooLarge):
        parse("upsert", collection="c", docs=[{"id": "x", "vector": [1.0]}] * 10_001)
    with pytest.raises(TooLarge):
        parse("upsert", collection="c", docs=[{"id": "x" * 257, "vector": [1.0]}])


def test_other_ops() -> None:
    create = parse("create_collection", name="n", dim=8, metric="ip")
    assert create == rq.CreateCollection("n", 8, Metric.IP, False)
    with pytest.raises(BadRequest):
        parse("create_collection", name="n", metric="hamming")
    with pytest.raises(BadRequest):
        parse("delete", collection="c")
    with pytest.raises(BadRequest):
        parse("delete", collection="c", ids=["a"], where={"x": 1})
    sub = parse("subscribe", collection="c", text="t", threshold=0.5, after_seq=10)
    assert isinstance(sub, rq.Subscribe) and sub.after_seq == 10
    with pytest.raises(BadRequest):
        parse("subscribe", collection="c", text="t")  # threshold is required
    with pytest.raises(UnknownOp):
        parse("frobnicate")


def test_frame_codec_round_trip() -> None:
    frame = decode_frame(msgpack.packb({"id": 9, "op": "ping", "x": b"\x01"}))
    assert (frame.request_id, frame.op, frame.args) == (9, "ping", {"x": b"\x01"})
    assert msgpack.unpackb(encode_reply(9, {"count": 2})) == {"id": 9, "ok": True, "count": 2}
    err = msgpack.unpackb(encode_error(None, BadRequest("nope")))
    assert err == {"id": None, "ok": False, "error": {"code": "bad_request", "message": "nope"}}
    assert msgpack.unpackb(encode_push("lagged", {"sub": "s", "dropped": 3})) == {
        "event": "lagged",
        "sub": "s",
        "dropped": 3,
    }


@pytest.mark.parametrize(
    ("data", "request_id", "code"),
    [
        (b"\xc1", None, "bad_frame"),
        (msgpack.packb([1]), None, "bad_frame"),
        (msgpack.packb({1: 2}), None, "bad_frame"),  # non-string keys
        (msgpack.packb({"op": "ping"}), None, "bad_request"),
        (msgpack.packb({"id": -1, "op": "ping"}), None, "bad_request"),
        (msgpack.packb({"id": 4}), 4, "bad_request"),
    ],
)
def test_bad_frames(data: bytes, request_id: int | None, code: str) -> None:
    with pytest.raises(FrameError) as info:
        decode_frame(data)
    assert info.value.request_id == request_id and info.value.error.code == code


def test_error_mapping_hides_internals() -> None:
    assert as_shoal_error(KeyError("secret path /etc")).to_wire() == {"code": "internal", "message": "internal error"}
    assert isinstance(as_shoal_error(ValueError()), Internal)
    codes = [cls("m").code for cls in ALL_ERRORS]
    # The contract's 14 codes and the two this server adds (docs/PROTOCOL.md), each once.
    assert len(codes) == len(set(codes)) == 16
    assert {"method_not_allowed", "gone"} <= set(codes)


def test_api_keys_and_token_bucket() -> None:
    keys = parse_api_keys('[{"key": "r", "collections": ["a"], "access": "read"}, {"key": "w"}]')
    assert keys == (ApiKey("r", frozenset({"a"}), Access.READ), ApiKey("w", None, Access.ADMIN))
    assert parse_api_keys("k1, k2") == (ApiKey("k1", None, Access.ADMIN), ApiKey("k2", None, Access.ADMIN))
    auth = Authenticator(keys)
    reader = auth.lookup("r")
    auth.check(reader, "-", rq.Count("a"))
    for denied in (rq.Count("b"), rq.DropCollection("a")):
        with pytest.raises(Exception) as info:
            auth.check(reader, "-", denied)
        assert getattr(info.value, "code", "") == "forbidden"
    buckets = TokenBuckets(rate=10, burst=3)
    for _ in range(3):
        buckets.charge("x")
    with pytest.raises(Exception) as limited:
        buckets.charge("x")
    assert getattr(limited.value, "code", "") == "rate_limited"
    assert 0 < limited.value.extra["retry_after_ms"] <= 101  # type: ignore[attr-defined]
    buckets.charge("y")  # callers are independent


# --- hostile input ---------------------------------------------------------------------------------

SURROGATE = "a\udfffb"  # what JSON's "a\\udfffb" decodes to


def _bad(op: str, args: dict[str, object], code: str = "bad_request") -> str:
    """The message of the error `parse_request` raises; asserts its code."""
    with pytest.raises(ShoalError) as info:
        rq.parse_request(op, args, LIMITS)
    assert info.value.code == code, info.value.message
    return info.value.message


def _doc(**fields: object) -> dict[str, object]:
    return {"id": "a", "vector": [1.0, 0.0], **fields}


@pytest.mark.parametrize("bad", [SURROGATE, "nul\x00inside"])
def test_every_accepted_string_refuses_nul_and_lone_surrogates(bad: str) -> None:
    cases: list[tuple[str, dict[str, object], str]] = [
        ("upsert", {"collection": "c", "docs": [_doc(id=bad)]}, "document id"),
        ("upsert", {"collection": "c", "docs": [_doc(text=bad)]}, "text"),
        ("upsert", {"collection": "c", "docs": [_doc(metadata={bad: 1})]}, "the key"),
        ("upsert", {"collection": "c", "docs": [_doc(metadata={"k": bad})]}, "metadata 'k'"),
        ("upsert", {"collection": "c", "docs": [_doc(metadata={"k": ["ok", bad]})]}, "metadata 'k'"),
        ("delete", {"collection": "c", "ids": ["ok", bad]}, "document id"),
        ("get", {"collection": "c", "ids": [bad]}, "document id"),
        ("delete", {"collection": "c", "where": {"k": bad}}, "where.k"),
        ("delete", {"collection": "c", "where": {"k": {"$in": ["x", bad]}}}, "where.k.$in[1]"),
        ("delete", {"collection": "c", "where": {bad: 1}}, "field name"),
        ("delete", {"collection": "c", "where_text": {"$contains": bad}}, "where_text.$contains"),
        ("query", {"collection": "c", "text": bad}, "'text'"),
        ("subscribe", {"collection": "c", "text": bad, "threshold": 0.5}, "'text'"),
        ("query", {"collection": "c", "vector": [1.0], "mode": bad}, "'mode'"),
        ("auth", {"key": bad}, "'key'"),
        ("unsubscribe", {"sub": bad}, "'sub'"),
    ]
    for op, args, names in cases:
        message = _bad(op, args)
        assert names in message, (op, message)
        assert "NUL" in message or "surrogate" in message, message
        message.encode("utf-8")  # the message itself is always sendable
    # Collection names only ever match [A-Za-z0-9_-].
    _bad("count", {"collection": bad})
    # Non-ASCII text that is valid Unicode is fine.
    up = parse("upsert", collection="c", docs=[_doc(id="ü-✓", text="naïve 🙂", metadata={"ключ": ["значение"]})])
    assert isinstance(up, rq.Upsert) and up.docs[0].id == "ü-✓"


def test_echoed_input_is_cut_short() -> None:
    huge = "x" * 10_000_000
    cases: list[tuple[str, dict[str, object]]] = [
        ("ping", {huge: 1}),
        ("upsert", {"collection": "c", "docs": [{"id": "a", "vector": [1.0], huge: 1}]}),
        ("delete", {"collection": "c", "where": {"a": {huge: 1}}}),
        ("delete", {"collection": "c", "where": {huge: {"$gt": "x"}}}),
        ("delete", {"collection": "c", "where": {"$" + huge: 1}}),
        ("delete", {"collection": "c", "where_text": {huge: "x"}}),
        ("upsert", {"collection": "c", "docs": [{"id": "a", "vector": [1.0], "metadata": {huge: {}}}]}),
    ]
    for op, args in cases:
        message = _bad(op, args)
        assert len(message) < 300, (op, len(message))
        assert "\u2026" in message  # the ellipsis says it was cut
    message = _bad(huge, {}, "unknown_op")
    assert len(message) < 100
    # Many unknown names: a few are named, the rest counted.
    message = _bad("ping", {f"arg{i}": i for i in range(1000)})
    assert "and 995 more" in message and len(message) < 200
    # Any ShoalError message is bounded and valid UTF-8, whatever its maker put in it.
    error = BadRequest("y" * 5000 + "\udfff")
    assert len(error.message) <= 1025 and error.to_wire()["message"].encode("utf-8")


def test_binary_keys_answer_bad_request() -> None:
    _bad("ping", {b"x": 1})  # type: ignore[dict-item]
    _bad("upsert", {"collection": "c", "docs": [{"id": "a", b"vector": [1.0]}]})
    _bad("upsert", {"collection": "c", "docs": [_doc(metadata={b"k": 1})]})
    _bad("query", {"collection": "c", "vector": [1.0], "where": {b"k": 1}})
    _bad("query", {"collection": "c", "vector": [1.0], "where": {"k": {b"$eq": 1}}})
    _bad("query", {"collection": "c", "vector": [1.0], "where_text": {b"$contains": "x"}})
    with pytest.raises(FrameError) as info:
        decode_frame(msgpack.packb({"id": 5, "op": "ping", b"x": 1}, use_bin_type=True))
    assert info.value.request_id == 5 and info.value.code == "bad_request"
    # A FrameError is a ShoalError with its error's code: decode_frame raises nothing else.
    assert isinstance(info.value, ShoalError)


def test_huge_integers_answer_bad_request() -> None:
    huge = 10**400
    _bad("query", {"collection": "c", "vector": [huge, 1]})
    _bad("upsert", {"collection": "c", "docs": [_doc(vector=[1, huge])]})
    _bad("query", {"collection": "c", "vector": [1.0], "alpha": huge})
    _bad("query", {"collection": "c", "vector": [1.0], "alpha": -huge})
    _bad("query", {"collection": "c", "vector": [1.0], "k": huge})
    _bad("query", {"collection": "c", "vector": [1.0], "ef": 2**64})
    _bad("subscribe", {"collection": "c", "vector": [1.0], "threshold": huge})
    _bad("subscribe", {"collection": "c", "vector": [1.0], "threshold": 0.5, "after_seq": 2**63})
    _bad("create_collection", {"name": "n", "dim": -huge})
    # Within 64 bits but over a limit stays too_large; a 64-bit threshold is just a number.
    _bad("query", {"collection": "c", "vector": [1.0], "k": 2**62}, "too_large")
    sub = parse("subscribe", collection="c", vector=[1.0], threshold=2**64 - 1)
    assert isinstance(sub, rq.Subscribe) and sub.threshold == float(2**64 - 1)


def test_vector_norm_bound() -> None:
    bound = LIMITS.max_vector_norm
    for vec in ([3e38, 3e38], [1e39, 1.0], [bound * 1.01, 0.0], [bound / 1.2] * 2, [2**64 - 1, 1]):
        assert "norm" in _bad("query", {"collection": "c", "vector": vec}, "invalid_vector")
        assert "norm" in _bad("upsert", {"collection": "c", "docs": [_doc(vector=vec)]}, "invalid_vector")
    packed = struct.pack("<2f", 3e38, 1.0)
    _bad("subscribe", {"collection": "c", "vector": packed, "threshold": 0.1}, "invalid_vector")
    ok = parse("query", collection="c", vector=[bound / 2, bound / 2])
    assert isinstance(ok, rq.Query) and ok.vector is not None and np.isfinite(ok.vector).all()
    # float32 arithmetic on vectors at the bound stays finite.
    a = np.full(4096, bound / 64, dtype=np.float32)
    b = -a
    assert np.isfinite(np.dot(a, b)) and np.isfinite(np.dot(a - b, a - b)) and np.isfinite(np.dot(a, a))
    # A setting above the ceiling cannot lift the bound past what float32 can carry.
    loose = Limits(max_vector_norm=1e30)
    with pytest.raises(InvalidVector):
        rq.parse_request("query", {"collection": "c", "vector": [1e19, 0.0]}, loose)


def test_empty_query_text_is_refused() -> None:
    assert "empty" in _bad("query", {"collection": "c", "text": ""})
    assert "empty" in _bad("subscribe", {"collection": "c", "text": "", "threshold": 0.1})


def test_filter_size_limits() -> None:
    limits = Limits(max_filter_values=100, max_filter_nodes=10)
    big_in = {"k": {"$in": list(range(101))}}
    with pytest.raises(TooLarge, match="at most 100 values"):
        rq.parse_request("query", {"collection": "c", "vector": [1.0], "where": big_in}, limits)
    many = {"$or": [{"k": i} for i in range(10)]}  # 11 nodes
    with pytest.raises(TooLarge, match="at most 10 comparisons"):
        rq.parse_request("delete", {"collection": "c", "where": many}, limits)
    at_limit = {"$and": [{"k": {"$in": list(range(91))}}, {"$or": [{"a": 1}, {"b": {"$nin": list(range(8))}}]}]}
    assert isinstance(rq.parse_request("delete", {"collection": "c", "where": at_limit}, limits), rq.Delete)
    with pytest.raises(TooLarge):
        rq.parse_request(
            "query", {"collection": "c", "vector": [1.0], "where_text": {"$contains": "x" * 100_001}}, LIMITS
        )


def test_only_shoal_errors_escape_the_parser() -> None:
    """A sample of odd shapes: whatever the input, the parser raises a ShoalError or returns."""
    odd: list[object] = [None, 1, -1, 2**70, 1.5, float("nan"), "", "x", b"x", [], [1], {}, {"a": 1}, [[]], True]
    for op in rq.PARSERS:
        for key in ("collection", "docs", "ids", "where", "where_text", "vector", "text", "k", "include",
                    "threshold", "alpha", "ef", "name", "dim", "metric", "key", "sub", "after_seq", "mode"):
            for value in odd:
                args: dict[str, object] = {"collection": "c", "name": "n", key: value}
                with contextlib.suppress(ShoalError):
                    rq.parse_request(op, args, LIMITS)
