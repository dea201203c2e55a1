"""A deployment's correction on top of a cold router, learned from its own labels.

    score = sigmoid(a * logit(base score) + w . embedding + b)

`base` is any router (the shipped default, a saved one); `a` and `b` are free, `w` has a
strong L2 penalty, so with few labels the router stays the base router re-scaled and only
moves away from it where the deployment's labels agree. This is what the gateway's
continuous learner (tierroute.gateway.learner) trains; the base is always the configured
cold router, never an earlier correction, so corrections do not stack up.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tierroute.encoder import Encoder
from tierroute.routers.base import BaseRouter, Scores, logit, sigmoid
from tierroute.types import Explanation

Matrix = npt.NDArray[np.float64]


class ResidualRouter(BaseRouter):
    kind: ClassVar[str] = "residual"
    learned: ClassVar[bool] = True

    def __init__(self, base: BaseRouter, base_spec: str, encoder: Encoder, l2: float = 10.0):
        self.base = base
        self.base_spec = base_spec  # how to open the base again (`open_router`)
        self.encoder = encoder
        self.l2 = l2
        self.coef_: Matrix | None = None
        self.base_weight_: float = 1.0
        self.intercept_: float = 0.0

    def inputs(self, texts: Sequence[str]) -> tuple[Matrix, Matrix]:
        """(logit of the base's scores, embeddings): what the correction reads."""
        z = logit(self.base.score_texts(texts))
        x = np.asarray(self.encoder.encode(texts), dtype=np.float64)
        return z, x

    def fit(self, texts: Sequence[str], labels: npt.ArrayLike) -> ResidualRouter:
        return self.fit_inputs(*self.inputs(texts), labels)

    def fit_inputs(self, z: Matrix, x: Matrix, labels: npt.ArrayLike) -> ResidualRouter:
        """`fit` on the base's logits and the embeddings (`inputs`), so that a
        cross-validation embeds each text once, not once per fold."""
        from scipy.optimize import minimize

        y = np.asarray(labels, dtype=np.float64)
        dim = x.shape[1]

        def loss(theta: Matrix) -> tuple[float, Matrix]:
            a, b, w = theta[0], theta[1], theta[2:]
            eta = a * z + x @ w + b
            p = sigmoid(eta)
            # log(1 + e^eta) - y * eta, computed without overflow
            value = float(np.sum(np.logaddexp(0.0, eta) - y * eta) + 0.5 * self.l2 * w @ w)
            r = p - y
            grad = np.concatenate(([r @ z, r.sum()], x.T @ r + self.l2 * w))
            return value, grad

        start = np.concatenate(([1.0, 0.0], np.zeros(dim)))
        theta = minimize(loss, start, jac=True, method="L-BFGS-B").x
        self.base_weight_, self.intercept_ = float(theta[0]), float(theta[1])
        self.coef_ = theta[2:].astype(np.float64)
        return self

    def score_inputs(self, z: Matrix, x: Matrix) -> Scores:
        self._check_fitted("coef_")
        assert self.coef_ is not None
        return sigmoid(self.base_weight_ * z + x @ self.coef_ + self.intercept_)

    def score_texts(self, texts: Sequence[str]) -> Scores:
        return self.score_inputs(*self.inputs(texts))

    def explain_text(self, text: str) -> Explanation:
        base = self.base.explain_text(text)
        z = logit([base.score])
        x = np.asarray(self.encoder.encode([text]), dtype=np.float64)
        score = float(self.score_inputs(z, x)[0])
        assert self.coef_ is not None
        reasons = (
            f"base {base.score:.3f} x {self.base_weight_:.2f}",
            f"learned correction {float(x[0] @ self.coef_ + self.intercept_):+.2f}",
            *base.reasons,
        )
        return Explanation(score=score, reasons=reasons, min_tiers=base.min_tiers, tags=base.tags)

    def get_params(self) -> dict[str, Any]:
        return {"base": self.base_spec, "l2": self.l2}

    def get_state(self) -> dict[str, npt.NDArray[Any]]:
        self._check_fitted("coef_")
        assert self.coef_ is not None
        return {
            "coef": self.coef_,
            "base_weight": np.array([self.base_weight_]),
            "intercept": np.array([self.intercept_]),
        }

    def set_state(self, state: dict[str, npt.NDArray[Any]]) -> None:
        self.coef_ = state["coef"]
        self.base_weight_ = float(state["base_weight"][0])
        self.intercept_ = float(state["intercept"][0])
