"""Property tests of the frame codec and the request parser, in-process (no server).

Property: every input either parses to a typed request that holds only values the engine can
serve, or raises a `ShoalError` whose code is in the error table (never `internal`, never another
exception type), with a bounded message that shows nothing of the server's insides; and
parsing is bounded in time (hypothesis `deadline`, and explicit timings for the largest inputs).

`HYPOTHESIS_PROFILE=soak` runs many more examples with fresh seeds (see tests/frame_strategies.py).
The named tests below the properties pin each known hostile input, so a fix can be checked with
`pytest tests/test_fuzz_parser.py -k <name>`.
"""

from __future__ import annotations

import dataclasses
import enum
import gc
import math
import time
from typing import Any

import msgpack
import numpy as np
import pytest
from hypothesis import currently_in_test_context, example, given, note
from hypothesis import strategies as st

from models.codec import MIN_FRAME_ITEMS, Frame, FrameError, decode_frame, frame_items
from models.config import Limits
from models.errors import ShoalError
from models.requests import PARSERS, Request, parse_request
from tests.frame_strategies import (
    PROFILE,
    any_key,
    check_error,
    frame_bytes,
    mutated_requests,
    ops,
    packed,
    requests,
    values,
)

LIMITS = Limits()
INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1


def short(obj: Any, n: int = 600) -> str:
    try:
        text = repr(obj)
    except RecursionError:
        return f"<{type(obj).__name__} nested too deep to print>"
    return text if len(text) <= n else f"{text[:n]}... ({len(text)} chars)"


def servable_problem(value: Any, path: str = "request") -> str | None:
    """Why a parsed request could not be stored, embedded or answered (None when it can): every
    string encodes as UTF-8, every integer fits in 64 bits, every float and vector is finite."""
    if isinstance(value, enum.Enum):
        return None
    if isinstance(value, str):
        try:
            value.encode("utf-8")
        except UnicodeEncodeError:
            return f"{path}: a string with a lone surrogate ({short(value, 80)})"
        return None
    if isinstance(value, bool) or value is None:
        return None
    if isinstance(value, int):
        return None if INT64_MIN <= value <= INT64_MAX else f"{path}: integer {short(value, 80)} beyond 64 bits"
    if isinstance(value, float):
        return None if math.isfinite(value) else f"{path}: non-finite float {value}"
    if isinstance(value, np.ndarray):
        return None if bool(np.isfinite(value).all()) else f"{path}: non-finite vector"
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        for f in dataclasses.fields(value):
            problem = servable_problem(getattr(value, f.name), f"{path}.{f.name}")
            if problem:
                return problem
        return None
    if isinstance(value, dict):
        for k, v in value.items():
            problem = servable_problem(k, f"{path}[key]") or servable_problem(v, f"{path}[{short(k, 40)}]")
            if problem:
                return problem
        return None
    if isinstance(value, list | tuple | frozenset | set):
        for i, item in enumerate(value):
            problem = servable_problem(item, f"{path}[{i}]")
            if problem:
                return problem
        return None
    return f"{path}: unexpected {type(value).__name__}"


def check_parse(op: Any, args: Any) -> Request | None:
    """Parse and apply the property; returns the request when it parsed."""
    if currently_in_test_context():
        note(f"op={short(op)} args={short(args, 2000)}")
    try:
        request = parse_request(op, args, LIMITS)
    except ShoalError as exc:
        check_error(exc)
        return None
    except Exception as exc:  # the property under test: nothing but ShoalError escapes
        raise AssertionError(
            f"parse_request raised {type(exc).__name__}: {exc}\n  op={short(op)}\n  args={short(args)}"
        ) from exc
    problem = servable_problem(request)
    assert problem is None, f"parsed, but not servable: {problem}\n  op={short(op)}\n  args={short(args)}"
    return request


def check_decode(data: bytes) -> Frame | None:
    try:
        return decode_frame(data)
    except FrameError as exc:
        check_error(exc.error)
        return None
    except Exception as exc:
        raise AssertionError(f"decode_frame raised {type(exc).__name__}: {exc}\n  bytes={short(data)}") from exc


# -- properties -------------------------------------------------------------------------------


@PROFILE
@given(st.binary(max_size=256))
@example(b"")
@example(b"\xc1")
@example(b"\x91" * 5000)  # nested arrays deeper than the unpacker's stack
@example(b"\x81\xc4\x01k\x01")  # {b"k": 1}
@example(b"\x82\xa2id\x01\xa2op\xa3\xff\xfe\xfd")  # invalid UTF-8 in a str
def test_decode_frame_of_arbitrary_bytes(data: bytes) -> None:
    check_decode(data)


