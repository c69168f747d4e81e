"""Typed requests and their validation: wire maps (already decoded) -> frozen dataclasses.

Both edges (WebSocket and HTTP) call `parse_request`; nothing past this module sees an
unvalidated value. Unknown arguments are rejected so a typo (`"were"` for `"where"`) cannot
silently turn a filtered query into an unfiltered one.

Hostile input: every string accepted passes `check_string` (no NUL, no lone surrogate), every
integer fits in 64 bits, every number converts to a finite float, every vector has a bounded
norm, and error messages quote input only through `echo`. Whatever the input, `parse_request`
raises nothing but `ShoalError` subclasses.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import Any, Literal

import numpy as np

from models.config import Limits
from models.cursor import decode_cursor
from models.errors import BadRequest, InvalidVector, TooLarge, UnknownOp, echo
from models.filters import Filter, TextFilter, parse_where, parse_where_text
from models.index_spec import IndexSpec, parse_index_spec
from models.records import DEFAULT_INCLUDE, DocId, Document, Include, Metadata, Metric, Vector
from models.strings import check_string

COLLECTION_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")
DEFAULT_K = 10
# A top-k subscription keeps at most this many hits live (PROTOCOL.md: k 1..100).
MAX_SUBSCRIBE_K = 100
# Documents in one page of `get` without ids (the most is `Limits.max_ids`).
DEFAULT_GET_LIMIT = 100
DEFAULT_RRF_K = 60
# ivf's nprobe: at most its largest nlist (a query's nprobe past its collection's nlist is capped).
MAX_NPROBE = 65_536
MAX_RRF_K = 1_000_000
# Arguments that only a hybrid query takes (fusion and its parameters, candidate depths).
HYBRID_ARGS = ("fusion", "alpha", "rrf_k", "vector_candidates", "keyword_candidates")
QueryMode = Literal["vector", "keyword", "hybrid"]
Fusion = Literal["rrf", "weighted"]


@dataclass(frozen=True, slots=True)
class Ping:
    pass


@dataclass(frozen=True, slots=True)
class Auth:
    key: str


@dataclass(frozen=True, slots=True)
class CreateCollection:
    name: str
    dim: int | None
    metric: Metric
    if_not_exists: bool
    index: IndexSpec = field(default_factory=IndexSpec)  # as given: defaults filled by the engine


@dataclass(frozen=True, slots=True)
class ListCollections:
    pass


@dataclass(frozen=True, slots=True)
class DropCollection:
    name: str


@dataclass(frozen=True, slots=True)
class Upsert:
    collection: str
    docs: tuple[Document, ...]


@dataclass(frozen=True, slots=True)
class Delete:
    collection: str
    ids: tuple[DocId, ...] | None
    where: Filter | None
    where_text: TextFilter | None


@dataclass(frozen=True, slots=True)
class Get:
    """By `ids`, or else a page: up to `limit` live documents passing the filters whose ids come
    after `after` (the decoded cursor; None: from the first), in id order."""

    collection: str
    ids: tuple[DocId, ...] | None
    include: frozenset[Include]
    where: Filter | None = None
    where_text: TextFilter | None = None
    limit: int = DEFAULT_GET_LIMIT
    after: DocId | None = None
    min_seq: int | None = None  # answer once this node has applied the collection through it


@dataclass(frozen=True, slots=True)
class Count:
    collection: str
    min_seq: int | None = None


@dataclass(frozen=True, slots=True)
class Query:
    collection: str
    vector: Vector | None
    text: str | None
    k: int
    where: Filter | None
    where_text: TextFilter | None
    include: frozenset[Include]
    ef: int | None
    mode: QueryMode
    fusion: Fusion
    alpha: float
    # Hybrid only: RRF's rank constant, and each side's candidate depth (None: the engine's
    # default, at least k).
    rrf_k: int = DEFAULT_RRF_K
    vector_candidates: int | None = None
    keyword_candidates: int | None = None
    min_seq: int | None = None
    # ivf's lists searched (checked against the collection's index kind by the engine, as is `ef`)
    nprobe: int | None = None
    # Query by example: the stored document whose vector (and, for keyword / hybrid, text) is
    # the query; it is left out of the hits.
    like: DocId | None = None


@dataclass(frozen=True, slots=True)
class QueryBatch:
    """Several queries of one collection in one request; each is a `Query` of its own (its
    `collection` is the batch's)."""

    collection: str
    queries: tuple[Query, ...]


@dataclass(frozen=True, slots=True)
class Subscribe:
    collection: str
    vector: Vector | None
    text: str | None
    threshold: float | None  # None only with `k` (a top-k subscription without a minimum score)
    where: Filter | None
    where_text: TextFilter | None
    include: frozenset[Include]
    after_seq: int | None
    # Query by example: the stored document whose vector, read at subscribe time, is the
    # standing query; that document itself never matches.
    like: DocId | None = None
    k: int | None = None  # a top-k subscription: the live list of the k best


@dataclass(frozen=True, slots=True)
class Unsubscribe:
    sub: str


Request = (
    Ping
    | Auth
    | CreateCollection
    | ListCollections
    | DropCollection
    | Upsert
    | Delete
    | Get
    | Count
    | Query
    | QueryBatch
    | Subscribe
    | Unsubscribe
)


class Args:
    """Typed accessors over one request's argument map; records which keys were consumed."""

    def __init__(self, raw: Mapping[str, Any], limits: Limits) -> None:
        self.raw = raw
        self.limits = limits
        self.used: set[str] = set()

    def _get(self, key: str) -> Any:
        self.used.add(key)
        return self.raw.get(key)

    def has(self, key: str) -> bool:
        return self.raw.get(key) is not None

    def finish(self) -> None:
        unknown = sorted(set(self.raw) - self.used)
        if unknown:
            shown = ", ".join(echo(key) for key in unknown[:MAX_ECHOED_NAMES])
            more = f" and {len(unknown) - MAX_ECHOED_NAMES} more" if len(unknown) > MAX_ECHOED_NAMES else ""
            raise BadRequest(f"unknown argument(s): {shown}{more}")

    def collection_name(self, key: str = "collection") -> str:
        value = self._get(key)
        if not isinstance(value, str) or not COLLECTION_NAME.fullmatch(value):
            raise BadRequest(f"'{key}' must be a name matching [A-Za-z0-9_-]{{1,64}}")
        return value

    def string(self, key: str, *, required: bool = False) -> str | None:
        value = self._get(key)
        if value is None:
            if required:
                raise BadRequest(f"'{key}' is required")
            return None
        if not isinstance(value, str):
            raise BadRequest(f"'{key}' must be a string")
        return check_string(value, f"'{key}'")

    def boolean(self, key: str, default: bool) -> bool:
        value = self._get(key)
        if value is None:
            return default
        if not isinstance(value, bool):
            raise BadRequest(f"'{key}' must be a boolean")
        return value

    def integer(
        self, key: str, *, low: int, high: int | None = None, default: int | None = None
    ) -> int | None:
        value = self._get(key)
        if value is None:
            return default
        if isinstance(value, bool) or not isinstance(value, int):
            raise BadRequest(f"'{key}' must be an integer")
        if not INT64_MIN <= value <= INT64_MAX:
            raise BadRequest(f"'{key}' must be an integer that fits in 64 bits")
        if value < low:
            raise BadRequest(f"'{key}' must be >= {low}")
        if high is not None and value > high:
            raise TooLarge(f"'{key}' must be <= {high}")
        return value

    def number(self, key: str, *, required: bool = False, default: float | None = None) -> float | None:
        value = self._get(key)
        if value is None:
            if required:
                raise BadRequest(f"'{key}' is required")
            return default
        number = _finite_float(value)
        if number is None:
            raise BadRequest(f"'{key}' must be a finite number")
        return number

    def include(self) -> frozenset[Include]:
        value = self._get("include")
        if value is None:
            return DEFAULT_INCLUDE
        if not isinstance(value, list):
            raise BadRequest("'include' must be a list of 'text', 'metadata', 'vector'")
        if len(value) > MAX_INCLUDE_ITEMS:  # a bound before the list is read item by item
            raise BadRequest(f"'include' holds at most {MAX_INCLUDE_ITEMS} items")
        try:
            return frozenset(Include(item) for item in value)
        except (ValueError, TypeError) as exc:
            raise BadRequest("'include' may only hold 'text', 'metadata', 'vector'") from exc

    def ids(self, key: str = "ids", *, required: bool = True) -> tuple[DocId, ...] | None:
        value = self._get(key)
        if value is None:
            if required:
                raise BadRequest(f"'{key}' is required")
            return None
        if not isinstance(value, list):
            raise BadRequest(f"'{key}' must be a list of document ids")
        if len(value) > self.limits.max_ids:
            raise TooLarge(f"at most {self.limits.max_ids} ids per request")
        return tuple(doc_id(item, self.limits) for item in value)

    def where(self) -> Filter | None:
        value = self._get("where")
        # `{}` means "no filter", as in Chroma.
        if value is None or value == {}:
            return None
        limits = self.limits
        return parse_where(
            value,
            limits.max_filter_depth,
            max_nodes=limits.max_filter_nodes,
            max_values=limits.max_filter_values,
        )

    def where_text(self) -> TextFilter | None:
        value = self._get("where_text")
        return None if value is None or value == {} else parse_where_text(value, self.limits.max_text_chars)

    def vector(self, key: str = "vector") -> Vector | None:
        value = self._get(key)
        return None if value is None else parse_vector(value, self.limits)

    def like(self, key: str = "like") -> DocId | None:
        """Query by example: the id of a stored document (validated like any document id)."""
        value = self._get(key)
        return None if value is None else doc_id(value, self.limits)

    def text(self, key: str = "text") -> str | None:
        """A query's text: non-empty (nothing to embed or match otherwise), bounded in length."""
        value = self._get(key)
        if value is None:
            return None
        if not isinstance(value, str):
            raise BadRequest(f"'{key}' must be a string")
        if not value:
            raise BadRequest(f"'{key}' must not be empty")
        if len(value) > self.limits.max_text_chars:
            raise TooLarge(f"'{key}' is longer than {self.limits.max_text_chars} characters")
        return check_string(value, f"'{key}'")


INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
# Items of an `include` list (duplicates are allowed, so more than its three names).
MAX_INCLUDE_ITEMS = 16
# Subscription ids are short server-made strings; a longer 'sub' cannot name one.
MAX_SUB_ID_CHARS = 64
# Unknown argument or field names quoted in one error message at most.
MAX_ECHOED_NAMES = 5
# The largest vector norm any setting may allow: with |x|, |y| <= 4e18 the float32 values
# |x|**2, x . y and |x - y|**2 <= 6.4e37 stay below float32's 3.4e38.
VECTOR_NORM_CEILING = 4e18


_NUMBER_TYPES = frozenset({int, float})


def _finite_float(value: object) -> float | None:
    """`value` as a finite float; None for a non-number, a bool, NaN / inf or an integer too big
    for a float (a JSON body may carry one of any length)."""
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if math.isfinite(number) else None


def doc_id(value: object, limits: Limits) -> DocId:
    if not isinstance(value, str) or not value:
        raise BadRequest("a document id must be a non-empty string")
    if len(value) > limits.max_id_chars:
        raise TooLarge(f"a document id is at most {limits.max_id_chars} characters")
    return DocId(check_string(value, lambda: f"document id {echo(value)}"))


def parse_vector(value: object, limits: Limits) -> Vector:
    """A float32 vector from msgpack `bin` (little-endian float32) or a list of numbers.

    Raises BadRequest (wrong type, a number that is no float), TooLarge (over `max_dim`
    values) or InvalidVector (NaN, infinity, or an L2 norm over `max_vector_norm`: beyond it
    float32 scores and distances overflow).
    """
    if isinstance(value, (bytes, bytearray, memoryview)):
        if len(value) % 4:
            raise BadRequest("a binary vector must hold little-endian float32 values (length % 4 == 0)")
        if len(value) // 4 > limits.max_dim:
            raise TooLarge(f"a vector has at most {limits.max_dim} values")
        vector = np.frombuffer(value, dtype="<f4").copy()  # float32 owning its memory
    elif isinstance(value, list):
        if len(value) > limits.max_dim:
            raise TooLarge(f"a vector has at most {limits.max_dim} values")
        # The exact types first (what JSON and msgpack decode to): a set of types is built several
        # times faster than the isinstance walk, which then only runs for anything else.
        if not set(map(type, value)) <= _NUMBER_TYPES and not all(
            isinstance(x, (int, float)) and not isinstance(x, bool) for x in value
        ):
            raise BadRequest("a vector must be a list of numbers")
        try:
            vector = np.asarray(value, dtype=np.float64)  # checked wide: 1e39 must not become inf
        except OverflowError as exc:  # an integer beyond float64
            raise BadRequest("a vector's values must be numbers within the float range") from exc
    else:
        raise BadRequest("a vector must be float32 bytes or a list of numbers")
    if vector.size == 0:
        raise BadRequest("a vector must not be empty")
    bound = min(limits.max_vector_norm, VECTOR_NORM_CEILING)
    # One float64 sum of squares decides the common case: it is NaN with a NaN, inf with an inf or
    # when the squares overflow, and those all fail the comparison. Squares of float32 values
    # cannot overflow float64; those of float64 values from a JSON list can. A ufunc, not
    # `np.dot`: BLAS releases the GIL, and the event loop (which parses) then waits for a search
    # thread to hand it back.
    if vector.dtype == np.float32:
        wide = vector.astype(np.float64)
        squared = float(np.add.reduce(wide * wide))
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            squared = float(np.add.reduce(vector * vector))
    if not squared <= bound * bound:
        if not np.isfinite(vector).all():
            raise InvalidVector("a vector must not contain NaN or infinity")
        raise InvalidVector(f"a vector's L2 norm must be at most {bound:g}")
    return vector if vector.dtype == np.float32 else vector.astype(np.float32)


def _metadata_name(key: str, suffix: str) -> str:
    return f"metadata {echo(key)}{suffix}"


def parse_metadata(value: object, limits: Limits) -> Metadata:
    if not isinstance(value, dict):
        raise BadRequest("'metadata' must be a map")
    if len(value) > limits.max_metadata_keys:
        raise TooLarge(f"'metadata' has at most {limits.max_metadata_keys} keys")
    for key, item in value.items():
        if not isinstance(key, str) or not key or key.startswith("$"):
            raise BadRequest("metadata keys must be non-empty strings not starting with '$'")
        check_string(key, partial(_metadata_name, key, ": the key"))
        if isinstance(item, str):
            check_string(item, partial(_metadata_name, key, ""))
        elif isinstance(item, float) and not math.isfinite(item):
            raise BadRequest(f"metadata {echo(key)} must be a finite number")
        elif isinstance(item, int) and not isinstance(item, bool) and not INT64_MIN <= item <= INT64_MAX:
            raise BadRequest(f"metadata {echo(key)} must fit in a 64-bit integer")
        elif isinstance(item, list):
            if not all(isinstance(x, str) for x in item):
                raise BadRequest(f"metadata {echo(key)}: a list may only hold strings")
            for x in item:
                check_string(x, partial(_metadata_name, key, ""))
        elif not isinstance(item, (int, float, bool)):
            raise BadRequest(f"metadata {echo(key)} must be a string, number, boolean or list of strings")
    return value


DOC_KEYS = frozenset({"id", "text", "vector", "metadata"})


def parse_document(value: object, limits: Limits) -> Document:
    if not isinstance(value, dict):
        raise BadRequest("each document must be a map")
    unknown = [key for key in value if key not in DOC_KEYS]
    if unknown:
        shown = ", ".join(echo(key) for key in unknown[:MAX_ECHOED_NAMES])
        raise BadRequest(f"unknown document field(s): {shown}")
    ident = doc_id(value.get("id"), limits)
    text = value.get("text")
    if text is not None:
        if not isinstance(text, str):
            raise BadRequest(f"document {echo(ident)}: 'text' must be a string")
        if len(text) > limits.max_text_chars:
            raise TooLarge(f"document {echo(ident)}: text is longer than {limits.max_text_chars} characters")
        check_string(text, lambda: f"document {echo(ident)}: text")
    raw_vector = value.get("vector")
    vector = None if raw_vector is None else parse_vector(raw_vector, limits)
    if text is None and vector is None:
        raise BadRequest(f"document {echo(ident)} needs 'text' or 'vector'")
    raw_meta = value.get("metadata")
    metadata = {} if raw_meta is None else parse_metadata(raw_meta, limits)
    return Document(id=ident, text=text, vector=vector, metadata=metadata)


def _create_collection(a: Args) -> CreateCollection:
    metric = a.string("metric") or Metric.COSINE.value
    try:
        parsed_metric = Metric(metric)
    except ValueError as exc:
        raise BadRequest("'metric' must be one of cosine, l2, ip, l1") from exc
    return CreateCollection(
        name=a.collection_name("name"),
        dim=a.integer("dim", low=1, high=a.limits.max_dim),
        metric=parsed_metric,
        if_not_exists=a.boolean("if_not_exists", False),
        index=parse_index_spec(a._get("index"), parsed_metric, a.limits.max_ef),
    )


def _upsert(a: Args) -> Upsert:
    name = a.collection_name()
    docs = a._get("docs")
    if not isinstance(docs, list) or not docs:
        raise BadRequest("'docs' must be a non-empty list of documents")
    if len(docs) > a.limits.max_batch_docs:
        raise TooLarge(f"at most {a.limits.max_batch_docs} documents per upsert")
    return Upsert(name, tuple(parse_document(d, a.limits) for d in docs))


def _delete(a: Args) -> Delete:
    name = a.collection_name()
    ids = a.ids(required=False)
    where, where_text = a.where(), a.where_text()
    if ids is None and where is None and where_text is None:
        raise BadRequest("delete needs 'ids' or 'where'")
    if ids is not None and (where is not None or where_text is not None):
        raise BadRequest("delete takes 'ids' or 'where', not both")
    return Delete(name, ids, where, where_text)


def _get(a: Args) -> Get:
    name = a.collection_name()
    include = a.include()
    min_seq = a.integer("min_seq", low=0)
    ids = a.ids(required=False)
    if ids is not None:
        if a.has("where") or a.has("where_text") or a.has("limit") or a.has("cursor"):
            raise BadRequest("get takes 'ids', or else 'where' / 'limit' / 'cursor', not both")
        return Get(name, ids, include, min_seq=min_seq)
    limit = a.integer("limit", low=1, high=a.limits.max_ids, default=DEFAULT_GET_LIMIT)
    assert limit is not None
    cursor = a.string("cursor")
    after = None if cursor is None else decode_cursor(cursor)
    return Get(name, None, include, a.where(), a.where_text(), limit, after, min_seq)


def _query_target(a: Args) -> tuple[Vector | None, str | None, DocId | None]:
    """(vector, text, like): exactly one of the three given."""
    raw = a.raw  # an absent key is not looked at (see `_query`)
    vector = a.vector() if "vector" in raw else None
    text = a.text() if "text" in raw else None
    like = a.like() if "like" in raw else None
    if sum(x is not None for x in (vector, text, like)) != 1:
        raise BadRequest("give exactly one of 'vector', 'text' or 'like'")
    return vector, text, like


def _keyword_target(a: Args, mode: str) -> tuple[str | None, DocId | None]:
    """(text, like) of a keyword or hybrid query: exactly one of the two given."""
    text, like = a.text(), a.like()
    if (text is None) == (like is None):
        raise BadRequest(f"mode {echo(mode)} needs 'text' or 'like' (exactly one)")
    if like is not None and a.has("vector"):
        raise BadRequest("'like' takes the stored document's vector; give no 'vector' with it")
    return text, like


def _query(a: Args) -> Query:
    """A query of one of three modes. `vector` (default): exactly one of `vector` / `text`, no
    fusion arguments. `keyword`: `text` only. `hybrid`: `text`, optionally a `vector` for the
    vector side, `fusion` (rrf: `rrf_k`; weighted: `alpha`), candidate depths >= k."""
    # A vector query is the hot path (thousands a second on the event loop): an optional
    # argument that is absent is not looked at, where the accessor calls cost more than the
    # checks of the arguments given (timeit of `parse_request`). Absent and nil read the same.
    raw = a.raw
    name = a.collection_name()
    mode = (a.string("mode") if "mode" in raw else None) or "vector"
    if mode not in ("vector", "keyword", "hybrid"):
        raise BadRequest("'mode' must be vector, keyword or hybrid")
    k = a.integer("k", low=1, high=a.limits.max_k, default=DEFAULT_K) if "k" in raw else DEFAULT_K
    assert k is not None
    min_seq = a.integer("min_seq", low=0) if "min_seq" in raw else None  # every mode: read-your-writes across nodes
    if mode == "vector":
        vector, text, like = _query_target(a)
        if not raw.keys().isdisjoint(HYBRID_ARGS):
            given = [key for key in HYBRID_ARGS if a.has(key)]
            if given:
                raise BadRequest(f"{echo(given[0])} applies to mode 'hybrid' only")
        return Query(
            collection=name,
            vector=vector,
            text=text,
            k=k,
            where=a.where() if "where" in raw else None,
            where_text=a.where_text() if "where_text" in raw else None,
            include=a.include() if "include" in raw else DEFAULT_INCLUDE,
            ef=a.integer("ef", low=1, high=a.limits.max_ef) if "ef" in raw else None,
            mode="vector",
            fusion="rrf",
            alpha=0.5,
            min_seq=min_seq,
            nprobe=a.integer("nprobe", low=1, high=MAX_NPROBE) if "nprobe" in raw else None,
            like=like,
        )
    text, like = _keyword_target(a, mode)
    if mode == "keyword":
        if a.has("vector"):
            raise BadRequest("mode 'keyword' takes 'text' only, not 'vector'")
        given = [key for key in (*HYBRID_ARGS, "ef", "nprobe") if a.has(key)]
        if given:
            raise BadRequest(f"{echo(given[0])} does not apply to mode 'keyword'")
        return Query(
            collection=name,
            vector=None,
            text=text,
            k=k,
            where=a.where(),
            where_text=a.where_text(),
            include=a.include(),
            ef=None,
            mode="keyword",
            fusion="rrf",
            alpha=0.5,
            min_seq=min_seq,
            like=like,
        )
    fusion = a.string("fusion") or "rrf"
    if fusion not in ("rrf", "weighted"):
        raise BadRequest("'fusion' must be rrf or weighted")
    if fusion == "rrf" and a.has("alpha"):
        raise BadRequest("'alpha' applies to fusion 'weighted' only")
    if fusion == "weighted" and a.has("rrf_k"):
        raise BadRequest("'rrf_k' applies to fusion 'rrf' only")
    alpha = a.number("alpha", default=0.5)
    assert alpha is not None
    if not 0.0 <= alpha <= 1.0:
        raise BadRequest("'alpha' must be between 0 and 1")
    rrf_k = a.integer("rrf_k", low=0, default=DEFAULT_RRF_K)
    assert rrf_k is not None
    if rrf_k > MAX_RRF_K:
        raise BadRequest(f"'rrf_k' must be <= {MAX_RRF_K}")
    depths = [a.integer(key, low=1, high=a.limits.max_k) for key in ("vector_candidates", "keyword_candidates")]
    for key, depth in zip(("vector_candidates", "keyword_candidates"), depths, strict=True):
        if depth is not None and depth < k:
            raise BadRequest(f"{echo(key)} must be >= k ({k})")
    return Query(
        collection=name,
        vector=a.vector(),
        text=text,
        k=k,
        where=a.where(),
        where_text=a.where_text(),
        include=a.include(),
        ef=a.integer("ef", low=1, high=a.limits.max_ef),
        mode="hybrid",
        fusion="rrf" if fusion == "rrf" else "weighted",
        alpha=alpha,
        rrf_k=rrf_k,
        vector_candidates=depths[0],
        keyword_candidates=depths[1],
        min_seq=min_seq,
        nprobe=a.integer("nprobe", low=1, high=MAX_NPROBE),
        like=like,
    )


def _query_batch(a: Args) -> QueryBatch:
    """`queries`: 1..`max_query_batch` maps, each the arguments of a `query` without
    `collection`. A bad one rejects the request, naming its position (as a bad document rejects
    an upsert)."""
    name = a.collection_name()
    raw = a._get("queries")
    if not isinstance(raw, list) or not raw:
        raise BadRequest("'queries' must be a non-empty list of query maps")
    limit = a.limits.max_query_batch
    if len(raw) > limit:
        raise TooLarge(f"at most {limit} queries per query_batch")
    queries = []
    for i, item in enumerate(raw):
        if not isinstance(item, dict):
            raise BadRequest(f"queries[{i}] must be a map of query arguments")
        if "collection" in item:
            raise BadRequest(f"queries[{i}]: give 'collection' once, beside 'queries'")
        if not all(isinstance(key, str) for key in item):
            raise BadRequest(f"queries[{i}]: argument names must be strings")
        accessor = Args({**item, "collection": name}, a.limits)
        try:
            query = _query(accessor)
            accessor.finish()
        except (BadRequest, TooLarge, InvalidVector) as exc:
            raise type(exc)(f"queries[{i}]: {exc.message}") from None
        queries.append(query)
    return QueryBatch(name, tuple(queries))


def _subscribe(a: Args) -> Subscribe:
    name = a.collection_name()
    vector, text, like = _query_target(a)
    k = a.integer("k", low=1, high=MAX_SUBSCRIBE_K)
    threshold = a.number("threshold", required=k is None)
    if like is not None and k is not None:
        raise BadRequest("'like' works with threshold subscriptions, not with 'k'")
    return Subscribe(
        collection=name,
        vector=vector,
        text=text,
        threshold=threshold,
        where=a.where(),
        where_text=a.where_text(),
        include=a.include(),
        after_seq=a.integer("after_seq", low=0),
        like=like,
        k=k,
    )


def _auth(a: Args) -> Auth:
    key = a.string("key", required=True)
    assert key is not None
    return Auth(key)


def _unsubscribe(a: Args) -> Unsubscribe:
    sub = a.string("sub", required=True)
    assert sub is not None
    if len(sub) > MAX_SUB_ID_CHARS:
        raise BadRequest(f"'sub' is a subscription id of at most {MAX_SUB_ID_CHARS} characters")
    return Unsubscribe(sub)


PARSERS: dict[str, Callable[[Args], Request]] = {
    "ping": lambda a: Ping(),
    "auth": _auth,
    "create_collection": _create_collection,
    "list_collections": lambda a: ListCollections(),
    "drop_collection": lambda a: DropCollection(a.collection_name("name")),
    "upsert": _upsert,
    "delete": _delete,
    "get": _get,
    "count": lambda a: Count(a.collection_name(), a.integer("min_seq", low=0)),
    "query": _query,
    "query_batch": _query_batch,
    "subscribe": _subscribe,
    "unsubscribe": _unsubscribe,
}


def parse_request(op: object, args: Mapping[str, Any], limits: Limits) -> Request:
    """Validate one request. Raises UnknownOp, BadRequest, TooLarge or InvalidVector, and no
    other exception whatever `op` and `args` hold."""
    if not isinstance(op, str):
        raise BadRequest("'op' must be a string")
    parser = PARSERS.get(op)
    if parser is None:
        raise UnknownOp(f"no such op: {echo(op)}")
    for key in args:
        # msgpack maps may have binary keys; the accessors and the unknown-argument check need str.
        if not isinstance(key, str):
            raise BadRequest(f"argument names must be strings, got {echo(key)}")
    accessor = Args(args, limits)
    request = parser(accessor)
    accessor.finish()
    return request
