"""`shoal_client.langchain.ShoalVectorStore` against a real server: a LangChain VectorStore end to end."""

from __future__ import annotations

import uuid

import numpy as np
import pytest
from langchain_core.documents import Document
from langchain_core.embeddings import Embeddings
from langchain_core.vectorstores import VectorStore

from shoal_client import BadRequest
from shoal_client.langchain import ShoalVectorStore
from shoal_client.metadata import JSON_KEY
from shoal_client.sync import SyncShoalHTTP
from tests.server_process import ServerProcess

pytestmark = pytest.mark.timeout(120)

PETS = [
    ("cat", "A cat is sleeping on the warm windowsill.", {"topic": "animals", "year": 2021}),
    ("dog", "The dog chased a ball across the park.", {"topic": "animals", "year": 2023}),
    ("tax", "The quarterly tax filing deadline is next Monday.", {"topic": "work", "year": 2023}),
    ("ship", "The container ship docked in the harbour at dawn.", {"topic": "travel", "year": 2022}),
]


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


class TableEmbeddings(Embeddings):
    """A local embedding for tests: each known text maps to a fixed vector."""

    def __init__(self, table: dict[str, list[float]]) -> None:
        self.table = table
        self.calls = 0

    def embed_documents(self, texts: list[str]) -> list[list[float]]:
        self.calls += 1
        return [self.table[t] for t in texts]

    def embed_query(self, text: str) -> list[float]:
        self.calls += 1
        return self.table[text]


def unit(*values: float) -> list[float]:
    v = np.asarray(values, np.float64)
    return [float(x) for x in v / np.linalg.norm(v)]


@pytest.fixture
def pets(server: ServerProcess) -> ShoalVectorStore:
    store = ShoalVectorStore(url=server.url, collection=unique("lc"))
    ids = store.add_texts([t for _, t, _ in PETS], [m for _, _, m in PETS], ids=[i for i, _, _ in PETS])
    assert ids == [i for i, _, _ in PETS]
    return store


def test_is_a_real_vector_store_with_server_side_embedding(pets: ShoalVectorStore) -> None:
    assert isinstance(pets, VectorStore) and pets.embeddings is None
    docs = pets.similarity_search("a kitten napping by the window", k=2)
    assert len(docs) == 2 and docs[0].id == "cat"
    assert docs[0].page_content == PETS[0][1] and docs[0].metadata == {"topic": "animals", "year": 2021}
    scored = pets.similarity_search_with_score("a kitten napping by the window", k=4)
    scores = [s for _, s in scored]
    assert scores == sorted(scores, reverse=True) and len(scored) == 4


def test_filter_is_a_shoal_where_and_results_stay_in_score_order(pets: ShoalVectorStore) -> None:
    scored = pets.similarity_search_with_score("animals playing", k=4, filter={"topic": "animals"})
    assert {d.id for d, _ in scored} == {"cat", "dog"}
    assert scored[0][1] >= scored[1][1]
    recent = pets.similarity_search(
        "anything", k=4, filter={"$and": [{"year": {"$gte": 2022}}, {"topic": {"$ne": "work"}}]}
    )
    assert {d.id for d in recent} == {"dog", "ship"}
    with pytest.raises(BadRequest):
        pets.similarity_search("anything", filter={"year": {"$regex": "x"}})
    with pytest.raises(ValueError, match="unknown search option"):
        pets.similarity_search("anything", fliter={"topic": "work"})


def test_delete_by_ids_and_by_filter(pets: ShoalVectorStore) -> None:
    assert pets.delete(["cat"]) is True
    assert "cat" not in {d.id for d in pets.similarity_search("a kitten napping", k=4)}
    assert [d.id for d in pets.get_by_ids(["cat", "dog"])] == ["dog"]
    assert pets.delete(filter={"topic": "animals"}) is True
    assert {d.id for d in pets.similarity_search("anything", k=4)} == {"tax", "ship"}
    with pytest.raises(ValueError, match="exactly one"):
        pets.delete()
    pets.delete_collection()
    assert pets.similarity_search("anything") == []  # recreated empty on use


def test_a_collection_dropped_elsewhere_is_created_again(server: ServerProcess) -> None:
    name = unique("lcdrop")
    store = ShoalVectorStore(url=server.url, collection=name)
    store.add_texts(["first text"], ids=["one"])
    with SyncShoalHTTP(server.url) as other:
        other.drop_collection(name)
    assert store.similarity_search("first") == []
    store.client.drop_collection(name)
    assert store.add_texts(["second text"], ids=["two"]) == ["two"]
    assert [d.id for d in store.similarity_search("second")] == ["two"]