@PROFILE
@given(frame_bytes())
def test_generated_frames_decode_and_parse(data: bytes | str) -> None:
    if isinstance(data, str):
        return  # a text frame never reaches the codec (the endpoint answers bad_frame)
    frame = check_decode(data)
    if frame is not None:
        check_parse(frame.op, frame.args)


@PROFILE
@given(requests())
def test_generated_requests_parse_or_fail_typed(request: tuple[Any, dict[Any, Any]]) -> None:
    check_parse(*request)


@PROFILE
@given(requests(wire="json"))
def test_generated_json_requests_parse_or_fail_typed(request: tuple[Any, dict[Any, Any]]) -> None:
    check_parse(*request)


@PROFILE
@given(mutated_requests())
def test_mutated_requests_parse_or_fail_typed(request: tuple[Any, dict[Any, Any]]) -> None:
    check_parse(*request)


@PROFILE
@given(ops, st.dictionaries(any_key, values, max_size=6))
def test_arbitrary_ops_and_arguments_parse_or_fail_typed(op: Any, args: dict[Any, Any]) -> None:
    check_parse(op, args)


@PROFILE
@given(
    st.sampled_from(sorted(PARSERS)),
    st.dictionaries(
        st.sampled_from(
            [
                "collection",
                "name",
                "docs",
                "ids",
                "where",
                "where_text",
                "vector",
                "text",
                "k",
                "ef",
                "include",
                "threshold",
                "after_seq",
                "dim",
                "metric",
                "if_not_exists",
                "mode",
                "fusion",
                "alpha",
                "key",
                "sub",
            ]
        ),
        values,
        max_size=6,
    ),
)
def test_known_arguments_with_arbitrary_values_parse_or_fail_typed(op: str, args: dict[str, Any]) -> None:
    check_parse(op, args)


# -- pinned hostile inputs (one test per defect class, for `-k`) ------------------------------

SURROGATE = "\ud800"
STRING_ARGS: list[tuple[str, dict[str, Any]]] = [
    ("query_text", {"op": "query", "collection": "c", "text": SURROGATE}),
    ("subscribe_text", {"op": "subscribe", "collection": "c", "text": "a" + SURROGATE, "threshold": 0.5}),
    ("doc_id", {"op": "upsert", "collection": "c", "docs": [{"id": SURROGATE, "vector": [1.0]}]}),
    ("doc_text", {"op": "upsert", "collection": "c", "docs": [{"id": "a", "text": SURROGATE}]}),
    (
        "meta_key",
        {"op": "upsert", "collection": "c", "docs": [{"id": "a", "vector": [1.0], "metadata": {SURROGATE: 1}}]},
    ),
    (
        "meta_value",
        {"op": "upsert", "collection": "c", "docs": [{"id": "a", "vector": [1.0], "metadata": {"t": SURROGATE}}]},
    ),
    (
        "meta_list",
        {"op": "upsert", "collection": "c", "docs": [{"id": "a", "vector": [1.0], "metadata": {"t": [SURROGATE]}}]},
    ),
    ("get_id", {"op": "get", "collection": "c", "ids": [SURROGATE]}),
    ("delete_id", {"op": "delete", "collection": "c", "ids": [SURROGATE]}),
    ("where_value", {"op": "delete", "collection": "c", "where": {"t": SURROGATE}}),
    ("where_field", {"op": "query", "collection": "c", "vector": [1.0], "where": {SURROGATE: 1}}),
    ("where_in", {"op": "query", "collection": "c", "vector": [1.0], "where": {"t": {"$in": [SURROGATE]}}}),
    ("where_text", {"op": "delete", "collection": "c", "where_text": {"$contains": SURROGATE}}),
    ("auth_key", {"op": "auth", "key": SURROGATE}),
    ("unsubscribe_sub", {"op": "unsubscribe", "sub": SURROGATE}),
    ("unknown_arg", {"op": "ping", SURROGATE: 1}),
    ("unknown_op", {"op": SURROGATE}),
]


@pytest.mark.parametrize("frame", [f for _, f in STRING_ARGS], ids=[n for n, _ in STRING_ARGS])
def test_lone_surrogates_are_rejected_or_servable(frame: dict[str, Any]) -> None:
    op = frame.pop("op")
    check_parse(op, frame)


@pytest.mark.parametrize(
    "args",
    [
        {"ping": None, b"bin": 1},
        {b"\xff": 1},
        {"collection": "c", b"bin": 1},
        {b"a": 1, "b": 2},
    ],
    ids=["only_bin", "invalid_utf8_bin", "bin_and_str", "bin_unknown_and_str_unknown"],
)
def test_binary_map_keys_at_the_top_level(args: dict[Any, Any]) -> None:
    args.pop("ping", None)
    for op in ("ping", "count"):
        check_parse(op, dict(args))
    # ...and the same through the codec, as a client sends them: refused there (typed, with the
    # request id) or by the parser.
    frame = check_decode(packed({"id": 1, "op": "count", **args}))
    if frame is not None:
        check_parse(frame.op, frame.args)


