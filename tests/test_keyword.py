"""Keyword search: the tokenizer, BM25 against bm25s, and end to end through a real server."""

from __future__ import annotations

import shutil
import uuid
from collections.abc import Iterator
from contextlib import contextmanager

import bm25s
import numpy as np
import pytest

from actors.keyword_index import KeywordIndex, query_terms, tokenize
from shoal_client import ShoalClient
from shoal_client.errors import BadRequest
from tests.server_process import ServerProcess, metric, temp_data_dir

pytestmark = pytest.mark.timeout(180)
DIM = 8


def unique(prefix: str) -> str:
    return f"{prefix}_{uuid.uuid4().hex[:8]}"


def vec(seed: int) -> list[float]:
    return np.random.default_rng(seed).standard_normal(DIM).astype(np.float32).tolist()


# -- the tokenizer and the index ------------------------------------------------------------------


def test_tokenizer_keeps_identifiers_findable() -> None:
    terms = tokenize("Parsing with LibXML2 in UTF-8, see v1.2 (e.g. the Über-Straße).")
    for term in ("parsing", "libxml2", "utf-8", "utf", "8", "v1.2", "v1", "2", "über-strasse"):
        assert term in terms, (term, terms)
    assert "with" not in terms and "the" not in terms  # stop words
    assert query_terms("the of and , . !") == ()
    assert query_terms("Cat cat CAT") == ("cat",)


def test_bm25_saturates_term_frequency_and_weighs_rare_terms() -> None:
    index = KeywordIndex()
    index.set(0, "apple banana")
    index.set(1, "apple apple apple apple apple apple banana")
    index.set(2, "apple cherry")
    index.set(3, "banana durian")
    scores, matched = index.scores(["apple"], 4)
    assert matched.tolist() == [True, True, True, False]
    # Six times the term is not six times the score (saturation), yet still more.
    assert scores[0] < scores[1] < 3 * scores[0]
    rare, _ = index.scores(["cherry"], 4)
    common, _ = index.scores(["apple"], 4)
    assert rare[2] > common[2]  # same length, rarer term: higher IDF


def test_scores_match_bm25s_on_the_same_tokens() -> None:
    rng = np.random.default_rng(7)
    words = [f"w{i}" for i in range(60)]
    texts = [" ".join(rng.choice(words, size=int(rng.integers(3, 30)))) for _ in range(200)]
    index = KeywordIndex()
    for label, text in enumerate(texts):
        index.set(label, text)
    reference = bm25s.BM25(k1=1.5, b=0.75, method="lucene")
    reference.index([tokenize(t) for t in texts], show_progress=False)
    for query in (["w3"], ["w1", "w17"], ["w5", "w5x", "w40"]):
        ours, _ = index.scores(query, len(texts))
        theirs = reference.get_scores(query)
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5)


def test_replace_remove_save_load() -> None:
    index = KeywordIndex()
    index.set(0, "alpha beta")
    index.set(1, "beta gamma")
    index.set(0, "delta")  # replaced: alpha is gone
    assert not index.scores(["alpha"], 2)[1].any()
    index.remove(1)
    assert not index.scores(["gamma"], 2)[1].any()
    index.set(5000, "far label alpha")  # grows past its arrays
    restored = KeywordIndex.load(index.save())
    for terms in (["delta"], ["alpha"], ["beta"]):
        np.testing.assert_array_equal(restored.scores(terms, 5001)[0], index.scores(terms, 5001)[0])


# -- end to end -----------------------------------------------------------------------------------

DOCS = [
    ("xml", "This build links libxml2 for parsing the feeds."),
    ("enc", "Every file is stored as UTF-8 without a byte order mark."),
    ("ver", "Release v1.2 fixed the crash on start."),
    ("cat", "A cat sleeps on the warm windowsill all afternoon."),
    ("dog", "The dog barks at the cat next door."),
]


async def _collection(client: ShoalClient) -> str:
    name = unique("kw")
    await client.create_collection(name, dim=DIM)
    docs = [{"id": i, "text": t, "vector": vec(n), "metadata": {"n": n}} for n, (i, t) in enumerate(DOCS)]
    await client.upsert(name, docs)
    return name


async def test_keyword_finds_identifiers(client: ShoalClient) -> None:
    name = await _collection(client)
    for query, expected in (("libxml2", "xml"), ("utf-8", "enc"), ("UTF-8", "enc"), ("v1.2", "ver")):
        result = await client.query(name, text=query, mode="keyword", k=3)
        assert [h.id for h in result.hits] == [expected], (query, result.hits)
        hit = result.hits[0]
        assert hit.distance is None and hit.scores is not None
        assert hit.scores.keyword == pytest.approx(hit.score) and hit.scores.vector is None
    hits = (await client.query(name, text="cat", mode="keyword", k=10)).hits
    assert {h.id for h in hits} == {"cat", "dog"}  # only documents holding a term
    assert hits[0].score >= hits[1].score > 0