def test_from_texts_then_retriever_invoke(server: ServerProcess) -> None:
    store = ShoalVectorStore.from_texts(
        [t for _, t, _ in PETS],
        metadatas=[m for _, _, m in PETS],
        ids=[i for i, _, _ in PETS],
        url=server.url,
        collection=unique("lcret"),
    )
    retriever = store.as_retriever(search_kwargs={"k": 1})
    assert [d.id for d in retriever.invoke("when are taxes due?")] == ["tax"]
    assert [d.id for d in store.as_retriever(search_kwargs={"k": 2, "filter": {"topic": "travel"}}).invoke("x")] == [
        "ship"
    ]
    threshold = store.as_retriever(
        search_type="similarity_score_threshold", search_kwargs={"k": 4, "score_threshold": 0.4}
    )
    relevant = threshold.invoke("a kitten napping by the window")
    assert [d.id for d in relevant] == ["cat"]
    relevance = store.similarity_search_with_relevance_scores("a kitten napping by the window", k=4)
    raw = store.similarity_search_with_score("a kitten napping by the window", k=4)
    # Cosine: the relevance is Shoal's score (a cosine similarity) clamped to 0..1.
    assert [r for _, r in relevance] == pytest.approx([min(1.0, max(0.0, s)) for _, s in raw])
    with pytest.raises(ValueError, match="only go with search_type 'hybrid'"):
        store.search("x", search_type="keyword", alpha=0.5)
    with pytest.raises(ValueError, match="search_type of nosuch not allowed"):
        store.as_retriever(search_type="nosuch")


def test_keyword_and_hybrid_search_types(server: ServerProcess) -> None:
    """Shoal's own search modes, through `search`, `search_with_score` and a retriever: keyword finds
    an exact identifier that embeddings blur, hybrid fuses both sides on the server."""
    store = ShoalVectorStore(url=server.url, collection=unique("lchyb"))
    store.add_texts(
        [
            "libxml2 fails to parse the v1.2 manifest",
            "the parser library crashed on a config file",
            "a kitten sleeps in the sun",
        ],
        metadatas=[{"kind": "bug"}, {"kind": "bug"}, {"kind": "pet"}],
        ids=["exact", "vague", "pet"],
    )
    keyword = store.search_with_score("libxml2", search_type="keyword", k=3)
    assert [d.id for d, _ in keyword] == ["exact"]  # only documents holding the term
    assert keyword[0][1] > 0
    hybrid = store.search("libxml2 manifest", search_type="hybrid", k=3, fusion="weighted", alpha=0.5)
    assert hybrid[0].id == "exact" and {d.id for d in hybrid} == {"exact", "vague", "pet"}
    filtered = store.search("parser", search_type="hybrid", k=3, filter={"kind": "pet"})
    assert [d.id for d in filtered] == ["pet"]  # the filter holds on both sides
    retriever = store.as_retriever(search_type="hybrid", search_kwargs={"k": 2, "fusion": "rrf", "rrf_k": 10})
    assert retriever.invoke("libxml2 manifest")[0].id == "exact"
    assert [d.id for d in store.as_retriever(search_type="keyword").invoke("kitten")] == ["pet"]
    with pytest.raises(BadRequest):  # alpha out of range: the server's own check
        store.search("x", search_type="hybrid", fusion="weighted", alpha=2.0)
    store.delete_collection()


def test_add_documents_keeps_ids_and_round_trips_nested_metadata(server: ServerProcess) -> None:
    store = ShoalVectorStore(url=server.url, collection=unique("lcmeta"))
    metadata = {"source": "a.txt", "page": 3, "tags": ["x", "y"], "pos": {"line": 4, "cols": [1, 2]}, "none": None}
    ids = store.add_documents([Document(page_content="hello world", metadata=metadata, id="d1"), Document("no id")])
    assert ids[0] == "d1" and len(ids[1]) == 32
    [doc] = store.get_by_ids(["d1"])
    assert doc.metadata == metadata and doc.page_content == "hello world"
    # Flat values are filterable; the rest travel JSON-encoded under the reserved key.
    assert [d.id for d in store.similarity_search("hello", filter={"page": 3})] == ["d1"]
    raw = store.client.get(store.collection, ["d1"])[0]["metadata"]
    assert set(raw) == {"source", "page", "tags", JSON_KEY}
    with pytest.raises(ValueError, match="reserved"):
        store.add_texts(["x"], [{JSON_KEY: "x"}])
    with pytest.raises(ValueError, match="cannot be stored"):
        store.add_texts(["x"], [{"when": object()}])


