"""Hypothesis strategies for Shoal requests and frames, plus the checks every answer must pass.

The request space is `load.fuzz_frames.FrameGen` (one generator, shared with the live fuzz run):
here it draws from a Random that hypothesis controls (`st.randoms(use_true_random=False)`), so
hypothesis explores it and shrinks a failure to a small frame. Native strategies add what
hypothesis generates better: arbitrary text (surrogates included), integers and floats at every
size, and arbitrary nested values with binary keys.

Profiles: `ci` (default; derandomised, so a run is deterministic) and `soak`
(`HYPOTHESIS_PROFILE=soak`: many more examples, a fresh seed each run, printed on failure).
"""

from __future__ import annotations

import os
from datetime import timedelta
from typing import Any

import msgpack
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st

from load.fuzz import MAX_MESSAGE_CHARS, internals_in
from load.fuzz_frames import OPS, FrameGen, Wire
from models.errors import ALL_ERRORS, ShoalError

settings.register_profile(
    "ci",
    max_examples=300,
    derandomize=True,
    deadline=timedelta(milliseconds=500),
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
settings.register_profile(
    "soak",
    max_examples=20_000,
    deadline=timedelta(milliseconds=500),
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
    print_blob=True,
)
PROFILE = settings.get_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))

ERROR_CODES = frozenset(e.code for e in ALL_ERRORS)


def check_error(error: ShoalError) -> None:
    """A client-visible error: a code of the table, never `internal`, a bounded, clean message."""
    assert isinstance(error, ShoalError), type(error)
    assert error.code in ERROR_CODES, error.code
    assert error.code != "internal", error.message
    assert len(error.message) <= MAX_MESSAGE_CHARS, f"{len(error.message)}-char message: {error.message[:200]!r}..."
    leak = internals_in(error.message)
    assert leak is None, f"message shows {leak!r}: {error.message[:300]!r}"


def generators(wire: Wire = "python", *, big: bool = False) -> st.SearchStrategy[FrameGen]:
    """A FrameGen over a hypothesis-controlled Random (shrinks with the example)."""
    return st.randoms(use_true_random=False, note_method_calls=False).map(lambda r: FrameGen(r, wire=wire, big=big))


@st.composite
def requests(draw: st.DrawFn, wire: Wire = "python") -> tuple[Any, dict[Any, Any]]:
    """(op, args) as a decoder hands them to `parse_request`."""
    return draw(generators(wire)).request()


@st.composite
def frame_bytes(draw: st.DrawFn) -> bytes | str:
    """One WebSocket message as a client may send it (a str is a text frame)."""
    return draw(generators("msgpack")).raw_frame()


# -- native strategies: values hypothesis is better at ----------------------------------------

any_text = st.text(st.characters(exclude_categories=()), max_size=40)  # surrogates and NUL too
any_int = st.one_of(
    st.integers(-(2**63) - 2, 2**64 + 1),
    st.sampled_from([-(2**63), 2**63 - 1, 2**63, 2**64 - 1, 2**64, 10**30, -(10**400)]),
    st.integers(),
)
any_float = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True),
    st.sampled_from([3e38, -3e38, 3.4028235e38, 3.5e38, 1.7976931348623157e308, 5e-324]),
)
any_key = st.one_of(any_text, st.binary(max_size=8))
scalars = st.one_of(st.none(), st.booleans(), any_int, any_float, any_text, st.binary(max_size=16))
values = st.recursive(
    scalars,
    lambda kids: st.one_of(st.lists(kids, max_size=4), st.dictionaries(any_key, kids, max_size=4)),
    max_leaves=12,
)
ops = st.one_of(st.sampled_from(OPS), any_text, values)


@st.composite
def mutated_requests(draw: st.DrawFn) -> tuple[Any, dict[Any, Any]]:
    """A generated request with one argument (top level, or inside a doc, filter or metadata)
    replaced by an arbitrary native value, or an arbitrary key added."""
    op, args = draw(requests())
    target = draw(st.sampled_from(["top", "new", "doc", "meta", "where"]))
    value = draw(values)
    if target == "top" and args:
        args[draw(st.sampled_from(sorted(args, key=repr)))] = value
    elif target == "doc" and isinstance(args.get("docs"), list) and args["docs"]:
        doc = args["docs"][0]
        if isinstance(doc, dict):
            doc[draw(st.sampled_from(["id", "text", "vector", "metadata", "extra"]))] = value
    elif target == "meta" and isinstance(args.get("docs"), list) and args["docs"]:
        doc = args["docs"][0]
        if isinstance(doc, dict):
            doc["metadata"] = {draw(any_key): value}
    elif target == "where":
        args["where"] = draw(st.one_of(values, st.dictionaries(any_key, values, max_size=3)))
    else:
        args[draw(any_key)] = value
    return op, args


def packed(frame: dict[Any, Any]) -> bytes:
    data: bytes = msgpack.packb(frame, use_bin_type=True, unicode_errors="surrogatepass")
    return data
