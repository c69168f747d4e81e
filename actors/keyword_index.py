"""The keyword side: a tokenizer and a mutable in-memory BM25 inverted index for one shard.

The index is keyed by the shard's labels (the same integers that index its vectors), so the
shard's filter masks apply to keyword search unchanged. It is updated on the shard's own apply
calls (`set` on upsert, `remove` on delete), so it follows the change log exactly as the vector
side does: whatever the shard has applied, keyword search sees.

Scoring is Okapi BM25 with term-frequency saturation (`k1`) and length normalisation (`b`), and
Lucene's form: IDF `ln(1 + (N - df + 0.5) / (df + 0.5))` (never negative) times
`tf / (tf + k1 * (1 - b + b * len / avg_len))` (the constant `k1 + 1` factor left out), as bm25s
scores by default.

Layout: a posting list per term, held as a dict label -> term frequency (mutable in O(terms of
the document)), and a numpy copy of each list made on first search after it changed, so a query
scores each term's postings in one vectorised step. Not thread-safe: the shard calls writes and
reads under its read/write discipline (reads may overlap; the numpy copies are built under a
lock so overlapping readers build each one once).
"""

from __future__ import annotations

import math
import re
import threading
from collections import Counter
from collections.abc import Iterable
from typing import Any

import numpy as np
from numpy.typing import NDArray

# A token: letters/digits/underscore runs, joined by single dots or dashes between word
# characters, so `utf-8`, `v1.2`, `libxml2` and `e.g` stay one token. A compound token is also
# indexed by its parts (`utf`, `8`), so a query for either part still finds it.
_TOKEN = re.compile(r"\w+(?:[.\-]\w+)*")
_SPLIT = re.compile(r"[.\-]")

# English stop words: dropped from documents and queries alike (a query of only these words
# finds nothing, which is an answer, not an error).
_STOP_LIST = """
    a about above after again against all am an and any are as at be because been before being
    below between both but by can could did do does doing down during each few for from further
    had has have having he her here hers herself him himself his how i if in into is it its
    itself just me more most my myself no nor not now of off on once only or other our ours
    ourselves out over own same she should so some such than that the their theirs them
    themselves then there these they this those through to too under until up very was we were
    what when where which while who whom why will with would you your yours yourself yourselves
"""
STOP_WORDS = frozenset(_STOP_LIST.split())

K1 = 1.5
B = 0.75


def tokenize(text: str) -> list[str]:
    """The index terms of `text`, in order, repeats kept: case-folded words, compounds of words
    joined by `.` or `-` kept whole and also split into their parts; stop words dropped."""
    out: list[str] = []
    for match in _TOKEN.finditer(text.casefold()):
        token = match.group()
        if token not in STOP_WORDS:
            out.append(token)
        if "." in token or "-" in token:
            out.extend(part for part in _SPLIT.split(token) if part and part not in STOP_WORDS)
    return out


def term_counts(text: str | None) -> dict[str, int]:
    """Each index term of `text` with its frequency (empty for no text): what `set_counts` takes,
    computed apart so a caller can tokenise outside its write lock."""
    return Counter(tokenize(text)) if text else {}


def query_terms(text: str) -> tuple[str, ...]:
    """The distinct terms of a query, in first-seen order (a repeated query word counts once)."""
    return tuple(dict.fromkeys(tokenize(text)))


