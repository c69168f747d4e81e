"""A benchmark corpus of real English text found on this machine, embedded and cached.

    python -m load.corpus [--size 20000] [--queries 1000] [--out DIR] [--rebuild]

Sources, all local:
- docstrings of every module, class and function in the Python standard library and in the
  site-packages of this interpreter (and of its base installation), read from the `.py` sources
  with `ast` — nothing is imported, so no module's import-time side effects run;
- docstrings of compiled modules (builtins, `lib-dynload`, extension modules), which have no
  source: those are imported and inspected in a child process with a timeout;
- paragraphs of `.txt`/`.rst`/`.md` files, README/NEWS files and package descriptions under
  `sys.prefix`, the base prefix and `/usr/share/doc` (gzip'd ones too).

Texts are split into passages of one to three sentences (at most 800 characters), filtered for
prose, deduplicated and put in a seeded hash order. The first `queries` passages are held out as
queries; the next `size` are the corpus. The cache directory (default
`~/.cache/shoal/corpus/<sha256 of the texts and the model>`, or under `$SHOAL_CACHE_DIR`) holds
texts.jsonl, vectors.npy, queries.npy, query_texts.json and ground_truth.npy (exact top-100 by
cosine). Other benchmarks call `load_corpus(size, queries)`.
"""

from __future__ import annotations

import argparse
import ast
import gzip
import hashlib
import json
import os
import re
import subprocess
import sys
import sysconfig
import time
import unicodedata
from collections.abc import Callable, Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from numpy.typing import NDArray

from models.config import EngineConfig

SEED = "shoal-corpus-v1"
# Bumped whenever extraction or splitting changes, so old caches are not reused by mistake.
BUILDER_VERSION = 1
TOP_K = 100
MAX_PASSAGE_CHARS = 800
MIN_PASSAGE_CHARS = 40
MIN_PASSAGE_WORDS = 6

# Path parts that mark tests, GUI demos and vendored copies: skipped by every source.
_SKIP_PARTS = frozenset(
    {
        "test",
        "tests",
        "testing",
        "idle_test",
        "idlelib",
        "tkinter",
        "turtledemo",
        "__pycache__",
        "_vendor",
        "vendored",
        "node_modules",
    }
)
# Modules never to import (side effects: a browser, the Zen printed, a GUI, a REPL).
_NEVER_IMPORT = frozenset({"antigravity", "this", "idlelib", "tkinter", "_tkinter", "turtle", "turtledemo", "__main__"})
_DOC_SUFFIXES = (".txt", ".rst", ".md", ".txt.gz", ".rst.gz", ".md.gz")
_DOC_STEMS = ("readme", "news", "changes", "faq", "todo", "thanks", "authors", "history")
_MAX_DOC_BYTES = 4 * 1024 * 1024


@dataclass(frozen=True, slots=True)
class Corpus:
    """Rows of `vectors` belong to `ids`/`texts`; `ground_truth[q]` lists corpus row indices of
    the exact top-k (by cosine, best first) for `query_vectors[q]`."""

    ids: list[str]
    texts: list[str]
    vectors: NDArray[np.float32]
    query_vectors: NDArray[np.float32]
    query_texts: list[str]
    ground_truth: NDArray[np.int64]
    path: Path


def _log(message: str) -> None:
    print(f"[corpus] {message}", file=sys.stderr, flush=True)


# ----------------------------------------------------------------------------- sources


def _python_roots() -> list[Path]:
    """The stdlib and every site-packages of this interpreter and its base installation."""
    roots: list[Path] = []
    paths = sysconfig.get_paths()
    for key in ("stdlib", "purelib", "platlib"):
        roots.append(Path(paths[key]))
    base = sysconfig.get_paths(vars={"base": sys.base_prefix, "platbase": sys.base_exec_prefix})
    for key in ("purelib", "platlib"):
        roots.append(Path(base[key]))
    unique: list[Path] = []
    for root in roots:
        if root.is_dir() and root.resolve() not in {u.resolve() for u in unique}:
            unique.append(root)
    return unique


