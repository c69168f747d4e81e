"""Seeded generation of well-formed and hostile Shoal requests, for fuzzing.

`FrameGen(rng)` draws every choice from one `random.Random`: with a seeded one the same frames
come out on every run (the live fuzz, `load/fuzz.py`); with a Random that hypothesis controls
(`st.randoms(use_true_random=False)`, tests/frame_strategies.py) hypothesis explores and shrinks the
same space. Every op of the request table and every argument gets well-formed values and hostile
ones: wrong types, binary map keys, lone surrogates and NUL in strings, integers at and past the
64-bit limits, huge finite floats, NaN and infinity, deep and wide filters, unknown ops and
arguments, empty strings and vectors of the wrong length.

Values are plain Python objects, as the decoders hand them to the parser. `wire` says which
decoder they must survive: `"python"` (anything, what `parse_request` may receive), `"msgpack"`
(integers within the 64-bit range msgpack can carry), `"json"` (no bytes, string keys only).
"""

from __future__ import annotations

import random
import string
from collections.abc import Callable, Sequence
from typing import Any, Literal

import msgpack

Wire = Literal["python", "msgpack", "json"]

INT64_MIN, INT64_MAX = -(2**63), 2**63 - 1
UINT64_MAX = 2**64 - 1

OPS = (
    "ping",
    "auth",
    "create_collection",
    "list_collections",
    "drop_collection",
    "upsert",
    "delete",
    "get",
    "count",
    "query",
    "subscribe",
    "unsubscribe",
)
# Ops that change data: never aimed at the protected (canary) collections.
WRITE_OPS = frozenset({"create_collection", "drop_collection", "upsert", "delete"})
FILTER_OPS = ("$eq", "$ne", "$gt", "$gte", "$lt", "$lte", "$in", "$nin")

MSGPACK_INTS = (
    0,
    1,
    -1,
    7,
    127,
    128,
    255,
    256,
    65_535,
    2**31 - 1,
    2**31,
    2**32,
    2**53,
    2**53 + 1,
    INT64_MAX,
    INT64_MIN,
    INT64_MAX + 1,
    UINT64_MAX,
)
BIG_INTS = (INT64_MIN - 1, 2**64, 10**20, -(10**30), 10**308, 10**309, -(10**400), 10**4000)
FLOATS = (
    0.0,
    -0.0,
    0.5,
    1.0,
    -1.0,
    1e-45,
    5e-324,
    1.5e-38,
    3e38,
    -3e38,
    3.4028235e38,
    3.5e38,
    1e39,
    1.7976931348623157e308,
    float("nan"),
    float("inf"),
    float("-inf"),
)
NASTY_STRINGS = (
    "",
    " ",
    "\x00",
    "a\x00b",
    "\ud800",
    "x\udfff",
    "\udc80\ud800",
    "\ud83d",
    "😀",
    "é",
    "\u202e\u0645\u0631\u062d\u0628\u0627",
    "\ufeff",
    "\uffff",
    "\U0010ffff",
    "'; DROP TABLE documents; --",
    "%s %d {0} {}",
    "\\",
    '"',
    "$eq",
    "$in",
    "$and",
    "$or",
    "$contains",
    "id",
    "op",
    "..",
    "/etc/passwd",
    "\r\n",
    "\t",
)
SAFE_ALPHABET = string.ascii_letters + string.digits + "_-"


