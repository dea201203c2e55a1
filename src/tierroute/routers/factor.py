"""A factor router: one model of every model's chance of answering each prompt.

Trained on all the models in the outcome rows at once, not only one pair:

    P(model m answers prompt x well) = sigmoid(v_m . (P z) + b_m + w . z)

where z is the standardised prompt features (embedding and text features), P projects
them to `rank` dimensions, v_m is model m's learned vector and b_m its ability. The
shared w . z term is a per-prompt difficulty, so rank 0 is the one-parameter
item-response-theory model (an ability per model, a difficulty per prompt) and rank > 0
is matrix factorisation in the spirit of RouteLLM's best router.

The routing score for a pair is P(large right) * (1 - P(small right)): the chance the
large model does better, treating the two as independent given the prompt. With
`score_by="difficulty"` the score is the prompt's difficulty alone, sigmoid(-w . z): the
chance a model of average ability fails. That needs no pair from the training files, so
it is the score to use on tiers and traffic the training files never saw. Modelling
each model's correctness separately uses far more of the data than the pair's label
(which is positive on only ~18% of MMLU rows), and any two trained models can be paired
after training, including pairs never seen together.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tierroute.data import ModelScores, Outcomes, canonical_model
from tierroute.encoder import Encoder
from tierroute.errors import RouterError
from tierroute.features import FEATURE_SETS, prompt_features
from tierroute.progress import progress
from tierroute.routers.base import BaseRouter, Scores, sigmoid
from tierroute.types import Explanation

Matrix = npt.NDArray[np.float64]

# The stand-in "model" when only pair labels are given: its score is 1 - label.
PAIR_SMALL = "small-tier"


class FactorRouter(BaseRouter):
    kind: ClassVar[str] = "mf"
    learned: ClassVar[bool] = True

    def __init__(
        self,
        encoder: Encoder,
        rank: int = 16,
        l2: float = 1e-3,
        small: str | None = None,
        large: str | None = None,
        max_iter: int = 300,
        seed: int = 0,
        score_by: str = "pair",
        features: str = "text",
    ) -> None:
        if rank < 0:
            raise RouterError(f"factor router rank must be 0 or more, not {rank}")
        if score_by not in ("pair", "difficulty"):
            raise RouterError(f"score_by must be 'pair' or 'difficulty', not '{score_by}'")
        if features not in FEATURE_SETS:
            raise RouterError(f"features must be one of {FEATURE_SETS}, not '{features}'")
        self.encoder = encoder
        self.rank = rank
        self.l2 = l2
        self.small = small
        self.large = large
        self.max_iter = max_iter
        self.seed = seed
        self.score_by = score_by
        self.features = features
        self.models_: list[str] | None = None
        self.mean_: Matrix | None = None
        self.scale_: Matrix | None = None
        self.proj_: Matrix | None = None
        self.vectors_: Matrix | None = None
        self.ability_: Matrix | None = None
        self.difficulty_: Matrix | None = None

    # ------------------------------------------------------------------ training

    def fit_outcomes(self, outcomes: Outcomes) -> FactorRouter:
        self.small = self.small or canonical_model(outcomes.small_model)
        self.large = self.large or canonical_model(outcomes.large_model)
        return self.fit_scores(outcomes.prompts, outcomes.model_scores())

    def fit(self, texts: Sequence[str], labels: npt.ArrayLike) -> FactorRouter:
        """Pair labels only: learn the small tier's chance of being enough."""
        y = np.asarray(labels, dtype=np.float64)
        self.small, self.large = PAIR_SMALL, None
        return self.fit_scores(texts, ModelScores([PAIR_SMALL], (1.0 - y)[:, None]))

    def fit_scores(
        self,
        texts: Sequence[str],
        table: ModelScores,
        row_weights: npt.ArrayLike | None = None,
    ) -> FactorRouter:
        """Fit on every model's scores; `row_weights` (mean 1) weight rows' observations,
        e.g. so that each of several files counts the same."""
        from scipy.optimize import minimize

        scores = np.clip(table.scores, 0.0, 1.0)  # scores are quality in [0, 1]
        observed = ~np.isnan(scores)
        if len(texts) != len(scores) or not observed.any():
            raise RouterError("the factor router needs scores for the texts it is trained on")
        x = prompt_features(self.encoder, texts, features=self.features)
        self.mean_ = x.mean(axis=0)
        std = x.std(axis=0)
        self.scale_ = np.where(std > 1e-9, std, 1.0)
        z = (x - self.mean_) / self.scale_
        target = np.where(observed, scores, 0.0)
        weight = np.ones(len(scores)) if row_weights is None else np.asarray(row_weights, float)
        observed_weight = np.where(observed, weight[:, None], 0.0)
        n_obs = float(observed_weight.sum())
        dim, n_models, rank = z.shape[1], scores.shape[1], self.rank
        rate = np.clip(np.nanmean(scores, axis=0), 1e-3, 1 - 1e-3)
        rng = np.random.default_rng(self.seed)
        start = np.concatenate(
            [
                rng.normal(0.0, 0.01, dim * rank),
                rng.normal(0.0, 0.1, n_models * rank),
                np.log(rate / (1 - rate)),
                np.zeros(dim),
            ]
        )

        def unpack(theta: Matrix) -> tuple[Matrix, Matrix, Matrix, Matrix]:
            a, b = dim * rank, dim * rank + n_models * rank
            return (
                theta[:a].reshape(dim, rank),
                theta[a:b].reshape(n_models, rank),
                theta[b : b + n_models],
                theta[b + n_models :],
            )

        def loss(theta: Matrix) -> tuple[float, Matrix]:
            proj, vectors, ability, difficulty = unpack(theta)
            hidden = z @ proj
            p = sigmoid(hidden @ vectors.T + ability + (z @ difficulty)[:, None])
            eps = 1e-12
            nll = -(target * np.log(p + eps) + (1 - target) * np.log(1 - p + eps))
            grad = observed_weight * (p - target) / n_obs
            penalty = self.l2 * (np.sum(proj**2) + np.sum(vectors**2) + np.sum(difficulty**2))
            g_proj = z.T @ (grad @ vectors) + 2 * self.l2 * proj
            g_vectors = grad.T @ hidden + 2 * self.l2 * vectors
            g_difficulty = z.T @ grad.sum(axis=1) + 2 * self.l2 * difficulty
            value = float((observed_weight * nll).sum() / n_obs + penalty)
            return value, np.concatenate(
                [g_proj.ravel(), g_vectors.ravel(), grad.sum(axis=0), g_difficulty]
            )

        kind = "irt" if rank == 0 else "mf"
        with progress(self.max_iter, f"fitting {kind}", unit="iter") as bar:
            result = minimize(
                loss,
                start,
                jac=True,
                method="L-BFGS-B",
                options={"maxiter": self.max_iter},
                callback=lambda _: bar.update(1),
            )
        self.proj_, self.vectors_, self.ability_, self.difficulty_ = unpack(result.x)
        self.models_ = list(table.models)
        return self

    # ------------------------------------------------------------------ scoring

    def _standardised(self, texts: Sequence[str]) -> Matrix:
        self._check_fitted("proj_")
        assert self.mean_ is not None and self.scale_ is not None
        x = prompt_features(self.encoder, texts, features=self.features)
        z: Matrix = (x - self.mean_) / self.scale_
        return z

    def model_probabilities(self, texts: Sequence[str]) -> Matrix:
        """P(each trained model answers well), one column per model in `models_`."""
        z = self._standardised(texts)
        assert self.proj_ is not None and self.vectors_ is not None
        assert self.ability_ is not None and self.difficulty_ is not None
        logits = (
            (z @ self.proj_) @ self.vectors_.T + self.ability_ + (z @ self.difficulty_)[:, None]
        )
        return sigmoid(logits)

    def _column(self, model: str | None) -> int | None:
        assert self.models_ is not None
        if model is None:
            return None
        name = canonical_model(model)
        if name not in self.models_:
            raise RouterError(
                f"the factor router has no vector for model '{model}'; it was trained on: "
                + ", ".join(self.models_)
            )
        return self.models_.index(name)

    def pair_scores(self, probs: Matrix) -> Scores:
        small, large = self._column(self.small), self._column(self.large)
        p_small = probs[:, small] if small is not None else np.zeros(len(probs))
        p_large = probs[:, large] if large is not None else np.ones(len(probs))
        out: Scores = p_large * (1.0 - p_small)
        return out

    def difficulty_scores(self, texts: Sequence[str]) -> Scores:
        """P(a model of ability 0 fails): the prompt's difficulty, for no pair in particular."""
        z = self._standardised(texts)
        assert self.difficulty_ is not None
        return sigmoid(-(z @ self.difficulty_))

    def score_texts(self, texts: Sequence[str]) -> Scores:
        if self.score_by == "difficulty":
            return self.difficulty_scores(texts)
        return self.pair_scores(self.model_probabilities(texts))

    def explain_text(self, text: str) -> Explanation:
        return self.explain_texts([text])[0]

    def explain_texts(self, texts: Sequence[str]) -> list[Explanation]:
        if self.score_by == "difficulty":
            return [
                Explanation(score=float(s), reasons=(f"difficulty {s:.2f}",))
                for s in self.difficulty_scores(texts)
            ]
        probs = self.model_probabilities(texts)
        scores = self.pair_scores(probs)
        # the router's reference models, not the configured tiers: say so by size only
        pair = (("small", self.small), ("large", self.large))
        columns = [(role, self._column(model)) for role, model in pair]
        return [
            Explanation(
                score=float(scores[i]),
                reasons=tuple(
                    f"P(a {role} model answers well) {probs[i, c]:.2f}"
                    for role, c in columns
                    if c is not None
                ),
            )
            for i in range(len(texts))
        ]

    # ------------------------------------------------------------------ state

    def get_params(self) -> dict[str, Any]:
        return {
            "rank": self.rank,
            "l2": self.l2,
            "small": self.small,
            "large": self.large,
            "max_iter": self.max_iter,
            "seed": self.seed,
            "score_by": self.score_by,
            "features": self.features,
        }

    def get_state(self) -> dict[str, npt.NDArray[Any]]:
        self._check_fitted("proj_")
        assert self.models_ is not None and self.mean_ is not None and self.scale_ is not None
        assert self.proj_ is not None and self.vectors_ is not None
        assert self.ability_ is not None and self.difficulty_ is not None
        return {
            "models": np.array(self.models_, dtype=np.str_),
            "mean": self.mean_,
            "scale": self.scale_,
            "proj": self.proj_,
            "vectors": self.vectors_,
            "ability": self.ability_,
            "difficulty": self.difficulty_,
        }

    def set_state(self, state: dict[str, npt.NDArray[Any]]) -> None:
        self.models_ = [str(m) for m in state["models"]]
        self.mean_ = state["mean"]
        self.scale_ = state["scale"]
        self.proj_ = state["proj"]
        self.vectors_ = state["vectors"]
        self.ability_ = state["ability"]
        self.difficulty_ = state["difficulty"]
        for model in (self.small, self.large):
            self._column(model)  # a pair the state cannot score fails at load, not per request