@pytest.mark.parametrize(
    "args",
    [
        {"collection": "c", "docs": [{"id": "a", "vector": [1.0], b"vector": 1}]},
        {"collection": "c", "docs": [{"id": "a", "vector": [1.0], "metadata": {b"k": 1}}]},
        {"collection": "c", "vector": [1.0], "where": {b"k": 1}},
        {"collection": "c", "vector": [1.0], "where": {"k": {b"$eq": 1}}},
        {"collection": "c", "vector": [1.0], "where": {"$and": [{b"k": 1}]}},
        {"collection": "c", "vector": [1.0], "where_text": {b"$contains": "a"}},
    ],
    ids=["doc_field", "metadata", "where", "where_op", "where_nested", "where_text"],
)
def test_binary_map_keys_nested(args: dict[Any, Any]) -> None:
    check_parse("upsert" if "docs" in args else "query", args)


HUGE_INTS = [2**63, -(2**63) - 1, 2**64, 10**30, 10**400]
INT_ARGS: list[tuple[str, str, dict[str, Any]]] = [
    ("k", "query", {"collection": "c", "vector": [1.0], "k": 0}),
    ("ef", "query", {"collection": "c", "vector": [1.0], "ef": 0}),
    ("alpha", "query", {"collection": "c", "vector": [1.0], "alpha": 0}),
    ("threshold", "subscribe", {"collection": "c", "vector": [1.0], "threshold": 0}),
    ("after_seq", "subscribe", {"collection": "c", "vector": [1.0], "threshold": 0.5, "after_seq": 0}),
    ("dim", "create_collection", {"name": "c", "dim": 0}),
    ("vector_item", "query", {"collection": "c", "vector": [0]}),
    ("metadata", "upsert", {"collection": "c", "docs": [{"id": "a", "vector": [1.0], "metadata": {"n": 0}}]}),
    ("where", "query", {"collection": "c", "vector": [1.0], "where": {"n": {"$gt": 0}}}),
    ("where_in", "query", {"collection": "c", "vector": [1.0], "where": {"n": {"$in": [0]}}}),
]


def _set_int(args: dict[str, Any], name: str, value: int) -> dict[str, Any]:
    import copy

    out = copy.deepcopy(args)
    if name == "vector_item":
        out["vector"] = [value]
    elif name == "metadata":
        out["docs"][0]["metadata"]["n"] = value
    elif name == "where":
        out["where"]["n"]["$gt"] = value
    elif name == "where_in":
        out["where"]["n"]["$in"] = [value]
    else:
        out[name] = value
    return out


@pytest.mark.parametrize("value", HUGE_INTS, ids=["int64_max_plus_1", "int64_min_minus_1", "2_64", "1e30", "1e400"])
@pytest.mark.parametrize("case", INT_ARGS, ids=[c[0] for c in INT_ARGS])
def test_huge_integers_are_rejected_or_servable(case: tuple[str, str, dict[str, Any]], value: int) -> None:
    name, op, args = case
    check_parse(op, _set_int(args, name, value))


@pytest.mark.parametrize("value", [3e38, -3e38, 3.4028235e38, 1.7976931348623157e308, math.nan, math.inf])
def test_huge_and_non_finite_floats_are_rejected_or_servable(value: float) -> None:
    check_parse("query", {"collection": "c", "vector": [value] * 8})
    check_parse("query", {"collection": "c", "vector": np.full(8, value, "<f8").astype("<f4").tobytes()})
    check_parse("subscribe", {"collection": "c", "vector": [1.0], "threshold": value})
    check_parse("query", {"collection": "c", "vector": [1.0], "alpha": value})
    check_parse("upsert", {"collection": "c", "docs": [{"id": "a", "vector": [1.0], "metadata": {"x": value}}]})
    check_parse("query", {"collection": "c", "vector": [1.0], "where": {"x": {"$lt": value}}})


