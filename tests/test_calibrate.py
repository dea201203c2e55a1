from __future__ import annotations

import numpy as np
import pytest

from tierroute.calibrate import (
    threshold_for_quality,
    threshold_for_share,
    thresholds_for_shares,
)
from tierroute.errors import InputError
from tierroute.eval.metrics import routing_curve


def test_threshold_for_share() -> None:
    scores = [0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0]
    t = threshold_for_share(scores, 0.3)
    assert t == 0.8
    assert np.mean(np.asarray(scores) >= t) == pytest.approx(0.3)
    assert threshold_for_share(scores, 0.0) > 1.0  # nothing goes large
    assert threshold_for_share(scores, 1.0) == 0.1
    with pytest.raises(InputError):
        threshold_for_share(scores, 1.5)


def test_thresholds_for_shares_of_three_tiers() -> None:
    scores = np.linspace(0.0, 0.99, 100)
    # 50% tier 0, 30% tier 1, 20% tier 2
    low, high = thresholds_for_shares(scores, [0.5, 0.3, 0.2])
    assert np.mean(scores >= high) == pytest.approx(0.2)
    assert np.mean((scores >= low) & (scores < high)) == pytest.approx(0.3)
    with pytest.raises(InputError):
        thresholds_for_shares(scores, [0.5, 0.6])


def test_threshold_for_quality_by_hand() -> None:
    small, large = [1, 0, 0, 1], [1, 1, 1, 0]
    curve = routing_curve([0.5, 0.9, 0.8, 0.1], small, large)
    # PGR [0, 1, 2, 2, 1]: PGR >= 1 first at the point with threshold 0.9
    assert threshold_for_quality(curve, 1.0) == 0.9
    assert threshold_for_quality(curve, 1.5) == 0.8
    assert threshold_for_quality(curve, 0.0) == float("inf")
    with pytest.raises(InputError, match=r"best is 2\.000"):
        threshold_for_quality(curve, 3.0)
