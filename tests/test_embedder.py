"""The embedding model (real all-MiniLM-L6-v2 int8) and the embedder actor, through its API.

Ordering and batching are observed through a wrapper around the real model that records every
batch and can hold the worker at a gate, so nothing here depends on timing.
"""

from __future__ import annotations

import threading
from collections.abc import AsyncIterator, Callable, Sequence
from contextlib import asynccontextmanager

import anyio
import numpy as np
import pytest
from anyio.abc import TaskStatus
from numpy.typing import NDArray

from actors.embedder import RUN_OVERHEAD_TOKENS, Embedder, EmbeddingModel, plan_runs
from actors.onnx_model import MAX_TOKENS, MiniLM, TokenIds
from models.config import EngineConfig
from models.errors import Overloaded, Unavailable
from models.records import MODEL_DIM

pytestmark = pytest.mark.timeout(60)

Vectors = NDArray[np.float32]

SENTENCES = [
    "a cat sits on the mat",
    "The quarterly tax filing deadline is approaching for small businesses.",
    "Mean pooling averages the token embeddings weighted by the attention mask.",
    "hello",
    "PostgreSQL commits the transaction and the write becomes durable on disk before the ack.",
]


@pytest.fixture(scope="module")
def model() -> MiniLM:
    return MiniLM(intra_threads=1)


def cosine(a: Vectors, b: Vectors) -> float:
    return float(np.dot(a, b) / (np.linalg.norm(a) * np.linalg.norm(b)))


class Recorder:
    """The real model, plus a log of the texts in every batch, a gate that holds chosen batches
    in their worker thread, and failure triggers."""

    def __init__(self, inner: MiniLM, fail_on: str | None = None) -> None:
        self.inner = inner
        self.fail_on = fail_on
        self.calls: list[list[str]] = []
        self.entered = threading.Event()
        self._texts: dict[tuple[int, ...], str] = {}
        self._gate = threading.Event()
        self._gate.set()
        self._gated: Callable[[list[str]], bool] = lambda texts: True

    def hold(self, when: Callable[[list[str]], bool] = lambda texts: True) -> None:
        self._gated = when
        self._gate.clear()

    def release(self) -> None:
        self._gate.set()

    async def wait_entered(self) -> None:
        """Until a batch has reached the model (then re-arms for the next one)."""
        assert await anyio.to_thread.run_sync(self.entered.wait, 10.0)
        self.entered.clear()

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        if self.fail_on is not None and f"tokenizer {self.fail_on}" in texts:
            raise RuntimeError("tokenizer exploded")
        rows = self.inner.tokenize(texts)
        for text, row in zip(texts, rows, strict=True):
            self._texts[tuple(row.tolist())] = text
        return rows

    def encode_ids(self, rows: Sequence[TokenIds]) -> Vectors:
        texts = [self._texts[tuple(r.tolist())] for r in rows]
        self.calls.append(texts)
        self.entered.set()
        if self._gated(texts) and not self._gate.wait(20.0):
            raise TimeoutError("gate never opened")
        if self.fail_on is not None and self.fail_on in texts:
            raise RuntimeError("model exploded")
        return self.inner.encode_ids(rows)


@asynccontextmanager
async def running(factory: Callable[[], EmbeddingModel], **config: int) -> AsyncIterator[tuple[Embedder, anyio.Event]]:
    """A started embedder; on exit it is closed and its `run()` must have returned."""
    embedder = Embedder(EngineConfig(**config), model_factory=factory)
    finished = anyio.Event()

    async def run(*, task_status: TaskStatus[None]) -> None:
        try:
            await embedder.run(task_status=task_status)
        finally:
            finished.set()

    with anyio.fail_after(30):
        async with anyio.create_task_group() as tg:
            await tg.start(run)
            try:
                yield embedder, finished
            finally:
                embedder.close()


async def until(condition: Callable[[], bool]) -> None:
    """Polls a condition on the actor's state (bounded by the test's timeout)."""
    with anyio.fail_after(10):
        while not condition():
            await anyio.sleep(0.002)