def _walk(root: Path, want: Callable[[Path], bool], *, nested_site: bool = True) -> list[Path]:
    """Files under `root` that `want`, in sorted order, outside tests and demos.

    Without `nested_site`, a site-packages inside `root` (the stdlib's) is not entered: it is a
    root of its own.
    """
    skip = _SKIP_PARTS if nested_site else _SKIP_PARTS | {"site-packages", "dist-packages"}
    found: list[Path] = []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        dirnames[:] = sorted(d for d in dirnames if d not in skip and not d.startswith("test_"))
        for name in sorted(filenames):
            path = Path(dirpath, name)
            if not name.startswith("test_") and want(path):
                found.append(path)
    return found


def _docstrings_of_files(paths: list[str]) -> list[str]:
    docs: list[str] = []
    for path in paths:
        try:
            tree = ast.parse(Path(path).read_bytes(), filename=path)
        except (SyntaxError, ValueError, RecursionError, OSError, MemoryError):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
                doc = ast.get_docstring(node, clean=True)
                if doc:
                    docs.append(doc)
    return docs


def _docstrings_worker() -> None:
    """Child process entry: groups of paths as JSON lines on stdin, their docstrings on stdout."""
    for line in sys.stdin:
        group, paths = json.loads(line)
        sys.stdout.write(json.dumps([group, _docstrings_of_files(paths)]) + "\n")
        sys.stdout.flush()


def _child_env() -> dict[str, str]:
    project = str(Path(__file__).resolve().parents[1])
    path = os.pathsep.join(p for p in (project, os.environ.get("PYTHONPATH", "")) if p)
    return dict(os.environ, PYTHONPATH=path, PYTHONDONTWRITEBYTECODE="1", TOKENIZERS_PARALLELISM="false")


def docstrings_from_sources(roots: Iterable[Path]) -> Iterator[str]:
    """Module, class and function docstrings of every `.py` file under `roots`, via `ast`.

    Parsing is spread over the cores in child processes (plain subprocesses: no fork of a
    process that may hold thread pools, no re-import of the caller's main module); results are
    put back in file order, so the output is deterministic.
    """
    files = [str(p) for root in roots for p in _walk(root, lambda p: p.suffix == ".py", nested_site=False)]
    groups = [files[i : i + 100] for i in range(0, len(files), 100)]
    workers = max(1, min(os.cpu_count() or 1, 8, len(groups)))
    results: dict[int, list[str]] = {}

    def serve(worker: int) -> None:
        child = subprocess.Popen(
            [sys.executable, "-c", "from load.corpus import _docstrings_worker; _docstrings_worker()"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=_child_env(),
        )
        assert child.stdin is not None and child.stdout is not None
        request = "".join(json.dumps([g, groups[g]]) + "\n" for g in range(worker, len(groups), workers))
        out, _ = child.communicate(request)
        for line in out.splitlines():
            group, docs = json.loads(line)
            results[group] = docs

    with ThreadPoolExecutor(max_workers=workers) as pool:
        list(pool.map(serve, range(workers)))
    for group in range(len(groups)):
        yield from results.get(group, [])


# Run in a child process: import each compiled module named on stdin and print its docstrings
# as JSON lines. A crash or a hang costs the parent one batch, never the whole build.
_COMPILED_WORKER = r"""
import inspect, json, sys, importlib
for name in sys.stdin.read().split():
    try:
        module = importlib.import_module(name)
    except BaseException:
        continue
    docs = []
    def add(obj):
        doc = getattr(obj, "__doc__", None)
        if isinstance(doc, str) and doc.strip():
            docs.append(inspect.cleandoc(doc))
    add(module)
    for _, member in sorted(vars(module).items()):
        if inspect.isclass(member) or inspect.isroutine(member):
            owner = getattr(member, "__module__", None)
            if owner is not None and owner != name:
                continue
            add(member)
            if inspect.isclass(member):
                for _, attr in sorted(vars(member).items()):
                    if inspect.isroutine(attr) or isinstance(attr, property):
                        add(attr)
    sys.stdout.write(json.dumps(docs) + "\n")
    sys.stdout.flush()
"""


def _compiled_module_names(roots: Iterable[Path]) -> list[str]:
    names = set(sys.builtin_module_names)
    for root in roots:
        for path in _walk(root, lambda p: p.suffix in (".so", ".pyd"), nested_site=False):
            parts = list(path.relative_to(root).parts)
            if parts[0] == "lib-dynload":
                parts = parts[1:]
            parts[-1] = parts[-1].split(".", 1)[0]
            if all(p.isidentifier() for p in parts):
                names.add(".".join(parts))
    return sorted(n for n in names if n.split(".")[0] not in _NEVER_IMPORT)


def docstrings_from_compiled(roots: Iterable[Path], timeout: float = 120.0) -> Iterator[str]:
    """Docstrings of compiled modules, imported in child processes (batches of 25, timed out)."""
    names = _compiled_module_names(roots)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", TOKENIZERS_PARALLELISM="false")
    for start in range(0, len(names), 25):
        batch = names[start : start + 25]
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", _COMPILED_WORKER],
                input=" ".join(batch),
                capture_output=True,
                text=True,
                timeout=timeout,
                env=env,
                cwd="/",
                check=False,
            )
        except (subprocess.TimeoutExpired, OSError):
            _log(f"skipped compiled modules {batch[0]}..{batch[-1]} (timed out)")
            continue
        for line in done.stdout.splitlines():
            try:
                docs = json.loads(line)
            except ValueError:
                continue
            yield from (d for d in docs if isinstance(d, str))


