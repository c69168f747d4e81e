"""A collection's index kind and its parameters: parsing, defaults and the query-side checks.

Wire shape (`create_collection`'s `index`, and the collection shape): `{"kind": KIND, ...}`.

- `hnsw` (default): `m` (2..1000, default `hnsw_m`), `ef_construction` (1..`max_ef`, default
  `hnsw_ef_construction`), `quantization`?; queries take `ef`.
- `flat`: exact search, no parameters.
- `ivf`: `nlist` (1..65536; absent: chosen from the size, see `actors/indexes/ivf.py`),
  `quantization`?; queries take `nprobe`.
- `lsh`: `nbits` (8..4096, a multiple of 8; default 2·dim, 256..2048), `candidates`
  (1..10000; default max(100, 10·k)).

`quantization` is `"int8"` or `"f16"`. Metric `l1` is served by `flat` and `ivf` (unquantised);
without `index`, an `l1` collection gets `flat`.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from models.errors import BadRequest, echo
from models.records import Metric

KINDS = ("hnsw", "flat", "ivf", "lsh")
QUANTIZATIONS = ("int8", "f16")
L1_KINDS = ("flat", "ivf")
QUANTIZED_KINDS = ("hnsw", "ivf")
# The query parameter each kind takes (a query naming another kind's parameter is refused).
QUERY_PARAMS = {"hnsw": "ef", "ivf": "nprobe"}
_MAX_NLIST = 65_536
_MAX_NBITS = 4_096
_DEFAULT_NBITS_CAP = 2_048
_MIN_DEFAULT_NBITS = 256
_MAX_CANDIDATES = 10_000
_MAX_M = 1_000
# Build parameters per kind, each with its inclusive integer range (None: the caller's bound).
_INT_PARAMS: dict[str, dict[str, tuple[int, int | None]]] = {
    "hnsw": {"m": (2, _MAX_M), "ef_construction": (1, None)},
    "flat": {},
    "ivf": {"nlist": (1, _MAX_NLIST)},
    "lsh": {"nbits": (8, _MAX_NBITS), "candidates": (1, _MAX_CANDIDATES)},
}


@dataclass(frozen=True, slots=True)
class IndexSpec:
    """An index kind and its build parameters; None means "the server's default" (for `nlist`:
    chosen from the collection's size as it grows)."""

    kind: str = "hnsw"
    m: int | None = None
    ef_construction: int | None = None
    nlist: int | None = None
    nbits: int | None = None
    candidates: int | None = None
    quantization: str | None = None

    def resolved(self, dim: int, hnsw_m: int, hnsw_ef_construction: int) -> IndexSpec:
        """This spec with the fixed defaults filled in (what a collection is created with and
        keeps across restarts, whatever the settings say later)."""
        if self.kind == "hnsw":
            return replace(
                self,
                m=self.m if self.m is not None else hnsw_m,
                ef_construction=self.ef_construction if self.ef_construction is not None else hnsw_ef_construction,
            )
        if self.kind == "lsh" and self.nbits is None:
            return replace(self, nbits=default_nbits(dim))
        return self

    def to_wire(self) -> dict[str, object]:
        """`{"kind", ...the parameters that are set}`."""
        out: dict[str, object] = {"kind": self.kind}
        for name in ("m", "ef_construction", "nlist", "nbits", "candidates", "quantization"):
            value = getattr(self, name)
            if value is not None:
                out[name] = value
        return out


def default_nbits(dim: int) -> int:
    """LSH signature bits by default: twice the width (at least 256: fewer bits cannot tell
    neighbours apart, whatever the width), a multiple of 8, at most 2048."""
    return min(_DEFAULT_NBITS_CAP, max(_MIN_DEFAULT_NBITS, -(-2 * dim // 8) * 8))


def default_spec(metric: Metric) -> IndexSpec:
    """The index of a collection created without `index`: hnsw, or flat under l1."""
    return IndexSpec("flat") if metric is Metric.L1 else IndexSpec("hnsw")


def parse_index_spec(raw: object, metric: Metric | None, max_ef: int) -> IndexSpec:
    """`create_collection`'s `index` argument (None: the default for `metric`), validated against
    the metric (None: not checked). Raises BadRequest for an unknown kind, an unknown or out-of-range parameter,
    quantisation on a kind without it, or a metric the kind cannot serve."""
    if raw is None:
        return default_spec(metric or Metric.COSINE)
    if not isinstance(raw, dict):
        raise BadRequest("'index' must be a map {\"kind\": ..., ...parameters}")
    kind = raw.get("kind")
    if not isinstance(kind, str) or kind not in KINDS:
        raise BadRequest(f"'index.kind' must be one of {', '.join(KINDS)}")
    allowed = _INT_PARAMS[kind]
    values: dict[str, Any] = {}
    for key, value in raw.items():
        if key == "kind":
            continue
        if key == "quantization":
            if kind not in QUANTIZED_KINDS:
                raise BadRequest(f"index kind {kind!r} takes no 'quantization' (kinds that do: hnsw, ivf)")
            if value not in QUANTIZATIONS:
                raise BadRequest(f"'index.quantization' must be one of {', '.join(QUANTIZATIONS)}")
            values["quantization"] = value
            continue
        if not isinstance(key, str) or key not in allowed:
            known = ", ".join(allowed) or "none"
            raise BadRequest(f"index kind {kind!r} has no parameter {echo(key)} (its parameters: {known})")
        low, high = allowed[key]
        high = max_ef if high is None else high
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise BadRequest(f"'index.{key}' must be an integer in {low}..{high}")
        if key == "nbits" and value % 8:
            raise BadRequest("'index.nbits' must be a multiple of 8")
        values[key] = value
    spec = IndexSpec(kind, **values)
    if metric is Metric.L1:
        if kind not in L1_KINDS:
            raise BadRequest(f"metric 'l1' is served by index kinds {', '.join(L1_KINDS)}, not {kind!r}")
        if spec.quantization is not None:
            raise BadRequest("metric 'l1' cannot be quantised (use index kind ivf or flat without 'quantization')")
    return spec


def spec_from_wire(raw: object) -> IndexSpec | None:
    """A stored spec (the catalog's JSON, a snapshot's manifest) or None when it is not one this
    build knows; never raises."""
    if not isinstance(raw, dict):
        return None
    try:
        return parse_index_spec(raw, None, 1 << 30)
    except BadRequest:
        return None


def check_query_params(spec: IndexSpec, collection: str, ef: int | None, nprobe: int | None) -> None:
    """Raises BadRequest when a query gives a parameter its collection's index kind has not."""
    for name, value in (("ef", ef), ("nprobe", nprobe)):
        if value is not None and QUERY_PARAMS.get(spec.kind) != name:
            owner = next(kind for kind, param in QUERY_PARAMS.items() if param == name)
            raise BadRequest(
                f"'{name}' applies to index kind {owner}; collection {collection!r} has index kind {spec.kind!r}"
            )
