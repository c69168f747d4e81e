"""`shoal import` and `shoal export`: a collection to and from a file, over the WebSocket client.

File format (JSONL, one Document per line): `{"id", "text"?, "vector"?, "metadata"?}`. `export`
writes vectors as arrays of numbers: each float32 value as the shortest decimal that reads back
as the same double, so the float32 comes back bit for bit; keys sorted, so a re-export of an
import is byte-identical. `import` also reads a vector given as a string: standard base64 of
its little-endian float32 values (`--vectors base64` on export writes that, a third the size).

CSV (header row): the `--id-column` (default `id`) and `--text-column` (default `text`), every
other non-empty cell a string metadata value.

Each line is validated here with the server's own parser (`models.requests.parse_document`) and
the collection's dim, so a bad line is reported with its number and skipped (or, `--strict`,
fails the import before anything is sent). Batches are pipelined: up to `--in-flight` upserts
wait for their acks at once. Upserts replace by id, so a re-run leaves the same documents.

Exit status: 0 when every line was imported, 1 when some were skipped or refused, 2 for a
mistake that stops it before any work (a bad path, an unreachable server: one line on stderr).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import csv
import json
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
from tqdm import tqdm

from models.config import Limits
from models.errors import ShoalError, StartupError
from models.records import MODEL_DIM
from models.requests import parse_document
from shoal_client import ShoalClient
from shoal_client.errors import ClientError
from shoal_client.errors import ShoalError as ClientShoalError

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_BATCH = 1_000
DEFAULT_IN_FLIGHT = 4
DEFAULT_PAGE = 1_000
EXIT_PARTIAL = 1


@dataclass(frozen=True, slots=True)
class ImportOptions:
    path: Path
    collection: str
    url: str = DEFAULT_URL
    key: str | None = None
    batch: int = DEFAULT_BATCH
    in_flight: int = DEFAULT_IN_FLIGHT
    strict: bool = False
    id_column: str = "id"
    text_column: str = "text"
    metric: str | None = None
    progress: bool = True


@dataclass(slots=True)
class ImportSummary:
    imported: int = 0
    skipped: int = 0  # bad lines, and lines of batches the server refused
    seq: int = 0
    seconds: float = 0.0

    def line(self, collection: str) -> str:
        rate = self.imported / self.seconds if self.seconds > 0 else 0.0
        return (
            f"imported {self.imported} documents into {collection} in {self.seconds:.2f} s "
            f"({rate:,.0f} docs/s), {self.skipped} lines skipped, last seq {self.seq}"
        )


class BadLine(Exception):
    """A line that is no Document; its message says why."""


def decode_vector_field(value: Any) -> Any:
    """A vector field as read: arrays as they are, a string as base64 of little-endian float32."""
    if not isinstance(value, str):
        return value
    try:
        raw = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError) as exc:
        raise BadLine("'vector' string is not base64") from exc
    if len(raw) % 4:
        raise BadLine("'vector' base64 does not hold whole float32 values")
    return np.frombuffer(raw, "<f4").astype(np.float32)


_NUMBER_TYPES = frozenset({float, int})


def _vector_bytes(vector: Any) -> Any:
    """A vector as little-endian float32 bytes when it is an array or a list of plain numbers
    (so that the parser takes its fast path), else as it is (the parser says what is wrong).
    A value beyond float32 becomes infinity, which the parser refuses as it refuses NaN."""
    if isinstance(vector, np.ndarray):
        return vector.astype("<f4").tobytes()
    if isinstance(vector, list) and vector and set(map(type, vector)) <= _NUMBER_TYPES:
        try:
            with np.errstate(over="ignore"):
                return np.asarray(vector, dtype=np.float64).astype("<f4").tobytes()
        except OverflowError:  # an integer beyond float64
            return vector
    return vector


def _records(path: Path, options: ImportOptions) -> Iterator[tuple[int, Any]]:
    """(line number, raw record or BadLine) for every non-blank line / CSV row of `path`."""
    try:
        handle = path.open(encoding="utf-8", newline="")
    except OSError as exc:
        raise StartupError(f"cannot read {path}: {exc.strerror}") from None
    with handle:
        try:
            if path.suffix.lower() == ".csv":
                yield from _csv_records(handle, options)
                return
            for number, line in enumerate(handle, 1):
                if not line.strip():
                    continue
                try:
                    yield number, json.loads(line)
                except ValueError as exc:
                    yield number, BadLine(f"not JSON ({exc})")
        except UnicodeDecodeError:
            raise StartupError(f"{path} is not UTF-8 text") from None


def _csv_records(handle: IO[str], options: ImportOptions) -> Iterator[tuple[int, Any]]:
    reader = csv.DictReader(handle)
    fields = reader.fieldnames or []
    if options.id_column not in fields:
        raise StartupError(f"{options.path}: no {options.id_column!r} column in the header (see --id-column)")
    for row in reader:
        number = reader.line_num
        if None in row:
            yield number, BadLine("more cells than the header has columns")
            continue
        doc: dict[str, Any] = {"id": row.pop(options.id_column)}
        text = row.pop(options.text_column, None)
        if text:
            doc["text"] = text
        doc["metadata"] = {k: v for k, v in row.items() if v not in (None, "")}
        yield number, doc


def _document(raw: Any, dim: int | None, limits: Limits) -> dict[str, Any]:
    """The upsert form of one record, checked as the server checks it. Raises BadLine."""
    if isinstance(raw, BadLine):
        raise raw
    if isinstance(raw, dict) and "vector" in raw:
        raw = {**raw, "vector": _vector_bytes(decode_vector_field(raw["vector"]))}
    try:
        doc = parse_document(raw, limits)
    except ShoalError as exc:
        raise BadLine(str(exc)) from None
    width = MODEL_DIM if doc.vector is None else int(doc.vector.shape[0])
    if dim is not None and width != dim:
        raise BadLine(f"vector has {width} values, the collection's dim is {dim}")
    out: dict[str, Any] = {"id": doc.id}
    if doc.text is not None:
        out["text"] = doc.text
    if doc.vector is not None:
        out["vector"] = doc.vector
    if doc.metadata:
        out["metadata"] = doc.metadata
    return out


async def _connect(url: str, key: str | None) -> ShoalClient:
    try:
        return await ShoalClient.connect(url, key)
    except (OSError, ClientError, ClientShoalError) as exc:
        raise StartupError(f"cannot reach a Shoal server at {url}: {exc}") from None


def _report(number: int, message: str) -> None:
    print(f"line {number}: {message}", file=sys.stderr)


async def import_file(options: ImportOptions) -> ImportSummary:
    """Upsert every good line of `options.path` into the collection (created when missing, dim
    from the first vector). Raises StartupError for a bad path or an unreachable server."""
    limits = Limits()
    if not options.path.is_file():
        raise StartupError(f"no such file: {options.path}")
    summary = ImportSummary()
    dim = _first_dim(options, limits)
    if options.strict:
        for number, raw in _records(options.path, options):
            try:
                _document(raw, dim, limits)
            except BadLine as exc:
                _report(number, str(exc))
                summary.skipped += 1
                return summary  # --strict: nothing is sent
    client = await _connect(options.url, options.key)
    started = time.perf_counter()
    try:
        info = await client.create_collection(options.collection, dim=dim, metric=options.metric, if_not_exists=True)
        dim = info.dim
        slots = Window(max(1, options.in_flight))
        failures: list[BaseException] = []

        async def send(batch: list[dict[str, Any]], first: int, last: int, bar: tqdm[Any]) -> None:
            try:
                result = await upsert_with_retries(client, options.collection, batch, slots)
            except ClientError as exc:  # the connection is gone: nothing more can be sent
                failures.append(exc)
            except ClientShoalError as exc:
                if exc.code in RETRIED:
                    failures.append(exc)
                print(f"lines {first}-{last}: batch refused: {exc}", file=sys.stderr)
                summary.skipped += len(batch)
            else:
                summary.imported += result.count
                summary.seq = max(summary.seq, result.seq)
                bar.update(result.count)
            finally:
                await slots.release()

        with tqdm(unit="docs", disable=not options.progress or None, file=sys.stderr, smoothing=0.1) as bar:
            async with asyncio.TaskGroup() as tasks:
                batch: list[dict[str, Any]] = []
                first = 0
                for number, raw in _records(options.path, options):
                    try:
                        doc = _document(raw, dim, limits)
                    except BadLine as exc:
                        _report(number, str(exc))
                        summary.skipped += 1
                        continue
                    if not batch:
                        first = number
                    batch.append(doc)
                    if len(batch) >= options.batch:
                        await slots.acquire()
                        tasks.create_task(send(batch, first, number, bar))
                        batch = []
                        await asyncio.sleep(0)  # let acks land while the file is read
                    if failures:
                        break
                if batch and not failures:
                    await slots.acquire()
                    tasks.create_task(send(batch, first, number, bar))
        if failures:
            raise StartupError(f"the server stopped taking writes: {failures[0]}")
    finally:
        summary.seconds = time.perf_counter() - started
        await client.close()
    return summary


# Codes a batch is sent again for, after a pause that doubles each time (up to RETRIES times).
RETRIED = frozenset({"overloaded", "rate_limited", "unavailable"})
RETRIES = 8
FIRST_PAUSE_S = 0.1


class Window:
    """How many upserts may await their acks at once: at most `limit`, halved each time the
    server answers that it is busy (more in flight would only pile up behind its deadline), one
    more after each batch it takes."""

    def __init__(self, limit: int) -> None:
        self.limit = self.size = limit
        self.in_flight = 0
        self._changed = asyncio.Condition()

    async def acquire(self) -> None:
        async with self._changed:
            await self._changed.wait_for(lambda: self.in_flight < self.size)
            self.in_flight += 1

    async def release(self) -> None:
        async with self._changed:
            self.in_flight -= 1
            self._changed.notify_all()

    def busy(self) -> None:
        self.size = max(1, self.size // 2)

    def took(self) -> None:
        # Waiters are woken by the release that follows every batch.
        self.size = min(self.limit, self.size + 1)


async def upsert_with_retries(
    client: ShoalClient, collection: str, batch: list[dict[str, Any]], window: Window | None = None
) -> Any:
    """`client.upsert`, again after a pause while the server answers overloaded / unavailable
    (narrowing `window` each time, widening it after a success)."""
    for attempt in range(RETRIES):
        try:
            result = await client.upsert(collection, batch)
        except ClientShoalError as exc:
            if exc.code not in RETRIED or attempt == RETRIES - 1:
                raise
            if window is not None:
                window.busy()
            await asyncio.sleep(FIRST_PAUSE_S * 2**attempt)
        else:
            if window is not None:
                window.took()
            return result
    raise AssertionError("unreachable")


def _first_dim(options: ImportOptions, limits: Limits) -> int | None:
    """The width of the first good record's vector (None: the first has only text)."""
    for _, raw in _records(options.path, options):
        try:
            doc = _document(raw, None, limits)
        except BadLine:
            continue
        vector = doc.get("vector")
        return None if vector is None else int(vector.shape[0])
    return None