class FrameGen:
    """Draws requests (op + args), argument values and raw frames from `rng`.

    `collections` are valid names the fuzzer may write to; `readable` are names it may only read
    (the canary); `dim` is the vector width those collections were made with.
    """

    def __init__(
        self,
        rng: random.Random,
        *,
        wire: Wire = "python",
        collections: Sequence[str] = ("fz_a", "fz_b"),
        readable: Sequence[str] = (),
        dim: int = 8,
        big: bool = False,
    ) -> None:
        self.rng = rng
        self.wire = wire
        self.collections = tuple(collections)
        self.readable = tuple(readable)
        self.dim = dim
        # `big` allows values of several MB (10 MB argument names, `$in` of 10^6 items).
        self.big = big

    # -- primitives ---------------------------------------------------------------------------

    def chance(self, p: float) -> bool:
        return self.rng.random() < p

    def pick(self, options: Sequence[Any]) -> Any:
        return options[self.rng.randrange(len(options))]

    def safe_name(self, low: int = 1, high: int = 12) -> str:
        return "".join(self.pick(SAFE_ALPHABET) for _ in range(self.rng.randint(low, high)))

    def code_point(self) -> str:
        kind = self.rng.randrange(6)
        if kind == 0:
            return chr(self.rng.randint(0, 0x1F))  # control characters, NUL included
        if kind == 1 and (self.wire != "msgpack" or self.chance(0.2)):
            # Lone surrogates. msgpack cannot carry them as str (a frame holding one is not valid
            # UTF-8), so on that wire they are rarer, to leave room for frames that decode.
            return chr(self.rng.randint(0xD800, 0xDFFF))
        if kind == 2:
            return chr(self.rng.randint(0x10000, 0x10FFFF))
        if kind == 3:
            return chr(self.rng.randint(0x80, 0xFFFF))
        return str(self.pick(string.printable))

    def string(self) -> str:
        """Any string: short printable, hostile characters, a fixed nasty one, or long."""
        kind = self.rng.randrange(10)
        if kind <= 2:
            return self.safe_name(0, 16)
        if kind <= 5:
            return "".join(self.code_point() for _ in range(self.rng.randint(1, 12)))
        if kind <= 8:
            return str(self.pick(NASTY_STRINGS))
        return self.long_string()

    def long_string(self) -> str:
        if self.big and self.chance(0.05):
            return "a" * (10 * 1024 * 1024)
        return str(self.pick("ab\u00e9\ud800")) * int(self.pick([257, 4_097, 100_001]))

    def integer(self) -> int:
        if self.wire != "msgpack" and self.chance(0.25):
            return int(self.pick(BIG_INTS))
        if self.chance(0.3):
            return self.rng.randint(-5, 1_100)
        return int(self.pick(MSGPACK_INTS))

    def number(self) -> float | int:
        if self.chance(0.4):
            return self.integer()
        if self.chance(0.3):
            return self.rng.uniform(-2.0, 2.0)
        value: float = self.pick(FLOATS)
        return value

    def key(self) -> Any:
        """A map key: mostly strings, bytes where the wire allows (msgpack `bin` keys)."""
        if self.wire != "json" and self.chance(0.15):
            return self.string().encode("utf-8", "surrogatepass")[:64] or b"k"
        return self.string()

    def scalar(self) -> Any:
        kind = self.rng.randrange(8)
        if kind == 0:
            return None
        if kind == 1:
            return self.chance(0.5)
        if kind == 2:
            return self.integer()
        if kind == 3:
            return self.number()
        if kind == 4 and self.wire != "json":
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 12)))
        if kind == 5 and self.wire == "msgpack":
            return msgpack.ExtType(self.rng.randint(0, 127), b"\x01\x02")
        return self.string()

    def value(self, depth: int = 2) -> Any:
        """Any JSON-ish value, possibly a list or a map (with hostile keys)."""
        if depth <= 0 or self.chance(0.6):
            return self.scalar()
        if self.chance(0.5):
            return [self.value(depth - 1) for _ in range(self.rng.randint(0, 4))]
        return {self.key(): self.value(depth - 1) for _ in range(self.rng.randint(0, 4))}

    def hostile_any(self) -> Any:
        """A value of a random type, for an argument that wants another."""
        return self.value(2)

    # -- arguments ----------------------------------------------------------------------------

    def collection(self, write: bool) -> Any:
        roll = self.rng.random()
        names = self.collections if write or not self.readable else self.collections + self.readable
        if roll < 0.75 and names:
            return self.pick(names)
        if roll < 0.85:
            return "fz_" + self.safe_name(1, 8)  # valid but (probably) missing
        if roll < 0.9:
            return "n" * self.pick([64, 65, 1000])
        return self.hostile_any() if self.chance(0.5) else self.string()

    def vector(self, dim: int | None = None) -> Any:
        width = self.dim if dim is None else dim
        kind = self.rng.randrange(14)
        if kind <= 3:
            return [self.rng.uniform(-1.0, 1.0) for _ in range(width)]
        if kind <= 6:
            floats = [self.rng.uniform(-1.0, 1.0) for _ in range(width)]
            if self.wire == "json":
                return floats
            return msgpack_f32(floats)
        if kind == 7:  # binary of the wrong length (a multiple of 4 or not)
            n = self.pick([0, 1, 3, 4 * width - 1, 4 * width + 4, 4 * (width - 1), 4 * 4097])
            return b"" if self.wire == "json" else bytes(self.rng.randrange(256) for _ in range(n))
        if kind == 8:  # huge finite values: norms and dot products overflow float32
            big = self.pick([3e38, -3e38, 3.4028235e38, 1e30])
            return [big] * width if self.wire == "json" or self.chance(0.5) else msgpack_f32([big] * width)
        if kind == 9:
            bad = self.pick([float("nan"), float("inf"), 1e39, True, "1", None, [1.0], self.integer()])
            vec: list[Any] = [0.5] * width
            vec[self.rng.randrange(width)] = bad
            return vec
        if kind == 10:
            return [0.0] * width  # zero vector: undefined under cosine
        if kind == 11:
            return [self.rng.uniform(-1, 1) for _ in range(self.pick([0, 1, width - 1, width + 1, 4097]))]
        if kind == 12 and self.wire != "json":
            # binary with NaN / inf bit patterns
            return bytes.fromhex(self.pick(["0000c07f", "0000807f", "000080ff", "ffffffff"])) * width
        return self.hostile_any()

    def metadata(self) -> Any:
        if self.chance(0.1):
            return self.hostile_any()
        out: dict[Any, Any] = {}
        for _ in range(self.rng.randint(0, 4)):
            key = self.pick(["n", "tag", "tags", "price", "ok"]) if self.chance(0.6) else self.key()
            if self.chance(0.75):
                value: Any = self.pick(
                    [
                        lambda: self.rng.randint(-100, 100),
                        lambda: self.rng.uniform(-100, 100),
                        lambda: self.chance(0.5),
                        lambda: self.safe_name(),
                        lambda: [self.safe_name() for _ in range(self.rng.randint(0, 3))],
                    ]
                )()
            else:
                value = self.pick([self.integer, self.number, self.string, self.hostile_any])()
                if self.chance(0.2):
                    value = [self.string() for _ in range(self.rng.randint(1, 3))]
            out[key] = value
        if self.chance(0.03):
            out.update({f"k{i}": i for i in range(257)})
        return out

    def doc_id(self) -> Any:
        if self.chance(0.8):
            return f"d{self.rng.randrange(200)}"
        if self.chance(0.5):
            return self.string()
        return self.hostile_any()

    def document(self) -> Any:
        if self.chance(0.05):
            return self.hostile_any()
        doc: dict[Any, Any] = {"id": self.doc_id()}
        if self.chance(0.1):
            del doc["id"]
        has_text = self.chance(0.15)
        if has_text:
            doc["text"] = self.pick(["a short text", "hello world"]) if self.chance(0.5) else self.string()
        if not has_text or self.chance(0.3):
            doc["vector"] = self.vector()
        if self.chance(0.5):
            doc["metadata"] = self.metadata()
        if self.chance(0.05):
            doc[self.key()] = self.hostile_any()
        return doc

    def ids(self) -> Any:
        roll = self.rng.random()
        if roll < 0.7:
            return [self.doc_id() for _ in range(self.rng.randint(0, 5))]
        if roll < 0.75:
            return [f"d{i}" for i in range(10_001)]
        return self.hostile_any()

    def include(self) -> Any:
        if self.chance(0.8):
            return self.rng.sample(["text", "metadata", "vector"], self.rng.randint(0, 3))
        return self.pick([["TEXT"], ["text", 1], "text", [None], [["text"]], self.hostile_any()])

    def filter_value(self, op: str) -> Any:
        if op in ("$in", "$nin"):
            roll = self.rng.random()
            if roll < 0.6:
                return [self.filter_scalar() for _ in range(self.rng.randint(0, 5))]
            if roll < 0.7:
                return list(range(self.pick([1_000, 10_000])))
            if roll < 0.73 and self.big:
                return list(range(1_000_000))
            return self.hostile_any()
        return self.filter_scalar()

    def filter_scalar(self) -> Any:
        roll = self.rng.random()
        if roll < 0.5:
            return self.pick([1, 2.5, "a", "x", True, False, -3])
        if roll < 0.7:
            return self.string()
        if roll < 0.85:
            return self.number()
        return self.hostile_any()

    def where(self, depth: int = 0) -> Any:
        """A filter: mostly well-formed, sometimes deep, wide or wrongly typed."""
        roll = self.rng.random()
        if depth == 0 and roll < 0.05:
            return self.deep_filter(self.pick([7, 8, 9, 20, 200]))
        if depth == 0 and roll < 0.08:
            return {"$or": [{"n": i} for i in range(self.pick([100, 5_000]))]}
        if depth == 0 and roll < 0.1:
            return {f"f{i}": i for i in range(self.pick([100, 2_000]))}
        if roll < 0.12:
            return self.hostile_any()
        if depth < 3 and roll < 0.3:
            logic = self.pick(["$and", "$or"])
            kids: Any = [self.where(depth + 1) for _ in range(self.rng.randint(0, 3))]
            return {logic: kids if self.chance(0.9) else self.hostile_any()}
        field = self.pick(["n", "tag", "tags", "price", "ok"]) if self.chance(0.7) else self.key()
        if self.chance(0.3):
            return {field: self.filter_scalar()}
        ops: dict[Any, Any] = {}
        for _ in range(self.rng.randint(0, 2) if self.chance(0.1) else 1):
            op = self.pick(FILTER_OPS) if self.chance(0.85) else self.pick(["$regex", "$exists", "eq", ""])
            ops[op if self.chance(0.95) else self.key()] = self.filter_value(op)
        return {field: ops}

    def deep_filter(self, depth: int) -> dict[str, Any]:
        node: dict[str, Any] = {"n": 1}
        for _ in range(depth):
            node = {self.pick(["$and", "$or"]): [node]}
        return node

    def where_text(self) -> Any:
        if self.chance(0.8):
            return {self.pick(["$contains", "$not_contains"]): self.string()}
        return self.pick([{}, {"$contains": 1}, {"$regex": "a"}, {"$contains": "a", "$not_contains": "b"}, "a"])

    # -- requests -----------------------------------------------------------------------------

    def request(self, *, allow_writes: bool = True) -> tuple[Any, dict[Any, Any]]:
        """(op, args): an op of the table (rarely an unknown or non-string op) and its arguments."""
        roll = self.rng.random()
        if roll < 0.04:
            op: Any = (
                self.pick(["pong", "Query", "query ", "", "$eq", "upsert\x00"])
                if self.chance(0.7)
                else (self.hostile_any())
            )
            return op, self.optional_args({})
        ops = OPS if allow_writes else tuple(o for o in OPS if o not in WRITE_OPS)
        op = self.pick(ops)
        build: Callable[[], dict[Any, Any]] = getattr(self, "_args_" + op)
        return op, self.optional_args(build())

    def optional_args(self, args: dict[Any, Any]) -> dict[Any, Any]:
        """Sometimes drop a required argument, retype one, or add unknown ones."""
        if args and self.chance(0.1):
            del args[self.pick(list(args))]
        if args and self.chance(0.1):
            args[self.pick(list(args))] = self.hostile_any()
        if self.chance(0.08):
            for _ in range(self.rng.randint(1, 3)):
                args[self.key()] = self.hostile_any()
        if self.big and self.chance(0.01):
            args["u" * (10 * 1024 * 1024)] = 1
        return args

    def _maybe(self, args: dict[Any, Any], key: str, p: float, make: Callable[[], Any]) -> None:
        if self.chance(p):
            args[key] = make()

    def _args_ping(self) -> dict[Any, Any]:
        return {}

    def _args_list_collections(self) -> dict[Any, Any]:
        return {}

    def _args_auth(self) -> dict[Any, Any]:
        return {"key": self.string() if self.chance(0.8) else self.hostile_any()}

    def _args_create_collection(self) -> dict[Any, Any]:
        args: dict[Any, Any] = {"name": self.collection(write=True)}
        self._maybe(args, "dim", 0.8, lambda: self.dim if self.chance(0.5) else self.pick([1, 3, 4096, 4097, 0, -1]))
        self._maybe(args, "metric", 0.5, lambda: self.pick(["cosine", "l2", "ip", "l1", "", "COSINE", 1]))
        self._maybe(args, "if_not_exists", 0.5, lambda: self.pick([True, False, 1, "true", None]))
        return args

    def _args_drop_collection(self) -> dict[Any, Any]:
        return {"name": self.collection(write=True)}

    def _args_upsert(self) -> dict[Any, Any]:
        roll = self.rng.random()
        if roll < 0.9:
            docs: Any = [self.document() for _ in range(self.rng.randint(1, 4))]
        elif roll < 0.93:
            docs = [{"id": f"d{i}", "vector": [0.5] * self.dim} for i in range(10_001)]
        elif roll < 0.96:
            docs = []
        else:
            docs = self.hostile_any()
        return {"collection": self.collection(write=True), "docs": docs}

    def _args_delete(self) -> dict[Any, Any]:
        args: dict[Any, Any] = {"collection": self.collection(write=True)}
        roll = self.rng.random()
        if roll < 0.5:
            args["ids"] = self.ids()
        elif roll < 0.85:
            args["where"] = self.where()
            self._maybe(args, "where_text", 0.2, self.where_text)
        elif roll < 0.95:
            args["where_text"] = self.where_text()
        else:
            args.update(ids=self.ids(), where=self.where())
        return args

    def _args_get(self) -> dict[Any, Any]:
        args: dict[Any, Any] = {"collection": self.collection(write=False), "ids": self.ids()}
        self._maybe(args, "include", 0.4, self.include)
        return args

    def _args_count(self) -> dict[Any, Any]:
        return {"collection": self.collection(write=False)}

    def _target(self, args: dict[Any, Any]) -> None:
        roll = self.rng.random()
        if roll < 0.75:
            args["vector"] = self.vector()
        elif roll < 0.9:
            args["text"] = self.pick(["hello", "", " ", "\ud800", "a\x00b"]) if self.chance(0.5) else self.string()
        elif roll < 0.95:
            args.update(vector=self.vector(), text="both")
        # else neither

    def _args_query(self) -> dict[Any, Any]:
        args: dict[Any, Any] = {"collection": self.collection(write=False)}
        self._target(args)
        self._maybe(args, "k", 0.5, lambda: self.rng.randint(1, 20) if self.chance(0.6) else self.integer())
        self._maybe(args, "where", 0.4, self.where)
        self._maybe(args, "where_text", 0.1, self.where_text)
        self._maybe(args, "include", 0.3, self.include)
        self._maybe(args, "ef", 0.2, lambda: self.rng.randint(1, 200) if self.chance(0.6) else self.integer())
        self._maybe(args, "mode", 0.1, lambda: self.pick(["vector", "keyword", "hybrid", "", 1]))
        self._maybe(args, "fusion", 0.05, lambda: self.pick(["rrf", "weighted", "x", 2]))
        self._maybe(args, "alpha", 0.05, self.number)
        return args

    def _args_subscribe(self) -> dict[Any, Any]:
        args: dict[Any, Any] = {"collection": self.collection(write=False)}
        self._target(args)
        self._maybe(args, "threshold", 0.9, lambda: self.rng.uniform(-1, 1) if self.chance(0.6) else self.number())
        self._maybe(args, "where", 0.3, self.where)
        self._maybe(args, "where_text", 0.1, self.where_text)
        self._maybe(args, "include", 0.2, self.include)
        self._maybe(args, "after_seq", 0.2, lambda: self.rng.randint(0, 10) if self.chance(0.5) else self.integer())
        return args

    def _args_unsubscribe(self) -> dict[Any, Any]:
        return {"sub": self.string() if self.chance(0.8) else self.hostile_any()}

    # -- whole frames -------------------------------------------------------------------------

    def request_id(self) -> Any:
        if self.chance(0.95):
            return self.rng.randrange(1, 2**32)
        return self.pick([None, -1, "1", 1.5, True, UINT64_MAX, 0, [1]])

    def frame_map(self, *, allow_writes: bool = True) -> dict[Any, Any]:
        """A request map as a client would send it: id, op and the arguments."""
        op, args = self.request(allow_writes=allow_writes)
        frame: dict[Any, Any] = {"id": self.request_id(), "op": op}
        if self.chance(0.02):
            del frame[self.pick(["id", "op"])]
        frame.update({k: v for k, v in args.items() if k not in ("id", "op")})
        return frame

    def raw_frame(self, *, allow_writes: bool = True) -> bytes | str:
        """The bytes of one WebSocket message (a str is a text frame): mostly a packed request map,
        sometimes not msgpack, not a map, truncated, invalid UTF-8 or lone surrogates in a str."""
        roll = self.rng.random()
        if roll < 0.9:
            return pack(self.frame_map(allow_writes=allow_writes))
        kind = self.rng.randrange(8)
        if kind == 0:
            return bytes(self.rng.randrange(256) for _ in range(self.rng.randint(0, 40)))
        if kind == 1:
            whole = pack(self.frame_map(allow_writes=False))
            return whole[: self.rng.randrange(len(whole))]
        if kind == 2:
            return pack(self.pick([[1, 2], 7, "ping", None, b"\x00", {}]))
        if kind == 3:
            return str(self.pick(['{"id":1,"op":"ping"}', "", "\x00"]))
        if kind == 4:  # a str holding invalid UTF-8
            return b"\x82\xa2id\x01\xa2op\xa3\xff\xfe\xfd"
        if kind == 5:  # lone surrogates encoded as if they were UTF-8
            return pack({"id": 1, "op": "query", "collection": self.collection(False), "text": "\ud800"})
        if kind == 6:  # binary keys at the top level
            return pack({"id": self.rng.randrange(1, 1000), "op": "ping", b"bin": 1})
        return pack({"id": self.rng.randrange(1, 1000), "op": "count", "collection": "x" * 70, b"\xff": [b"k"]})


def msgpack_f32(values: Sequence[float]) -> bytes:
    """Little-endian float32 bytes (values out of float32 range become infinity)."""
    import numpy as np

    with np.errstate(over="ignore"):
        return np.asarray(values, dtype="<f8").astype("<f4").tobytes()


def pack(obj: Any) -> bytes:
    """msgpack bytes as the server reads them; lone surrogates pass as their (invalid) UTF-8."""
    packed: bytes = msgpack.packb(obj, use_bin_type=True, unicode_errors="surrogatepass")
    return packed
