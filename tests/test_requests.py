"""Request validation and the frame codec, with values and bytes alone."""

from __future__ import annotations

import struct

import msgpack
import numpy as np
import pytest

from models import requests as rq
from models.codec import FrameError, decode_frame, encode_error, encode_push, encode_reply
from models.config import Limits
from models.errors import ALL_ERRORS, BadRequest, Internal, InvalidVector, TooLarge, UnknownOp, as_shoal_error
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
    assert len(codes) == len(set(codes)) == 15


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
