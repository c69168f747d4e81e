"""The filter language: parsing, the numpy mask, and the SQL translation against a real PostgreSQL."""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import AsyncIterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import asyncpg
import numpy as np
import pytest

from actors.pg_server import open_database
from models.errors import BadRequest, TooLarge
from models.filters import (
    And,
    Compare,
    Filter,
    InSet,
    MetadataColumns,
    Or,
    TextFilter,
    parse_where,
    parse_where_text,
    text_mask,
    text_to_sql,
    to_sql,
)

# --- a naive reference evaluator, one row at a time -----------------------------------------------


def _ref_eq(doc: Any, want: Any) -> bool:
    if isinstance(doc, list):
        return isinstance(want, str) and want in doc
    if isinstance(doc, bool) or isinstance(want, bool):
        return type(doc) is bool and type(want) is bool and doc == want
    if isinstance(doc, str) or isinstance(want, str):
        return type(doc) is str and type(want) is str and doc == want
    return float(doc) == float(want)


def _ref(flt: Filter, md: Mapping[str, Any]) -> bool:
    if isinstance(flt, And):
        return all(_ref(c, md) for c in flt.children)
    if isinstance(flt, Or):
        return any(_ref(c, md) for c in flt.children)
    present = flt.field in md
    doc: Any = md.get(flt.field)
    if isinstance(flt, InSet):
        hit = present and any(_ref_eq(doc, v) for v in flt.values)
        return hit if flt.op == "$in" else not hit
    if flt.op in ("$eq", "$ne"):
        hit = present and _ref_eq(doc, flt.value)
        return hit if flt.op == "$eq" else not hit
    if not present or isinstance(doc, bool | str | list):
        return False
    a, b = float(doc), float(flt.value)
    return {"$gt": a > b, "$gte": a >= b, "$lt": a < b, "$lte": a <= b}[flt.op]


def _ids(mask: np.ndarray[Any, Any]) -> list[int]:
    return [int(i) for i in np.flatnonzero(mask)]


# --- parsing ---------------------------------------------------------------------------------------


def _nest(depth: int) -> dict[str, Any]:
    """A filter of exactly `depth`: depth - 1 nested $and around one comparison."""
    flt: dict[str, Any] = {"a": 1}
    for _ in range(depth - 1):
        flt = {"$and": [flt]}
    return flt