@pytest.mark.parametrize("length", [0, 1, 3, 5, 4 * 4097])
def test_binary_vectors_of_wrong_length(length: int) -> None:
    check_parse("query", {"collection": "c", "vector": b"\x00\x00\x80\x3f" * (length // 4) + b"\x01" * (length % 4)})


def test_empty_query_text_is_rejected() -> None:
    for op, extra in (("query", {}), ("subscribe", {"threshold": 0.5})):
        with pytest.raises(ShoalError) as caught:
            parse_request(op, {"collection": "c", "text": "", **extra}, LIMITS)
        check_error(caught.value)


def test_ten_megabyte_unknown_argument_is_not_echoed_in_full() -> None:
    for op in ("ping", "query"):
        args: dict[str, Any] = {"u" * (10 * 1024 * 1024): 1}
        if op == "query":
            args.update(collection="c", vector=[1.0])
        with pytest.raises(ShoalError) as caught:
            parse_request(op, args, LIMITS)
        check_error(caught.value)


@pytest.mark.parametrize(
    "where",
    [
        {"f" * 100_000: {"$regex": 1}},
        {"n": {"$" + "x" * 100_000: 1}},
        {"$" + "x" * 100_000: 1},
        {"n": {"k" * 100_000: 1}},
    ],
    ids=["long_field", "long_operator", "long_top_operator", "long_nested_key"],
)
def test_long_filter_keys_are_not_echoed_in_full(where: dict[str, Any]) -> None:
    with pytest.raises(ShoalError) as caught:
        parse_request("query", {"collection": "c", "vector": [1.0], "where": where}, LIMITS)
    check_error(caught.value)


def _deep(depth: int) -> dict[str, Any]:
    node: dict[str, Any] = {"n": 1}
    for _ in range(depth):
        node = {"$and": [node]}
    return node


@pytest.mark.parametrize("depth", [8, 9, 100, 100_000])
def test_deep_filters_are_bounded(depth: int) -> None:
    where = _deep(depth)
    gc.collect()  # the cycle collector walking 10^5 fresh maps is not the parser's time
    started = time.perf_counter()
    check_parse("query", {"collection": "c", "vector": [1.0], "where": where})
    assert time.perf_counter() - started < 0.1


@pytest.mark.parametrize("size", [10_000, 1_000_000])
def test_large_in_lists_parse_in_bounded_time(size: int) -> None:
    """A `$in` as large as a frame allows must not hold the event loop: parsed or refused fast
    (a million values are refused by the decoder, before they are unpacked)."""
    where = {"n": {"$in": list(range(size))}}
    data = msgpack.packb({"id": 1, "op": "query", "collection": "c", "vector": [1.0], "where": where})
    started = time.perf_counter()
    frame = check_decode(data)
    if size > MIN_FRAME_ITEMS:
        assert frame is None and time.perf_counter() - started < 0.05
        frame = decode_frame(data, frame_items(Limits(max_filter_values=size)))
    assert frame is not None
    decoded = time.perf_counter()
    check_parse(frame.op, frame.args)
    parsed = time.perf_counter() - decoded
    assert parsed < 0.05, f"$in of {size} values took {parsed * 1000:.0f} ms to parse"


def test_wide_filters_are_bounded() -> None:
    started = time.perf_counter()
    check_parse("query", {"collection": "c", "vector": [1.0], "where": {"$or": [{"n": i} for i in range(50_000)]}})
    check_parse("query", {"collection": "c", "vector": [1.0], "where": {f"f{i}": i for i in range(50_000)}})
    assert time.perf_counter() - started < 0.5


def test_an_array_or_map_past_the_frame_bound_is_too_large_with_the_frames_id() -> None:
    """msgpack checks a container's length before building it: the million items are never
    made, and the id is found by skipping over the other values."""
    million = list(range(1_000_000))
    for frame, want_id in (
        ({"op": "query", "where": {"n": {"$in": million}}, "id": 7}, 7),
        ({"id": 8, "op": "upsert", "docs": [{"metadata": {f"k{i}": i for i in range(MIN_FRAME_ITEMS + 1)}}]}, 8),
        ({"op": "query", "vector": million}, None),  # no id in the frame
        ({"id": True, "op": "query", "vector": million}, None),  # not a valid id
    ):
        data = msgpack.packb(frame)
        started = time.perf_counter()
        with pytest.raises(FrameError) as caught:
            decode_frame(data)
        assert caught.value.error.code == "too_large" and caught.value.request_id == want_id
        assert time.perf_counter() - started < 0.05  # nothing was unpacked
    at_bound = msgpack.packb({"id": 9, "op": "query", "where": {"n": {"$in": list(range(MIN_FRAME_ITEMS))}}})
    assert decode_frame(at_bound).request_id == 9
    raised = Limits(max_filter_values=200_000)
    wide = msgpack.packb({"id": 10, "op": "query", "where": {"n": {"$in": list(range(150_000))}}})
    assert decode_frame(wide, frame_items(raised)).request_id == 10
    with pytest.raises(FrameError):
        decode_frame(wide)