def test_client_side_embedding_creates_the_collection_with_its_dimension(server: ServerProcess) -> None:
    table = {
        "q": [1.0, 0.0, 0.0],
        "a": unit(1, 0.01, 0),
        "a2": unit(1, 0.02, 0),
        "b": unit(0.7, 0.7, 0),
        "c": unit(0, 0, 1),
    }
    embeddings = TableEmbeddings(table)
    name = unique("lcvec")
    store = ShoalVectorStore(url=server.url, collection=name, embedding=embeddings)
    store.add_texts(["a", "a2", "b", "c"], ids=["a", "a2", "b", "c"])
    with SyncShoalHTTP(server.url) as db:
        info = {c.name: c for c in db.list_collections()}[name]
    assert (info.dim, info.count) == (3, 4)
    assert [d.id for d in store.similarity_search("q", k=2)] == ["a", "a2"]
    assert [d.id for d in store.similarity_search_by_vector([0.0, 0.0, 1.0], k=1)] == ["c"]
    # Among the 3 nearest (a, a2, b), MMR trades the near-duplicate a2 for the more different b;
    # among all 4 it takes c, orthogonal to a.
    assert [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=3, lambda_mult=0.3)] == ["a", "b"]
    assert [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=4, lambda_mult=0.3)] == ["a", "c"]
    assert [d.id for d in store.max_marginal_relevance_search("q", k=2, fetch_k=4, lambda_mult=1.0)] == ["a", "a2"]
    assert [
        d.id
        for d in store.as_retriever(search_type="mmr", search_kwargs={"k": 2, "fetch_k": 3, "lambda_mult": 0.3}).invoke(
            "q"
        )
    ] == [
        "a",
        "b",
    ]
    other = ShoalVectorStore(url=server.url, collection=name, embedding=TableEmbeddings({"x": [1.0, 0.0]}))
    with pytest.raises(ValueError, match="3-dimensional"):
        other.add_texts(["x"])
    assert store.client.count(name) == 4  # nothing written by the refused store


def test_mmr_with_server_side_embedding_skips_duplicates(server: ServerProcess) -> None:
    store = ShoalVectorStore(url=server.url, collection=unique("lcmmr"))
    store.add_texts(
        ["The cat sleeps on the mat.", "The cat sleeps on the mat.", "A dog barks at the mailman."],
        ids=["cat1", "cat2", "dog"],
    )
    plain = {d.id for d in store.similarity_search("a cat sleeping on a mat", k=2)}
    assert plain == {"cat1", "cat2"}
    diverse = [d.id for d in store.max_marginal_relevance_search("a cat sleeping on a mat", k=2, fetch_k=3)]
    assert diverse[0] in {"cat1", "cat2"} and diverse[1] == "dog"


async def test_async_variants(server: ServerProcess) -> None:
    store = await ShoalVectorStore.afrom_texts(
        [t for _, t, _ in PETS],
        metadatas=[m for _, _, m in PETS],
        ids=[i for i, _, _ in PETS],
        url=server.url,
        collection=unique("lcasync"),
    )
    assert [d.id for d in await store.asimilarity_search("when are taxes due?", k=1)] == ["tax"]
    scored = await store.asimilarity_search_with_score("animals", k=4, filter={"topic": "animals"})
    assert {d.id for d, _ in scored} == {"cat", "dog"} and scored[0][1] >= scored[1][1]
    assert [d.id for d in await store.as_retriever(search_kwargs={"k": 1}).ainvoke("a ship in port")] == ["ship"]
    more = await store.aadd_documents(
        [Document("Rain is expected all weekend.", metadata={"topic": "weather"}, id="rain")]
    )
    assert more == ["rain"]
    assert [d.id for d in await store.asimilarity_search("will it rain on saturday", k=1)] == ["rain"]
    mmr = await store.amax_marginal_relevance_search("animals", k=2, fetch_k=4)
    assert len(mmr) == 2
    assert await store.adelete(["rain"]) is True
    assert [d.id for d in await store.aget_by_ids(["rain", "tax"])] == ["tax"]
    hybrid = await store.asearch("ship", search_type="hybrid", k=1, fusion="rrf")
    assert [d.id for d in hybrid] == ["ship"]
    store.close()