@pytest.mark.parametrize(
    ("where", "message"),
    [
        ([], "where: a filter must be a map, got list"),
        ("a", "a filter must be a map, got string"),
        (None, "a filter must be a map, got null"),
        ({}, "where: empty filter map"),
        ({"": 1}, "empty field name"),
        ({"$foo": 1}, "unknown operator '$foo'"),
        ({"$not": {"a": 1}}, "unknown operator '$not'"),
        ({"$contains": "x"}, "unknown operator '$contains'"),
        ({1: 2}, "keys must be strings"),
        ({"a": None}, "where.a: needs a string, number or bool, got null"),
        ({"a": [1, 2]}, "where.a: needs a string, number or bool, got list"),
        ({"a": b"x"}, "got bytes"),
        ({"a": {}}, "where.a: empty operator map"),
        ({"a": {"$regex": "x"}}, "where.a: unknown operator '$regex'"),
        ({"a": {"b": 1}}, "no nested maps"),
        ({"a": {"$eq": None}}, "where.a.$eq: needs a string, number or bool, got null"),
        ({"a": {"$eq": {"$eq": 1}}}, "where.a.$eq: needs a string, number or bool, got map"),
        ({"a": {"$ne": [1]}}, "where.a.$ne: needs"),
        ({"a": {"$gt": "x"}}, "where.a.$gt: needs a number, got string"),
        ({"a": {"$gte": True}}, "where.a.$gte: needs a number, got bool"),
        ({"a": {"$lt": None}}, "where.a.$lt: needs a number, got null"),
        ({"a": {"$lte": [1]}}, "needs a number, got list"),
        ({"a": {"$gt": float("nan")}}, "must be finite"),
        ({"a": {"$eq": float("inf")}}, "must be finite"),
        ({"a": 2**63}, "64-bit"),
        ({"a": {"$in": "x"}}, "where.a.$in: needs a list, got string"),
        ({"a": {"$nin": 3}}, "where.a.$nin: needs a list, got number"),
        ({"a": {"$in": [1, [2]]}}, "where.a.$in[1]: needs a string, number or bool, got list"),
        ({"a": {"$in": [None]}}, "where.a.$in[0]"),
        ({"$and": []}, "where.$and: empty list"),
        ({"$or": []}, "where.$or: empty list"),
        ({"$and": {"a": 1}}, "where.$and: needs a list of filters, got map"),
        ({"$or": "a"}, "needs a list of filters, got string"),
        ({"$and": [{"a": 1}, 5]}, "where.$and[1]: a filter must be a map, got number"),
        ({"$or": [{"a": 1}, {}]}, "where.$or[1]: empty filter map"),
        ({"$and": [{"$or": [{"a": {"$gt": "z"}}]}]}, "where.$and[0].$or[0].a.$gt: needs a number"),
        (_nest(9), "nested deeper than 8"),
    ],
)
def test_parse_errors(where: object, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_where(where)
    assert message in info.value.message
    assert info.value.code == "bad_request"


def test_parse_shapes() -> None:
    assert parse_where({"a": "x"}) == Compare("a", "$eq", "x")
    assert parse_where({"a": {"$ne": 1.5}}) == Compare("a", "$ne", 1.5)
    assert parse_where({"a": {"$in": ["x", 1, True]}}) == InSet("a", "$in", ("x", 1, True))
    assert parse_where({"a": {"$nin": []}}) == InSet("a", "$nin", ())
    # Several keys, or several operators, are ANDed.
    assert parse_where({"a": 1, "b": {"$gt": 0, "$lt": 5}}) == And(
        (Compare("a", "$eq", 1), Compare("b", "$gt", 0), Compare("b", "$lt", 5))
    )
    assert parse_where({"$or": [{"a": 1}, {"$and": [{"b": True}]}]}) == Or(
        (Compare("a", "$eq", 1), And((Compare("b", "$eq", True),)))
    )
    assert parse_where({"a.b": 1}) == Compare("a.b", "$eq", 1)


def test_depth_limit() -> None:
    assert isinstance(parse_where(_nest(8)), And)
    with pytest.raises(BadRequest, match="deeper than 8"):
        parse_where(_nest(9))
    # $or counts like $and; the implicit AND of a multi-key map adds no depth.
    wide = {"$or": [_nest(7), {"x": 1, "y": 2}]}
    assert isinstance(parse_where(wide), Or)
    with pytest.raises(BadRequest, match="deeper than 8"):
        parse_where({"$or": [_nest(8)]})
    assert parse_where(_nest(3), max_depth=3)
    with pytest.raises(BadRequest, match="deeper than 2"):
        parse_where(_nest(3), max_depth=2)
    with pytest.raises(BadRequest, match="deeper than 0"):
        parse_where({"a": 1}, max_depth=0)


def test_hostile_nesting_is_rejected_without_recursion_error() -> None:
    flt: dict[str, Any] = {"a": 1}
    for _ in range(100_000):
        flt = {"$or": [flt]}
    with pytest.raises(BadRequest, match="deeper than 8"):
        parse_where(flt)


def test_size_limits_are_checked_before_a_list_is_read() -> None:
    class Exploding(list[object]):
        def __iter__(self) -> Any:
            raise AssertionError("read an oversized $in list")

    with pytest.raises(TooLarge, match="at most 10000 values"):
        parse_where({"k": {"$in": Exploding(range(10_001))}})
    assert isinstance(parse_where({"k": {"$nin": list(range(10_000))}}), InSet)
    # Values add up across the whole filter; nodes count comparisons and $and / $or.
    with pytest.raises(TooLarge, match="values in all"):
        parse_where({"a": {"$in": list(range(6_000))}, "b": {"$in": list(range(6_000))}})
    with pytest.raises(TooLarge, match="at most 3 comparisons"):
        parse_where({"$or": [{"a": 1}, {"b": 2}, {"c": 3}]}, max_nodes=3)
    assert isinstance(parse_where({"$or": [{"a": 1}, {"b": 2}]}, max_nodes=3), Or)
    assert parse_where({"a": {"$in": [1, 2]}}, max_values=2) == InSet("a", "$in", (1, 2))
    with pytest.raises(TooLarge):
        parse_where({"a": 1, "b": {"$in": [1, 2]}}, max_values=2)


@pytest.mark.parametrize("bad", ["x\udfff", "x\x00"])
def test_strings_postgresql_cannot_hold_are_refused(bad: str) -> None:
    for where in ({"k": bad}, {"k": {"$ne": bad}}, {"k": {"$in": ["ok", bad]}}, {bad: 1}):
        with pytest.raises(BadRequest, match=r"NUL|surrogate"):
            parse_where(where)
    with pytest.raises(BadRequest, match=r"NUL|surrogate"):
        parse_where_text({"$contains": bad})
    with pytest.raises(TooLarge):
        parse_where_text({"$not_contains": "x" * 11}, max_chars=10)


def test_error_paths_quote_long_names_shortened() -> None:
    name = "f" * 100_000
    with pytest.raises(BadRequest) as info:
        parse_where({name: {"$gt": "x"}})
    assert len(info.value.message) < 200 and "\u2026" in info.value.message
    with pytest.raises(BadRequest) as info:
        parse_where({"a": {"$" + name: 1}})
    assert len(info.value.message) < 200


@pytest.mark.parametrize(
    ("where_text", "message"),
    [
        ({}, "exactly one"),
        ("x", "exactly one"),
        ({"$contains": "x", "$not_contains": "y"}, "exactly one"),
        ({"$regex": "x"}, "unknown operator '$regex'"),
        ({"$eq": "x"}, "unknown operator"),
        ({"$contains": 1}, "where_text.$contains: needs a string, got number"),
        ({"$not_contains": None}, "needs a string, got null"),
        ({"$contains": ["x"]}, "got list"),
    ],
)
def test_parse_where_text_errors(where_text: object, message: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_where_text(where_text)
    assert message in info.value.message


def test_text_mask() -> None:
    assert parse_where_text({"$contains": "ab"}) == TextFilter("ab", negate=False)
    texts = ["xaby", "AB", None, "", "ab"]
    assert _ids(text_mask(parse_where_text({"$contains": "ab"}), texts)) == [0, 4]
    assert _ids(text_mask(parse_where_text({"$not_contains": "ab"}), texts)) == [1, 3]
    # The empty needle is in every text, and None still matches neither form.
    assert _ids(text_mask(TextFilter("", negate=False), texts)) == [0, 1, 3, 4]
    assert _ids(text_mask(TextFilter("", negate=True), texts)) == []
    assert text_mask(TextFilter("a", negate=False), []).shape == (0,)


# --- mask semantics --------------------------------------------------------------------------------

ROWS: list[dict[str, Any]] = [
    {"n": 1, "s": "x", "tags": ["a", "b"]},  # 0
    {"n": 1.0, "s": "1", "b": True},  # 1
    {"n": 2.5, "s": "y", "tags": []},  # 2
    {"n": True, "s": 1, "b": False, "tags": ["b"]},  # 3
    {"n": "1", "tags": "a"},  # 4
    {},  # 5
    {"n": -3, "b": 1, "tags": ["c", "c"]},  # 6
]


@pytest.mark.parametrize(
    ("where", "expected"),
    [
        # Type-strict equality: 1 == 1.0, True != 1, "1" != 1.
        ({"n": 1}, [0, 1]),
        ({"n": 1.0}, [0, 1]),
        ({"n": True}, [3]),
        ({"n": "1"}, [4]),
        ({"s": 1}, [3]),
        ({"b": True}, [1]),
        ({"b": 1}, [6]),
        ({"b": False}, [3]),
        # A row that lacks the field matches only $ne / $nin.
        ({"n": {"$ne": 1}}, [2, 3, 4, 5, 6]),
        ({"b": {"$ne": True}}, [0, 2, 3, 4, 5, 6]),
        ({"zz": {"$ne": 1}}, [0, 1, 2, 3, 4, 5, 6]),
        ({"zz": {"$nin": [1]}}, [0, 1, 2, 3, 4, 5, 6]),
        ({"zz": 1}, []),
        ({"zz": {"$in": [1, "x"]}}, []),
        ({"zz": {"$gt": -1e9}}, []),
        # Lists: any element for $eq / $in, no element for $ne / $nin; a scalar str also matches.
        ({"tags": "a"}, [0, 4]),
        ({"tags": "b"}, [0, 3]),
        ({"tags": "c"}, [6]),
        ({"tags": {"$ne": "b"}}, [1, 2, 4, 5, 6]),
        ({"tags": {"$in": ["c", "b"]}}, [0, 3, 6]),
        ({"tags": {"$nin": ["a", "c"]}}, [1, 2, 3, 5]),
        ({"tags": {"$in": [1, True]}}, []),
        # Ordering: numbers only.
        ({"n": {"$gt": 1}}, [2]),
        ({"n": {"$gte": 1}}, [0, 1, 2]),
        ({"n": {"$lt": 1}}, [6]),
        ({"n": {"$lte": 1.0}}, [0, 1, 6]),
        ({"n": {"$gt": 0, "$lt": 2}}, [0, 1]),
        ({"s": {"$gt": 0}}, [3]),
        ({"b": {"$gte": 0}}, [6]),
        # Sets.
        ({"n": {"$in": []}}, []),
        ({"n": {"$nin": []}}, [0, 1, 2, 3, 4, 5, 6]),
        ({"n": {"$in": [2.5, "1", True]}}, [2, 3, 4]),
        ({"n": {"$nin": [1, -3]}}, [2, 3, 4, 5]),
        ({"s": {"$in": ["x", "y", "zz"]}}, [0, 2]),
        ({"b": {"$in": [True, False]}}, [1, 3]),
        # Logic.
        ({"n": 1, "s": "x"}, [0]),
        ({"$and": [{"n": 1}, {"s": "1"}]}, [1]),
        ({"$or": [{"n": 2.5}, {"s": 1}, {"tags": "c"}]}, [2, 3, 6]),
        ({"$or": [{"$and": [{"n": 1}, {"b": True}]}, {"$and": [{"zz": {"$ne": 0}}, {"s": "y"}]}]}, [1, 2]),
        ({"$and": [{"$or": [{"n": {"$lt": 0}}, {"tags": "a"}]}, {"s": {"$nin": ["x"]}}]}, [4, 6]),
    ],
)
def test_mask_semantics(where: dict[str, Any], expected: list[int]) -> None:
    flt = parse_where(where)
    store = MetadataColumns.from_rows(ROWS)
    assert _ids(store.mask(flt, len(ROWS))) == expected
    assert [i for i, md in enumerate(ROWS) if _ref(flt, md)] == expected


def test_rows_past_the_store_lack_every_field() -> None:
    store = MetadataColumns(capacity=2)
    store.set_row(0, {"a": 1})
    assert _ids(store.mask(parse_where({"a": 1}), 5)) == [0]
    assert _ids(store.mask(parse_where({"a": {"$ne": 1}}), 5)) == [1, 2, 3, 4]
    assert _ids(store.mask(parse_where({"a": {"$nin": [1]}}), 1)) == []
    assert store.mask(parse_where({"a": 1}), 0).shape == (0,)
    assert _ids(store.mask(And(()), 3)) == [0, 1, 2]
    assert _ids(store.mask(Or(()), 3)) == []


def test_set_row_replaces_and_clear_row_forgets() -> None:
    store = MetadataColumns(capacity=1)
    store.set_row(0, {"a": "x", "t": ["p", "q"]})
    store.set_row(5, {"a": "x", "n": 3})  # grows past the capacity
    assert store.capacity >= 6
    assert _ids(store.mask(parse_where({"a": "x"}), 6)) == [0, 5]
    assert _ids(store.mask(parse_where({"t": "q"}), 6)) == [0]
    store.set_row(0, {"a": 7})  # replaces the whole row: t is gone, a changes type
    assert _ids(store.mask(parse_where({"t": "q"}), 6)) == []
    assert _ids(store.mask(parse_where({"t": {"$ne": "q"}}), 6)) == [0, 1, 2, 3, 4, 5]
    assert _ids(store.mask(parse_where({"a": "x"}), 6)) == [5]
    assert _ids(store.mask(parse_where({"a": {"$gte": 7}}), 6)) == [0]
    store.clear_row(5)
    store.clear_row(5)
    store.clear_row(3)  # never set
    assert _ids(store.mask(parse_where({"a": "x"}), 6)) == []
    assert _ids(store.mask(parse_where({"n": {"$ne": 3}}), 6)) == [0, 1, 2, 3, 4, 5]
    # Strings freed by every row may be re-coded; old codes must not leak into new matches.
    store.set_row(1, {"a": "y", "t": ["r"]})
    store.set_row(2, {"a": "z", "t": ["p"]})
    assert _ids(store.mask(parse_where({"a": "y"}), 6)) == [1]
    assert _ids(store.mask(parse_where({"a": "x"}), 6)) == []
    assert _ids(store.mask(parse_where({"t": {"$in": ["p", "q"]}}), 6)) == [2]
    assert _ids(store.mask(parse_where({"a": {"$in": ["z", 7]}}), 6)) == [0, 2]


def test_set_row_rejects_bad_values_and_keeps_the_row() -> None:
    store = MetadataColumns()
    store.set_row(0, {"a": 1})
    bads: list[Any] = [{"a": None}, {"a": {"x": 1}}, {"a": [1]}, {"a": ["x", None]}]
    for bad in bads:
        with pytest.raises(TypeError):
            store.set_row(0, bad)
    assert _ids(store.mask(parse_where({"a": 1}), 1)) == [0]


def _random_scalar(rng: random.Random) -> Any:
    return rng.choice([0, 1, 2, -1, 1.0, 2.5, -0.5, 10**6, True, False, "a", "b", "c", "1", "", "A"])


def _random_meta(rng: random.Random) -> dict[str, Any]:
    md: dict[str, Any] = {}
    for key in ("f0", "f1", "f2", "t", "g"):
        roll = rng.random()
        if roll < 0.25:
            continue
        if roll < 0.4 or (key == "t" and roll < 0.8):
            md[key] = [rng.choice("abcd1") for _ in range(rng.randint(0, 3))]
        else:
            md[key] = _random_scalar(rng)
    return md


def _random_where(rng: random.Random, depth: int) -> dict[str, Any]:
    if depth > 1 and rng.random() < 0.35:
        op = rng.choice(["$and", "$or"])
        return {op: [_random_where(rng, depth - 1) for _ in range(rng.randint(1, 3))]}
    field = rng.choice(["f0", "f1", "f2", "t", "g", "missing"])
    op = rng.choice(["eq", "$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin"])
    if op == "eq":
        return {field: _random_scalar(rng)}
    if op in ("$in", "$nin"):
        return {field: {op: [_random_scalar(rng) for _ in range(rng.randint(0, 4))]}}
    if op in ("$eq", "$ne"):
        return {field: {op: _random_scalar(rng)}}
    return {field: {op: rng.choice([0, 1, 1.0, 2.5, -1, 3, 10**6])}}


@pytest.fixture(scope="module")
def random_case() -> tuple[list[dict[str, Any] | None], list[Filter]]:
    """~2,000 rows (None: never set, or cleared) and ~200 filters, seeded."""
    rng = random.Random(20240611)
    rows: list[dict[str, Any] | None] = [
        None if rng.random() < 0.05 else _random_meta(rng) for _ in range(2000)
    ]
    filters = [parse_where(_random_where(rng, rng.randint(1, 4))) for _ in range(200)]
    return rows, filters


def _store_with_churn(rows: Sequence[dict[str, Any] | None]) -> MetadataColumns:
    """The rows, written in a shuffled order over earlier garbage, so replacement and clearing count."""
    rng = random.Random(7)
    store = MetadataColumns(capacity=4)
    for i in range(len(rows)):
        store.set_row(i, _random_meta(rng))
    order = list(range(len(rows)))
    rng.shuffle(order)
    for i in order:
        md = rows[i]
        if md is None:
            store.clear_row(i)
        else:
            store.set_row(i, md)
    return store


def test_mask_matches_reference_on_random_data(
    random_case: tuple[list[dict[str, Any] | None], list[Filter]],
) -> None:
    rows, filters = random_case
    store = _store_with_churn(rows)
    batch = MetadataColumns.from_rows([md or {} for md in rows])
    nonempty = 0
    for flt in filters:
        expected = [i for i, md in enumerate(rows) if _ref(flt, md or {})]
        assert _ids(store.mask(flt, len(rows))) == expected, flt
        assert _ids(batch.mask(flt, len(rows))) == expected, flt
        nonempty += 0 < len(expected) < len(rows)
    assert nonempty > 100  # the random filters are not all trivially empty or full


# --- SQL against a real PostgreSQL ----------------------------------------------------------------


@pytest.fixture(scope="module")
async def pg_dsn() -> AsyncIterator[str]:
    with tempfile.TemporaryDirectory(prefix="shoal-filters-", dir="/tmp") as parent:
        async with open_database(Path(parent), None) as dsn:
            yield dsn


def test_sql_placeholders_and_params() -> None:
    sql, params = to_sql(parse_where({"a": "x", "b": {"$gt": 2}, "$or": [{"a": {"$in": ["y", 3]}}]}), 4)
    assert params == ["a", "x", "b", 2.0, "y", 3.0]  # the field `a` takes one placeholder, reused
    assert "$4" in sql and "$9" in sql and "$3" not in sql and "$10" not in sql
    assert "'x'" not in sql and "'a'" not in sql
    sql, params = text_to_sql(TextFilter("it's", negate=True), 2, column="d.text")
    assert params == ["it's"] and "$2" in sql and "d.text" in sql
    with pytest.raises(ValueError):
        to_sql(parse_where({"a": 1}), 1, column="metadata; drop table x")


@pytest.mark.timeout(120)
async def test_sql_selects_the_same_rows_as_the_mask(
    pg_dsn: str, random_case: tuple[list[dict[str, Any] | None], list[Filter]]
) -> None:
    rows, filters = random_case
    trng = random.Random(3)
    texts = [
        None if trng.random() < 0.1 else "".join(trng.choices("abAB", k=trng.randint(0, 6))) for _ in rows
    ]
    store = MetadataColumns.from_rows([md or {} for md in rows])
    conn = await asyncpg.connect(pg_dsn)
    try:
        await conn.execute("CREATE TABLE docs (row_id int PRIMARY KEY, metadata jsonb, body text)")
        # A missing metadata map is stored as SQL NULL on some rows and as {} on others.
        await conn.executemany(
            "INSERT INTO docs VALUES ($1, $2::jsonb, $3)",
            [
                (i, None if md is None and i % 2 else json.dumps(md or {}), text)
                for i, (md, text) in enumerate(zip(rows, texts, strict=True))
            ],
        )
        for flt in filters:
            # $1 is taken by the surrounding query, as the server's queries will do.
            sql, params = to_sql(flt, 2)
            got = await conn.fetch(
                f"SELECT row_id FROM docs WHERE row_id >= $1 AND {sql} ORDER BY row_id", 0, *params
            )
            assert [r["row_id"] for r in got] == _ids(store.mask(flt, len(rows))), (flt, sql)
        needles = ["", "a", "ab", "B", "aB", "zz", "bA"]
        for tflt in [TextFilter(n, neg) for n in needles for neg in (False, True)]:
            sql, params = text_to_sql(tflt, 1, column="body")
            got = await conn.fetch(f"SELECT row_id FROM docs WHERE {sql} ORDER BY row_id", *params)
            assert [r["row_id"] for r in got] == _ids(text_mask(tflt, texts)), tflt
        # Both together, numbered one after the other.
        flt = parse_where({"t": {"$in": ["a", "b"]}})
        msql, mparams = to_sql(flt, 1)
        tsql, tparams = text_to_sql(TextFilter("a", negate=False), 1 + len(mparams), column="body")
        got = await conn.fetch(f"SELECT row_id FROM docs WHERE {msql} AND {tsql}", *mparams, *tparams)
        both = store.mask(flt, len(rows)) & text_mask(TextFilter("a", negate=False), texts)
        assert sorted(r["row_id"] for r in got) == _ids(both)
    finally:
        await conn.close()
