"""LlamaIndex vector store on Shoal (`pip install "shoal-client[llama-index]"`).

    from llama_index.core import VectorStoreIndex
    from shoal_client.llama_index import ShoalVectorStore

    store = ShoalVectorStore(url="http://127.0.0.1:8080", collection="notes")
    index = VectorStoreIndex.from_vector_store(store, embed_model=my_embed_model)

Nodes: the node id is the Shoal id, the node's text (without metadata) the document text, and
its embedding, when it has one, the vector; a node without an embedding is embedded by the
server. Metadata follows LlamaIndex's own convention (`node_to_metadata_dict`): the whole node
(metadata, relationships, ...) is kept as JSON under `_node_content`, its ref doc id under
`ref_doc_id` (and `doc_id`, `document_id`), so `delete(ref_doc_id)` is one delete by `where`, and
queries rebuild the very node. Every metadata value Shoal can store flat (str, int, float, bool,
list of str) is also a key of its own, which filters apply to; nested values are kept only in
`_node_content`, and cannot be filtered on.

Queries: `query_embedding` when given, else `query_str` (the server embeds it; build the store
with `is_embedding_query=False` so retrievers send only the text). `MetadataFilters` become a
Shoal `where` (`filters_to_where`); `doc_ids` restrict to those ref doc ids. Modes: `default` and
`mmr` (`mmr_threshold` is the similarity/diversity weight, default 0.5); any other mode raises
`ValueError`. Similarities are Shoal's scores (higher is better; the cosine similarity under the
default metric).

The collection is created on first use (`if_not_exists`), with the first embedding's dimension
(or the server's default without one) and `metric` when given. The store talks HTTP through
`SyncShoalHTTP` (see `shoal_client.langchain` for why); the async methods await the same
requests from any event loop.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

try:
    from llama_index.core.bridge.pydantic import PrivateAttr
    from llama_index.core.schema import BaseNode, MetadataMode, TextNode
    from llama_index.core.vector_stores.types import (
        BasePydanticVectorStore,
        FilterCondition,
        FilterOperator,
        MetadataFilter,
        MetadataFilters,
        VectorStoreQuery,
        VectorStoreQueryMode,
        VectorStoreQueryResult,
    )
    from llama_index.core.vector_stores.utils import metadata_dict_to_node, node_to_metadata_dict
except ImportError as exc:  # the extra is not installed: say which one
    raise ImportError(
        f'shoal_client.llama_index needs llama-index-core: pip install "shoal-client[llama-index]" ({exc})'
    ) from exc

from shoal_client.errors import NotFound
from shoal_client.http import ShoalHTTP
from shoal_client.metadata import decode_metadata, is_flat_value
from shoal_client.mmr import mmr_order
from shoal_client.store_collection import StoreCollection
from shoal_client.sync import SyncShoalHTTP
from shoal_client.types import Hit

REF_DOC_KEY = "ref_doc_id"
NODE_CONTENT_KEY = "_node_content"
DEFAULT_BATCH_SIZE = 256
# MMR picks from this many times `similarity_top_k` nearest hits (at most the server's k limit).
MMR_PREFETCH_FACTOR = 4
# LlamaIndex query modes that Shoal serves itself: BM25 over the texts, and server-side fusion
# (`alpha` given: weighted with it as the vector side's weight; otherwise reciprocal rank).
_SHOAL_MODES = {VectorStoreQueryMode.TEXT_SEARCH: "keyword", VectorStoreQueryMode.HYBRID: "hybrid"}
MAX_K = 1000

_OPERATORS: dict[FilterOperator, str] = {
    FilterOperator.EQ: "$eq",
    FilterOperator.NE: "$ne",
    FilterOperator.GT: "$gt",
    FilterOperator.GTE: "$gte",
    FilterOperator.LT: "$lt",
    FilterOperator.LTE: "$lte",
    FilterOperator.IN: "$in",
    FilterOperator.NIN: "$nin",
    # On a list-of-str field, Shoal's `$in` matches when any element is among the values.
    FilterOperator.ANY: "$in",
}
_LIST_OPERATORS = frozenset({FilterOperator.IN, FilterOperator.NIN, FilterOperator.ANY, FilterOperator.ALL})
_SUPPORTED = "==, !=, >, >=, <, <=, in, nin, any, all"


def filters_to_where(filters: MetadataFilters | None) -> dict[str, Any] | None:
    """The Shoal `where` for LlamaIndex `filters` (None: no filter).

    EQ/NE/GT/GTE/LT/LTE/IN/NIN map to `$eq/$ne/$gt/$gte/$lt/$lte/$in/$nin`; ANY (a list field
    holding any of the values) to `$in`; ALL (holding all of them) to an `$and` of equalities;
    conditions AND/OR to `$and/$or`, nested `MetadataFilters` to nested filters. Raises
    `ValueError` for what Shoal cannot express: the operators text_match, contains, is_empty
    (Shoal matches metadata by equality and order, not substrings or absence), the condition NOT,
    a None value, or a list value for a single-value operator.
    """
    if filters is None:
        return None
    parts = [
        part
        for part in (
            filters_to_where(item) if isinstance(item, MetadataFilters) else _filter_to_where(item)
            for item in filters.filters
        )
        if part is not None
    ]
    if not parts:
        return None
    condition = filters.condition or FilterCondition.AND
    if condition == FilterCondition.AND:
        return parts[0] if len(parts) == 1 else {"$and": parts}
    if condition == FilterCondition.OR:
        return parts[0] if len(parts) == 1 else {"$or": parts}
    raise ValueError(f"filter condition {condition.value!r} is not supported by Shoal; use 'and' or 'or'")


def _filter_to_where(item: MetadataFilter) -> dict[str, Any]:
    operator, value, key = item.operator, item.value, item.key
    if operator not in _OPERATORS and operator != FilterOperator.ALL:
        raise ValueError(f"filter operator {operator.value!r} on {key!r} is not supported by Shoal; use {_SUPPORTED}")
    if value is None:
        raise ValueError(
            f"filter on {key!r}: Shoal cannot compare with None (a document lacking {key!r} matches != and nin)"
        )
    if operator in _LIST_OPERATORS:
        if not isinstance(value, list):
            raise ValueError(f"filter operator {operator.value!r} on {key!r} needs a list value")
        if operator == FilterOperator.ALL:
            if not value:
                raise ValueError(f"filter operator 'all' on {key!r} needs a non-empty list")
            return {"$and": [{key: {"$eq": v}} for v in value]}
    elif isinstance(value, list):
        raise ValueError(f"filter operator {operator.value!r} on {key!r} takes one value, not a list")
    return {key: {_OPERATORS[operator]: value}}


class ShoalVectorStore(BasePydanticVectorStore):
    """A LlamaIndex vector store over one Shoal collection, reached at `url` (`http://HOST:PORT`).

    `key`: the API key, if the server requires one. `metric` / `dim`: used when the collection is
    created (and checked against an existing one: `ValueError` if they differ). `batch_size`
    (1..10,000): nodes per upsert request. `timeout`: seconds per HTTP request.
    `is_embedding_query=False`: retrievers send the query text only, for the server to embed.
    `client`: share an open `SyncShoalHTTP`. Server errors raise the client's `ShoalError`s.
    """

    stores_text: bool = True
    flat_metadata: bool = False
    url: str
    collection: str
    metric: str | None = None
    dim: int | None = None
    batch_size: int = DEFAULT_BATCH_SIZE
    timeout: float = 30.0

    _db: SyncShoalHTTP = PrivateAttr()
    _owns_client: bool = PrivateAttr(default=True)
    _target: StoreCollection = PrivateAttr()

    def __init__(
        self,
        url: str,
        collection: str,
        *,
        key: str | None = None,
        metric: str | None = None,
        dim: int | None = None,
        batch_size: int = DEFAULT_BATCH_SIZE,
        timeout: float = 30.0,
        is_embedding_query: bool = True,
        client: SyncShoalHTTP | None = None,
    ) -> None:
        if not 1 <= batch_size <= 10_000:
            raise ValueError(f"batch_size must be between 1 and 10000, not {batch_size}")
        # As a dict: the type checker only knows the base class's fields for its __init__.
        fields: dict[str, Any] = {
            "url": url,
            "collection": collection,
            "metric": metric,
            "dim": dim,
            "batch_size": batch_size,
            "timeout": timeout,
            "is_embedding_query": is_embedding_query,
        }
        super().__init__(**fields)
        self._owns_client = client is None
        self._db = client if client is not None else SyncShoalHTTP(url, key, timeout=timeout, use_msgpack=True)
        self._target = StoreCollection(collection, dim, metric, batch_size)

    @classmethod
    def class_name(cls) -> str:
        return "ShoalVectorStore"

    @property
    def client(self) -> SyncShoalHTTP:
        """The blocking HTTP client this store talks through."""
        return self._db

    # --- writes ---------------------------------------------------------------------------------

    def add(self, nodes: Sequence[BaseNode], **add_kwargs: Any) -> list[str]:
        """Upsert `nodes` (replacing nodes of the same id); their ids, once durable and searchable.
        Raises `ValueError` for metadata keys Shoal refuses or a collection of another dimension."""
        docs, dim = _documents(nodes)
        if docs:
            self._db.run(lambda c: self._target.upsert(c, docs, dim))
        return [doc["id"] for doc in docs]

    async def async_add(self, nodes: Sequence[BaseNode], **kwargs: Any) -> list[str]:
        docs, dim = _documents(nodes)
        if docs:
            await self._db.arun(lambda c: self._target.upsert(c, docs, dim))
        return [doc["id"] for doc in docs]

    def delete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        """Delete every node of the source document `ref_doc_id`."""
        self._db.run(lambda c: c.delete(self.collection, where={REF_DOC_KEY: ref_doc_id}))

    async def adelete(self, ref_doc_id: str, **delete_kwargs: Any) -> None:
        await self._db.arun(lambda c: c.delete(self.collection, where={REF_DOC_KEY: ref_doc_id}))

    def delete_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None, **delete_kwargs: Any
    ) -> None:
        """Delete the nodes `node_ids`, or those matching `filters` (one of the two)."""
        args = _delete_args(node_ids, filters)
        self._db.run(lambda c: c.delete(self.collection, **args))

    async def adelete_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None, **delete_kwargs: Any
    ) -> None:
        args = _delete_args(node_ids, filters)
        await self._db.arun(lambda c: c.delete(self.collection, **args))

    def clear(self) -> None:
        """Drop the collection; the next write creates it again."""
        self._db.run(self._drop)

    async def aclear(self) -> None:
        await self._db.arun(self._drop)

    # --- reads ----------------------------------------------------------------------------------

    def get_nodes(self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None) -> list[BaseNode]:
        """The nodes among `node_ids` that exist. Raises `ValueError` for `filters`: Shoal reads
        documents by id, and finds them by filter only in a search."""
        ids = _get_ids(node_ids, filters)
        return [_node_from_doc(d) for d in self._db.run(lambda c: c.get(self.collection, ids))]

    async def aget_nodes(
        self, node_ids: list[str] | None = None, filters: MetadataFilters | None = None
    ) -> list[BaseNode]:
        ids = _get_ids(node_ids, filters)
        return [_node_from_doc(d) for d in await self._db.arun(lambda c: c.get(self.collection, ids))]

    def query(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        """The `similarity_top_k` nearest nodes, best first, with Shoal's scores as similarities.
        Raises `ValueError` for an unsupported mode or filter, or a query with neither an
        embedding nor a text."""
        return self._db.run(lambda c: self._query(c, query))

    async def aquery(self, query: VectorStoreQuery, **kwargs: Any) -> VectorStoreQueryResult:
        return await self._db.arun(lambda c: self._query(c, query))

    def close(self) -> None:
        """Close the HTTP client (unless it was given to the constructor)."""
        if self._owns_client:
            self._db.close()

    # --- internals: coroutines run on the client's private loop -----------------------------

    async def _drop(self, c: ShoalHTTP) -> None:
        await c.drop_collection(self.collection)
        self._target.forget()

    async def _query(self, c: ShoalHTTP, query: VectorStoreQuery) -> VectorStoreQueryResult:
        mmr = query.mode == VectorStoreQueryMode.MMR
        modes = (VectorStoreQueryMode.DEFAULT, VectorStoreQueryMode.MMR, *_SHOAL_MODES)
        if query.mode not in modes:
            raise ValueError(
                f"query mode {query.mode.value!r} is not supported by Shoal; use one of "
                + ", ".join(repr(m.value) for m in modes)
            )
        if query.node_ids:
            raise ValueError("restricting a query to node_ids is not supported by Shoal; filter on metadata instead")
        vector = np.asarray(query.query_embedding, np.float32) if query.query_embedding is not None else None
        text = query.query_str if vector is None else None
        server_mode = _SHOAL_MODES.get(query.mode)
        fusion: dict[str, Any] = {}
        if server_mode is not None:
            # Keyword and hybrid rank by the text on the server (hybrid's vector side may be ours).
            if not query.query_str:
                raise ValueError(f"query mode {query.mode.value!r} needs query_str")
            text = query.query_str
            if server_mode == "keyword":
                vector = None
            elif query.alpha is not None:
                fusion = {"fusion": "weighted", "alpha": query.alpha}
            fusion["mode"] = server_mode
        if vector is None and text is None:
            raise ValueError("a query needs query_embedding or query_str")
        where = filters_to_where(query.filters)
        if query.doc_ids:
            by_doc = {REF_DOC_KEY: {"$in": list(query.doc_ids)}}
            where = by_doc if where is None else {"$and": [where, by_doc]}
        cached = self._target.known
        info = await self._target.ensure(c, len(vector) if vector is not None else None)
        k = query.similarity_top_k
        fetch = min(MAX_K, max(k, k * MMR_PREFETCH_FACTOR)) if mmr else k
        include = ["text", "metadata", "vector"] if mmr else ["text", "metadata"]
        try:
            found = await c.query(
                self.collection, vector=vector, text=text, k=fetch, where=where, include=include, **fusion
            )
        except NotFound:
            if not cached:
                raise
            self._target.forget()  # dropped since it was looked up: create it again (empty), once
            return await self._query(c, query)
        hits = found.hits
        if mmr:
            weight = query.mmr_threshold if query.mmr_threshold is not None else 0.5
            hits = mmr_order(hits, k, weight, metric=info.metric, query_vector=vector)
        return VectorStoreQueryResult(
            nodes=[_node_from_hit(hit) for hit in hits],
            similarities=[hit.score for hit in hits],
            ids=[hit.id for hit in hits],
        )


def _documents(nodes: Sequence[BaseNode]) -> tuple[list[dict[str, Any]], int | None]:
    """Shoal documents for `nodes`, and the dimension of their embeddings (None: none has one)."""
    docs: list[dict[str, Any]] = []
    dims: set[int] = set()
    for node in nodes:
        metadata = node_to_metadata_dict(node, remove_text=True, flat_metadata=False)
        flat: dict[str, Any] = {}
        for key, value in metadata.items():
            if not isinstance(key, str) or not key or key.startswith("$"):
                raise ValueError(
                    f"node {node.node_id!r}: metadata key {key!r} must be a non-empty string not starting with '$'"
                )
            if is_flat_value(value):
                flat[key] = value
        doc: dict[str, Any] = {
            "id": node.node_id,
            "text": node.get_content(metadata_mode=MetadataMode.NONE),
            "metadata": flat,
        }
        embedding = node.embedding
        if embedding is not None:
            doc["vector"] = np.asarray(embedding, np.float32)
            dims.add(len(embedding))
        docs.append(doc)
    if len(dims) > 1:
        raise ValueError(f"nodes have embeddings of different dimensions: {sorted(dims)}")
    return docs, next(iter(dims)) if dims else None


def _node(doc_id: str, text: str | None, metadata: Mapping[str, Any] | None) -> BaseNode:
    meta = dict(metadata or {})
    if isinstance(meta.get(NODE_CONTENT_KEY), str):
        node = metadata_dict_to_node(meta, text=text)
        node.id_ = doc_id
        return node
    # A document written by something else than this store: a plain text node.
    return TextNode(id_=doc_id, text=text or "", metadata=decode_metadata(meta))


def _node_from_hit(hit: Hit) -> BaseNode:
    return _node(hit.id, hit.text, hit.metadata)


def _node_from_doc(doc: Mapping[str, Any]) -> BaseNode:
    text = doc.get("text")
    metadata = doc.get("metadata")
    return _node(
        str(doc["id"]), text if isinstance(text, str) else None, metadata if isinstance(metadata, Mapping) else None
    )


def _delete_args(node_ids: list[str] | None, filters: MetadataFilters | None) -> dict[str, Any]:
    where = filters_to_where(filters)
    if (node_ids is None) == (where is None):
        raise ValueError("delete_nodes takes node_ids or filters, exactly one (Shoal deletes by ids or by where)")
    return {"ids": list(node_ids)} if node_ids is not None else {"where": where}


def _get_ids(node_ids: list[str] | None, filters: MetadataFilters | None) -> list[str]:
    if filters is not None and filters.filters:
        raise ValueError("get_nodes by filters is not supported by Shoal: it reads documents by id; query with filters")
    if node_ids is None:
        raise ValueError("get_nodes needs node_ids")
    return list(node_ids)


__all__ = ["ShoalVectorStore", "filters_to_where"]
