"""Filters as parameterised PostgreSQL over a `jsonb` metadata column (re-exported by models.filters).

The SQL selects exactly the rows `MetadataColumns.mask` selects; the comments say how each piece keeps
the semantics of models/filters.py. Field names and values only ever travel as parameters, with
explicit casts so asyncpg can encode them: field names as text, numbers as float8 (a Python float),
strings as text / text[], bools as boolean / boolean[]. Every leaf is NOT NULL (COALESCE / CASE), so
`NOT` over a leaf gives `$ne` / `$nin` on missing fields and on a NULL column alike.
"""

from __future__ import annotations

import re

from models.filters import ORDER_OPS, And, Compare, Filter, InSet, Or, Scalar, TextFilter

_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)?")
_SQL_ORDER = {"$gt": ">", "$gte": ">=", "$lt": "<", "$lte": "<="}


def _check_column(column: str) -> str:
    # The column is the one piece of text spliced into the SQL; it comes from code, never from a client.
    if not _COLUMN.fullmatch(column):
        raise ValueError(f"not a plain column reference: {column!r}")
    return column


class _Params:
    """Numbers placeholders from `first`, reusing one placeholder per distinct field name."""

    def __init__(self, first: int) -> None:
        self.first = first
        self.values: list[object] = []
        self._fields: dict[str, str] = {}

    def add(self, value: object) -> str:
        self.values.append(value)
        return f"${self.first + len(self.values) - 1}"

    def field(self, name: str) -> str:
        ref = self._fields.get(name)
        if ref is None:
            ref = self._fields[name] = self.add(name)
        return ref


def _is_number(ref: str) -> str:
    return f"jsonb_typeof({ref}) = 'number'"


def _eq_any(ref: str, values: tuple[Scalar, ...], params: _Params) -> str:
    """`ref` equals (or, as an array, contains) one of `values`, type-strictly; never NULL."""
    strs = [v for v in values if isinstance(v, str)]
    nums = [float(v) for v in values if not isinstance(v, bool | str)]
    bools = [v for v in values if isinstance(v, bool)]
    parts: list[str] = []
    if len(strs) == 1:
        # A jsonb string contains only itself; an array contains each of its elements.
        parts.append(f"COALESCE({ref} @> to_jsonb({params.add(strs[0])}::text), false)")
    elif strs:
        # `?|` matches a string scalar equal to, or a top-level array element among, the given strings
        # (and object keys, which metadata never holds).
        parts.append(f"COALESCE({ref} ?| {params.add(strs)}::text[], false)")
    if nums:
        # CASE (unlike AND) guarantees the cast runs only on numbers; float8 matches the float64 mask.
        test = f"= {params.add(nums[0])}::float8" if len(nums) == 1 else f"= ANY({params.add(nums)}::float8[])"
        parts.append(f"CASE WHEN {_is_number(ref)} THEN ({ref})::float8 {test} ELSE false END")
    if bools:
        if len(set(bools)) == 1:
            parts.append(f"COALESCE({ref} = to_jsonb({params.add(bools[0])}::boolean), false)")
        else:
            parts.append(f"COALESCE(jsonb_typeof({ref}) = 'boolean', false)")
    return parts[0] if len(parts) == 1 else "(" + " OR ".join(parts) + ")"


def _leaf(flt: Compare | InSet, column: str, params: _Params) -> str:
    if isinstance(flt, InSet) and not flt.values:
        # Decided without the field: a placeholder no expression uses has no type PostgreSQL can infer.
        return "true" if flt.op == "$nin" else "false"
    ref = f"({column} -> {params.field(flt.field)}::text)"
    if isinstance(flt, Compare) and flt.op in ORDER_OPS:
        value = params.add(float(flt.value))
        op = _SQL_ORDER[flt.op]
        return f"CASE WHEN {_is_number(ref)} THEN ({ref})::float8 {op} {value}::float8 ELSE false END"
    values = flt.values if isinstance(flt, InSet) else (flt.value,)
    hit = _eq_any(ref, values, params)
    return f"NOT {hit}" if flt.op in ("$ne", "$nin") else hit


def _node(flt: Filter, column: str, params: _Params) -> str:
    if isinstance(flt, And | Or):
        if not flt.children:
            return "true" if isinstance(flt, And) else "false"
        joiner = " AND " if isinstance(flt, And) else " OR "
        return "(" + joiner.join(_node(c, column, params) for c in flt.children) + ")"
    return _leaf(flt, column, params)


def filter_to_sql(flt: Filter, first_param: int, column: str = "metadata") -> tuple[str, list[object]]:
    """See models.filters.to_sql."""
    params = _Params(first_param)
    sql = _node(flt, _check_column(column), params)
    return sql, params.values


def text_filter_to_sql(flt: TextFilter, first_param: int, column: str = "text") -> tuple[str, list[object]]:
    """See models.filters.text_to_sql. strpos is case-sensitive and needs no LIKE escaping."""
    col = _check_column(column)
    test = "= 0" if flt.negate else "> 0"
    return f"COALESCE(strpos({col}, ${first_param}::text) {test}, false)", [flt.needle]
