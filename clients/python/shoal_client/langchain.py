"""LangChain vector store on Shoal (`pip install "shoal-client[langchain]"`).

    from shoal_client.langchain import ShoalVectorStore

    store = ShoalVectorStore(url="http://127.0.0.1:8080", collection="notes")
    store.add_texts(["the cat sat on the mat"], metadatas=[{"lang": "en"}])
    store.similarity_search("kitten", k=4, filter={"lang": "en"})
    store.as_retriever(search_kwargs={"k": 2}).invoke("kitten")

Embedding: with no `embedding`, texts travel as they are and Shoal embeds them (documents and
queries alike, with the server's model). With an `Embeddings`, vectors are computed here and
sent with the texts; the collection must then have the embedding's dimension.

The collection is created on first use (`if_not_exists`): with the embedding's dimension, or the
server's default (its model's) without one, and with `metric` when given. An existing collection
of another dimension or metric is refused with `ValueError` before anything is written.

Scores: `similarity_search_with_score` returns Shoal's score, higher is better (the cosine
similarity under `cosine`, the inner product under `ip`, the negated Euclidean distance under
`l2`). The relevance scores of `similarity_search_with_relevance_scores` (0..1) are that cosine /
inner product clamped to 0..1, and 1 - d/√2 under `l2` (clamped too), as LangChain maps distances
of unit vectors.

Filters: `filter=` is a Shoal `where` as is (`{"lang": "en"}`, `{"n": {"$gte": 2}}`,
`{"$or": [...]}`); `where_text=` and `ef=` are passed through too; any other keyword is refused
with `ValueError`, so a misspelt option never silently widens a search.

Metadata: see `shoal_client.metadata` — values Shoal cannot store flat (nested maps, None, lists
of non-strings) are JSON-encoded under the reserved key `_shoal_json` and come back decoded, but
cannot be filtered on.

Transport: HTTP, through `SyncShoalHTTP` (msgpack bodies, so vectors travel as float32 bytes).
A store is a long-lived object (notebooks, web apps) used one request at a time; over HTTP each
request stands alone and a server restart or an idle-connection drop is healed by the next
request, where a WebSocket would need reconnecting. Async methods run the same requests on the
client's private event loop and await them from the caller's loop, so they work from any loop.

Search types: `similarity`, `similarity_score_threshold` and `mmr` (maximal marginal relevance
over `fetch_k` hits, with their vectors), and Shoal's own `keyword` (BM25 over the texts) and
`hybrid` (both sides fused on the server: `fusion="rrf"` with `rrf_k`, or `fusion="weighted"` with
`alpha`, the vector side's weight). Keyword and hybrid always send the query text, so the server
embeds it for the vector side; their scores are the server's keyword or fused scores.
`as_retriever(search_type="hybrid", search_kwargs={...})` returns a retriever that uses them.
"""

from __future__ import annotations

import math
import uuid
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, ClassVar

import numpy as np

try:
    from langchain_core.callbacks import AsyncCallbackManagerForRetrieverRun, CallbackManagerForRetrieverRun
    from langchain_core.documents import Document
    from langchain_core.embeddings import Embeddings
    from langchain_core.vectorstores import VectorStore, VectorStoreRetriever
except ImportError as exc:  # the extra is not installed: say which one
    raise ImportError(
        f'shoal_client.langchain needs langchain-core: pip install "shoal-client[langchain]" ({exc})'
    ) from exc

from shoal_client.errors import NotFound
from shoal_client.http import ShoalHTTP
from shoal_client.metadata import decode_metadata, encode_metadata
from shoal_client.mmr import mmr_order
from shoal_client.store_collection import StoreCollection
from shoal_client.sync import SyncShoalHTTP
from shoal_client.types import Hit

# Options a search accepts besides `k`: the Shoal query arguments they map to.
_SEARCH_OPTIONS = frozenset({"filter", "where_text", "ef"})
# Shoal's own search modes, and the options only they take.
_SHOAL_SEARCH_TYPES = frozenset({"hybrid", "keyword"})
_FUSION_OPTIONS = frozenset({"fusion", "alpha", "rrf_k", "vector_candidates", "keyword_candidates"})
# Kept well under the server's per-upsert limits (10,000 documents, 16 MiB).
DEFAULT_BATCH_SIZE = 256


