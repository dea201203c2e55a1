"""Cost-quality metrics for a router on outcome data. Pure numpy on plain sequences.

A router ranks queries by score; sending the top-k to the large model and the rest
to the small one gives one point of the curve for every k at which the score changes
(tied scores move together, so the trapezoid between two points is the expected
value under random tie-breaking). With r the mean quality of the routed answers:

    PGR  = (r - r_small) / (r_large - r_small)
    APGR = area under PGR over the large-call share in [0, 1] (trapezoid rule),
           as RouteLLM's evaluation computes it: random ~0.5
    CPT(x) = the smallest large-call share at which PGR reaches x, interpolated on
           the running maximum of the curve: random ~x
    AUC  = area under the mean quality over the large-call share
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierroute.errors import DataError

FloatArray = npt.NDArray[np.float64]
ArrayLike = Sequence[float] | FloatArray


@dataclass(frozen=True)
class Curve:
    """The routing curve: one entry per distinct threshold, share ascending from 0 to 1."""

    share: FloatArray
    quality: FloatArray
    pgr: FloatArray
    # Route to the large model when score >= threshold; +inf at share 0.
    threshold: FloatArray
    # Mean cost per query at each point, when the data has per-query costs.
    cost: FloatArray | None


def _as_array(values: ArrayLike) -> FloatArray:
    return np.asarray(values, dtype=np.float64)


def routing_curve(
    scores: ArrayLike,
    small: ArrayLike,
    large: ArrayLike,
    small_cost: ArrayLike | None = None,
    large_cost: ArrayLike | None = None,
) -> Curve:
    s, q_small, q_large = _as_array(scores), _as_array(small), _as_array(large)
    n = len(s)
    if n == 0 or not (len(q_small) == len(q_large) == n):
        raise ValueError("scores, small and large need the same non-zero length")
    weak, strong = q_small.mean(), q_large.mean()
    if strong == weak:
        raise DataError(
            "the large and small models have the same mean quality here, so PGR is undefined; "
            "pick another model pair or more rows"
        )
    order = np.argsort(-s, kind="stable")
    ranked = s[order]
    # Points at k = 0, at every k where the next score differs, and at k = n.
    cuts = np.concatenate(([0], np.flatnonzero(ranked[1:] != ranked[:-1]) + 1, [n]))
    gain = np.concatenate(([0.0], np.cumsum((q_large - q_small)[order])))
    quality = weak + gain[cuts] / n
    threshold = np.concatenate(([np.inf], ranked[cuts[1:] - 1]))
    cost = None
    if small_cost is not None and large_cost is not None:
        c_small, c_large = _as_array(small_cost), _as_array(large_cost)
        extra = np.concatenate(([0.0], np.cumsum((c_large - c_small)[order])))
        cost = c_small.mean() + extra[cuts] / n
    return Curve(
        share=cuts / n,
        quality=quality,
        pgr=(quality - weak) / (strong - weak),
        threshold=threshold,
        cost=cost,
    )


def apgr(curve: Curve) -> float:
    return float(np.trapezoid(curve.pgr, curve.share))


def auc(curve: Curve) -> float:
    return float(np.trapezoid(curve.quality, curve.share))


def cpt(curve: Curve, target: float) -> float:
    """Smallest large-call share with PGR >= target; nan if the curve never gets there."""
    best = np.maximum.accumulate(curve.pgr)
    hits = np.flatnonzero(best >= target)
    if len(hits) == 0:
        return float("nan")
    i = int(hits[0])
    if i == 0:
        return float(curve.share[0])
    lo, hi = best[i - 1], best[i]
    frac = (target - lo) / (hi - lo)
    return float(curve.share[i - 1] + frac * (curve.share[i] - curve.share[i - 1]))


def point_at_threshold(curve: Curve, threshold: float) -> int:
    """Index of the curve point reached by routing large every score >= threshold."""
    # thresholds are descending after the leading +inf; count the points at or above it
    reached = np.flatnonzero(curve.threshold >= threshold)
    return int(reached[-1]) if len(reached) else 0


def summary(curve: Curve) -> dict[str, float]:
    return {
        "apgr": apgr(curve),
        "cpt50": cpt(curve, 0.5),
        "cpt80": cpt(curve, 0.8),
        "auc": auc(curve),
    }
