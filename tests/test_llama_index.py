"""`shoal_client.llama_index.ShoalVectorStore` against a real server, with local embeddings only."""

from __future__ import annotations

import re
import uuid
import zlib
from typing import Any

import numpy as np
import pytest
from llama_index.core import VectorStoreIndex
from llama_index.core.base.embeddings.base import BaseEmbedding
from llama_index.core.embeddings import MockEmbedding
from llama_index.core.schema import NodeRelationship, RelatedNodeInfo, TextNode
from llama_index.core.vector_stores.types import (
    BasePydanticVectorStore,
    FilterCondition,
    FilterOperator,
    MetadataFilter,
    MetadataFilters,
    VectorStoreQuery,
    VectorStoreQueryMode,
)

from shoal_client.llama_index import ShoalVectorStore, filters_to_where
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(120)

DIM = 64


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class HashEmbedding(BaseEmbedding):
    """A deterministic local embedding: hashed bag of words, L2-normalised (no model, no download)."""

    def _vector(self, text: str) -> list[float]:
        v = np.zeros(DIM)
        for word in re.findall(r"[a-z]+", text.lower()):
            v[zlib.crc32(word.encode()) % DIM] += 1.0
        norm = np.linalg.norm(v)
        return [float(x) for x in (v / norm if norm else v)]

    def _get_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    async def _aget_query_embedding(self, query: str) -> list[float]:
        return self._vector(query)

    def _get_text_embedding(self, text: str) -> list[float]:
        return self._vector(text)


def node(node_id: str, text: str, doc: str, **metadata: Any) -> TextNode:
    return TextNode(
        id_=node_id,
        text=text,
        metadata=metadata,
        relationships={NodeRelationship.SOURCE: RelatedNodeInfo(node_id=doc)},
    )


def corpus() -> list[TextNode]:
    return [
        node(
            "cat",
            "A cat is sleeping on the warm windowsill.",
            "pets",
            topic="animals",
            year=2021,
            tags=["cute", "indoor"],
        ),
        node("dog", "The dog chased a ball across the park.", "pets", topic="animals", year=2023, tags=["outdoor"]),
        node("tax", "The quarterly tax filing deadline is next Monday.", "office", topic="work", year=2023, tags=[]),
        node(
            "ship",
            "The container ship docked in the harbour at dawn.",
            "travel",
            topic="travel",
            year=2022,
            tags=["outdoor", "sea"],
        ),
    ]


def ids_of(store: ShoalVectorStore, filters: MetadataFilters, query: str = "anything") -> set[str]:
    result = store.query(VectorStoreQuery(query_str=query, similarity_top_k=10, filters=filters))
    assert result.ids is not None
    return set(result.ids)


@pytest.fixture
def server_embedded(server: ServerProcess) -> ShoalVectorStore:
    """A store of the corpus, nodes without embeddings: the server embeds them."""
    store = ShoalVectorStore(url=server.url, collection=unique("li"), is_embedding_query=False)
    assert store.add(corpus()) == ["cat", "dog", "tax", "ship"]
    return store


def test_index_with_a_local_embedding_inserts_retrieves_filters_and_deletes_by_ref_doc(server: ServerProcess) -> None:
    store = ShoalVectorStore(url=server.url, collection=unique("liidx"))
    assert isinstance(store, BasePydanticVectorStore) and store.stores_text and store.client is not None
    index = VectorStoreIndex.from_vector_store(store, embed_model=HashEmbedding())
    index.insert_nodes(corpus())
    assert {c.name: c.dim for c in store.client.list_collections()}[store.collection] == DIM

    results = index.as_retriever(similarity_top_k=2).retrieve("cat sleeping on the windowsill")
    assert results[0].node.node_id == "cat"
    assert results[0].node.get_content() == "A cat is sleeping on the warm windowsill."
    assert results[0].node.metadata == {"topic": "animals", "year": 2021, "tags": ["cute", "indoor"]}
    assert results[0].node.ref_doc_id == "pets"
    assert results[0].score is not None and results[1].score is not None and results[0].score > results[1].score

    animals = MetadataFilters(filters=[MetadataFilter(key="topic", value="animals")])
    filtered = index.as_retriever(similarity_top_k=4, filters=animals).retrieve("the harbour at dawn")
    assert {r.node.node_id for r in filtered} == {"cat", "dog"}
    scores = [r.score for r in filtered]
    assert scores == sorted(scores, reverse=True)  # type: ignore[type-var]

    index.delete_ref_doc("pets")
    left = index.as_retriever(similarity_top_k=4).retrieve("a cat and a dog")
    assert {r.node.node_id for r in left} == {"tax", "ship"}