async def test_keyword_filters_and_stop_words(client: ShoalClient) -> None:
    name = await _collection(client)
    hits = (await client.query(name, text="cat", mode="keyword", where={"n": {"$gte": 4}})).hits
    assert [h.id for h in hits] == ["dog"]
    hits = (await client.query(name, text="cat", mode="keyword", where_text={"$contains": "warm"})).hits
    assert [h.id for h in hits] == ["cat"]
    assert (await client.query(name, text="the of and", mode="keyword")).hits == []
    assert (await client.query(name, text="?!, ...", mode="keyword")).hits == []


async def test_acked_writes_are_found_by_keyword_at_once(client: ShoalClient) -> None:
    name = await _collection(client)
    for i in range(20):
        word = f"zebra{i}"
        await client.upsert(name, [{"id": f"z{i}", "text": f"a note about {word}", "vector": vec(100 + i)}])
        assert [h.id for h in (await client.query(name, text=word, mode="keyword")).hits] == [f"z{i}"]
    # Re-upsert replaces the text: the old word no longer finds it, the new one does.
    await client.upsert(name, [{"id": "z3", "text": "now about giraffes", "vector": vec(3)}])
    assert (await client.query(name, text="zebra3", mode="keyword")).hits == []
    assert [h.id for h in (await client.query(name, text="giraffes", mode="keyword")).hits] == ["z3"]
    # A vector-only document has no text: keyword search never finds it.
    await client.upsert(name, [{"id": "z4", "vector": vec(4)}])
    assert (await client.query(name, text="zebra4", mode="keyword")).hits == []
    await client.delete(name, ids=["z5"])
    assert (await client.query(name, text="zebra5", mode="keyword")).hits == []
    await client.request("delete", collection=name, where_text={"$contains": "zebra6"})
    assert (await client.query(name, text="zebra6", mode="keyword")).hits == []


async def test_keyword_bad_input(client: ShoalClient) -> None:
    name = await _collection(client)
    bad = [
        {"mode": "keyword"},  # no text
        {"mode": "keyword", "vector": vec(1)},
        {"mode": "keyword", "text": "cat", "vector": vec(1)},
        {"mode": "keyword", "text": "cat", "fusion": "rrf"},
        {"mode": "keyword", "text": "cat", "alpha": 0.5},
        {"mode": "keyword", "text": "cat", "ef": 10},
        {"mode": "keyword", "text": ""},
    ]
    for args in bad:
        with pytest.raises(BadRequest):
            await client.request("query", collection=name, **args)


@contextmanager
def own_server() -> Iterator[ServerProcess]:
    """A server on a data directory of its own, for tests that stop, kill and restart it."""
    data_dir = temp_data_dir()
    proc = ServerProcess(data_dir)
    try:
        proc.start()
        yield proc
    finally:
        proc.stop()
        shutil.rmtree(data_dir, ignore_errors=True)


async def test_keyword_index_is_rebuilt_on_restart() -> None:
    with own_server() as proc:
        async with ShoalClient.connect(proc.ws_url) as c:
            name = await _collection(c)
            await c.delete(name, ids=["enc"])
            await c.upsert(name, [{"id": "ver", "text": "Release v2.0 is out", "vector": vec(9)}])
        proc.stop()
        proc.start()
        async with ShoalClient.connect(proc.ws_url) as c:
            assert [h.id for h in (await c.query(name, text="libxml2", mode="keyword")).hits] == ["xml"]
            assert (await c.query(name, text="utf-8", mode="keyword")).hits == []
            assert (await c.query(name, text="v1.2", mode="keyword")).hits == []
            assert [h.id for h in (await c.query(name, text="v2.0", mode="keyword")).hits] == ["ver"]
        # The stop wrote a snapshot and this start loaded it (it did not rebuild from the log).
        assert await metric(proc.url, 'shoal_snapshot_loads_total{result="loaded"}') >= 1


async def test_keyword_index_after_sigkill_holds_every_acked_change() -> None:
    """Changes acked after the last snapshot, then SIGKILL: the start loads the snapshot and
    replays the log past it, and keyword search sees exactly the acked state."""
    with own_server() as proc:
        async with ShoalClient.connect(proc.ws_url) as c:
            name = await _collection(c)
        proc.stop()  # a snapshot of the first state
        proc.start()
        async with ShoalClient.connect(proc.ws_url) as c:
            await c.delete(name, ids=["xml"])
            await c.upsert(name, [{"id": "ver", "text": "Release v3.1 ships libfoo3", "vector": vec(9)}])
            await c.upsert(name, [{"id": f"new{i}", "text": f"crashproof entry {i}", "vector": vec(20 + i)}
                                  for i in range(30)])  # fmt: skip
        proc.kill()
        proc.start()
        async with ShoalClient.connect(proc.ws_url) as c:
            assert (await c.query(name, text="libxml2", mode="keyword")).hits == []
            assert "ver" not in {h.id for h in (await c.query(name, text="v1.2", mode="keyword")).hits}
            assert [h.id for h in (await c.query(name, text="libfoo3", mode="keyword")).hits] == ["ver"]
            found = (await c.query(name, text="crashproof", mode="keyword", k=100)).hits
            assert sorted(h.id for h in found) == sorted(f"new{i}" for i in range(30))
