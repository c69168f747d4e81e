"""The collection a framework store (LangChain, LlamaIndex) writes to and reads from.

Created on first use (`if_not_exists`) with the store's dimension and metric, checked against
them when it already exists, and forgotten when another client dropped it, so that the next
write creates it again. Both stores keep one `StoreCollection` and call it from coroutines that
run on their HTTP client's private loop.
"""

from __future__ import annotations

from typing import Any

from shoal_client.errors import NotFound
from shoal_client.http import ShoalHTTP
from shoal_client.types import CollectionInfo


class StoreCollection:
    def __init__(self, name: str, dim: int | None, metric: str | None, batch_size: int) -> None:
        self.name = name
        self.dim = dim
        self.metric = metric
        self.batch_size = batch_size
        self.info: CollectionInfo | None = None  # None: not looked up yet, or dropped since

    @property
    def known(self) -> bool:
        """True once looked up: a `not_found` then means another client dropped it."""
        return self.info is not None

    def forget(self) -> None:
        self.info = None

    async def ensure(self, c: ShoalHTTP, dim: int | None) -> CollectionInfo:
        """The collection's shape, creating it if missing (with `dim`, else the store's own).
        Raises ValueError when it exists with another metric or dimension."""
        info = self.info
        if info is None:
            wanted = dim if dim is not None else self.dim
            info = await c.create_collection(self.name, dim=wanted, metric=self.metric, if_not_exists=True)
        if self.metric is not None and info.metric != self.metric:
            raise ValueError(f"collection {self.name!r} uses metric {info.metric!r}, not {self.metric!r}")
        if dim is not None and info.dim != dim:
            raise ValueError(
                f"collection {self.name!r} holds {info.dim}-dimensional vectors; the embedding gives {dim}"
            )
        self.info = info
        return info

    async def upsert(self, c: ShoalHTTP, docs: list[dict[str, Any]], dim: int | None) -> None:
        """Upsert `docs` in batches of `batch_size`, creating the collection first if needed."""
        known = self.known
        await self.ensure(c, dim)
        try:
            for start in range(0, len(docs), self.batch_size):
                await c.upsert(self.name, docs[start : start + self.batch_size])
        except NotFound:
            if not known:
                raise
            # Dropped since it was looked up (by another client): create it again, once. Upserts
            # replace by id, so re-sending batches that went through is harmless.
            self.forget()
            await self.upsert(c, docs, dim)
