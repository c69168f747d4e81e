"""The filter language of PROTOCOL.md: parse -> AST -> numpy mask / parameterised SQL.

Semantics, shared exactly by `MetadataColumns.mask` and `to_sql`:

* Equality is type-strict: a str equals only a str, a bool only a bool, and a number (int or float,
  never bool) only a number, compared numerically (1 == 1.0, True != 1, "1" != 1).
* On a list-of-str field, `$eq` / `$in` match when any element matches; `$ne` / `$nin` match when no
  element does. A document that lacks the field matches only `$ne` and `$nin`.
* `$gt` / `$gte` / `$lt` / `$lte` take a number and match only numeric fields.
* `$in []` matches nothing, `$nin []` everything.
* Numbers are compared as float64 on both sides (SQL casts jsonb numbers to float8), so integers
  beyond 2**53 compare with float64 precision.
* Several field keys in one map, or several operators in one operator map, are ANDed.
* Depth: a comparison is depth 1 and each explicit `$and` / `$or` adds one; the implicit AND of a
  map with several keys adds nothing.
* Size: at most `Limits.max_filter_nodes` nodes and `Limits.max_filter_values` values per filter
  (`too_large`), so parsing and evaluating one is bounded whatever the client sends.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, cast

import numpy as np
from numpy.typing import NDArray

from models.config import Limits
from models.errors import ECHO_CHARS, BadRequest, TooLarge, echo
from models.records import MetaValue
from models.strings import check_string

Scalar = str | int | float | bool
CompareOp = Literal["$eq", "$ne", "$gt", "$gte", "$lt", "$lte"]
SetOp = Literal["$in", "$nin"]


@dataclass(frozen=True, slots=True)
class Compare:
    field: str
    op: CompareOp
    value: Scalar


@dataclass(frozen=True, slots=True)
class InSet:
    field: str
    op: SetOp
    values: tuple[Scalar, ...]


@dataclass(frozen=True, slots=True)
class And:
    children: tuple[Filter, ...]


@dataclass(frozen=True, slots=True)
class Or:
    children: tuple[Filter, ...]


Filter = Compare | InSet | And | Or


@dataclass(frozen=True, slots=True)
class TextFilter:
    """`where_text`: a case-sensitive substring test; a document without text matches neither form."""

    needle: str
    negate: bool  # False: $contains, True: $not_contains


_COMPARE_OPS: frozenset[str] = frozenset({"$eq", "$ne", "$gt", "$gte", "$lt", "$lte"})
ORDER_OPS: frozenset[str] = frozenset({"$gt", "$gte", "$lt", "$lte"})
_SET_OPS: frozenset[str] = frozenset({"$in", "$nin"})
_INT_LIMIT = 2**63  # filter integers must fit in 64 bits


def _type_name(obj: object) -> str:
    if obj is None:
        return "null"
    if isinstance(obj, bool):
        return "bool"
    if isinstance(obj, int | float):
        return "number"
    if isinstance(obj, str):
        return "string"
    if isinstance(obj, list | tuple):
        return "list"
    if isinstance(obj, Mapping):
        return "map"
    return type(obj).__name__


def _segment(key: str) -> str:
    """A field or operator name as it appears in an error path: cut, since names are client input."""
    if len(key) <= ECHO_CHARS and key.isprintable():
        return key
    return echo(key)  # quoted and escaped, cut with an ellipsis


class _Budget:
    """Counts what a filter holds while it is parsed, so an oversized one is refused before the
    rest of it is read: nodes (each comparison, each $in / $nin, each $and / $or) and values (each
    compared scalar, each element of an $in / $nin list)."""

    __slots__ = ("max_nodes", "max_values", "nodes", "values")

    def __init__(self, max_nodes: int, max_values: int) -> None:
        self.max_nodes, self.max_values = max_nodes, max_values
        self.nodes = self.values = 0

    def take(self, nodes: int, values: int, path: str) -> None:
        self.nodes += nodes
        self.values += values
        if self.nodes > self.max_nodes:
            raise TooLarge(f"{path}: a filter holds at most {self.max_nodes} comparisons and $and / $or nodes")
        if self.values > self.max_values:
            raise TooLarge(f"{path}: a filter holds at most {self.max_values} values in all")


def _scalar(obj: object, path: str, numeric_only: bool) -> Scalar:
    if isinstance(obj, bool):
        if numeric_only:
            raise BadRequest(f"{path}: needs a number, got {_type_name(obj)}")
        return obj
    if isinstance(obj, str):
        if numeric_only:
            raise BadRequest(f"{path}: needs a number, got {_type_name(obj)}")
        return check_string(obj, path)
    if isinstance(obj, int):
        if not -_INT_LIMIT <= obj < _INT_LIMIT:
            raise BadRequest(f"{path}: integer out of the 64-bit range")
        return obj
    if isinstance(obj, float):
        if not math.isfinite(obj):
            raise BadRequest(f"{path}: number must be finite")
        return obj
    want = "a number" if numeric_only else "a string, number or bool"
    raise BadRequest(f"{path}: needs {want}, got {_type_name(obj)}")


def _parse_field(name: str, obj: object, path: str, budget: _Budget) -> list[Filter]:
    if not isinstance(obj, Mapping):
        budget.take(1, 1, path)
        return [Compare(name, "$eq", _scalar(obj, path, numeric_only=False))]
    if not obj:
        raise BadRequest(f"{path}: empty operator map")
    out: list[Filter] = []
    for op, arg in obj.items():
        if not isinstance(op, str):
            raise BadRequest(f"{path}: operators must be strings, got {_type_name(op)}")
        where = f"{path}.{_segment(op)}"
        if op in _COMPARE_OPS:
            budget.take(1, 1, where)
            value = _scalar(arg, where, numeric_only=op in ORDER_OPS)
            out.append(Compare(name, cast(CompareOp, op), value))
        elif op in _SET_OPS:
            if not isinstance(arg, list | tuple):
                raise BadRequest(f"{where}: needs a list, got {_type_name(arg)}")
            budget.take(1, len(arg), where)  # before reading the list: it may be huge
            values = tuple(_scalar(v, f"{where}[{i}]", numeric_only=False) for i, v in enumerate(arg))
            out.append(InSet(name, cast(SetOp, op), values))
        elif op.startswith("$"):
            raise BadRequest(f"{path}: unknown operator {echo(op)}")
        else:
            raise BadRequest(f"{path}: expected an operator such as $eq, got key {echo(op)} (no nested maps)")
    return out


def _parse_map(obj: object, path: str, nesting: int, max_depth: int, budget: _Budget) -> Filter:
    """`nesting` counts the $and/$or around `obj`; a comparison inside sits at depth nesting + 1."""
    if not isinstance(obj, Mapping):
        raise BadRequest(f"{path}: a filter must be a map, got {_type_name(obj)}")
    if not obj:
        raise BadRequest(f"{path}: empty filter map")
    parts: list[Filter] = []
    for key, val in obj.items():
        if not isinstance(key, str):
            raise BadRequest(f"{path}: keys must be strings, got {_type_name(key)}")
        where = f"{path}.{_segment(key)}"
        if key in ("$and", "$or"):
            # Checked before descending so a hostile, deeply nested input cannot exhaust the stack.
            if nesting + 2 > max_depth:
                raise BadRequest(f"{where}: filter nested deeper than {max_depth}")
            if not isinstance(val, list | tuple):
                raise BadRequest(f"{where}: needs a list of filters, got {_type_name(val)}")
            if not val:
                raise BadRequest(f"{where}: empty list")
            budget.take(1, 0, where)
            kids = tuple(
                _parse_map(c, f"{where}[{i}]", nesting + 1, max_depth, budget) for i, c in enumerate(val)
            )
            parts.append(And(kids) if key == "$and" else Or(kids))
        elif key.startswith("$"):
            raise BadRequest(f"{path}: unknown operator {echo(key)}")
        elif not key:
            raise BadRequest(f"{path}: empty field name")
        else:
            if nesting + 1 > max_depth:
                raise BadRequest(f"{where}: filter nested deeper than {max_depth}")
            check_string(key, f"{where}: the field name")
            parts.extend(_parse_field(key, val, where, budget))
    return parts[0] if len(parts) == 1 else And(tuple(parts))


_DEFAULTS = Limits()


def parse_where(
    obj: object,
    max_depth: int = _DEFAULTS.max_filter_depth,
    *,
    max_nodes: int = _DEFAULTS.max_filter_nodes,
    max_values: int = _DEFAULTS.max_filter_values,
) -> Filter:
    """Parse a `where` map. Raises BadRequest on unknown operators, wrong types, depth > max_depth,
    strings holding NUL or lone surrogates; TooLarge when the filter holds more than `max_nodes`
    nodes or `max_values` values (counted as in `_Budget`, checked before a list is read).

    The message names the offending part by path, e.g. `where.$and[1].price.$gt: needs a number`.
    An empty map is rejected; a caller that wants "no filter" passes no `where` at all.
    """
    return _parse_map(obj, "where", 0, max_depth, _Budget(max_nodes, max_values))


def parse_where_text(obj: object, max_chars: int = _DEFAULTS.max_text_chars) -> TextFilter:
    """Parse a `where_text` map: one of `$contains` / `$not_contains` with a string. Raises
    BadRequest (wrong shape, NUL or lone surrogate), TooLarge (needle over `max_chars`)."""
    if not isinstance(obj, Mapping) or len(obj) != 1:
        raise BadRequest("where_text: needs a map with exactly one of $contains / $not_contains")
    ((op, arg),) = obj.items()
    if op not in ("$contains", "$not_contains"):
        raise BadRequest(f"where_text: unknown operator {echo(op)}")
    if not isinstance(arg, str):
        raise BadRequest(f"where_text.{op}: needs a string, got {_type_name(arg)}")
    if len(arg) > max_chars:
        raise TooLarge(f"where_text.{op}: the string is longer than {max_chars} characters")
    return TextFilter(check_string(arg, f"where_text.{op}"), op == "$not_contains")


# --- columnar evaluation -------------------------------------------------------------------------

# What a row holds in one field.
_MISSING, _NUM, _STR, _BOOL, _LIST = 0, 1, 2, 3, 4
_ORDER_UFUNCS = {"$gt": np.greater, "$gte": np.greater_equal, "$lt": np.less, "$lte": np.less_equal}


def _as_float(value: int | float) -> float:
    try:
        return float(value)
    except OverflowError:  # an int beyond float64: only validation elsewhere can keep these out
        return math.inf if value > 0 else -math.inf


def _grown(arr: NDArray[np.generic], capacity: int) -> NDArray[np.generic]:
    out = np.zeros(capacity, dtype=arr.dtype)
    out[: len(arr)] = arr
    return out


class _Field:
    """The values of one metadata key across all rows.

    `kind[row]` says what the row holds. Numbers and bools live in `num` (bools as 0.0 / 1.0); a str
    lives in `code` as the code its interner gave it; a list of str lives in `postings` (code -> rows)
    and `lists` (row -> codes, to undo it). Codes are reference-counted and reused once no row holds
    the string, so memory follows the live rows, not every string ever seen.
    """

    __slots__ = ("_cache", "code", "codes", "count", "free", "kind", "lists", "num", "postings", "refs")

    def __init__(self, capacity: int) -> None:
        self.kind: NDArray[np.int8] = np.zeros(capacity, dtype=np.int8)
        self.num: NDArray[np.float64] | None = None  # allocated on the first number or bool
        self.code: NDArray[np.int32] | None = None  # allocated on the first str
        self.codes: dict[str, int] = {}
        self.refs: dict[int, tuple[str, int]] = {}  # code -> (string, number of holders)
        self.free: list[int] = []
        self.postings: dict[int, set[int]] = {}
        self._cache: dict[int, NDArray[np.intp]] = {}
        self.lists: dict[int, tuple[int, ...]] = {}
        self.count = 0  # rows holding this field

    def grow(self, capacity: int) -> None:
        self.kind = cast(NDArray[np.int8], _grown(self.kind, capacity))
        if self.num is not None:
            self.num = cast(NDArray[np.float64], _grown(self.num, capacity))
        if self.code is not None:
            self.code = cast(NDArray[np.int32], _grown(self.code, capacity))

    def _acquire(self, s: str) -> int:
        code = self.codes.get(s)
        if code is None:
            code = self.free.pop() if self.free else len(self.codes)
            self.codes[s] = code
            self.refs[code] = (s, 1)
        else:
            self.refs[code] = (s, self.refs[code][1] + 1)
        return code

    def _release(self, code: int) -> None:
        s, n = self.refs[code]
        if n > 1:
            self.refs[code] = (s, n - 1)
        else:
            del self.refs[code], self.codes[s]
            self.free.append(code)

    def set(self, row: int, value: MetaValue) -> None:
        """Store `value` in an empty row (the caller clears first)."""
        if isinstance(value, int | float):  # bool included
            if self.num is None:
                self.num = np.zeros(len(self.kind), dtype=np.float64)
            self.kind[row] = _BOOL if isinstance(value, bool) else _NUM
            self.num[row] = _as_float(value)
        elif isinstance(value, str):
            if self.code is None:
                self.code = np.zeros(len(self.kind), dtype=np.int32)
            self.kind[row] = _STR
            self.code[row] = self._acquire(value)
        else:
            self.kind[row] = _LIST
            codes = tuple(self._acquire(s) for s in dict.fromkeys(value))
            for c in codes:
                self.postings.setdefault(c, set()).add(row)
                self._cache.pop(c, None)
            self.lists[row] = codes
        self.count += 1

    def clear(self, row: int) -> None:
        kind = self.kind[row]
        if kind == _MISSING:
            return
        if kind == _STR:
            assert self.code is not None
            self._release(int(self.code[row]))
        elif kind == _LIST:
            for c in self.lists.pop(row):
                rows = self.postings[c]
                rows.discard(row)
                if not rows:
                    del self.postings[c]
                self._cache.pop(c, None)
                self._release(c)
        self.kind[row] = _MISSING
        self.count -= 1

    def _rows_with(self, code: int) -> NDArray[np.intp]:
        rows = self._cache.get(code)
        if rows is None:
            post = self.postings.get(code, ())
            rows = np.fromiter(post, dtype=np.intp, count=len(post))
            self._cache[code] = rows
        return rows

    def _typed(self, kind: int, m: int) -> NDArray[np.bool_]:
        return cast(NDArray[np.bool_], self.kind[:m] == kind)

    def eq_any(self, values: Sequence[Scalar], m: int) -> NDArray[np.bool_]:
        """Rows 0..m-1 whose value equals (or, for a list, contains) any of `values`."""
        out = np.zeros(m, dtype=np.bool_)
        nums = [_as_float(v) for v in values if not isinstance(v, bool | str)]
        bools = [float(v) for v in values if isinstance(v, bool)]
        strs = [c for v in values if isinstance(v, str) and (c := self.codes.get(v)) is not None]
        for kind, floats in ((_NUM, nums), (_BOOL, bools)):
            if floats and self.num is not None:
                hits = self.num[:m] == floats[0] if len(floats) == 1 else np.isin(self.num[:m], floats)
                out |= self._typed(kind, m) & hits
        if strs and self.code is not None:
            hits = self.code[:m] == strs[0] if len(strs) == 1 else np.isin(self.code[:m], strs)
            out |= self._typed(_STR, m) & hits
        for c in strs:
            rows = self._rows_with(c)
            out[rows[rows < m]] = True
        return out

    def order(self, op: str, value: float, m: int) -> NDArray[np.bool_]:
        if self.num is None:
            return np.zeros(m, dtype=np.bool_)
        hits = cast(NDArray[np.bool_], _ORDER_UFUNCS[op](self.num[:m], value))
        return self._typed(_NUM, m) & hits


class MetadataColumns:
    """Columnar, growable copy of the metadata of rows 0..n-1, for vectorised filter masks.

    One `_Field` per key that some row holds; its arrays grow by doubling with the store. Rows never
    set, or cleared, lack every field. A mask costs a few numpy passes per filter node, no Python
    work per row. Not thread-safe: one owner mutates and queries it.
    """

    def __init__(self, capacity: int = 1024) -> None:
        self._capacity = max(1, capacity)
        self._fields: dict[str, _Field] = {}
        self._row_keys: dict[int, tuple[str, ...]] = {}

    @classmethod
    def from_rows(cls, rows: Sequence[Mapping[str, MetaValue]]) -> MetadataColumns:
        """A store whose row i is rows[i]: evaluates many filters over a small batch of documents."""
        store = cls(len(rows))
        for i, md in enumerate(rows):
            store.set_row(i, md)
        return store

    @property
    def capacity(self) -> int:
        return self._capacity

    def set_row(self, row: int, metadata: Mapping[str, MetaValue]) -> None:
        """Replace the whole metadata of `row`. Raises TypeError (store unchanged) on a value that is
        not str | int | float | bool | list of str."""
        if row < 0:
            raise ValueError(f"row must be >= 0, got {row}")
        for key, value in metadata.items():
            ok = isinstance(value, str | int | float) or (
                isinstance(value, list) and all(isinstance(s, str) for s in value)
            )
            if not ok:
                raise TypeError(f"metadata {key!r}: unsupported value {_type_name(value)}")
        self.clear_row(row)
        if row >= self._capacity:
            self._capacity = max(2 * self._capacity, row + 1)
            for f in self._fields.values():
                f.grow(self._capacity)
        for key, value in metadata.items():
            field = self._fields.get(key)
            if field is None:
                field = self._fields[key] = _Field(self._capacity)
            field.set(row, value)
        if metadata:
            self._row_keys[row] = tuple(metadata)

    def clear_row(self, row: int) -> None:
        """Forget the metadata of `row` (it then lacks every field). Clearing an unset row is a no-op."""
        for key in self._row_keys.pop(row, ()):
            field = self._fields[key]
            field.clear(row)
            if field.count == 0:  # keys nobody holds any more cost nothing
                del self._fields[key]

    def mask(self, flt: Filter, n_rows: int) -> NDArray[np.bool_]:
        """Boolean mask of length n_rows: True where the row's metadata passes `flt`."""
        return self._eval(flt, n_rows)

    def _eval(self, flt: Filter, n: int) -> NDArray[np.bool_]:
        if isinstance(flt, And | Or):
            if not flt.children:
                return np.full(n, isinstance(flt, And), dtype=np.bool_)
            out = self._eval(flt.children[0], n)
            for child in flt.children[1:]:
                if isinstance(flt, And):
                    out &= self._eval(child, n)
                else:
                    out |= self._eval(child, n)
            return out
        # Positive leaves are False on rows that lack the field, so rows past the capacity pad with
        # False; $ne / $nin are their complements.
        negate = flt.op in ("$ne", "$nin")
        m = min(n, self._capacity)
        field = self._fields.get(flt.field)
        if field is None:
            hits = np.zeros(m, dtype=np.bool_)
        elif isinstance(flt, InSet):
            hits = field.eq_any(flt.values, m)
        elif flt.op in ORDER_OPS:
            hits = field.order(flt.op, _as_float(cast(float, flt.value)), m)
        else:
            hits = field.eq_any((flt.value,), m)
        if m < n:
            hits = np.concatenate([hits, np.zeros(n - m, dtype=np.bool_)])
        return ~hits if negate else hits


def text_mask(flt: TextFilter, texts: Sequence[str | None]) -> NDArray[np.bool_]:
    """Boolean mask over `texts`: True where the text passes `flt`; None passes neither form."""
    needle, negate = flt.needle, flt.negate
    return np.fromiter(
        (t is not None and (needle in t) != negate for t in texts), dtype=np.bool_, count=len(texts)
    )


def to_sql(flt: Filter, first_param: int, column: str = "metadata") -> tuple[str, list[object]]:
    """A SQL boolean expression over the jsonb `column` using $first_param.. placeholders, and
    the parameter values. Never splices values into the text."""
    from models.filter_sql import filter_to_sql

    return filter_to_sql(flt, first_param, column)


def text_to_sql(flt: TextFilter, first_param: int, column: str = "text") -> tuple[str, list[object]]:
    """A SQL boolean expression over the text `column` using one placeholder $first_param, and the
    parameter values; a NULL text matches neither form."""
    from models.filter_sql import text_filter_to_sql

    return text_filter_to_sql(flt, first_param, column)
