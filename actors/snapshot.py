"""Snapshot files of a collection's shards: layout, manifest, checksums, atomic write, verify.

A snapshot is a cache of state PostgreSQL already holds, never a source of truth: start-up may
use it to skip the full scan of the docs table, and anything wrong with it means a full rebuild.

Layout under the snapshot root (`<data-dir>/snapshots`)::

    <collection>/manifest.json          the commit point: names the generation in use
    <collection>/gen-<seq>-<nonce>/shard-<i>/arrays.npz, docs.msgpack, and the index's own
                                        files (index.hnsw; index.faiss, index.json, ...)

A new generation is written beside the old one: every file is written and fsynced, then the
manifest is written to a temporary file, fsynced and renamed over `manifest.json` (and the
directory fsynced). A crash at any point leaves either the old manifest or the new one, each
naming complete files; generations no manifest names are removed by the next write or start.

The manifest records what the snapshot claims (collection, PostgreSQL's collection id and
creation time, dim, metric, the applied seq, counts, index parameters, library versions, the
size and SHA-256 of every file) and a SHA-256 of its own content. `verify_files` checks every
file against it before anything parses a file: hnswlib's and faiss's loaders trust their input.
The index kind and its parameters are part of `Params` (and of the shard's docs file): a
snapshot of another kind, or of an older format (1: hnsw only), is discarded and the collection
rebuilt from the log, never loaded into the wrong index.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import uuid
from dataclasses import asdict, dataclass, field
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

from models.records import Metric

FORMAT_VERSION = 2
MANIFEST = "manifest.json"
_CHUNK = 4 * 1024 * 1024


class SnapshotInvalid(Exception):
    """A snapshot that cannot be used; the message says why (shown in the start-up warning)."""


def library_versions() -> dict[str, str]:
    """The versions of the libraries whose file formats a snapshot holds."""
    out: dict[str, str] = {}
    for name in ("hnswlib", "numpy", "msgpack", "faiss-cpu"):
        try:
            out[name] = version(name)
        except PackageNotFoundError:
            out[name] = "unknown"
    return out


@dataclass(frozen=True, slots=True)
class Identity:
    """Which PostgreSQL collection a snapshot belongs to: a dropped and re-created collection of
    the same name has another id and creation time, so its old snapshot never matches."""

    collection_id: int
    created_at: str
    dim: int
    metric: str


@dataclass(frozen=True, slots=True)
class Params:
    """Settings the files were built with; a snapshot built with others is not used."""

    shards: int
    hnsw_m: int
    hnsw_ef_construction: int
    index: str = ""  # the collection's index spec as sorted JSON (models/index_spec.py)


@dataclass(frozen=True, slots=True)
class FileEntry:
    bytes: int
    sha256: str


@dataclass(frozen=True, slots=True)
class ShardEntry:
    count: int
    files: dict[str, FileEntry]


@dataclass(frozen=True, slots=True)
class Manifest:
    collection: str
    identity: Identity
    seq: int  # every change with a seq up to this one is in the files (later ones may be too)
    count: int
    params: Params
    generation: str
    shards: tuple[ShardEntry, ...]
    versions: dict[str, str] = field(default_factory=library_versions)
    format: int = FORMAT_VERSION

    def to_json(self) -> bytes:
        body = asdict(self)
        body["checksum"] = _body_checksum(body)
        return json.dumps(body, indent=1, sort_keys=True).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        """Raises SnapshotInvalid for anything but a well-formed manifest of this format."""
        try:
            body = json.loads(data)
            if not isinstance(body, dict):
                raise SnapshotInvalid("the manifest is not a JSON object")
            checksum = body.pop("checksum", None)
            if checksum != _body_checksum(body):
                raise SnapshotInvalid("the manifest's checksum does not match its content")
            if body.get("format") != FORMAT_VERSION:
                raise SnapshotInvalid(f"snapshot format {body.get('format')!r}, this build reads {FORMAT_VERSION}")
            shards = tuple(
                ShardEntry(int(s["count"]), {k: FileEntry(**v) for k, v in s["files"].items()}) for s in body["shards"]
            )
            return cls(
                collection=str(body["collection"]),
                identity=Identity(**body["identity"]),
                seq=int(body["seq"]),
                count=int(body["count"]),
                params=Params(**body["params"]),
                generation=str(body["generation"]),
                shards=shards,
                versions={str(k): str(v) for k, v in body["versions"].items()},
                format=int(body["format"]),
            )
        except SnapshotInvalid:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as exc:
            raise SnapshotInvalid(f"the manifest is malformed ({type(exc).__name__}: {exc})") from exc


def _body_checksum(body: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()


def file_entry(path: Path) -> FileEntry:
    """Size and SHA-256 of a file, after fsyncing it (it is then durable as well as checked)."""
    return _digest(path, fsync=True)


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class SnapshotStore:
    """The snapshot directories under one root. Blocking file I/O: call from a worker thread."""

    def __init__(self, root: Path) -> None:
        self.root = root

    def collection_dir(self, name: str) -> Path:
        # Collection names are [A-Za-z0-9_-]{1,64} (checked at the edge), safe as a file name.
        return self.root / name

    def names(self) -> list[str]:
        """Collections that have a snapshot directory here."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if p.is_dir())

    def new_generation(self, name: str, seq: int, shards: int) -> Path:
        """A fresh, empty generation directory with one sub-directory per shard."""
        gen = self.collection_dir(name) / f"gen-{seq}-{uuid.uuid4().hex[:12]}"
        for i in range(shards):
            (gen / f"shard-{i}").mkdir(parents=True)
        return gen

    @staticmethod
    def shard_dir(generation: Path, shard: int) -> Path:
        return generation / f"shard-{shard}"

    def commit(self, manifest: Manifest) -> None:
        """Make `manifest` (whose generation's files are all written) the snapshot in use:
        fsync the files and directories, rename the manifest into place, drop older generations."""
        cdir = self.collection_dir(manifest.collection)
        gen = cdir / manifest.generation
        for i in range(len(manifest.shards)):
            fsync_dir(self.shard_dir(gen, i))
        fsync_dir(gen)
        tmp = cdir / f".{MANIFEST}.{uuid.uuid4().hex[:8]}.tmp"
        with tmp.open("wb") as f:
            f.write(manifest.to_json())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cdir / MANIFEST)
        fsync_dir(cdir)
        self.prune(manifest.collection, keep=manifest.generation)

    def prune(self, name: str, keep: str | None) -> None:
        """Remove every generation and temporary file of `name` except generation `keep`."""
        cdir = self.collection_dir(name)
        if not cdir.is_dir():
            return
        for entry in cdir.iterdir():
            if entry.name in (MANIFEST, keep):
                continue
            if entry.is_dir():
                shutil.rmtree(entry, ignore_errors=True)
            else:
                entry.unlink(missing_ok=True)

    def abandon(self, generation: Path) -> None:
        """Remove a generation that was never committed."""
        shutil.rmtree(generation, ignore_errors=True)

    def remove(self, name: str) -> None:
        """Remove everything of collection `name` (dropped, or unusable)."""
        shutil.rmtree(self.collection_dir(name), ignore_errors=True)

    def read_manifest(self, name: str) -> Manifest | None:
        """The manifest in use, or None when the collection has none. Raises SnapshotInvalid."""
        path = self.collection_dir(name) / MANIFEST
        try:
            data = path.read_bytes()
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise SnapshotInvalid(f"the manifest cannot be read: {exc}") from exc
        manifest = Manifest.from_json(data)
        if manifest.collection != name:
            raise SnapshotInvalid(f"the manifest is of collection {manifest.collection!r}")
        return manifest

    def verify_files(self, manifest: Manifest) -> Path:
        """Check size and SHA-256 of every file the manifest names; returns the generation
        directory. Raises SnapshotInvalid naming the first file that differs."""
        gen = self.collection_dir(manifest.collection) / manifest.generation
        for i, shard in enumerate(manifest.shards):
            for fname, want in shard.files.items():
                path = self.shard_dir(gen, i) / fname
                try:
                    got = _digest(path)
                except OSError as exc:
                    raise SnapshotInvalid(f"shard {i} file {fname} cannot be read: {exc}") from exc
                if got != want:
                    raise SnapshotInvalid(
                        f"shard {i} file {fname} is damaged ({got.bytes} bytes, expected {want.bytes}, "
                        "or its checksum differs)"
                    )
        return gen