def doc_line(doc: dict[str, Any], vectors: str = "array") -> str:
    """One export line: keys sorted, vectors exact (see the module docstring)."""
    out = dict(doc)
    vector = out.get("vector")
    if vector is not None:
        array = np.asarray(vector, dtype="<f4")
        out["vector"] = base64.b64encode(array.tobytes()).decode() if vectors == "base64" else array.tolist()
    return json.dumps(out, ensure_ascii=False, sort_keys=True, separators=(",", ":"), allow_nan=False)


async def export_collection(
    collection: str,
    out: IO[str],
    *,
    url: str = DEFAULT_URL,
    key: str | None = None,
    page: int = DEFAULT_PAGE,
    vectors: str = "array",
) -> int:
    """Write every live document of `collection` to `out` in id order; returns how many.
    Raises StartupError for an unreachable server or an unknown collection."""
    client = await _connect(url, key)
    written = 0
    try:
        async for got in client.scan(collection, page=page, include=["text", "metadata", "vector"]):
            out.writelines(doc_line(doc, vectors) + "\n" for doc in got.docs)
            written += len(got.docs)
    except (ClientShoalError, ClientError) as exc:
        if getattr(exc, "code", "") == "not_found":
            raise StartupError(f"no collection named {collection!r}") from None
        raise StartupError(f"export of {collection} failed after {written} documents: {exc}") from None
    finally:
        await client.close()
    return written


def run_import(options: ImportOptions) -> int:
    """`shoal import`: the exit status (0 all imported, 1 some skipped); prints the summary."""
    summary = asyncio.run(import_file(options))
    print(summary.line(options.collection), file=sys.stderr)
    return 0 if summary.skipped == 0 else EXIT_PARTIAL


def run_export(collection: str, output: str | None, *, url: str, key: str | None, page: int, vectors: str) -> int:
    """`shoal export`: writes to `output` (None or `-`: stdout); prints a summary on stderr."""
    started = time.perf_counter()
    if output in (None, "-"):
        written = asyncio.run(export_collection(collection, sys.stdout, url=url, key=key, page=page, vectors=vectors))
    else:
        try:
            handle = Path(output).open("w", encoding="utf-8", newline="\n")  # noqa: SIM115 (closed by the with below)
        except OSError as exc:
            raise StartupError(f"cannot write {output}: {exc.strerror}") from None
        with handle:
            written = asyncio.run(export_collection(collection, handle, url=url, key=key, page=page, vectors=vectors))
    print(f"exported {written} documents of {collection} in {time.perf_counter() - started:.1f} s", file=sys.stderr)
    return 0