class KeywordIndex:
    """BM25 over the texts of one shard's documents, by label."""

    def __init__(self, k1: float = K1, b: float = B) -> None:
        self.k1 = k1
        self.b = b
        self._postings: dict[str, dict[int, int]] = {}
        self._terms: dict[int, tuple[str, ...]] = {}  # label -> its distinct terms (for removal)
        self._lengths = np.zeros(1024, np.float32)  # label -> document length in terms
        self._total_length = 0
        self._arrays: dict[str, tuple[NDArray[np.int64], NDArray[np.float32]]] = {}
        self._arrays_lock = threading.Lock()

    @property
    def documents(self) -> int:
        """Documents with at least one term."""
        return len(self._terms)

    # -- writes --------------------------------------------------------------------------------

    def set(self, label: int, text: str | None) -> None:
        """Index `text` under `label`, replacing what the label held (None: holds nothing)."""
        self.set_counts(label, term_counts(text))

    def remove(self, label: int) -> None:
        """Forget what `label` holds (nothing if it holds nothing)."""
        terms = self._terms.pop(label, None)
        if terms is None:
            return
        self._total_length -= int(self._lengths[label])
        self._lengths[label] = 0
        postings, arrays = self._postings, self._arrays
        for term in terms:
            posting = postings[term]
            del posting[label]
            if not posting:
                del postings[term]
            arrays.pop(term, None)

    # -- reads ---------------------------------------------------------------------------------

    def scores(self, terms: Iterable[str], size: int) -> tuple[NDArray[np.float32], NDArray[np.bool_]]:
        """BM25 scores of every label below `size` for the query `terms`, and which labels hold
        at least one of them (the others score 0 and are no match)."""
        scores = np.zeros(size, np.float32)
        matched = np.zeros(size, np.bool_)
        n = len(self._terms)
        if n == 0:
            return scores, matched
        avg = self._total_length / n
        k1, b = self.k1, self.b
        norm = k1 * (1.0 - b + b * self._lengths / max(avg, 1e-9))
        for term in terms:
            got = self._posting_arrays(term)
            if got is None:
                continue
            labels, tfs = got
            keep = labels < size
            if not keep.all():
                labels, tfs = labels[keep], tfs[keep]
            df = labels.shape[0]
            idf = math.log(1.0 + (n - df + 0.5) / (df + 0.5))
            scores[labels] += np.float32(idf) * tfs / (tfs + norm[labels])
            matched[labels] = True
        return scores, matched

    def _posting_arrays(self, term: str) -> tuple[NDArray[np.int64], NDArray[np.float32]] | None:
        got = self._arrays.get(term)
        if got is not None:
            return got
        posting = self._postings.get(term)
        if posting is None:
            return None
        with self._arrays_lock:
            got = self._arrays.get(term)
            if got is None:
                labels = np.fromiter(posting.keys(), np.int64, len(posting))
                tfs = np.fromiter(posting.values(), np.float32, len(posting))
                got = (labels, tfs)
                self._arrays[term] = got
        return got

    # -- persistence ---------------------------------------------------------------------------

    def save(self) -> dict[str, Any]:
        """The index as plain values (label -> its terms with frequencies), for a snapshot."""
        return {
            "k1": self.k1,
            "b": self.b,
            "docs": {
                label: {term: self._postings[term][label] for term in terms}
                for label, terms in self._terms.items()
            },
        }

    @classmethod
    def load(cls, saved: dict[str, Any]) -> KeywordIndex:
        """An index equal to the one `save` was called on."""
        index = cls(float(saved["k1"]), float(saved["b"]))
        for label, counts in saved["docs"].items():
            index.set_counts(int(label), {str(t): int(tf) for t, tf in counts.items()})
        return index

    def set_counts(self, label: int, counts: dict[str, int]) -> None:
        """Index a document given as `term_counts(text)` under `label`, replacing what it held."""
        self.remove(label)
        if not counts:
            return
        if label >= self._lengths.shape[0]:
            size = self._lengths.shape[0]
            while size <= label:
                size *= 2
            grown = np.zeros(size, np.float32)
            grown[: self._lengths.shape[0]] = self._lengths
            self._lengths = grown
        length = sum(counts.values())
        self._lengths[label] = length
        self._total_length += length
        self._terms[label] = tuple(counts)
        for term, tf in counts.items():
            self._postings.setdefault(term, {})[label] = tf
            self._arrays.pop(term, None)
