"""The keyword-side candidates measured on the same documents and queries as `load.quality`.

    python -m load.keyword_candidates [--size 2000] [--batches 50] [--out keyword_candidates.json]

Candidates: the shard's mutable `KeywordIndex` (numpy-scored posting lists), bm25s (static:
every change means re-indexing), tantivy in RAM (a commit and searcher reload per applied
batch), and PostgreSQL full-text search (the embedded server: a stored `tsvector` with the
`english` configuration under a GIN index, ranked by `ts_rank` over an OR of the query's
lexemes, one round trip per query and one transaction per batch). For each: MRR@10 on the
mixed query set, mean query latency (top-10, one thread), the time to index every document at
once, and the cost of applying `--batches` small batches of 10 replaced documents with a query
after each (what following the change log costs).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import tempfile
import time
from collections.abc import Callable
from contextlib import AsyncExitStack
from pathlib import Path
from typing import Protocol

import asyncpg
import bm25s  # type: ignore[import-untyped]
import numpy as np
import tantivy

from actors.keyword_index import KeywordIndex, query_terms, tokenize
from actors.pg_server import open_database
from load.quality import build, metrics

Search = Callable[[str], list[int]]


class Candidate(Protocol):
    def apply(self, batch: list[tuple[int, str]]) -> None: ...
    def search(self, text: str) -> list[int]: ...


class Ours:
    def __init__(self, docs: list[str]) -> None:
        self.index = KeywordIndex()
        self.size = len(docs)
        self.apply(list(enumerate(docs)))

    def apply(self, batch: list[tuple[int, str]]) -> None:
        for row, text in batch:
            self.index.set(row, text)

    def search(self, text: str) -> list[int]:
        scores, matched = self.index.scores(query_terms(text), self.size)
        rows = np.flatnonzero(matched)
        return rows[np.lexsort((rows, -scores[rows]))][:10].tolist()  # type: ignore[no-any-return]


class Bm25s:
    def __init__(self, docs: list[str]) -> None:
        self.docs = list(docs)
        self._build()

    def _build(self) -> None:
        self.model = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
        self.model.index([tokenize(d) for d in self.docs], show_progress=False)

    def apply(self, batch: list[tuple[int, str]]) -> None:
        for row, text in batch:
            self.docs[row] = text
        self._build()  # static index: a change means re-indexing

    def search(self, text: str) -> list[int]:
        terms = list(query_terms(text))
        if not terms:
            return []
        scores = self.model.get_scores(terms)
        top = np.argsort(-scores, kind="stable")[:10]
        return [int(r) for r in top if scores[r] > 0]


class Tantivy:
    def __init__(self, docs: list[str]) -> None:
        builder = tantivy.SchemaBuilder()
        builder.add_text_field("body", stored=False)
        builder.add_integer_field("row", stored=True, indexed=True)
        self.schema = builder.build()
        self.index = tantivy.Index(self.schema)
        self.writer = self.index.writer(heap_size=50_000_000, num_threads=1)
        for row, text in enumerate(docs):
            self.writer.add_document(tantivy.Document(body=text, row=row))
        self.writer.commit()
        self.index.reload()

    def apply(self, batch: list[tuple[int, str]]) -> None:
        for row, text in batch:
            self.writer.delete_documents_by_term("row", row)
            self.writer.add_document(tantivy.Document(body=text, row=row))
        self.writer.commit()
        self.index.reload()

    def search(self, text: str) -> list[int]:
        words = re.sub(r"[^\w\s]", " ", text).split()
        if not words:
            return []
        query = self.index.parse_query(" ".join(words), ["body"])
        searcher = self.index.searcher()
        return [int(searcher.doc(address)["row"][0]) for _, address in searcher.search(query, 10).hits]


class PostgresFullText:
    """PostgreSQL's own pipeline on both sides (its parser, English stemming and stop words):
    the strongest form of the database-side candidate, not our tokens."""

    # An OR of the query's lexemes: plainto_tsquery ANDs them, which finds almost nothing for
    # a sentence-long query.
    SEARCH = """
        WITH query AS (SELECT replace(plainto_tsquery('english', $1)::text, '&', '|')::tsquery AS q)
        SELECT row FROM docs, query
        WHERE q::text <> '' AND tsv @@ q ORDER BY ts_rank(tsv, q) DESC, row LIMIT 10"""
    UPSERT = "INSERT INTO docs (row, body) VALUES ($1, $2) ON CONFLICT (row) DO UPDATE SET body = excluded.body"

    def __init__(self, docs: list[str]) -> None:
        self.loop = asyncio.new_event_loop()
        self.stack = AsyncExitStack()
        self.tmp = tempfile.TemporaryDirectory(prefix="shoal-fts-")
        self.loop.run_until_complete(self._open(docs))

    async def _open(self, docs: list[str]) -> None:
        dsn = await self.stack.enter_async_context(open_database(Path(self.tmp.name), None))
        self.conn: asyncpg.Connection = await asyncpg.connect(dsn)
        self.stack.push_async_callback(self.conn.close)
        await self.conn.execute(
            "CREATE TABLE docs (row int PRIMARY KEY, body text NOT NULL, "
            "tsv tsvector GENERATED ALWAYS AS (to_tsvector('english', body)) STORED);"
            "CREATE INDEX docs_tsv ON docs USING gin (tsv)"
        )
        await self.conn.executemany(self.UPSERT, list(enumerate(docs)))
        await self.conn.execute("ANALYZE docs")

    def apply(self, batch: list[tuple[int, str]]) -> None:
        async def write() -> None:
            async with self.conn.transaction():
                await self.conn.executemany(self.UPSERT, batch)

        self.loop.run_until_complete(write())

    def search(self, text: str) -> list[int]:
        rows = self.loop.run_until_complete(self.conn.fetch(self.SEARCH, text))
        return [int(r["row"]) for r in rows]

    def close(self) -> None:
        self.loop.run_until_complete(self.stack.aclose())
        self.loop.close()
        self.tmp.cleanup()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--size", type=int, default=2000)
    parser.add_argument("--batches", type=int, default=50)
    parser.add_argument("--out", type=Path, default=Path("keyword_candidates.json"))
    args = parser.parse_args(argv)
    docs, labelled = build(args.size, 50, 300)
    rng = np.random.default_rng(3)
    results: dict[str, dict[str, float]] = {}
    candidates: tuple[tuple[str, Callable[[list[str]], Candidate]], ...] = (
        ("KeywordIndex (chosen)", Ours),
        ("bm25s", Bm25s),
        ("tantivy", Tantivy),
        ("PostgreSQL full-text", PostgresFullText),
    )
    print("| candidate | MRR@10 mixed | query ms | index all s | batch of 10 + query ms |")
    print("|---|---|---|---|---|")
    for name, kind in candidates:
        started = time.perf_counter()
        engine = kind(docs)
        index_s = time.perf_counter() - started
        started = time.perf_counter()
        ranked = [engine.search(q) for _, q, _ in labelled]
        query_ms = (time.perf_counter() - started) * 1000 / len(labelled)
        pairs = zip(ranked, labelled, strict=True)
        mrr = float(np.mean([metrics([f"d{r}" for r in got], rel)[0] for got, (_, _, rel) in pairs]))
        started = time.perf_counter()
        for _ in range(args.batches):
            rows = rng.choice(len(docs), size=10, replace=False).tolist()
            engine.apply([(r, docs[(r + 1) % len(docs)]) for r in rows])
            engine.search(labelled[0][1])
        batch_ms = (time.perf_counter() - started) * 1000 / args.batches
        if isinstance(engine, PostgresFullText):
            engine.close()
        results[name] = {"mrr@10_mixed": mrr, "query_ms": query_ms, "index_all_s": index_s, "batch_ms": batch_ms}
        print(f"| {name} | {mrr:.3f} | {query_ms:.3f} | {index_s:.2f} | {batch_ms:.2f} |", flush=True)
    args.out.write_text(json.dumps({"documents": len(docs), "queries": len(labelled), "results": results}, indent=2))


if __name__ == "__main__":
    main()
