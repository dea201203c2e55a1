"""Pure functions that turn scores into thresholds for a target.

A threshold t sends a request to the larger tier when its score >= t. Thresholds are
score values, not shares, so one fitted on calibration rows applies to new traffic.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from tierroute.errors import InputError
from tierroute.eval.metrics import ArrayLike, Curve, routing_curve


def threshold_for_share(scores: ArrayLike, share: float) -> float:
    """The threshold that sends about `share` of these scores to the larger tier."""
    if not 0.0 <= share <= 1.0:
        raise InputError(f"a target share must be within [0, 1], not {share}")
    ranked = np.sort(np.asarray(scores, dtype=np.float64))[::-1]
    k = round(share * len(ranked))
    if k == 0:
        return float(np.nextafter(ranked[0], np.inf))
    return float(ranked[k - 1])


def thresholds_for_shares(scores: ArrayLike, shares: Sequence[float]) -> list[float]:
    """Boundaries for n tiers from the share each tier should take (smallest tier first).

    Returns n-1 ascending thresholds: boundary i separates tier i from tier i+1.
    """
    if abs(sum(shares) - 1.0) > 1e-6 or any(s < 0 for s in shares):
        raise InputError(f"tier shares must be >= 0 and add up to 1, not {list(shares)}")
    above = np.cumsum(list(shares)[::-1])[:-1]  # share at or above each boundary, top down
    return [threshold_for_share(scores, float(a)) for a in above[::-1]]


def threshold_for_quality(curve: Curve, target_pgr: float) -> float:
    """The highest threshold (fewest large calls) whose PGR on `curve` reaches target_pgr."""
    hits = np.flatnonzero(curve.pgr >= target_pgr)
    if len(hits) == 0:
        raise InputError(
            f"no threshold reaches PGR {target_pgr}; the best is {curve.pgr.max():.3f}"
        )
    i = int(hits[0])
    return float(curve.threshold[i]) if i > 0 else float("inf")


def threshold_for_quality_on(
    scores: ArrayLike, small: ArrayLike, large: ArrayLike, target_pgr: float
) -> float:
    return threshold_for_quality(routing_curve(scores, small, large), target_pgr)
