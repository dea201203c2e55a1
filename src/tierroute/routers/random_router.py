"""The seeded random baseline: every request gets a uniform score."""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np

from tierroute.routers.base import BaseRouter, Scores


class RandomRouter(BaseRouter):
    """Uniform scores derived from (seed, text), so the same text always scores the same."""

    kind: ClassVar[str] = "random"

    def __init__(self, seed: int = 0) -> None:
        self.seed = seed

    def score_texts(self, texts: Sequence[str]) -> Scores:
        out = np.empty(len(texts), dtype=np.float64)
        for i, text in enumerate(texts):
            digest = hashlib.blake2b(text.encode(), digest_size=8, key=str(self.seed).encode())
            out[i] = int.from_bytes(digest.digest(), "little") / 2**64
        return out

    def get_params(self) -> dict[str, Any]:
        return {"seed": self.seed}
