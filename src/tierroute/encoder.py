"""TextEncoder: the one seam routers use to turn texts into vectors.

It wraps the Embedder with a small in-memory memo (so the tagger and a router that
embed the same live request share one forward pass) and, for offline work over data
files, the on-disk EmbeddingCache.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Sequence
from typing import Protocol

import numpy as np

from tierroute.embed import Embedder, EmbeddingCache, Vectors


class Encoder(Protocol):
    dim: int

    @property
    def model_id(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> Vectors: ...


class TextEncoder:
    """Encoder over the local Embedder, memoising recent single texts."""

    def __init__(
        self,
        embedder: Embedder | None = None,
        disk_cache: EmbeddingCache | None = None,
        memo_size: int = 512,
    ) -> None:
        self.embedder = embedder or Embedder()
        self.disk_cache = disk_cache
        self.memo_size = memo_size
        self._memo: OrderedDict[str, Vectors] = OrderedDict()
        self.dim = self.embedder.dim

    @property
    def model_id(self) -> str:
        return self.embedder.model_id

    def encode(self, texts: Sequence[str]) -> Vectors:
        if len(texts) == 1:
            return self._encode_one(texts[0])[None, :]
        if self.disk_cache is not None:
            return self.disk_cache.embed(self.embedder, texts)
        # A routing micro-batch prefetched these: explaining them together reads the memo.
        hits = [self._memo.get(text) for text in texts]
        if texts and all(hit is not None for hit in hits):
            return np.stack(hits)  # type: ignore[arg-type]
        return self.embedder.embed(texts)

    def prefetch(self, texts: Sequence[str]) -> None:
        """Embed the texts not yet memoised in one batched call, so the single-text
        `encode` calls that routers then make (the gateway's micro-batch) hit the memo."""
        todo = [t for t in dict.fromkeys(texts) if t not in self._memo]
        if not todo:
            return
        vectors = self.embedder.embed(todo)
        for text, vector in zip(todo, vectors, strict=True):
            # A copy: a row view would keep the whole batch's array alive in the memo.
            self._memo[text] = vector.copy()
        while len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)

    def _encode_one(self, text: str) -> Vectors:
        hit = self._memo.get(text)
        if hit is not None:
            self._memo.move_to_end(text)
            return hit
        vector: Vectors = self.embedder.embed([text])[0]
        self._memo[text] = vector
        if len(self._memo) > self.memo_size:
            self._memo.popitem(last=False)
        return vector


def normalise_rows(vectors: Vectors) -> Vectors:
    norms = np.linalg.norm(vectors, axis=1, keepdims=True)
    out: Vectors = (vectors / np.maximum(norms, 1e-12)).astype(np.float32)
    return out
