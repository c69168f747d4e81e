"""Documents and queries for the load generators: the real corpus, or synthetic vectors.

- `corpus` (default): real passages found on this machine and embedded by Shoal's own model
  (`load.corpus.load_corpus`, cached outside the repo), with held-out query passages and their
  exact top-100 ground truth.
- `synthetic`: random unit vectors and texts made of a small vocabulary, with exact ground truth
  computed here: for quick runs and tests, nothing to build or cache.

Every document gets the metadata `{"bucket": i % 100, "n": i}`, so `{"bucket": b}` is a filter
that matches 1 % of the documents.
"""

from __future__ import annotations

import argparse
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import NDArray

from load.common import unit_rows
from shoal_client.codec import encode_vector

BUCKETS = 100
DEFAULT_SIZE = 20_000
DEFAULT_QUERIES = 1_000
# Vocabulary of the synthetic texts (also used by load/persist_bench.py).
WORDS = [
    "stream",
    "index",
    "shard",
    "vector",
    "query",
    "search",
    "semantic",
    "durable",
    "commit",
    "batch",
    "replica",
    "latency",
    "throughput",
    "socket",
    "protocol",
    "filter",
    "metadata",
    "embedding",
    "cosine",
    "neighbour",
    "graph",
    "layer",
    "river",
    "harbour",
    "lantern",
    "orchard",
    "meadow",
    "quartz",
    "violet",
    "thunder",
    "copper",
    "willow",
]


@dataclass(frozen=True, slots=True)
class Dataset:
    """`vectors[i]` / `texts[i]` is document `ids[i]`; `truth[q]` are the rows of the exact top-k
    for `query_vectors[q]` (cosine, best first)."""

    source: str
    ids: list[str]
    texts: list[str]
    vectors: NDArray[np.float32]
    query_vectors: NDArray[np.float32]
    query_texts: list[str]
    truth: NDArray[np.int64]

    @property
    def size(self) -> int:
        return len(self.ids)

    @property
    def dim(self) -> int:
        return int(self.vectors.shape[1])

    def row_of(self) -> dict[str, int]:
        return {doc_id: i for i, doc_id in enumerate(self.ids)}

    def metadata(self, i: int) -> dict[str, Any]:
        return {"bucket": i % BUCKETS, "n": i}

    def doc(self, i: int, *, with_vector: bool = True, with_text: bool = True, id_prefix: str = "") -> dict[str, Any]:
        """Document `i` as an upsert entry (vector pre-encoded as float32 `bin`)."""
        doc: dict[str, Any] = {"id": id_prefix + self.ids[i], "metadata": self.metadata(i)}
        if with_text:
            doc["text"] = self.texts[i]
        if with_vector:
            doc["vector"] = encode_vector(self.vectors[i])
        return doc

    def batches(
        self,
        batch: int,
        count: int | None = None,
        *,
        with_vector: bool = True,
        with_text: bool = True,
        id_prefix: str = "",
    ) -> Iterator[list[dict[str, Any]]]:
        """`count` documents (default: all) in batches. Past the end of the dataset the rows repeat
        under new ids (`<id>~<round>`), so any count can be ingested."""
        count = self.size if count is None else count
        for start in range(0, count, batch):
            out = []
            for n in range(start, min(count, start + batch)):
                i, round_ = n % self.size, n // self.size
                prefix = id_prefix if round_ == 0 else f"{id_prefix}~{round_}~"
                out.append(self.doc(i, with_vector=with_vector, with_text=with_text, id_prefix=prefix))
            yield out

    def filtered_truth(self, buckets: Sequence[int], k: int) -> list[NDArray[np.int64]]:
        """Exact top-k rows for each query among the documents whose bucket is `buckets[q]`
        (fewer than k when fewer documents match)."""
        rows = np.arange(self.size)
        out: list[NDArray[np.int64]] = []
        for q, b in enumerate(buckets):
            candidates = rows[rows % BUCKETS == b]
            scores = self.vectors[candidates] @ self.query_vectors[q]
            order = np.lexsort((candidates, -scores))[:k]
            out.append(candidates[order].astype(np.int64))
        return out


def exact_top_k(corpus: NDArray[np.float32], queries: NDArray[np.float32], k: int) -> NDArray[np.int64]:
    """Rows of the k highest cosines per query (unit vectors), best first, ties by row."""
    k = min(k, len(corpus))
    scores = queries @ corpus.T
    top = np.argpartition(-scores, k - 1, axis=1)[:, :k]
    top_scores = np.take_along_axis(scores, top, axis=1)
    order = np.lexsort((top, -top_scores), axis=1)
    return np.take_along_axis(top, order, axis=1).astype(np.int64)


def synthetic(size: int, queries: int, dim: int = 384, seed: int = 7) -> Dataset:
    vectors = unit_rows(size, dim, seed)
    query_vectors = unit_rows(queries, dim, seed + 1)
    rng = np.random.default_rng(seed + 2)

    def text(n: int) -> str:
        return " ".join(rng.choice(WORDS, size=12 + n % 20)).capitalize() + "."

    return Dataset(
        source="synthetic",
        ids=[f"s{i:07d}" for i in range(size)],
        texts=[text(i) for i in range(size)],
        vectors=vectors,
        query_vectors=query_vectors,
        query_texts=[text(i) for i in range(queries)],
        truth=exact_top_k(vectors, query_vectors, min(100, size)),
    )


def real_corpus(size: int, queries: int) -> Dataset:
    """The real corpus. Sizes up to the default (20,000 passages, 1,000 queries) are slices of the
    default build, with their ground truth recomputed, so nothing new is built or embedded."""
    from load.corpus import load_corpus

    corpus = load_corpus(max(size, DEFAULT_SIZE), max(queries, DEFAULT_QUERIES))
    vectors, query_vectors = corpus.vectors[:size], corpus.query_vectors[:queries]
    truth = corpus.ground_truth[:queries]
    if size < len(corpus.ids):
        truth = exact_top_k(vectors, query_vectors, min(100, size))
    return Dataset(
        source=f"corpus:{corpus.path.name[:12]}",
        ids=corpus.ids[:size],
        texts=corpus.texts[:size],
        vectors=vectors,
        query_vectors=query_vectors,
        query_texts=corpus.query_texts[:queries],
        truth=truth,
    )


def load_dataset(source: str, size: int, queries: int, *, dim: int = 384, seed: int = 7) -> Dataset:
    """`source` is `corpus` or `synthetic`."""
    if source == "synthetic":
        return synthetic(size, queries, dim, seed)
    if source == "corpus":
        return real_corpus(size, queries)
    raise ValueError(f"unknown data source {source!r} (corpus | synthetic)")


def add_dataset_args(p: argparse.ArgumentParser, *, size: int, size_help: str, queries: int | None) -> None:
    """--source, --size, (--queries,) --dim: where a generator's vectors come from."""
    p.add_argument("--source", choices=["corpus", "synthetic"], default="corpus")
    p.add_argument("--size", type=int, default=size, help=f"{size_help} (default {size})")
    if queries is not None:
        p.add_argument("--queries", type=int, default=queries, help=f"distinct query vectors (default {queries})")
    p.add_argument("--dim", type=int, default=384, help="synthetic vectors' dimension")
