"""Broker entries -> typed requests, and source URLs, without a broker: fields as bytes alone."""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest

from actors.sources.base import Completion, RawEntry, Status
from actors.sources.parse import parse_entry
from actors.sources.redis_stream import parse_url
from models.config import Limits
from models.errors import BadRequest, StartupError
from models.requests import Delete, Upsert

LIMITS = Limits(max_text_chars=100)


def entry(**fields: str | bytes) -> RawEntry:
    return RawEntry("1-0", {k.encode(): v if isinstance(v, bytes) else v.encode() for k, v in fields.items()})


def test_an_upsert_entry_is_the_websocket_upsert_of_one_document() -> None:
    doc = {"id": "a", "vector": [1.0, 2.0], "text": "hi", "metadata": {"k": 1}}
    parsed = parse_entry(entry(doc=json.dumps(doc)), "docs", LIMITS)
    assert parsed.error is None
    assert isinstance(parsed.request, Upsert)
    assert parsed.request.collection == "docs" and parsed.doc_id == "a"
    (document,) = parsed.request.docs
    assert document.vector is not None and document.vector.tolist() == [1.0, 2.0]
    assert document.metadata == {"k": 1}


def test_a_vector_may_be_base64_of_float32() -> None:
    vector = np.asarray([0.5, -1.25, 3.0], dtype="<f4")
    doc = {"id": "a", "vector": base64.b64encode(vector.tobytes()).decode()}
    parsed = parse_entry(entry(doc=json.dumps(doc)), "docs", LIMITS)
    assert isinstance(parsed.request, Upsert)
    assert parsed.request.docs[0].vector is not None
    assert parsed.request.docs[0].vector.tolist() == [0.5, -1.25, 3.0]
    for bad in ("not base64!", base64.b64encode(b"abc").decode()):
        refused = parse_entry(entry(doc=json.dumps({"id": "a", "vector": bad})), "docs", LIMITS)
        assert refused.error is not None and refused.error.code == "bad_request", bad


def test_a_delete_entry_names_its_id_and_the_collection_field_wins() -> None:
    parsed = parse_entry(entry(op="delete", id="x", collection="other"), "docs", LIMITS)
    assert isinstance(parsed.request, Delete)
    assert parsed.request.collection == "other" and parsed.request.ids == ("x",)


@pytest.mark.parametrize(
    ("fields", "code"),
    [
        ({"doc": "{nope"}, "bad_request"),
        ({"doc": "[" * 100_000}, "bad_request"),
        ({"doc": json.dumps({"id": "a", "text": "x" * 101})}, "too_large"),
        ({"doc": json.dumps({"id": "a", "vector": [1.0] * 5000})}, "too_large"),
        ({"doc": json.dumps({"id": "a", "vector": [1e30, 1.0]})}, "invalid_vector"),
        ({"doc": '{"id": "a", "vector": [1e999]}'}, "bad_request"),
        ({"doc": '{"id": "a", "vector": [NaN]}'}, "bad_request"),
        ({"doc": json.dumps({"id": "a", "vector": [1.0, True]})}, "bad_request"),
        ({"doc": json.dumps({"id": "a"})}, "bad_request"),
        ({"doc": json.dumps({"id": "a", "text": "t", "extra": 1})}, "bad_request"),
        ({"op": "merge", "doc": "{}"}, "unknown_op"),
        ({"op": "delete"}, "bad_request"),
        ({"op": "delete", "id": "a", "doc": "{}"}, "bad_request"),
        ({"id": "a", "doc": json.dumps({"id": "a", "text": "t"})}, "bad_request"),
        ({"doc": json.dumps({"id": "a", "text": "t"}), "colection": "x"}, "bad_request"),
        ({"doc": b"\xff\xfe"}, "bad_request"),
        ({"collection": "bad name!", "doc": json.dumps({"id": "a", "text": "t"})}, "bad_request"),
    ],
)
def test_bad_entries_are_rejected_with_their_code(fields: dict[str, str | bytes], code: str) -> None:
    parsed = parse_entry(entry(**fields), "docs", LIMITS)
    assert parsed.request is None and parsed.error is not None
    assert parsed.error.code == code, parsed.error.message


def test_an_entry_without_collection_needs_the_default() -> None:
    parsed = parse_entry(entry(doc=json.dumps({"id": "a", "text": "t"})), None, LIMITS)
    assert isinstance(parsed.error, BadRequest) and "collection" in parsed.error.message


def test_an_entry_larger_than_a_frame_is_too_large() -> None:
    parsed = parse_entry(entry(doc="x" * 2000), "docs", Limits(max_frame_bytes=1000))
    assert parsed.error is not None and parsed.error.code == "too_large"


def test_completion_fields() -> None:
    done = Completion("5-1", "docs", "a", Status.INDEXED, 7)
    assert done.to_fields() == {"entry": "5-1", "collection": "docs", "id": "a", "seq": "7", "status": "indexed"}
    refused = Completion("5-2", "docs", "b", Status.REJECTED, error=BadRequest("no"))
    assert refused.to_fields()["code"] == "bad_request" and refused.to_fields()["message"] == "no"
    assert refused.to_fields()["seq"] == ""


def test_source_urls() -> None:
    url = parse_url("redis://u:pw@127.0.0.1:6390/2?stream=s&group=g&collection=c&notify=done")
    assert (url.host, url.port, url.db, url.stream, url.group, url.collection, url.notify) == (
        "127.0.0.1",
        6390,
        2,
        "s",
        "g",
        "c",
        "done",
    )
    assert url.password == "pw" and "pw" not in url.safe_url and "u:" not in url.safe_url
    plain = parse_url("redis://127.0.0.1/0?stream=s")
    assert (plain.port, plain.group, plain.notify, plain.consumer) == (6379, "shoal", "s.indexed", "shoal")
    bad_urls = ("redis://h/0?stream=s&stream=t", "redis://h/0?stream=s&notify=s", "redis://h/0?stream=s&collection=a b")
    for bad in bad_urls:
        with pytest.raises(StartupError):
            parse_url(bad)