def queued(embedder: Embedder) -> tuple[int, int]:
    """(queries, bulk chunks) waiting in the lanes."""
    return (
        embedder._query_rx.statistics().current_buffer_used,
        embedder._bulk_rx.statistics().current_buffer_used,
    )


# ------------------------------------------------------------------------------ the model


def test_vectors_are_unit_length_384d(model: MiniLM) -> None:
    vectors = model.encode(SENTENCES)
    assert vectors.shape == (len(SENTENCES), MODEL_DIM)
    assert vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert model.encode([]).shape == (0, MODEL_DIM)


def test_close_meanings_score_higher(model: MiniLM) -> None:
    cat, kitten, tax = model.encode(
        ["a cat sits on the mat", "a kitten is on the rug", "quarterly tax filing deadline"]
    )
    assert cosine(cat, kitten) > 0.5
    assert cosine(cat, kitten) > cosine(cat, tax) + 0.3
    assert cosine(cat, kitten) > cosine(kitten, tax) + 0.3


def test_batching_and_padding_do_not_change_results(model: MiniLM) -> None:
    long_texts = [" ".join(["padding makes every other row in this batch much longer"] * k) for k in (3, 8, 20)]
    for text in SENTENCES:
        alone = model.encode([text])[0]
        batched = model.encode([*long_texts, text, *long_texts])[len(long_texts)]
        assert cosine(alone, batched) > 0.999


def test_padding_is_to_the_longest_not_to_128(model: MiniLM) -> None:
    counts = model.token_counts(["hello", "hello world"])
    assert counts == [3, 4]  # [CLS] hello [SEP]: the shipped tokenizer.json would pad to 128


def test_truncation_at_256_tokens(model: MiniLM) -> None:
    words = [f"word{i % 97}" if i % 3 else "river" for i in range(5000)]
    huge = " ".join(words)
    assert model.token_counts([huge]) == [MAX_TOKENS]
    assert model.token_counts([" ".join(["river"] * 200)]) == [202]  # not cut at the file's 128
    vectors = model.encode([huge, " ".join(words[:600])])
    assert vectors.shape == (2, MODEL_DIM)
    # Both are cut to the same first 256 tokens, so they embed identically.
    assert cosine(vectors[0], vectors[1]) > 0.9999


# ------------------------------------------------------------------------------ the actor


async def test_actor_matches_the_model_in_caller_order(model: MiniLM) -> None:
    texts = [f"{s} (variant {i})" if i % 2 else s for i, s in enumerate(SENTENCES * 5)]
    expected = model.encode(texts)
    async with running(lambda: model, embed_batch=4) as (embedder, _):
        got = await embedder.embed_documents(texts)
        query = await embedder.embed_query(SENTENCES[2])
        empty = await embedder.embed_documents([])
        huge = await embedder.embed_query(" ".join(["river"] * 5000))
    assert got.shape == (len(texts), MODEL_DIM)
    for i in range(len(texts)):
        assert cosine(got[i], expected[i]) > 0.999
    assert query.shape == (MODEL_DIM,)
    assert cosine(query, expected[2]) > 0.999
    assert empty.shape == (0, MODEL_DIM)
    assert cosine(huge, model.encode([" ".join(["river"] * 300)])[0]) > 0.9999


async def test_queries_jump_ahead_of_queued_bulk(model: MiniLM) -> None:
    recorder = Recorder(model)
    done: list[str] = []
    texts = [f"document number {i} about rivers and mountains" for i in range(40)]
    question = "where do rivers start?"
    config = {"embed_batch": 4, "embed_workers": 1, "embed_express_slots": 0, "embed_queue": 64}
    async with running(lambda: recorder, **config) as (embedder, _):
        recorder.hold()
        async with anyio.create_task_group() as tg:

            async def bulk() -> None:
                await embedder.embed_documents(texts)
                done.append("bulk")

            async def query() -> None:
                await embedder.embed_query(question)
                done.append("query")

            tg.start_soon(bulk)
            await recorder.wait_entered()
            await until(lambda: queued(embedder) == (0, 9))  # one chunk runs, nine wait
            tg.start_soon(query)
            await until(lambda: queued(embedder) == (1, 9))
            recorder.release()
    assert done == ["query", "bulk"]
    assert len(recorder.calls[0]) == 4
    assert recorder.calls[1] == [question]  # next in line, ahead of nine queued chunks
    assert sorted(t for call in recorder.calls[2:] for t in call) == sorted(set(texts) - set(recorder.calls[0]))


