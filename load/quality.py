"""A labelled retrieval-quality benchmark: vector, keyword and hybrid search on real text.

    python -m load.quality [--size 2000] [--queries 50] [--phrases 300] [--out quality.json]

Documents and labelled queries come from the passages of `load.corpus` (real text on this
machine). Two query sets, each query with exactly one relevant document:
- summary -> body: a passage of two or more sentences is split; its first sentence is the
  query and the rest is the document;
- exact phrase: three consecutive words from a document, chosen around its rarest term.
The mixed set is both together.

Each side runs the engine's own code in-process: exact cosine over MiniLM embeddings (what the
vector side returns on a collection this small), the shard's BM25 index (`KeywordIndex`), and
`actors.fusion` over both sides' top-100 candidates (the server's default depth); bm25s over
the same documents and tokens is the keyword anchor. Prints a table of MRR@10 and nDCG@10 and
writes JSON.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Callable
from pathlib import Path

import bm25s  # type: ignore[import-untyped]
import numpy as np

from actors import fusion
from actors.keyword_index import KeywordIndex, query_terms, tokenize
from load.corpus import _embed, load_corpus
from models.records import DocId, Hit

DEPTH = 100
CUTOFF = 10
_SENTENCE = re.compile(r"(?<=[.!?])\s+(?=[A-Z`\"'(])")

Ranker = Callable[[int], list[str]]


def build(size: int, queries: int, phrases: int) -> tuple[list[str], list[tuple[str, str, str]]]:
    """(documents, [(set name, query text, relevant doc id)]). Doc ids are "d<row>"."""
    corpus = load_corpus(size, queries)
    docs: list[str] = []
    labelled: list[tuple[str, str, str]] = []
    for text in corpus.texts:
        parts = _SENTENCE.split(text, maxsplit=1)
        if len(parts) == 2 and len(parts[0]) >= 20 and len(parts[1]) >= 40:
            labelled.append(("summary", parts[0], f"d{len(docs)}"))
            docs.append(parts[1])
        else:
            docs.append(text)
    # Document frequencies for choosing rare phrases.
    df: dict[str, int] = {}
    for doc in docs:
        for term in set(tokenize(doc)):
            df[term] = df.get(term, 0) + 1
    rng = np.random.default_rng(11)
    for row in rng.permutation(len(docs))[:phrases].tolist():
        words = docs[row].split()
        if len(words) < 6:
            continue
        rarity = [min((df.get(t, 1) for t in tokenize(w)), default=10**9) for w in words]
        centre = int(np.argmin(rarity))
        start = max(0, min(centre - 1, len(words) - 3))
        labelled.append(("phrase", " ".join(words[start : start + 3]), f"d{row}"))
    return docs, labelled


def metrics(ranked: list[str], relevant: str) -> tuple[float, float]:
    """(reciprocal rank, nDCG) at CUTOFF for one relevant document."""
    top = ranked[:CUTOFF]
    if relevant not in top:
        return 0.0, 0.0
    rank = top.index(relevant) + 1
    return 1.0 / rank, 1.0 / math.log2(rank + 1)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--queries", type=int, default=50, help="held-out passages of load.corpus")
    parser.add_argument("--phrases", type=int, default=300)
    parser.add_argument("--out", type=Path, default=Path("quality.json"))
    args = parser.parse_args(argv)

    docs, labelled = build(args.size, args.queries, args.phrases)
    print(f"{len(docs)} documents, {len(labelled)} labelled queries", file=sys.stderr)
    doc_vectors = _embed(docs, "documents")
    query_vectors = _embed([q for _, q, _ in labelled], "queries")

    index = KeywordIndex()
    for row, doc in enumerate(docs):
        index.set(row, doc)
    anchor = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    anchor.index([tokenize(d) for d in docs], show_progress=False)

    def vector_hits(q: int) -> list[Hit]:
        scores = doc_vectors @ query_vectors[q]
        top = np.argsort(-scores, kind="stable")[:DEPTH]
        return [Hit(DocId(f"d{r}"), float(scores[r]), 1.0 - float(scores[r])) for r in top.tolist()]

    def keyword_hits(q: int) -> list[Hit]:
        terms = query_terms(labelled[q][1])
        scores, matched = index.scores(terms, len(docs))
        rows = np.flatnonzero(matched)
        order = rows[np.lexsort((rows, -scores[rows]))][:DEPTH]
        return [Hit(DocId(f"d{r}"), float(scores[r]), None) for r in order.tolist()]

    def bm25s_ranked(q: int) -> list[str]:
        terms = list(query_terms(labelled[q][1]))
        if not terms:
            return []
        scores = anchor.get_scores(terms)
        top = np.argsort(-scores, kind="stable")[:CUTOFF]
        return [f"d{r}" for r in top.tolist() if scores[r] > 0]

    cache: dict[int, tuple[list[Hit], list[Hit]]] = {}

    def sides(q: int) -> tuple[list[Hit], list[Hit]]:
        if q not in cache:
            cache[q] = (vector_hits(q), keyword_hits(q))
        return cache[q]

    rankers: dict[str, Ranker] = {
        "vector": lambda q: [str(h.id) for h in sides(q)[0]],
        "keyword": lambda q: [h.id for h in sides(q)[1]],
        "bm25s (anchor)": bm25s_ranked,
        "hybrid rrf (k=60)": lambda q: [h.id for h in fusion.rrf(*sides(q), CUTOFF, 60)],
    }

    def weighted(alpha: float) -> Ranker:
        return lambda q: [h.id for h in fusion.weighted(*sides(q), CUTOFF, alpha)]

    for alpha in (0.3, 0.5, 0.7):
        rankers[f"hybrid weighted a={alpha}"] = weighted(alpha)

    sets = {"summary": [], "phrase": [], "mixed": []}  # type: dict[str, list[int]]
    for q, (kind, _, _) in enumerate(labelled):
        sets[kind].append(q)
        sets["mixed"].append(q)
    results: dict[str, dict[str, dict[str, float]]] = {}
    for name, ranker in rankers.items():
        results[name] = {}
        for set_name, qs in sets.items():
            pairs = [metrics(ranker(q), labelled[q][2]) for q in qs]
            results[name][set_name] = {
                "mrr@10": float(np.mean([p[0] for p in pairs])) if pairs else 0.0,
                "ndcg@10": float(np.mean([p[1] for p in pairs])) if pairs else 0.0,
                "queries": len(qs),
            }
    columns = [f"{s} {m}" for s in ("summary", "phrase", "mixed") for m in ("MRR@10", "nDCG@10")]
    print("| ranker | " + " | ".join(columns) + " |")
    print("|---|---|---|---|---|---|---|")
    for name, by_set in results.items():
        cells = [f"{by_set[s][m]:.3f}" for s in ("summary", "phrase", "mixed") for m in ("mrr@10", "ndcg@10")]
        print(f"| {name} | " + " | ".join(cells) + " |")
    counts = {s: len(qs) for s, qs in sets.items()}
    print(f"queries: {counts}, documents: {len(docs)}")
    args.out.write_text(json.dumps({"documents": len(docs), "queries": counts, "results": results}, indent=2))


if __name__ == "__main__":
    main()