def _digest(path: Path, fsync: bool = False) -> FileEntry:
    digest = hashlib.sha256()
    size = 0
    with path.open("rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
            size += len(chunk)
        if fsync:
            os.fsync(f.fileno())
    return FileEntry(size, digest.hexdigest())


def check_usable(
    manifest: Manifest, identity: Identity, last_seq: int, params: Params, versions: dict[str, str]
) -> None:
    """Raises SnapshotInvalid unless the snapshot belongs to this PostgreSQL collection, is not
    ahead of its log, was built with these parameters and is readable by these libraries."""
    if manifest.identity != identity:
        raise SnapshotInvalid(
            f"it belongs to another collection of that name (snapshot {manifest.identity}, database {identity})"
        )
    if manifest.seq > last_seq:
        raise SnapshotInvalid(f"it is at seq {manifest.seq}, ahead of the database's last seq {last_seq}")
    if manifest.params != params:
        raise SnapshotInvalid(f"it was built with other settings ({manifest.params}, now {params})")
    if len(manifest.shards) != params.shards:
        raise SnapshotInvalid(f"it has {len(manifest.shards)} shards, the settings {params.shards}")
    for library in ("hnswlib", "faiss-cpu"):
        if manifest.versions.get(library) != versions.get(library):
            raise SnapshotInvalid(
                f"its index was written by {library} {manifest.versions.get(library)}, this is {versions.get(library)}"
            )
    if manifest.count != sum(s.count for s in manifest.shards):
        raise SnapshotInvalid("its shard counts do not add up to its document count")


def metric_name(metric: Metric) -> str:
    return Metric(metric).value
