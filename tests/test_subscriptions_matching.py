"""The vectorised matcher against brute force, and a subscriber's bounded buffer, without I/O."""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import numpy as np
import pytest

from actors.exact import row_norms
from actors.matching import StandingQuery, compile_queries, doc_batch, match
from actors.subscriber import ChangeEvent, Lagged, MatchEvent, Subscriber, Upserted
from actors.subscriptions import _change_events, _chunks
from models.filters import parse_where, parse_where_text
from models.records import Change, DocId, Metric, Seq, StoredDoc

pytestmark = pytest.mark.timeout(60)

WHERES: list[dict[str, Any] | None] = [None, {"kind": "a"}, {"n": {"$gte": 5}}, {"$or": [{"kind": "b"}, {"n": 1}]}]
TEXTS: list[dict[str, str] | None] = [None, {"$contains": "red"}, {"$not_contains": "red"}]


def brute_scores(q: np.ndarray, v: np.ndarray, metric: Metric) -> np.ndarray:
    q64, v64 = q.astype(np.float64), v.astype(np.float64)
    if metric is Metric.IP:
        return q64 @ v64.T
    if metric is Metric.COSINE:
        qn = q64 / np.linalg.norm(q64, axis=1, keepdims=True)
        vn = v64 / np.linalg.norm(v64, axis=1, keepdims=True)
        return qn @ vn.T
    return -np.linalg.norm(q64[:, None, :] - v64[None, :, :], axis=2)