async def test_a_query_does_not_wait_for_busy_workers(model: MiniLM) -> None:
    recorder = Recorder(model)
    texts = [f"ingested text {i}" for i in range(8)]
    async with running(lambda: recorder, embed_batch=4, embed_workers=1, embed_express_slots=1) as (
        embedder,
        _,
    ):
        recorder.hold(when=lambda batch: batch[0].startswith("ingested"))
        async with anyio.create_task_group() as tg:
            tg.start_soon(embedder.embed_documents, texts)
            await recorder.wait_entered()
            # The only worker is held by a bulk batch; the query runs beside it, on the express slot.
            vector = await embedder.embed_query("is anyone there?")
            assert vector.shape == (MODEL_DIM,)
            assert embedder.stats.express_batches == 1
            assert embedder.stats.bulk_texts == 0
            recorder.release()
    assert recorder.calls[1] == ["is anyone there?"]


async def test_pending_queries_form_one_batch(model: MiniLM) -> None:
    recorder = Recorder(model)
    async with running(lambda: recorder, embed_batch=16, embed_workers=1, embed_express_slots=0) as (
        embedder,
        _,
    ):
        recorder.hold()
        results: dict[int, Vectors] = {}
        async with anyio.create_task_group() as tg:

            async def query(i: int) -> None:
                results[i] = await embedder.embed_query(f"{SENTENCES[i % len(SENTENCES)]} {i}")

            tg.start_soon(query, 0)
            await recorder.wait_entered()
            for i in range(1, 11):
                tg.start_soon(query, i)
            await until(lambda: queued(embedder) == (10, 0))
            recorder.release()
        assert embedder.stats.largest_batch == 10
    assert [len(call) for call in recorder.calls] == [1, 10]
    for i, vector in results.items():
        assert cosine(vector, model.encode([f"{SENTENCES[i % len(SENTENCES)]} {i}"])[0]) > 0.999


async def test_batches_respect_the_token_budget(model: MiniLM) -> None:
    recorder = Recorder(model)
    texts = [" ".join(["word"] * n) for n in (1, 2, 3, 5, 8, 13, 21, 34, 55, 89, 3, 2, 1)]
    async with running(lambda: recorder, embed_batch=8, embed_batch_tokens=64) as (embedder, _):
        got = await embedder.embed_documents(texts)
    for call in recorder.calls:
        padded = len(call) * max(len(t.split()) + 2 for t in call)
        assert len(call) <= 8
        assert padded <= 64 or len(call) == 1
    assert sum(len(call) for call in recorder.calls) == len(texts)
    expected = model.encode(texts)
    for i in range(len(texts)):
        assert cosine(got[i], expected[i]) > 0.999


