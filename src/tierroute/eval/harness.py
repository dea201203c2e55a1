"""Evaluate a router on outcome data, with cross-validation and baselines beside it.

Learned routers are trained and scored fold by fold (grouped k-fold when a group field
is named, so no group is in both parts); each row gets an out-of-fold score. Routers
that do not learn score every row once. Either way the operating threshold of each
fold is calibrated on the other folds' scores, so the reported share and quality at
the calibrated threshold are out-of-sample too.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from tierroute.calibrate import threshold_for_quality, threshold_for_share
from tierroute.data import Outcomes
from tierroute.errors import InputError
from tierroute.eval.folds import grouped_folds
from tierroute.eval.metrics import Curve, routing_curve, summary
from tierroute.eval.published import published_for
from tierroute.progress import progress
from tierroute.routers.base import BaseRouter
from tierroute.routers.random_router import RandomRouter

Scores = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Target:
    """What the operating threshold is calibrated to: a large-call share or a PGR."""

    large_share: float | None = None
    quality: float | None = None
    # A threshold already calibrated (a saved router's): used as it is on every fold.
    fixed: float | None = None

    def __post_init__(self) -> None:
        if sum(v is not None for v in (self.large_share, self.quality, self.fixed)) != 1:
            raise InputError("give exactly one of a target large share or a target quality")

    def threshold(self, scores: Scores, small: Scores, large: Scores) -> float:
        if self.fixed is not None:
            return self.fixed
        if self.large_share is not None:
            return threshold_for_share(scores, self.large_share)
        assert self.quality is not None
        return threshold_for_quality(routing_curve(scores, small, large), self.quality)

    def describe(self) -> str:
        if self.fixed is not None:
            return f"the router's calibrated threshold {self.fixed:.4g}"
        if self.large_share is not None:
            return f"large share {self.large_share:.0%}"
        return f"PGR {self.quality:.0%}"


@dataclass
class Evaluation:
    router: str
    outcomes: Outcomes
    scores: Scores
    curve: Curve
    target: Target
    operating: dict[str, float]
    baselines: dict[str, dict[str, float]]
    baseline_curves: dict[str, Curve]
    folds: int
    cv_group: str | None
    published: dict[str, dict[str, float]] = field(default_factory=dict)

    @property
    def figures(self) -> dict[str, float]:
        return summary(self.curve)

    def as_dict(self) -> dict[str, Any]:
        o = self.outcomes
        return {
            "router": self.router,
            "data": o.path,
            "data_sha256": o.data_hash,
            "small": o.small_model,
            "large": o.large_model,
            "rows": len(o),
            "rows_skipped": o.skipped,
            "cv": {"group": self.cv_group, "folds": self.folds},
            **self.figures,
            "target": self.target.describe(),
            "at_threshold": self.operating,
            "baselines": self.baselines,
            "published": self.published,
        }


def _single_models(o: Outcomes) -> dict[str, dict[str, float]]:
    out: dict[str, dict[str, float]] = {}
    for name, quality, cost in (
        ("all-small", o.small, o.small_cost),
        ("all-large", o.large, o.large_cost),
    ):
        entry = {
            "quality": float(quality.mean()),
            "large_share": 0.0 if name == "all-small" else 1.0,
        }
        if cost is not None:
            entry["cost_per_query"] = float(cost.mean())
        out[name] = entry
    return out


def _operating_point(
    o: Outcomes, scores: Scores, folds: list[npt.NDArray[np.int64]], target: Target
) -> dict[str, float]:
    """Route each fold with the threshold calibrated on the other folds' scores."""
    to_large = np.zeros(len(o), dtype=bool)
    thresholds = []
    for test in folds:
        rest = np.setdiff1d(np.arange(len(o)), test)
        t = target.threshold(scores[rest], o.small[rest], o.large[rest])
        thresholds.append(t)
        to_large[test] = scores[test] >= t
    quality = np.where(to_large, o.large, o.small)
    weak, strong = o.small.mean(), o.large.mean()
    point = {
        "threshold_mean": float(np.mean([t for t in thresholds if np.isfinite(t)] or [np.inf])),
        "large_share": float(to_large.mean()),
        "quality": float(quality.mean()),
        "pgr": float((quality.mean() - weak) / (strong - weak)),
    }
    if o.small_cost is not None and o.large_cost is not None:
        point["cost_per_query"] = float(np.where(to_large, o.large_cost, o.small_cost).mean())
    return point


def out_of_fold_scores(
    factory: Callable[[], BaseRouter], o: Outcomes, folds: list[npt.NDArray[np.int64]]
) -> Scores:
    scores = np.empty(len(o), dtype=np.float64)
    with progress(len(folds), "cross-validation folds", unit="fold") as bar:
        for test in folds:
            train = np.setdiff1d(np.arange(len(o)), test)
            router = factory().fit_outcomes(o.subset(train))
            scores[test] = router.score_texts([o.prompts[i] for i in test])
            bar.update(1)
    return scores


def evaluate(
    name: str,
    o: Outcomes,
    *,
    factory: Callable[[], BaseRouter] | None = None,
    fixed: BaseRouter | None = None,
    cv_group: str | None = None,
    n_folds: int = 5,
    seed: int = 0,
    target: Target | None = None,
) -> Evaluation:
    """Evaluate a learned router (`factory`, cross-validated) or a fixed one (`fixed`)."""
    target = target or Target(quality=0.8)
    groups = o.field(cv_group) if cv_group else o.ids
    folds = grouped_folds(groups, n_folds=n_folds, seed=seed)
    if factory is not None:
        scores = out_of_fold_scores(factory, o, folds)
    elif fixed is not None:
        scores = fixed.score_texts(o.prompts)
    else:
        raise ValueError("pass a router factory or a fixed router")
    curve = routing_curve(scores, o.small, o.large, o.small_cost, o.large_cost)

    random_scores = RandomRouter(seed=seed).score_texts(o.prompts)
    oracle_scores = o.large - o.small
    baseline_curves = {
        "random": routing_curve(random_scores, o.small, o.large, o.small_cost, o.large_cost),
        "oracle": routing_curve(oracle_scores, o.small, o.large, o.small_cost, o.large_cost),
    }
    baselines: dict[str, dict[str, float]] = {key: summary(c) for key, c in baseline_curves.items()}
    baselines.update(_single_models(o))
    dataset = str(o.rows[0].get("dataset", ""))
    return Evaluation(
        router=name,
        outcomes=o,
        scores=scores,
        curve=curve,
        target=target,
        operating=_operating_point(o, scores, folds, target),
        baselines=baselines,
        baseline_curves=baseline_curves,
        folds=n_folds,
        cv_group=cv_group,
        published=published_for(dataset, o.small_model, o.large_model),
    )