def _doc_file(path: Path) -> bool:
    name = path.name.lower()
    if name.endswith(_DOC_SUFFIXES):
        return True
    stem = name.removesuffix(".gz").split(".", 1)[0]
    return stem in _DOC_STEMS or (name == "metadata" and path.parent.name.endswith(".dist-info"))


def _read_text(path: Path) -> str | None:
    try:
        if path.stat().st_size > _MAX_DOC_BYTES:
            return None
        raw = path.read_bytes()
        if path.name.endswith(".gz"):
            raw = gzip.decompress(raw)[:_MAX_DOC_BYTES]
    except (OSError, EOFError, gzip.BadGzipFile, ValueError):
        return None
    if b"\x00" in raw[:4096]:
        return None
    return raw.decode("utf-8", errors="replace")


def texts_from_doc_files(roots: Iterable[Path]) -> Iterator[str]:
    """Whole documentation files: text/reST/Markdown, README/NEWS, dist-info METADATA."""
    for root in roots:
        if not root.is_dir():
            continue
        for path in _walk(root, _doc_file):
            text = _read_text(path)
            if text:
                if path.name == "METADATA":
                    # Headers, a blank line, then the long description.
                    text = text.partition("\n\n")[2]
                yield text


# ----------------------------------------------------------------------------- passages