def passes(where: dict[str, Any] | None, text: dict[str, str] | None, meta: dict[str, Any], body: str | None) -> bool:
    ok = True
    if where == {"kind": "a"}:
        ok = meta.get("kind") == "a"
    elif where == {"n": {"$gte": 5}}:
        ok = meta.get("n", -1) >= 5
    elif where is not None:
        ok = meta.get("kind") == "b" or meta.get("n") == 1
    if text is not None and ok:
        if body is None:
            return False
        ok = ("red" in body) != ("$not_contains" in text)
    return ok


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.IP, Metric.L2])
def test_match_500_queries_x_100_docs_equals_brute_force(metric: Metric) -> None:
    rng = np.random.default_rng(42)
    dim, n_subs, n_docs = 16, 500, 100
    q = rng.normal(size=(n_subs, dim)).astype(np.float32)
    v = rng.normal(size=(n_docs, dim)).astype(np.float32)
    v[7] = q[3]  # an exact duplicate: cosine 1, l2 distance 0
    exact = brute_scores(q, v, metric)
    # Thresholds around each query's 80th percentile, so roughly a fifth of the pairs pass.
    thresholds = np.quantile(exact, 0.8, axis=1)
    wheres = [WHERES[i % len(WHERES)] for i in range(n_subs)]
    texts = [TEXTS[(i // 4) % len(TEXTS)] for i in range(n_subs)]
    metas = [{"kind": "ab"[i % 2], "n": i % 10} for i in range(n_docs)]
    bodies = [None if i % 5 == 0 else ("red fox" if i % 3 == 0 else "blue sky") for i in range(n_docs)]
    queries = [
        StandingQuery(
            q[i],
            float(thresholds[i]),
            None if wheres[i] is None else parse_where(wheres[i]),
            None if texts[i] is None else parse_where_text(texts[i]),
        )
        for i in range(n_subs)
    ]
    compiled = compile_queries(queries, metric, dim)
    assert len(compiled.filters) == len(WHERES) * len(TEXTS)  # grouped: each filter evaluated once
    found = match(compiled, doc_batch(list(v), bodies, metas))

    got: dict[tuple[int, int], tuple[float, float]] = {}
    for chunk in found:
        pairs = list(zip(chunk.queries.tolist(), chunk.docs.tolist(), strict=True))
        assert pairs == sorted(pairs), "pairs come ordered by query, then document (seq)"
        for (qi, di), s, d in zip(pairs, chunk.scores.tolist(), chunk.distances.tolist(), strict=True):
            got[(qi, di)] = (s, d)
    expected = {
        (i, j)
        for i in range(n_subs)
        for j in range(n_docs)
        if exact[i, j] >= thresholds[i] and passes(wheres[i], texts[i], metas[j], bodies[j])
    }
    # float32 rounding may flip a pair sitting right on its threshold; nothing else may differ.
    differ = set(got) ^ expected
    assert all(abs(exact[i, j] - thresholds[i]) < 1e-4 for i, j in differ), sorted(differ)[:5]
    assert len(expected) > 1000
    for (i, j), (score, dist) in got.items():
        assert score >= thresholds[i], "a match's reported score always reaches its threshold"
        assert score == pytest.approx(exact[i, j], abs=1e-4)
        want = -score if metric is Metric.L2 else 1.0 - score
        assert dist == pytest.approx(want, abs=1e-6)
    if metric is not Metric.IP:
        assert got[(3, 7)][0] == pytest.approx(1.0 if metric is Metric.COSINE else 0.0, abs=1e-5)


def test_filters_are_grouped_type_strictly() -> None:
    vec = np.ones(4, np.float32)
    one = StandingQuery(vec, 0.0, parse_where({"a": 1}), None)
    true = StandingQuery(vec, 0.0, parse_where({"a": True}), None)
    compiled = compile_queries([one, true, one], Metric.COSINE, 4)
    assert len(compiled.filters) == 2
    assert compiled.groups.tolist() == [0, 1, 0]
    found = match(compiled, doc_batch([vec, vec], [None, None], [{"a": 1}, {"a": True}]))
    pairs = {(int(q), int(d)) for c in found for q, d in zip(c.queries, c.docs, strict=True)}
    assert pairs == {(0, 0), (1, 1), (2, 0)}


def test_l2_threshold_is_exact_near_duplicates() -> None:
    base = np.full(64, 100.0, np.float32)
    near = base.copy()
    near[0] += 0.001  # distance 0.001: the |q|^2 - 2qv + |v|^2 expansion loses it entirely
    queries = [StandingQuery(base, -0.0005, None, None), StandingQuery(base, -0.002, None, None)]
    found = match(compile_queries(queries, Metric.L2, 64), doc_batch([near], [None], [{}]))
    pairs = [(int(q), float(s)) for c in found for q, s in zip(c.queries, c.scores, strict=True)]
    assert [p[0] for p in pairs] == [1]
    assert pairs[0][1] == pytest.approx(-0.001, rel=1e-2)
    # A positive l2 threshold can never be reached (score = -distance <= 0).
    positive = compile_queries([StandingQuery(base, 0.5, None, None)], Metric.L2, 64)
    assert match(positive, doc_batch([base], [None], [{}])) == []


def test_cosine_matches_unnormalised_vectors() -> None:
    q = np.array([3.0, 0.0], np.float32)
    found = match(
        compile_queries([StandingQuery(q, 0.7, None, None)], Metric.COSINE, 2),
        doc_batch([np.array([10.0, 10.0], np.float32), np.array([0.1, 0.0], np.float32)], [None, None], [{}, {}]),
    )
    assert [int(d) for c in found for d in c.docs] == [0, 1]
    assert float(found[0].scores[0]) == pytest.approx(np.sqrt(0.5), abs=1e-6)
    assert row_norms(np.ones((1, 4), np.float32))[0] == pytest.approx(2.0)


# --- the subscriber's buffer ---------------------------------------------------------------------


def _collection(last_seq: int = 0) -> Any:
    return SimpleNamespace(name="c", metric=Metric.COSINE, last_seq=last_seq)


def _event(seq: int) -> MatchEvent:
    doc = StoredDoc(DocId(f"d{seq}"), None, np.ones(2, np.float32), {}, Seq(seq))
    return MatchEvent(Upserted(doc), 1.0, 0.0)


def test_overflow_is_reported_once_where_the_gap_is() -> None:
    sub = Subscriber("s1", _collection(), "match", None, frozenset(), capacity=3, close_on_overflow=False)
    sub.go_live()
    for seq in range(1, 7):  # 1..3 fit, 4..6 dropped
        sub.offer(_event(seq))
    assert sub.dropped_total == 3
    assert [getattr(i, "seq", None) for i in sub.take(2)] == [1, 2]
    sub.offer(_event(7))  # room again: the gap goes before it
    items = sub.take(10)
    assert [type(i).__name__ for i in items] == ["MatchEvent", "Lagged", "MatchEvent"]
    assert isinstance(items[1], Lagged) and items[1].dropped == 3
    assert sub.take(10) == [] and not sub.closed


def test_overflow_closes_an_sse_subscriber() -> None:
    sub = Subscriber("s1", _collection(), "match", None, frozenset(), capacity=2, close_on_overflow=True)
    closed: list[str | None] = []
    sub.close_hooks.append(lambda s: closed.append(s.reason))
    for seq in range(1, 4):
        sub.offer(_event(seq))
    assert sub.closed and sub.reason == "lagged" and closed == ["lagged"]
    assert [getattr(i, "seq", None) for i in sub.take(10)] == [1, 2]  # what was buffered is readable
    assert sub.finished


def test_live_from_skips_what_replay_covers() -> None:
    sub = Subscriber("s1", _collection(), "changes", None, frozenset(), capacity=10, close_on_overflow=True)
    sub.live_from = 5
    sub.offer(_event(5))
    sub.offer(ChangeEvent("upsert", 3, (DocId("a"), DocId("b"), DocId("c"), DocId("d"))))  # seqs 3..6
    sub.offer(_event(6))
    items = sub.take(10)
    assert items[0] == ChangeEvent("upsert", 6, (DocId("d"),))
    assert [i.seq for i in items if isinstance(i, MatchEvent | ChangeEvent)] == [6, 6]


def test_change_events_are_cut_at_op_changes_and_gaps() -> None:
    def change(seq: int, op: str) -> Change:
        return Change(Seq(seq), op, DocId(f"x{seq}"), None, None, None)  # type: ignore[arg-type]

    log = [change(1, "upsert"), change(2, "upsert"), change(3, "delete"), change(5, "delete"), change(6, "upsert")]
    events = _change_events(log)
    assert [(e.op, e.first_seq, e.seq, len(e.ids)) for e in events] == [
        ("upsert", 1, 2, 2),
        ("delete", 3, 3, 1),
        ("delete", 5, 5, 1),
        ("upsert", 6, 6, 1),
    ]
    many = _chunks("upsert", [(DocId(str(i)), i) for i in range(1, 1202)])
    assert [len(e.ids) for e in many] == [500, 500, 201] and many[-1].seq == 1201
