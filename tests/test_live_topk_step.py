"""`actors.topk.step`, the vectorised move of every top-k list past one batch, checked against exact
search under every metric, with filters and thresholds: lists it updates are exact, lists it
leaves alone are unchanged and still exact, and lists it cannot prove are sent to refill (here an
exact search stands in for the planner's query)."""

from __future__ import annotations

import math

import numpy as np
import pytest

from actors.matching import compile_queries
from actors.topk import TopkList, TopkQuery, make_hit, step
from models.filters import parse_where
from models.records import DocId, Include, Metric, Seq, StoredDoc

DIM = 6
INCLUDE = frozenset({Include.METADATA})
WANTED: dict[int, int] = {}  # id(query) -> the g its filter asks for


def score(metric: Metric, q: np.ndarray, v: np.ndarray) -> float:
    if metric is Metric.COSINE:
        return float(q @ v / (np.linalg.norm(q) * np.linalg.norm(v)))
    if metric is Metric.IP:
        return float(q @ v)
    return -float(np.linalg.norm(q - v))


def exact(metric: Metric, query: TopkQuery, state: dict[str, StoredDoc]) -> list[tuple[str, float]]:
    rows = []
    for doc in state.values():
        if query.where is not None and doc.metadata.get("g") != WANTED[id(query)]:
            continue
        s = score(metric, np.asarray(query.vector), doc.vector)
        if query.threshold is None or s >= query.threshold:
            rows.append((doc.id, s))
    rows.sort(key=lambda r: -r[1])
    return rows[: query.k]


@pytest.mark.parametrize("metric", [Metric.COSINE, Metric.IP, Metric.L2])
def test_step_keeps_every_list_exact(metric: Metric) -> None:
    rng = np.random.default_rng(7)
    seq = 0
    state: dict[str, StoredDoc] = {}

    def new(doc_id: str) -> StoredDoc:
        nonlocal seq
        seq += 1
        vector = rng.normal(size=DIM).astype(np.float32)
        return StoredDoc(DocId(doc_id), None, vector, {"g": int(rng.integers(0, 3))}, Seq(seq))

    for i in range(80):
        state[f"d{i}"] = new(f"d{i}")
    queries = []
    for i in range(12):
        threshold = None if i % 3 else (0.2 if metric is Metric.COSINE else -3.0 if metric is Metric.L2 else 0.5)
        where = parse_where({"g": int(i % 3)}) if i % 4 == 1 else None
        query = TopkQuery(rng.normal(size=DIM).astype(np.float32), 1 + i % 7, threshold, where, None)
        WANTED[id(query)] = int(i % 3)
        queries.append(query)
    lists = [TopkList(q, INCLUDE) for q in queries]

    def refill(lst: TopkList) -> None:
        doc_of = state
        lst.hits = [make_hit(doc_of[i], s, metric, INCLUDE) for i, s in exact(metric, lst.query, state)]

    for lst in lists:
        refill(lst)
    compiled = compile_queries([q.standing() for q in queries], metric, DIM)
    refills = changed = 0
    for _ in range(300):
        ids = list(state)
        changed_ids: set[str] = set()
        if rng.random() < 0.5 or len(state) < 40:  # upserts, new or replacing (members often)
            for _ in range(int(rng.integers(1, 5))):
                pick = rng.random()
                if pick < 0.4 or len(state) < 40:
                    doc_id = f"n{seq}"
                elif pick < 0.7:
                    members = [h.id for lst in lists for h in lst.hits]
                    doc_id = str(rng.choice(members)) if members else str(rng.choice(ids))
                else:
                    doc_id = str(rng.choice(ids))
                state[doc_id] = new(doc_id)
                changed_ids.add(doc_id)
        else:  # deletes
            members = [h.id for lst in lists for h in lst.hits]
            for _ in range(int(rng.integers(1, 4))):
                doc_id = str(rng.choice(members)) if members and rng.random() < 0.7 else str(rng.choice(ids))
                state.pop(doc_id, None)
                changed_ids.add(doc_id)
        final = [state[i] for i in changed_ids if i in state]
        touched = {j for j, lst in enumerate(lists) if any(h.id in changed_ids for h in lst.hits)}
        before = [lst.ids() for lst in lists]
        result = step(lists, compiled, final, frozenset(DocId(i) for i in changed_ids), touched)
        for j, hits in result.changed:
            lists[j].hits = hits
            changed += 1
        for j in result.refill:
            refill(lists[j])
            refills += 1
        pushed = {j for j, _ in result.changed}
        for j, lst in enumerate(lists):
            want = exact(metric, lst.query, state)
            got = [(h.id, h.score) for h in lst.hits]
            assert [i for i, _ in got] == [i for i, _ in want], (metric, j, got, want)
            assert all(math.isclose(a, b, abs_tol=1e-4) for (_, a), (_, b) in zip(got, want, strict=True))
            if j not in pushed and j not in result.refill:
                assert lst.ids() == before[j], "a list left alone did not change"
    assert changed > 50 and refills > 5, (changed, refills)
