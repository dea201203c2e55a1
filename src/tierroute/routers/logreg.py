"""Logistic regression on the prompt embedding (optionally with tags and text features).

Two feature sets:
- "embedding" (the default): the MiniLM embedding as it is, not standardised, with strong
  L2. The penalty then shrinks the embedding's low-variance directions most, so the model
  leans on the broad directions that carry over between datasets. Measured over the eight
  setups of benchmarks/quality_bench.py it beat "all" in domain (mean APGR 0.555 vs
  0.531) and across datasets (0.522 vs 0.495).
- "all": embedding, the tagger's class similarities and the text features of
  `tierroute.features`, each standardised. It fits one dataset a little better but learns
  its format (length, notation), which does not transfer; saved routers from before the
  choice existed use it.
A tagger given with "embedding" only names tags in explanations.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tierroute.encoder import Encoder
from tierroute.errors import RouterError
from tierroute.features import FEATURE_NAMES, prompt_features
from tierroute.routers.base import BaseRouter, Scores, sigmoid
from tierroute.tagger import Tagger
from tierroute.types import Explanation

Matrix = npt.NDArray[np.float64]

FEATURE_SETS = ("embedding", "all")
DEFAULT_C = {"embedding": 0.1, "all": 0.05}


class LogRegRouter(BaseRouter):
    kind: ClassVar[str] = "logreg"
    learned: ClassVar[bool] = True

    def __init__(
        self,
        encoder: Encoder,
        tagger: Tagger | None = None,
        C: float | None = None,
        features: str = "embedding",
    ) -> None:
        if features not in FEATURE_SETS:
            raise RouterError(
                f"logreg features must be one of {', '.join(FEATURE_SETS)}, not {features!r}"
            )
        self.encoder = encoder
        self.tagger = tagger
        self.features = features
        self.C = DEFAULT_C[features] if C is None else C
        self.mean_: Matrix | None = None
        self.scale_: Matrix | None = None
        self.coef_: Matrix | None = None
        self.intercept_: float = 0.0

    @property
    def feature_names(self) -> list[str]:
        names = [f"emb{i}" for i in range(self.encoder.dim)]
        if self.features == "embedding":
            return names
        if self.tagger is not None:
            names += self.tagger.feature_names
        return names + list(FEATURE_NAMES)

    def _features(self, texts: Sequence[str]) -> Matrix:
        if self.features == "embedding":
            return np.asarray(self.encoder.encode(texts), dtype=np.float64)
        return prompt_features(self.encoder, texts, self.tagger)

    def fit(self, texts: Sequence[str], labels: npt.ArrayLike) -> LogRegRouter:
        from sklearn.linear_model import LogisticRegression

        x = self._features(texts)
        y = np.asarray(labels, dtype=np.int64)
        if self.features == "embedding":
            self.mean_, self.scale_ = np.zeros(x.shape[1]), np.ones(x.shape[1])
        else:
            self.mean_ = x.mean(axis=0)
            self.scale_ = np.where(x.std(axis=0) > 1e-9, x.std(axis=0), 1.0)
        model = LogisticRegression(C=self.C, max_iter=3000)
        model.fit((x - self.mean_) / self.scale_, y)
        self.coef_ = model.coef_[0].astype(np.float64)
        self.intercept_ = float(model.intercept_[0])
        return self

    def _logits(self, x: Matrix) -> Matrix:
        self._check_fitted("coef_")
        assert self.mean_ is not None and self.scale_ is not None and self.coef_ is not None
        logits: Matrix = ((x - self.mean_) / self.scale_) @ self.coef_ + self.intercept_
        return logits

    def score_texts(self, texts: Sequence[str]) -> Scores:
        return sigmoid(self._logits(self._features(texts)))

    def explain_text(self, text: str) -> Explanation:
        x = self._features([text])
        score = float(sigmoid(self._logits(x))[0])
        assert self.mean_ is not None and self.scale_ is not None and self.coef_ is not None
        contrib = ((x[0] - self.mean_) / self.scale_) * self.coef_
        names = self.feature_names
        dim = self.encoder.dim
        named = sorted(range(dim, len(names)), key=lambda i: -abs(contrib[i]))[:3]
        reasons = [f"embedding {contrib[:dim].sum():+.2f}"]
        reasons += [f"{names[i]} {contrib[i]:+.2f}" for i in named]
        tags = {}
        if self.tagger is not None:
            similarities = (
                self.tagger.similarities(x[:, :dim].astype(np.float32))
                if self.features == "embedding"
                else x[:, dim : dim + len(self.tagger.feature_names)].astype(np.float32)
            )
            tags = self.tagger.tags_from_similarities(similarities)[0]
        return Explanation(score=score, reasons=tuple(reasons), tags=tags)

    def get_params(self) -> dict[str, Any]:
        return {"C": self.C, "features": self.features, "uses_tags": self.tagger is not None}

    def get_state(self) -> dict[str, npt.NDArray[Any]]:
        self._check_fitted("coef_")
        assert self.mean_ is not None and self.scale_ is not None and self.coef_ is not None
        return {
            "mean": self.mean_,
            "scale": self.scale_,
            "coef": self.coef_,
            "intercept": np.array([self.intercept_]),
        }

    def set_state(self, state: dict[str, npt.NDArray[Any]]) -> None:
        self.mean_ = state["mean"]
        self.scale_ = state["scale"]
        self.coef_ = state["coef"]
        self.intercept_ = float(state["intercept"][0])