def test_server_side_embedding_query_by_text(server_embedded: ShoalVectorStore) -> None:
    result = server_embedded.query(VectorStoreQuery(query_str="a kitten napping by the window", similarity_top_k=2))
    assert result.ids is not None and result.ids[0] == "cat"
    assert result.similarities is not None and result.similarities[0] > result.similarities[1]
    assert result.nodes is not None and result.nodes[0].ref_doc_id == "pets"
    # Through an index: the store asks for no query embedding, so the text goes to the server.
    index = VectorStoreIndex.from_vector_store(server_embedded, embed_model=MockEmbedding(embed_dim=8))
    assert [r.node.node_id for r in index.as_retriever(similarity_top_k=1).retrieve("when are taxes due?")] == ["tax"]
    restricted = server_embedded.query(
        VectorStoreQuery(query_str="a kitten napping", similarity_top_k=4, doc_ids=["office", "travel"])
    )
    assert set(restricted.ids or []) == {"tax", "ship"}


@pytest.mark.parametrize(
    ("filters", "expected"),
    [
        ([MetadataFilter(key="topic", value="work")], {"tax"}),
        ([MetadataFilter(key="topic", value="animals", operator=FilterOperator.NE)], {"tax", "ship"}),
        ([MetadataFilter(key="year", value=2022, operator=FilterOperator.GT)], {"dog", "tax"}),
        ([MetadataFilter(key="year", value=2022, operator=FilterOperator.GTE)], {"dog", "tax", "ship"}),
        ([MetadataFilter(key="year", value=2022, operator=FilterOperator.LT)], {"cat"}),
        ([MetadataFilter(key="year", value=2022, operator=FilterOperator.LTE)], {"cat", "ship"}),
        ([MetadataFilter(key="topic", value=["work", "travel"], operator=FilterOperator.IN)], {"tax", "ship"}),
        ([MetadataFilter(key="topic", value=["work", "travel"], operator=FilterOperator.NIN)], {"cat", "dog"}),
        ([MetadataFilter(key="tags", value=["sea", "cute"], operator=FilterOperator.ANY)], {"cat", "ship"}),
        ([MetadataFilter(key="tags", value=["outdoor", "sea"], operator=FilterOperator.ALL)], {"ship"}),
        (
            [
                MetadataFilter(key="year", value=2023),
                MetadataFilters(
                    filters=[MetadataFilter(key="topic", value="work"), MetadataFilter(key="tags", value="outdoor")],
                    condition=FilterCondition.OR,
                ),
            ],
            {"dog", "tax"},
        ),
    ],
)
def test_metadata_filters_become_a_shoal_where(
    server_embedded: ShoalVectorStore, filters: list[MetadataFilter | MetadataFilters], expected: set[str]
) -> None:
    assert ids_of(server_embedded, MetadataFilters(filters=filters)) == expected


def test_or_condition_and_the_where_it_maps_to(server_embedded: ShoalVectorStore) -> None:
    either = MetadataFilters(
        filters=[
            MetadataFilter(key="topic", value="work"),
            MetadataFilter(key="year", value=2021, operator=FilterOperator.LTE),
        ],
        condition=FilterCondition.OR,
    )
    assert filters_to_where(either) == {"$or": [{"topic": {"$eq": "work"}}, {"year": {"$lte": 2021}}]}
    assert ids_of(server_embedded, either) == {"tax", "cat"}
    assert filters_to_where(MetadataFilters(filters=[])) is None


