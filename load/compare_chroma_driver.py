"""The Chroma side of `load.compare`, run by the Python of Chroma's own virtualenv.

    <chroma venv>/bin/python load/compare_chroma_driver.py < commands

It imports only the standard library, numpy and chromadb (never Shoal), reads one JSON command
per line on stdin and answers each with one JSON line on stdout; progress goes to stderr. The
server itself (`chroma run`) is started and stopped by the caller, which owns every process.

Commands (every one names `port` and `collection`; `corpus` is the corpus cache directory):
- `ingest`: create the collection (cosine, max_neighbors=m, ef_construction) and add the corpus
  (ids, documents and embeddings) in batches, one client, each batch awaited.
  -> `{docs, seconds, acks, count, version, configuration}`
- `set_ef`: `collection.modify(configuration={"hnsw": {"ef_search": ef}})`. In chromadb 1.x a
  running server keeps the loaded index with its old ef, so the caller restarts the server after.
  -> `{configuration}`
- `query`: `clients` threads, each with its own HttpClient, in a closed loop for `seconds` and then
  until every query was answered once, at most `max_seconds`.
  -> `{latencies, first: {query: [corpus rows]}, seconds}`
Any failure answers `{"ok": false, "error": ...}`.
"""

from __future__ import annotations

import importlib
import json
import os
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any

os.environ.setdefault("ANONYMIZED_TELEMETRY", "False")

np: Any = importlib.import_module("numpy")
chromadb: Any = importlib.import_module("chromadb")
chroma_config: Any = importlib.import_module("chromadb.config")

K = 10


class Corpus:
    def __init__(self, path: Path) -> None:
        self.ids: list[str] = []
        self.texts: list[str] = []
        with (path / "texts.jsonl").open(encoding="utf-8") as f:
            for line in f:
                row = json.loads(line)
                self.ids.append(row["id"])
                self.texts.append(row["text"])
        self.vectors = np.load(path / "vectors.npy")
        self.queries = np.load(path / "queries.npy")
        self.row_of = {doc_id: row for row, doc_id in enumerate(self.ids)}


_corpora: dict[str, Corpus] = {}


def corpus(cmd: dict[str, Any]) -> Corpus:
    key = str(cmd["corpus"])
    if key not in _corpora:
        _corpora[key] = Corpus(Path(key))
    return _corpora[key]


def client(port: int) -> Any:
    settings = chroma_config.Settings(anonymized_telemetry=False)
    return chromadb.HttpClient(host="127.0.0.1", port=port, settings=settings)


def ingest(cmd: dict[str, Any]) -> dict[str, Any]:
    data = corpus(cmd)
    size = int(cmd.get("size", len(data.ids)))
    api = client(cmd["port"])
    hnsw = {"space": "cosine", "max_neighbors": cmd["m"], "ef_construction": cmd["ef_construction"]}
    collection = api.create_collection(cmd["collection"], configuration={"hnsw": hnsw}, embedding_function=None)
    batch = int(cmd["batch"])
    acks: list[float] = []
    started = time.perf_counter()
    for lo in range(0, size, batch):
        hi = min(lo + batch, size)
        t0 = time.perf_counter()
        collection.add(ids=data.ids[lo:hi], documents=data.texts[lo:hi], embeddings=data.vectors[lo:hi])
        acks.append(time.perf_counter() - t0)
    seconds = time.perf_counter() - started
    return {
        "docs": size,
        "seconds": seconds,
        "acks": acks,
        "count": collection.count(),
        "version": chromadb.__version__,
        "configuration": _jsonable(api.get_collection(cmd["collection"]).configuration),
    }


def set_ef(cmd: dict[str, Any]) -> dict[str, Any]:
    api = client(cmd["port"])
    api.get_collection(cmd["collection"]).modify(configuration={"hnsw": {"ef_search": int(cmd["ef"])}})
    return {"configuration": _jsonable(api.get_collection(cmd["collection"]).configuration)}


def query(cmd: dict[str, Any]) -> dict[str, Any]:
    data = corpus(cmd)
    n_clients, seconds, max_seconds = int(cmd["clients"]), float(cmd["seconds"]), float(cmd["max_seconds"])
    n_queries = len(data.queries)
    collections = [client(cmd["port"]).get_collection(cmd["collection"]) for _ in range(n_clients)]
    latencies: list[list[float]] = [[] for _ in range(n_clients)]
    first: dict[int, list[int]] = {}
    errors: list[str] = []
    lock = threading.Lock()
    start = time.perf_counter()

    def more() -> bool:
        elapsed = time.perf_counter() - start
        return not errors and elapsed < max_seconds and (elapsed < seconds or len(first) < n_queries)

    def work(w: int) -> None:
        i = w
        try:
            while more():
                q = i % n_queries
                t0 = time.perf_counter()
                reply = collections[w].query(query_embeddings=[data.queries[q]], n_results=K, include=[])
                latencies[w].append(time.perf_counter() - t0)
                rows = [data.row_of[doc_id] for doc_id in reply["ids"][0]]
                with lock:
                    first.setdefault(q, rows)
                i += n_clients
        except Exception as exc:
            errors.append(f"{type(exc).__name__}: {exc}")

    threads = [threading.Thread(target=work, args=(w,)) for w in range(n_clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    elapsed = time.perf_counter() - start
    if errors:
        raise RuntimeError(f"{len(errors)} clients failed; first: {errors[0]}")
    return {
        "latencies": [x for per in latencies for x in per],
        "first": first,
        "seconds": elapsed,
    }


def _jsonable(value: Any) -> Any:
    return json.loads(json.dumps(value, default=str))


COMMANDS = {"ingest": ingest, "set_ef": set_ef, "query": query}


def main() -> None:
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            cmd = json.loads(line)
            reply = {"ok": True, **COMMANDS[cmd["cmd"]](cmd)}
        except Exception as exc:
            traceback.print_exc(file=sys.stderr)
            reply = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
        sys.stdout.write(json.dumps(reply) + "\n")
        sys.stdout.flush()


if __name__ == "__main__":
    main()
