"""The filter language of PROTOCOL.md: parse -> AST -> numpy mask / parameterised SQL.

(Interface fixed here; the implementation is being written.)
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Union

import numpy as np
from numpy.typing import NDArray

from models.records import MetaValue

Scalar = Union[str, int, float, bool]
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


Filter = Union[Compare, InSet, And, Or]


@dataclass(frozen=True, slots=True)
class TextFilter:
    """`where_text`: a case-sensitive substring test; a document without text matches neither form."""

    needle: str
    negate: bool  # False: $contains, True: $not_contains


def parse_where(obj: object, max_depth: int = 8) -> Filter:
    """Parse a `where` map. Raises BadRequest on unknown operators, wrong types or depth > max_depth."""
    raise NotImplementedError


def parse_where_text(obj: object) -> TextFilter:
    """Parse a `where_text` map. Raises BadRequest."""
    raise NotImplementedError


class MetadataColumns:
    """Columnar, growable copy of the metadata of rows 0..n-1, for vectorised filter masks."""

    def set_row(self, row: int, metadata: Mapping[str, MetaValue]) -> None:
        raise NotImplementedError

    def clear_row(self, row: int) -> None:
        raise NotImplementedError

    def mask(self, flt: Filter, n_rows: int) -> NDArray[np.bool_]:
        """Boolean mask of length n_rows: True where the row's metadata passes `flt`."""
        raise NotImplementedError


def text_mask(flt: TextFilter, texts: Sequence[str | None]) -> NDArray[np.bool_]:
    raise NotImplementedError


def to_sql(flt: Filter, first_param: int, column: str = "metadata") -> tuple[str, list[object]]:
    """A SQL boolean expression over the jsonb `column` using $first_param.. placeholders, and
    the parameter values. Never splices values into the text."""
    raise NotImplementedError


def text_to_sql(flt: TextFilter, first_param: int, column: str = "text") -> tuple[str, list[object]]:
    raise NotImplementedError