@pytest.mark.parametrize(
    ("filters", "message"),
    [
        (
            MetadataFilters(filters=[MetadataFilter(key="topic", value="wo", operator=FilterOperator.TEXT_MATCH)]),
            "text_match",
        ),
        (
            MetadataFilters(filters=[MetadataFilter(key="tags", value="sea", operator=FilterOperator.CONTAINS)]),
            "contains",
        ),
        (
            MetadataFilters(filters=[MetadataFilter(key="tags", value=None, operator=FilterOperator.IS_EMPTY)]),
            "is_empty",
        ),
        (MetadataFilters(filters=[MetadataFilter(key="topic", value="work")], condition=FilterCondition.NOT), "'not'"),
        (MetadataFilters(filters=[MetadataFilter(key="topic", value=None)]), "None"),
        (MetadataFilters(filters=[MetadataFilter(key="topic", value=["a", "b"])]), "one value"),
        (MetadataFilters(filters=[MetadataFilter(key="topic", value="a", operator=FilterOperator.IN)]), "list value"),
    ],
)
def test_unsupported_filters_raise_a_clear_error(
    server_embedded: ShoalVectorStore, filters: MetadataFilters, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        server_embedded.query(VectorStoreQuery(query_str="x", filters=filters))


def test_keyword_and_hybrid_modes_rank_on_the_server(server_embedded: ShoalVectorStore) -> None:
    keyword = server_embedded.query(
        VectorStoreQuery(query_str="harbour", mode=VectorStoreQueryMode.TEXT_SEARCH, similarity_top_k=3)
    )
    assert keyword.ids == ["ship"]  # only nodes holding the term
    hybrid = server_embedded.query(
        VectorStoreQuery(query_str="tax deadline", mode=VectorStoreQueryMode.HYBRID, similarity_top_k=2, alpha=0.5)
    )
    assert hybrid.ids is not None and hybrid.ids[0] == "tax" and len(hybrid.ids) == 2
    rrf = server_embedded.query(VectorStoreQuery(query_str="dog", mode=VectorStoreQueryMode.HYBRID))
    assert rrf.ids is not None and rrf.ids[0] == "dog"


def test_unsupported_modes_and_node_id_restriction_raise(server_embedded: ShoalVectorStore) -> None:
    with pytest.raises(ValueError, match="not supported by Shoal"):
        server_embedded.query(VectorStoreQuery(query_str="x", mode=VectorStoreQueryMode.SPARSE))
    with pytest.raises(ValueError, match="needs query_str"):
        server_embedded.query(VectorStoreQuery(query_embedding=[0.0] * 4, mode=VectorStoreQueryMode.HYBRID))
    with pytest.raises(ValueError, match="node_ids"):
        server_embedded.query(VectorStoreQuery(query_str="x", node_ids=["cat"]))
    with pytest.raises(ValueError, match="query_embedding or query_str"):
        server_embedded.query(VectorStoreQuery())


def test_nodes_round_trip_and_delete_nodes(server: ServerProcess) -> None:
    store = ShoalVectorStore(url=server.url, collection=unique("linodes"))
    first = node("n1", "first node about sailing", "doc-1", page=1, pos={"line": 3, "cols": [1, 2]}, flag=True)
    first.relationships[NodeRelationship.NEXT] = RelatedNodeInfo(node_id="n2")
    first.embedding = HashEmbedding()._vector(first.text)
    second = node("n2", "second node about baking", "doc-1", page=2)
    second.embedding = HashEmbedding()._vector(second.text)
    store.add([first, second])
    [got] = store.get_nodes(["n1", "missing"])
    assert isinstance(got, TextNode) and got.text == first.text
    # Nested metadata and relationships come back from the stored node JSON.
    assert got.metadata == {"page": 1, "pos": {"line": 3, "cols": [1, 2]}, "flag": True}
    assert got.ref_doc_id == "doc-1" and got.next_node is not None and got.next_node.node_id == "n2"
    raw = store.client.get(store.collection, ["n1"])[0]["metadata"]
    assert "pos" not in raw and raw["page"] == 1 and raw["ref_doc_id"] == "doc-1"  # flat keys only, filterable
    with pytest.raises(ValueError, match="dimension"):
        store.add([TextNode(id_="bad", text="x", embedding=[1.0, 0.0])])
    store.delete_nodes(filters=MetadataFilters(filters=[MetadataFilter(key="page", value=2)]))
    assert [n.node_id for n in store.get_nodes(["n1", "n2"])] == ["n1"]
    store.delete_nodes(["n1"])
    assert store.get_nodes(["n1", "n2"]) == []
    with pytest.raises(ValueError, match="exactly one"):
        store.delete_nodes()
    store.clear()
    assert store.collection not in {c.name for c in store.client.list_collections()}


async def test_async_variants_and_mmr(server: ServerProcess) -> None:
    store = ShoalVectorStore(url=server.url, collection=unique("liasync"))
    embed = HashEmbedding()
    nodes = [
        node("a", "red apple pie", "d1"),
        node("a2", "red apple pie recipe", "d1"),
        node("b", "green pear tart", "d2"),
    ]
    for n in nodes:
        n.embedding = embed._vector(n.text)
    assert await store.async_add(nodes) == ["a", "a2", "b"]
    q = embed._vector("red apple pie")
    result = await store.aquery(VectorStoreQuery(query_embedding=q, similarity_top_k=2))
    assert result.ids == ["a", "a2"]
    diverse = await store.aquery(
        VectorStoreQuery(query_embedding=q, similarity_top_k=2, mode=VectorStoreQueryMode.MMR, mmr_threshold=0.2)
    )
    assert diverse.ids == ["a", "b"]
    index = VectorStoreIndex.from_vector_store(store, embed_model=embed)
    retrieved = await index.as_retriever(similarity_top_k=1).aretrieve("pear tart")
    assert [r.node.node_id for r in retrieved] == ["b"]
    await store.adelete("d1")
    assert [n.node_id for n in await store.aget_nodes(["a", "a2", "b"])] == ["b"]
    await store.adelete_nodes(["b"])
    assert (await store.aquery(VectorStoreQuery(query_embedding=q, similarity_top_k=3))).ids == []
    await store.aclear()
    store.close()


def test_a_collection_dropped_elsewhere_is_created_again(server: ServerProcess) -> None:
    store = ShoalVectorStore(url=server.url, collection=unique("lidrop"))
    store.add([TextNode(id_="one", text="first text")])
    store.client.drop_collection(store.collection)  # as another client would
    assert store.query(VectorStoreQuery(query_str="first", similarity_top_k=2)).ids == []
    store.client.drop_collection(store.collection)
    assert store.add([TextNode(id_="two", text="second text")]) == ["two"]
    assert store.query(VectorStoreQuery(query_str="second", similarity_top_k=2)).ids == ["two"]