_CODE_FENCE = re.compile(r"^\s*(```|~~~)")
_UNDERLINE = re.compile(r"^\s*([-=~^*+#`'\".:_])\1{2,}\s*$")
_MD_LINK = re.compile(r"!?\[([^\]]*)\]\([^)]*\)")
_URL = re.compile(r"(https?|ftp)://\S+|www\.\S+")
_ROLE = re.compile(r":[a-z:]+:`([^`<]*)(<[^>]*>)?`")
_INLINE = re.compile(r"`{1,2}([^`]*)`{1,2}|\*{1,2}([^*]+)\*{1,2}")
_HTML = re.compile(r"<[^>]{1,200}>")
_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]?\s+(?=[A-Z0-9\"'(\[])")
_SYMBOLS = set("{}[]()=<>_*/\\|#$@`;%^&~+")


_BULLET = re.compile(r"^\s*([-*+•o]|\d{1,2}[.)])\s+\S")


def _paragraphs(text: str) -> Iterator[str]:
    """Prose paragraphs: blank-line separated, without code blocks, doctests and markup lines.

    Each list item is a paragraph of its own; its indented continuation lines belong to it.
    Other indented lines are taken for code, signatures or parameter bodies and dropped.
    """
    in_fence = False
    in_item = False
    lines: list[str] = []
    for line in text.splitlines():
        stripped = line.strip()
        if _CODE_FENCE.match(line):
            in_fence = not in_fence
            lines.append("")
            continue
        if in_fence or not stripped or _UNDERLINE.match(line):
            in_item = False
            lines.append("")
            continue
        if stripped.startswith((">>>", "... ", "$ ", "#", ".. ", "|", "+-", "In [", "Out[")):
            in_item = False
            lines.append("")
            continue
        if _BULLET.match(line):
            in_item = True
            lines.extend(("", stripped))
            continue
        if line.startswith(("    ", "\t")) and not in_item:
            lines.append("")
            continue
        lines.append(stripped)
    paragraph: list[str] = []
    for line in [*lines, ""]:
        if line:
            paragraph.append(line)
        elif paragraph:
            yield " ".join(paragraph)
            paragraph = []


def _clean(paragraph: str) -> str:
    text = unicodedata.normalize("NFKC", paragraph)
    text = _MD_LINK.sub(r"\1", text)
    text = _ROLE.sub(r"\1", text)
    text = _INLINE.sub(lambda m: m.group(1) or m.group(2) or "", text)
    text = _URL.sub("", text)
    text = _HTML.sub("", text)
    text = re.sub(r"^([-*+•o]|\d{1,2}[.)])\s+", "", text).replace("\ufffd", "")
    # reST: "Example::" introduces a literal block; as prose it is "Example:".
    text = re.sub(r"\s*::(\s|$)", r":\1", text)
    return re.sub(r"\s+", " ", text).strip()


def _is_prose(text: str) -> bool:
    if len(text) < MIN_PASSAGE_CHARS or len(text.split()) < MIN_PASSAGE_WORDS:
        return False
    letters = sum(c.isalpha() for c in text)
    symbols = sum(c in _SYMBOLS for c in text)
    if letters < 0.7 * len(text.replace(" ", "")) or symbols > 0.03 * len(text):
        return False
    words = text.split()
    # Mostly lower-case words that are not identifiers: English, not a list of names or code.
    plain = sum(w.isalpha() and w.islower() for w in words)
    return plain >= 0.5 * len(words) and text[0].isupper() and text.isascii()


def _choose(key: str, options: int) -> int:
    return int.from_bytes(hashlib.blake2b(key.encode(), digest_size=2).digest(), "big") % options


def passages(text: str) -> Iterator[str]:
    """Passages of 1..3 sentences, at most `MAX_PASSAGE_CHARS`, from one document."""
    for paragraph in _paragraphs(text):
        cleaned = _clean(paragraph)
        if len(cleaned) < MIN_PASSAGE_CHARS:
            continue
        sentences = [s.strip() for s in _SENTENCE_END.split(cleaned) if s.strip()]
        i = 0
        while i < len(sentences):
            # How many sentences go together varies per paragraph, deterministically.
            want = 1 + _choose(sentences[i], 3)
            chunk = sentences[i]
            i += 1
            while want > 1 and i < len(sentences) and len(chunk) + 1 + len(sentences[i]) <= MAX_PASSAGE_CHARS:
                chunk = f"{chunk} {sentences[i]}"
                i += 1
                want -= 1
            if len(chunk) > MAX_PASSAGE_CHARS:
                chunk = chunk[:MAX_PASSAGE_CHARS].rsplit(" ", 1)[0]
            if _is_prose(chunk):
                yield chunk


def collect_passages() -> list[str]:
    """Every distinct passage this machine yields, in the seeded hash order."""
    started = time.perf_counter()
    roots = _python_roots()
    doc_roots = sorted({Path(sys.prefix), Path(sys.base_prefix), Path("/usr/share/doc")})
    sources: list[tuple[str, Callable[[], Iterable[str]]]] = [
        ("docstrings (.py sources)", lambda: docstrings_from_sources(roots)),
        ("docstrings (compiled modules)", lambda: docstrings_from_compiled(roots)),
        ("documentation files", lambda: texts_from_doc_files(doc_roots)),
    ]
    seen: dict[str, str] = {}
    for label, source in sources:
        before = len(seen)
        for document in source():
            for passage in passages(document):
                key = " ".join(passage.lower().split())
                seen.setdefault(key, passage)
        _log(f"{label}: {len(seen) - before} passages ({time.perf_counter() - started:.1f}s)")

    def order(text: str) -> bytes:
        return hashlib.sha256(f"{SEED}\x00{text}".encode()).digest()

    return sorted(seen.values(), key=order)


# ----------------------------------------------------------------------------- embed + cache


def cache_root() -> Path:
    env = os.environ.get("SHOAL_CACHE_DIR")
    base = Path(env) if env else Path.home() / ".cache" / "shoal"
    return base / "corpus"


def _embed(texts: list[str], label: str) -> NDArray[np.float32]:
    """Embed in length-sorted batches on all cores; progress to stderr."""
    from actors.onnx_model import MiniLM

    model = MiniLM(intra_threads=1)
    tokens = model.tokenize(texts)
    order = np.argsort([len(t) for t in tokens], kind="stable")
    # The engine's batching: at most embed_batch texts and embed_batch_tokens padded tokens.
    config = EngineConfig()
    batches: list[NDArray[np.intp]] = []
    start = 0
    while start < len(order):
        widest = len(tokens[order[min(start + config.embed_batch, len(order)) - 1]])
        take = max(1, min(config.embed_batch, config.embed_batch_tokens // widest))
        batches.append(order[start : start + take])
        start += take
    out = np.zeros((len(texts), 384), dtype=np.float32)
    started = last = time.perf_counter()
    done = 0
    with ThreadPoolExecutor(max_workers=os.cpu_count() or 1) as pool:
        runs = pool.map(lambda rows: (rows, model.encode_ids([tokens[r] for r in rows])), batches)
        for rows, vectors in runs:
            out[rows] = vectors
            done += len(rows)
            now = time.perf_counter()
            if now - last > 5 or done == len(texts):
                last = now
                rate = done / (now - started)
                _log(f"embedding {label}: {done}/{len(texts)} ({rate:.0f} texts/s)")
    return out


def exact_top_k(corpus: NDArray[np.float32], queries: NDArray[np.float32], k: int = TOP_K) -> NDArray[np.int64]:
    """Row indices of the k highest cosines per query, best first (vectors are unit length)."""
    k = min(k, len(corpus))
    result = np.zeros((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), 256):
        scores = queries[start : start + 256] @ corpus.T
        top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
        top_scores = np.take_along_axis(scores, top, axis=1)
        # Ties broken by row index so the ground truth is deterministic.
        order = np.lexsort((top, -top_scores), axis=1)
        result[start : start + 256] = np.take_along_axis(top, order, axis=1)
    return result


def _content_key(texts: list[str], query_texts: list[str]) -> str:
    from actors.onnx_model import MODEL_ID, model_path

    digest = hashlib.sha256()
    digest.update(f"v{BUILDER_VERSION}\x00{MODEL_ID}\x00".encode())
    digest.update(hashlib.sha256(model_path().read_bytes()).digest())
    for text in [*query_texts, "\x01", *texts]:
        digest.update(text.encode() + b"\x00")
    return digest.hexdigest()


_FILES = ("texts.jsonl", "vectors.npy", "queries.npy", "query_texts.json", "ground_truth.npy")


def _read(path: Path) -> Corpus:
    ids: list[str] = []
    texts: list[str] = []
    with (path / "texts.jsonl").open(encoding="utf-8") as f:
        for line in f:
            row = json.loads(line)
            ids.append(row["id"])
            texts.append(row["text"])
    return Corpus(
        ids=ids,
        texts=texts,
        vectors=np.load(path / "vectors.npy").astype(np.float32, copy=False),
        query_vectors=np.load(path / "queries.npy").astype(np.float32, copy=False),
        query_texts=json.loads((path / "query_texts.json").read_text(encoding="utf-8")),
        ground_truth=np.load(path / "ground_truth.npy").astype(np.int64, copy=False),
        path=path,
    )


def _write(path: Path, texts: list[str], query_texts: list[str]) -> None:
    vectors = _embed(texts, "corpus")
    query_vectors = _embed(query_texts, "queries")
    truth = exact_top_k(vectors, query_vectors)
    tmp = path.with_name(path.name + f".tmp{os.getpid()}")
    tmp.mkdir(parents=True, exist_ok=True)
    with (tmp / "texts.jsonl").open("w", encoding="utf-8") as f:
        for i, text in enumerate(texts):
            f.write(json.dumps({"id": f"p{i:06d}", "text": text}) + "\n")
    np.save(tmp / "vectors.npy", vectors)
    np.save(tmp / "queries.npy", query_vectors)
    (tmp / "query_texts.json").write_text(json.dumps(query_texts), encoding="utf-8")
    np.save(tmp / "ground_truth.npy", truth)
    # Complete or absent: readers only ever see a finished directory.
    try:
        tmp.rename(path)
    except OSError:
        if not all((path / f).exists() for f in _FILES):
            raise


def load_corpus(size: int = 20_000, queries: int = 1_000, *, out: Path | None = None, rebuild: bool = False) -> Corpus:
    """The corpus of `size` passages and `queries` held-out query passages, built once and cached.

    Raises `RuntimeError` if the machine yields fewer than `size + queries` passages.
    """
    if size < 1 or queries < 0:
        raise ValueError("size must be >= 1 and queries >= 0")
    root = out if out is not None else cache_root()
    # A small index maps the request to its content directory, so a warm load does not rescan.
    index = root / "index" / f"v{BUILDER_VERSION}-{size}-{queries}.json"
    if not rebuild and index.is_file():
        path = root / json.loads(index.read_text(encoding="utf-8"))["dir"]
        if all((path / f).exists() for f in _FILES):
            return _read(path)
    everything = collect_passages()
    _log(f"this machine yields {len(everything)} distinct passages")
    if len(everything) < size + queries:
        raise RuntimeError(f"only {len(everything)} passages found; {size + queries} wanted")
    query_texts = everything[:queries]
    texts = everything[queries : queries + size]
    key = _content_key(texts, query_texts)
    path = root / key
    if rebuild or not all((path / f).exists() for f in _FILES):
        _write(path, texts, query_texts)
    index.parent.mkdir(parents=True, exist_ok=True)
    tmp_index = index.with_name(index.name + f".tmp{os.getpid()}")
    tmp_index.write_text(json.dumps({"dir": key, "available": len(everything)}), encoding="utf-8")
    tmp_index.replace(index)
    return _read(path)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m load.corpus", description=__doc__.split("\n")[0])
    parser.add_argument("--size", type=int, default=20_000, help="corpus passages (default 20000)")
    parser.add_argument("--queries", type=int, default=1_000, help="held-out query passages (default 1000)")
    parser.add_argument("--out", type=Path, default=None, help=f"cache root (default {cache_root()})")
    parser.add_argument("--rebuild", action="store_true", help="rescan the machine and re-embed")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    corpus = load_corpus(args.size, args.queries, out=args.out, rebuild=args.rebuild)
    elapsed = time.perf_counter() - started
    summary = {
        "path": str(corpus.path),
        "passages": len(corpus.texts),
        "queries": len(corpus.query_texts),
        "mean_chars": round(float(np.mean([len(t) for t in corpus.texts])), 1),
        "seconds": round(elapsed, 1),
    }
    print(json.dumps(summary, indent=2))


if __name__ == "__main__":
    main()