def _greedy_sizes(widths: list[int], max_rows: int, max_tokens: int) -> list[int]:
    """Each run filled to its limits: the cut `plan_runs` replaced."""
    sizes, start = [], 0
    while start < len(widths):
        take = min(len(widths) - start, max(1, min(max_rows, max_tokens // widths[start])))
        sizes.append(take)
        start += take
    return sizes


def _plan_cost(widths: list[int], sizes: list[int], overhead: int = RUN_OVERHEAD_TOKENS) -> int:
    cost, start = 0, 0
    for size in sizes:
        cost += widths[start] * size + overhead
        start += size
    return cost


def _cheapest_cost(widths: list[int], max_rows: int, max_tokens: int) -> int:
    """Every way of cutting `widths` into runs within the limits, by brute force."""
    if not widths:
        return 0
    best = None
    for rows in range(1, min(max_rows, len(widths)) + 1):
        if rows > 1 and widths[0] * rows > max_tokens:
            break
        cost = widths[0] * rows + RUN_OVERHEAD_TOKENS + _cheapest_cost(widths[rows:], max_rows, max_tokens)
        best = cost if best is None else min(best, cost)
    assert best is not None
    return best


def test_planned_runs_are_the_cheapest_cut_within_the_limits() -> None:
    rng = np.random.default_rng(7)
    for _ in range(200):
        widths = sorted(rng.integers(1, 90, size=int(rng.integers(0, 11))).tolist(), reverse=True)
        max_rows, max_tokens = int(rng.integers(1, 6)), int(rng.integers(20, 200))
        sizes = plan_runs(widths, max_rows, max_tokens)
        assert sum(sizes) == len(widths)
        start = 0
        for size in sizes:
            assert 1 <= size <= max_rows
            assert size == 1 or widths[start] * size <= max_tokens
            start += size
        assert _plan_cost(widths, sizes) == _cheapest_cost(widths, max_rows, max_tokens)


def test_planned_runs_pad_less_than_filling_each_run() -> None:
    """A request of 500 texts whose token counts spread like real passages' (a long tail):
    filling each run to 16 texts pads short texts to long ones where the sorted lengths fall
    steeply; the plan runs those apart."""
    rng = np.random.default_rng(3)
    counts = np.clip(rng.lognormal(np.log(25), 0.6, size=500), 4, 256).astype(int)
    widths = sorted(counts.tolist(), reverse=True)
    planned, greedy = plan_runs(widths, 16, 1024), _greedy_sizes(widths, 16, 1024)
    assert _plan_cost(widths, planned) < 0.98 * _plan_cost(widths, greedy)


async def test_small_bulk_requests_share_a_run_only_when_it_is_cheaper(model: MiniLM) -> None:
    """Single-text upserts of similar lengths queued behind a running batch go out as one run;
    a long one among them runs apart rather than pad the short ones to its length."""
    recorder = Recorder(model)
    short = ["a short note", "another note", "one more note"]
    long = " ".join(["a long passage that would make every short note in its run pad to it"] * 8)
    async with running(lambda: recorder, embed_batch=16, embed_workers=1, embed_express_slots=0) as (embedder, _):
        recorder.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(embedder.embed_documents, ["running first"])
            await recorder.wait_entered()
            for waiting, text in enumerate([short[0], short[1], long, short[2]], start=1):
                tg.start_soon(embedder.embed_documents, [text])
                await until(lambda n=waiting: queued(embedder)[1] == n)  # in this order
            recorder.release()
    assert recorder.calls == [["running first"], short[:2], [long], [short[2]]]


async def test_concurrent_callers_get_their_own_results(model: MiniLM) -> None:
    docs = [[f"{s} #{caller}-{j}" for j, s in enumerate(SENTENCES)] for caller in range(6)]
    expected = [model.encode(d) for d in docs]
    async with running(lambda: model, embed_batch=8, embed_workers=2) as (embedder, _):
        got: dict[tuple[str, int], Vectors] = {}
        async with anyio.create_task_group() as tg:

            async def bulk(i: int) -> None:
                got["bulk", i] = await embedder.embed_documents(docs[i])

            async def query(i: int) -> None:
                got["query", i] = await embedder.embed_query(docs[i][0])

            for i in range(len(docs)):
                tg.start_soon(bulk, i)
                tg.start_soon(query, i)
    for i in range(len(docs)):
        for j in range(len(SENTENCES)):
            assert cosine(got["bulk", i][j], expected[i][j]) > 0.999
        assert cosine(got["query", i], expected[i][0]) > 0.999


async def test_bulk_requests_are_embedded_in_turn_not_interleaved(model: MiniLM) -> None:
    """Chunks of a bulk request run before those of a request made after it, so the first
    finishes first (and can be committed while the second is embedded)."""
    recorder = Recorder(model)
    docs = {name: [f"{s} ({name} {j})" for j in range(4) for s in SENTENCES] for name in ("first", "second")}
    # A bulk lane of 2 chunks: both requests are still queueing chunks when the model frees up.
    async with running(lambda: recorder, embed_batch=2, embed_workers=1, embed_queue=4) as (embedder, _):
        recorder.hold()  # the first chunk waits in the model, the lane fills, the first waits
        done: list[str] = []
        async with anyio.create_task_group() as tg:

            async def bulk(name: str) -> None:
                await embedder.embed_documents(docs[name])
                done.append(name)

            tg.start_soon(bulk, "first")
            await recorder.wait_entered()
            await until(lambda: queued(embedder)[1] == 2)
            tg.start_soon(bulk, "second")
            await until(lambda: embedder._bulk_admission.statistics().tasks_waiting == 1)
            recorder.release()
    owners = ["first" if text in docs["first"] else "second" for call in recorder.calls for text in call]
    assert owners == ["first"] * 20 + ["second"] * 20
    assert done == ["first", "second"]


async def test_cancelled_callers_do_not_break_the_actor(model: MiniLM) -> None:
    recorder = Recorder(model)
    config = {"embed_batch": 4, "embed_workers": 1, "embed_express_slots": 0}
    async with running(lambda: recorder, **config) as (embedder, _):
        recorder.hold()
        with anyio.CancelScope() as scope:
            async with anyio.create_task_group() as tg:
                tg.start_soon(embedder.embed_query, "running when cancelled")
                await recorder.wait_entered()
                tg.start_soon(embedder.embed_query, "queued when cancelled")
                tg.start_soon(embedder.embed_documents, [f"bulk text {i}" for i in range(10)])
                await until(lambda: queued(embedder) == (1, 3))
                scope.cancel()
        recorder.release()
        vector = await embedder.embed_query("still serving")
        docs = await embedder.embed_documents(["and bulk too", "yes"])
        assert vector.shape == (MODEL_DIM,)
        assert docs.shape == (2, MODEL_DIM)
        # The queued query and the three queued chunks were skipped, not run.
        assert embedder.stats.abandoned == 1 + 10
    assert recorder.calls == [["running when cancelled"], ["still serving"], ["and bulk too", "yes"]]


async def test_model_errors_reach_only_the_affected_callers(model: MiniLM) -> None:
    recorder = Recorder(model, fail_on="BOOM")
    async with running(lambda: recorder, embed_workers=1) as (embedder, _):
        with pytest.raises(RuntimeError, match="model exploded"):
            await embedder.embed_query("BOOM")
        with pytest.raises(RuntimeError, match="model exploded"):
            await embedder.embed_documents(["fine", "BOOM"])
        with pytest.raises(RuntimeError, match="tokenizer exploded"):
            await embedder.embed_documents(["fine", "tokenizer BOOM"])
        assert (await embedder.embed_query("fine")).shape == (MODEL_DIM,)
        assert (await embedder.embed_documents(["fine", "also fine"])).shape == (2, MODEL_DIM)
        assert embedder.stats.failed_batches == 2


async def test_a_failed_model_load_fails_run_and_callers() -> None:
    def broken() -> EmbeddingModel:
        raise FileNotFoundError("no model here")

    embedder = Embedder(EngineConfig(), model_factory=broken)
    with anyio.fail_after(10):
        with pytest.raises(FileNotFoundError):
            await embedder.run()
        with pytest.raises(Unavailable):
            await embedder.embed_documents(["x"])
        with pytest.raises(Unavailable):
            await embedder.embed_query("x")


async def test_full_query_lane_is_overloaded(model: MiniLM) -> None:
    recorder = Recorder(model)
    config = {"embed_workers": 1, "embed_express_slots": 0, "embed_queue": 2}
    async with running(lambda: recorder, **config) as (embedder, _):
        recorder.hold()
        async with anyio.create_task_group() as tg:
            tg.start_soon(embedder.embed_query, "running")
            await recorder.wait_entered()
            tg.start_soon(embedder.embed_query, "queued 1")
            tg.start_soon(embedder.embed_query, "queued 2")
            await until(lambda: queued(embedder) == (2, 0))
            with pytest.raises(Overloaded):
                await embedder.embed_query("one too many")
            recorder.release()


async def test_full_bulk_lane_pushes_back(model: MiniLM) -> None:
    recorder = Recorder(model)
    finished: list[int] = []
    async with running(lambda: recorder, embed_batch=2, embed_workers=1, embed_queue=4) as (embedder, _):
        recorder.hold()
        async with anyio.create_task_group() as tg:

            async def bulk(n: int) -> None:
                await embedder.embed_documents([f"text {i}" for i in range(n)])
                finished.append(n)

            tg.start_soon(bulk, 2)
            await recorder.wait_entered()
            tg.start_soon(bulk, 20)  # ten chunks, the lane holds two: the caller waits
            await until(lambda: embedder._bulk_rx.statistics().tasks_waiting_send == 1)
            assert queued(embedder) == (0, 2)
            assert finished == []
            recorder.release()
    assert finished == [2, 20]


async def test_close_drains_queued_work_and_refuses_new(model: MiniLM) -> None:
    recorder = Recorder(model)
    results: list[int] = []
    config = {"embed_batch": 4, "embed_workers": 1, "embed_express_slots": 0}
    async with running(lambda: recorder, **config) as (embedder, finished):
        recorder.hold()
        async with anyio.create_task_group() as tg:

            async def query(i: int) -> None:
                await embedder.embed_query(f"query {i}")
                results.append(1)

            async def bulk() -> None:
                out = await embedder.embed_documents([f"doc {i}" for i in range(8)])
                results.append(len(out))

            tg.start_soon(query, 0)
            await recorder.wait_entered()
            tg.start_soon(query, 1)
            tg.start_soon(bulk)
            await until(lambda: queued(embedder) == (1, 2))
            embedder.close()
            with pytest.raises(Unavailable):
                await embedder.embed_query("too late")
            with pytest.raises(Unavailable):
                await embedder.embed_documents(["too late"])
            assert not finished.is_set()
            recorder.release()
        await finished.wait()
    assert sorted(results) == [1, 1, 8]


# ------------------------------------------------------------------------------ the benchmark corpus


def test_corpus_passages_keep_prose_and_drop_code() -> None:
    from load.corpus import MAX_PASSAGE_CHARS, passages

    doc = """Frobnicate the widget.

    This function turns every widget into a frobnicated widget. It never fails on valid input!
    See the `reference` manual for all of the details.

    >>> frobnicate(widget)
    <Widget frobnicated=True>

        for x in range(10): print(x)

    - Fixed a crash when the widget was empty and the caller passed no options at all.
      The fix also covers nested widgets.
    """
    import inspect

    got = list(passages(inspect.cleandoc(doc)))
    assert got, "prose passages expected"
    assert all(">>>" not in p and "print(" not in p for p in got)
    assert all(len(p) <= MAX_PASSAGE_CHARS for p in got)
    joined = " ".join(got)
    assert "turns every widget into a frobnicated widget" in joined
    assert "See the reference manual for all of the details." in joined
    assert "Fixed a crash when the widget was empty" in joined and "covers nested widgets." in joined


def test_corpus_ground_truth_is_exact_top_k() -> None:
    from load.corpus import exact_top_k

    rng = np.random.default_rng(7)
    corpus = rng.normal(size=(500, 16)).astype(np.float32)
    corpus /= np.linalg.norm(corpus, axis=1, keepdims=True)
    queries = corpus[:20] + 0.1 * rng.normal(size=(20, 16)).astype(np.float32)
    truth = exact_top_k(corpus, queries, k=10)
    expected = np.argsort(-(queries @ corpus.T), axis=1, kind="stable")[:, :10]
    np.testing.assert_array_equal(truth, expected)