class ShoalVectorStore(VectorStore):
    """A LangChain `VectorStore` over one Shoal collection, reached at `url` (`http://HOST:PORT`).

    `embedding`: None lets the server embed texts and queries. `key`: the API key, if the server
    requires one. `metric` / `dim`: used when the collection is created (and checked against an
    existing one). `batch_size` (1..10,000): documents per upsert request. `timeout`: seconds per
    HTTP request. `client`: share an open `SyncShoalHTTP` (then `close()` leaves it open).
    Server errors raise the client's `ShoalError` subclasses (`BadRequest` for a bad filter, ...).
    """

    def __init__(
        self,
        url: str,
        collection: str,
        embedding: Embeddings | None = None,
        *,
        key: str | None = None,
        metric: str | None = None,
        dim: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout: float = 30.0,
        client: SyncShoalHTTP | None = None,
    ) -> None:
        if not 1 <= batch_size <= 10_000:
            raise ValueError(f"batch_size must be between 1 and 10000, not {batch_size}")
        self.collection = collection
        self._embedding = embedding
        self._metric = metric
        self._dim = dim
        self._batch_size = batch_size
        self._owns_client = client is None
        self._db = client if client is not None else SyncShoalHTTP(url, key, timeout=timeout, use_msgpack=True)
        self._target = StoreCollection(collection, dim, metric, batch_size)

    # --- LangChain's VectorStore ------------------------------------------------------------

    @property
    def embeddings(self) -> Embeddings | None:
        return self._embedding

    @property
    def client(self) -> SyncShoalHTTP:
        """The blocking HTTP client this store talks through."""
        return self._db

    def add_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """Upsert `texts` (ids: given, or new UUIDs; a None id gets one too) and return their ids,
        once durable and searchable. Raises `ValueError` for mismatched lengths, bad metadata or
        a collection of another dimension."""
        texts = list(texts)
        _no_options(kwargs, "add_texts")
        vectors = self._embedding.embed_documents(texts) if self._embedding is not None and texts else None
        new_ids, docs = self._documents(texts, metadatas, ids, vectors)
        if docs:
            self._db.run(lambda c: self._target.upsert(c, docs, _dim_of(vectors)))
        return new_ids

    async def aadd_texts(
        self,
        texts: Iterable[str],
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> list[str]:
        """`add_texts`, awaited."""
        texts = list(texts)
        _no_options(kwargs, "aadd_texts")
        vectors = await self._embedding.aembed_documents(texts) if self._embedding is not None and texts else None
        new_ids, docs = self._documents(texts, metadatas, ids, vectors)
        if docs:
            await self._db.arun(lambda c: self._target.upsert(c, docs, _dim_of(vectors)))
        return new_ids

    def similarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        """The `k` documents most similar to `query`, best first (`filter=`: a Shoal `where`)."""
        return [doc for doc, _ in self.similarity_search_with_score(query, k, **kwargs)]

    async def asimilarity_search(self, query: str, k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score(query, k, **kwargs)]

    def similarity_search_with_score(self, query: str, k: int = 4, **kwargs: Any) -> list[tuple[Document, float]]:
        """`(document, Shoal score)` pairs, best first; the score is higher-is-better."""
        options = _search_options(kwargs)
        if self._embedding is not None:
            return self.similarity_search_with_score_by_vector(self._embedding.embed_query(query), k, **options)
        hits = self._db.run(lambda c: self._query(c, None, query, k, options))
        return [(_document(hit), hit.score) for hit in hits]

    async def asimilarity_search_with_score(
        self, query: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        options = _search_options(kwargs)
        if self._embedding is not None:
            vector = await self._embedding.aembed_query(query)
            return await self.asimilarity_search_with_score_by_vector(vector, k, **options)
        hits = await self._db.arun(lambda c: self._query(c, None, query, k, options))
        return [(_document(hit), hit.score) for hit in hits]

    def similarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in self.similarity_search_with_score_by_vector(embedding, k, **kwargs)]

    async def asimilarity_search_by_vector(self, embedding: list[float], k: int = 4, **kwargs: Any) -> list[Document]:
        return [doc for doc, _ in await self.asimilarity_search_with_score_by_vector(embedding, k, **kwargs)]

    def similarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """`(document, Shoal score)` pairs for a query vector, best first."""
        options = _search_options(kwargs)
        hits = self._db.run(lambda c: self._query(c, _vector(embedding), None, k, options))
        return [(_document(hit), hit.score) for hit in hits]

    async def asimilarity_search_with_score_by_vector(
        self, embedding: Sequence[float], k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        options = _search_options(kwargs)
        hits = await self._db.arun(lambda c: self._query(c, _vector(embedding), None, k, options))
        return [(_document(hit), hit.score) for hit in hits]

    def max_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        """`k` of the `fetch_k` most similar documents, picked for similarity and diversity."""
        if self._embedding is not None:
            vector = self._embedding.embed_query(query)
            return self.max_marginal_relevance_search_by_vector(vector, k, fetch_k, lambda_mult, **kwargs)
        options = _search_options(kwargs)
        hits = self._db.run(lambda c: self._query(c, None, query, fetch_k, options, with_vectors=True))
        return self._mmr(hits, k, lambda_mult, None)

    async def amax_marginal_relevance_search(
        self, query: str, k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        if self._embedding is not None:
            vector = await self._embedding.aembed_query(query)
            return await self.amax_marginal_relevance_search_by_vector(vector, k, fetch_k, lambda_mult, **kwargs)
        options = _search_options(kwargs)
        hits = await self._db.arun(lambda c: self._query(c, None, query, fetch_k, options, with_vectors=True))
        return self._mmr(hits, k, lambda_mult, None)

    def max_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        options = _search_options(kwargs)
        vector = _vector(embedding)
        hits = self._db.run(lambda c: self._query(c, vector, None, fetch_k, options, with_vectors=True))
        return self._mmr(hits, k, lambda_mult, vector)

    async def amax_marginal_relevance_search_by_vector(
        self, embedding: list[float], k: int = 4, fetch_k: int = 20, lambda_mult: float = 0.5, **kwargs: Any
    ) -> list[Document]:
        options = _search_options(kwargs)
        vector = _vector(embedding)
        hits = await self._db.arun(lambda c: self._query(c, vector, None, fetch_k, options, with_vectors=True))
        return self._mmr(hits, k, lambda_mult, vector)

    def delete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        """Delete the documents `ids`, or those matching `filter=` (a Shoal `where`); True once
        done (ids that do not exist are no error). Raises `ValueError` with neither or both:
        Shoal has no delete-everything request; `delete_collection()` drops the collection."""
        args = _delete_args(ids, kwargs)
        self._db.run(lambda c: c.delete(self.collection, **args))
        return True

    async def adelete(self, ids: list[str] | None = None, **kwargs: Any) -> bool | None:
        args = _delete_args(ids, kwargs)
        await self._db.arun(lambda c: c.delete(self.collection, **args))
        return True

    def get_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        """The documents among `ids` that exist, in the order asked for."""
        return _documents_from_get(self._db.run(lambda c: c.get(self.collection, list(ids))))

    async def aget_by_ids(self, ids: Sequence[str], /) -> list[Document]:
        return _documents_from_get(await self._db.arun(lambda c: c.get(self.collection, list(ids))))

    @classmethod
    def from_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> ShoalVectorStore:
        """A store (`url=`, `collection=` and the constructor's other options as keywords) with
        `texts` added. `embedding` None: the server embeds."""
        store = cls(embedding=embedding, **_store_options(kwargs))
        store.add_texts(texts, metadatas, ids=ids)
        return store

    @classmethod
    async def afrom_texts(
        cls,
        texts: list[str],
        embedding: Embeddings | None = None,
        metadatas: list[dict[str, Any]] | None = None,
        *,
        ids: list[str] | None = None,
        **kwargs: Any,
    ) -> ShoalVectorStore:
        store = cls(embedding=embedding, **_store_options(kwargs))
        await store.aadd_texts(texts, metadatas, ids=ids)
        return store

    def _select_relevance_score_fn(self) -> Callable[[float], float]:
        """Shoal score -> relevance in 0..1, for the collection's metric (see the module doc)."""
        return self._relevance

    def search(self, query: str, search_type: str, **kwargs: Any) -> list[Document]:
        if search_type in _SHOAL_SEARCH_TYPES:
            return [doc for doc, _ in self.search_with_score(query, search_type, **kwargs)]
        return super().search(query, search_type, **kwargs)

    async def asearch(self, query: str, search_type: str, **kwargs: Any) -> list[Document]:
        if search_type in _SHOAL_SEARCH_TYPES:
            return [doc for doc, _ in await self.asearch_with_score(query, search_type, **kwargs)]
        return await super().asearch(query, search_type, **kwargs)

    def search_with_score(
        self, query: str, search_type: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        """`(document, server score)` pairs of a `keyword` or `hybrid` search, best first
        (`filter=`, `where_text=`, and for hybrid `fusion`, `alpha`, `rrf_k`, candidate depths)."""
        mode, options = _mode_options(search_type, kwargs)
        hits = self._db.run(lambda c: self._query(c, None, query, k, options, mode=mode))
        return [(_document(hit), hit.score) for hit in hits]

    async def asearch_with_score(
        self, query: str, search_type: str, k: int = 4, **kwargs: Any
    ) -> list[tuple[Document, float]]:
        mode, options = _mode_options(search_type, kwargs)
        hits = await self._db.arun(lambda c: self._query(c, None, query, k, options, mode=mode))
        return [(_document(hit), hit.score) for hit in hits]

    def as_retriever(self, **kwargs: Any) -> VectorStoreRetriever:
        """A retriever (`search_type`: similarity, similarity_score_threshold, mmr, keyword or
        hybrid; `search_kwargs`: k, filter, score_threshold, fetch_k, lambda_mult, where_text, ef,
        and for hybrid fusion, alpha, rrf_k, vector_candidates, keyword_candidates)."""
        tags = kwargs.pop("tags", None) or []
        tags.extend(self._get_retriever_tags())
        return ShoalRetriever(vectorstore=self, tags=tags, **kwargs)

    # --- beyond LangChain's interface ---------------------------------------------------------

    def delete_collection(self) -> None:
        """Drop the whole collection; the next write creates it again."""
        self._db.drop_collection(self.collection)
        self._target.forget()

    def close(self) -> None:
        """Close the HTTP client (unless it was given to the constructor)."""
        if self._owns_client:
            self._db.close()

    def __enter__(self) -> ShoalVectorStore:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # --- internals: coroutines run on the client's private loop ----------------------------

    async def _query(
        self,
        c: ShoalHTTP,
        vector: np.ndarray[Any, np.dtype[np.float32]] | None,
        text: str | None,
        k: int,
        options: Mapping[str, Any],
        *,
        with_vectors: bool = False,
        mode: str | None = None,
    ) -> list[Hit]:
        cached = self._target.known
        await self._target.ensure(c, len(vector) if vector is not None else None)
        include = ["text", "metadata", "vector"] if with_vectors else None
        try:
            result = await c.query(
                self.collection,
                vector=vector,
                text=text,
                k=k,
                where=options.get("filter"),
                where_text=options.get("where_text"),
                ef=options.get("ef"),
                include=include,
                mode=mode,
                **{key: options[key] for key in _FUSION_OPTIONS if key in options},
            )
        except NotFound:
            if not cached:
                raise
            self._target.forget()  # dropped since it was looked up: create it again (empty), once
            return await self._query(c, vector, text, k, options, with_vectors=with_vectors, mode=mode)
        return result.hits

    def _documents(
        self,
        texts: list[str],
        metadatas: list[dict[str, Any]] | None,
        ids: Sequence[str | None] | None,
        vectors: list[list[float]] | None,
    ) -> tuple[list[str], list[dict[str, Any]]]:
        if metadatas is not None and len(metadatas) != len(texts):
            raise ValueError(f"{len(metadatas)} metadatas for {len(texts)} texts")
        if ids is not None and len(ids) != len(texts):
            raise ValueError(f"{len(ids)} ids for {len(texts)} texts")
        new_ids = [i if i else uuid.uuid4().hex for i in (ids or [None] * len(texts))]
        docs: list[dict[str, Any]] = []
        for n, (doc_id, text) in enumerate(zip(new_ids, texts, strict=True)):
            doc: dict[str, Any] = {"id": doc_id, "text": text}
            metadata = encode_metadata(metadatas[n] if metadatas is not None else None)
            if metadata:
                doc["metadata"] = metadata
            if vectors is not None:
                doc["vector"] = _vector(vectors[n])
            docs.append(doc)
        return new_ids, docs

    def _mmr(
        self, hits: list[Hit], k: int, lambda_mult: float, vector: np.ndarray[Any, np.dtype[np.float32]] | None
    ) -> list[Document]:
        info = self._target.info
        metric = info.metric if info is not None else "cosine"
        return [_document(hit) for hit in mmr_order(hits, k, lambda_mult, metric=metric, query_vector=vector)]

    def _relevance(self, score: float) -> float:
        info = self._target.info
        metric = info.metric if info is not None else (self._metric or "cosine")
        relevance = 1.0 + score / math.sqrt(2) if metric == "l2" else score
        return min(1.0, max(0.0, relevance))


def _document(hit: Hit) -> Document:
    return Document(id=hit.id, page_content=hit.text or "", metadata=decode_metadata(hit.metadata))


def _documents_from_get(docs: list[dict[str, Any]]) -> list[Document]:
    return [
        Document(id=str(d["id"]), page_content=str(d.get("text") or ""), metadata=decode_metadata(d.get("metadata")))
        for d in docs
    ]


def _vector(values: Sequence[float] | np.ndarray[Any, Any]) -> np.ndarray[Any, np.dtype[np.float32]]:
    return np.asarray(values, dtype=np.float32)


def _dim_of(vectors: list[list[float]] | None) -> int | None:
    return len(vectors[0]) if vectors else None


def _search_options(kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """The search keywords this store understands; `ValueError` for any other."""
    unknown = set(kwargs) - _SEARCH_OPTIONS
    if unknown:
        raise ValueError(
            f"unknown search option(s) {sorted(unknown)}; ShoalVectorStore takes {sorted(_SEARCH_OPTIONS)}"
        )
    where = kwargs.get("filter")
    if where is not None and not isinstance(where, Mapping):
        raise ValueError(f"filter must be a Shoal where map, e.g. {{'lang': 'en'}}, not {type(where).__name__}")
    return {key: value for key, value in kwargs.items() if value is not None}


def _delete_args(ids: list[str] | None, kwargs: Mapping[str, Any]) -> dict[str, Any]:
    unknown = set(kwargs) - {"filter"}
    if unknown:
        raise ValueError(f"unknown delete option(s) {sorted(unknown)}; ShoalVectorStore.delete takes ids or filter")
    where = kwargs.get("filter")
    if (ids is None) == (where is None):
        raise ValueError(
            "delete takes ids or filter= (a Shoal where), exactly one;"
            " Shoal has no delete-everything request: use delete_collection()"
        )
    if where is not None and not isinstance(where, Mapping):
        raise ValueError(f"filter must be a Shoal where map, not {type(where).__name__}")
    return {"ids": list(ids)} if ids is not None else {"where": dict(where or {})}


def _no_options(kwargs: Mapping[str, Any], method: str) -> None:
    if kwargs:
        raise ValueError(f"unknown option(s) {sorted(kwargs)} for ShoalVectorStore.{method}")


def _store_options(kwargs: dict[str, Any]) -> dict[str, Any]:
    for required in ("url", "collection"):
        if required not in kwargs:
            raise ValueError(f"ShoalVectorStore.from_texts needs {required}=")
    return kwargs


def _mode_options(search_type: str, kwargs: Mapping[str, Any]) -> tuple[str, dict[str, Any]]:
    """The server's `mode` and the options of a keyword / hybrid search; `ValueError` otherwise."""
    if search_type not in _SHOAL_SEARCH_TYPES:
        raise ValueError(f"search_type {search_type!r} is not one of {sorted(_SHOAL_SEARCH_TYPES)}")
    fusion = {key: value for key, value in kwargs.items() if key in _FUSION_OPTIONS and value is not None}
    if fusion and search_type != "hybrid":
        raise ValueError(f"{sorted(fusion)} only go with search_type 'hybrid'")
    options = _search_options({key: value for key, value in kwargs.items() if key not in _FUSION_OPTIONS})
    return search_type, options | fusion


class ShoalRetriever(VectorStoreRetriever):
    """LangChain's vector-store retriever, with Shoal's `keyword` and `hybrid` search types."""

    allowed_search_types: ClassVar[Collection[str]] = (
        *VectorStoreRetriever.allowed_search_types,
        *sorted(_SHOAL_SEARCH_TYPES),
    )

    def _get_relevant_documents(
        self, query: str, *, run_manager: CallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        if self.search_type in _SHOAL_SEARCH_TYPES:
            return self.vectorstore.search(query, self.search_type, **(self.search_kwargs | kwargs))
        return super()._get_relevant_documents(query, run_manager=run_manager, **kwargs)

    async def _aget_relevant_documents(
        self, query: str, *, run_manager: AsyncCallbackManagerForRetrieverRun, **kwargs: Any
    ) -> list[Document]:
        if self.search_type in _SHOAL_SEARCH_TYPES:
            return await self.vectorstore.asearch(query, self.search_type, **(self.search_kwargs | kwargs))
        return await super()._aget_relevant_documents(query, run_manager=run_manager, **kwargs)


__all__ = ["ShoalRetriever", "ShoalVectorStore"]
