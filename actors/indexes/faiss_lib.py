"""faiss, typed as Any: its bundled stubs disagree with the SWIG wrappers on several calls used
here (keyword parameters of SearchParameters*, IDSelectorBitmap over an array, IndexHNSWSQ)."""

from __future__ import annotations

from typing import Any

import faiss as _faiss

faiss: Any = _faiss
