"""Metrics against numbers worked by hand on tiny tables."""

from __future__ import annotations

import math

import numpy as np
import pytest

from tierroute.errors import DataError
from tierroute.eval.metrics import apgr, auc, cpt, point_at_threshold, routing_curve, summary

from .conftest import MMLU, MMLU_LARGE, MMLU_SMALL, needs_shared

# Four queries. Small: [1, 0, 0, 1] (mean 0.5); large: [1, 1, 1, 0] (mean 0.75).
SMALL = [1.0, 0.0, 0.0, 1.0]
LARGE = [1.0, 1.0, 1.0, 0.0]


def test_curve_points_by_hand() -> None:
    # Scores rank query 1 first, then 2, then 0, then 3.
    curve = routing_curve([0.5, 0.9, 0.8, 0.1], SMALL, LARGE)
    # k=0: 0.5; +q1 (gain 1): 0.75; +q2 (gain 1): 1.0; +q0 (0): 1.0; +q3 (-1): 0.75
    assert curve.share.tolist() == [0.0, 0.25, 0.5, 0.75, 1.0]
    assert curve.quality.tolist() == [0.5, 0.75, 1.0, 1.0, 0.75]
    # PGR = (r - 0.5) / 0.25
    assert curve.pgr.tolist() == [0.0, 1.0, 2.0, 2.0, 1.0]
    assert curve.threshold.tolist() == [math.inf, 0.9, 0.8, 0.5, 0.1]


def test_apgr_auc_by_hand() -> None:
    curve = routing_curve([0.5, 0.9, 0.8, 0.1], SMALL, LARGE)
    # trapezoids of width 0.25 over PGR [0, 1, 2, 2, 1]: (0.5 + 1.5 + 2 + 1.5) / 4 = 1.375
    assert apgr(curve) == pytest.approx(1.375)
    # quality [0.5, .75, 1, 1, .75]: (0.625 + 0.875 + 1 + 0.875) / 4 = 0.84375
    assert auc(curve) == pytest.approx(0.84375)


def test_cpt_interpolates_on_running_maximum() -> None:
    curve = routing_curve([0.5, 0.9, 0.8, 0.1], SMALL, LARGE)
    # PGR 0 at share 0, 1 at share 0.25: PGR 0.5 is reached at share 0.125
    assert cpt(curve, 0.5) == pytest.approx(0.125)
    assert cpt(curve, 1.5) == pytest.approx(0.375)
    assert math.isnan(cpt(curve, 2.5))


def test_worst_ranking_uses_running_maximum() -> None:
    # Reverse order: query 3 (loss) first. PGR: 0, -1, -1, 0, 1
    curve = routing_curve([0.9, 0.1, 0.2, 0.95], SMALL, LARGE)
    assert curve.pgr.tolist() == [0.0, -1.0, -1.0, 0.0, 1.0]
    # running max 0, 0, 0, 0, 1: PGR 0.5 reached half way between share 0.75 and 1.0
    assert cpt(curve, 0.5) == pytest.approx(0.875)


def test_ties_move_together() -> None:
    # All scores equal: the curve is a straight line from all-small to all-large.
    curve = routing_curve([0.3, 0.3, 0.3, 0.3], SMALL, LARGE)
    assert curve.share.tolist() == [0.0, 1.0]
    assert apgr(curve) == pytest.approx(0.5)
    assert cpt(curve, 0.5) == pytest.approx(0.5)


def test_costs_follow_the_curve() -> None:
    curve = routing_curve([0.5, 0.9, 0.8, 0.1], SMALL, LARGE, [1, 1, 1, 1], [10, 10, 10, 10])
    assert curve.cost is not None
    assert curve.cost.tolist() == [1.0, 3.25, 5.5, 7.75, 10.0]


def test_point_at_threshold() -> None:
    curve = routing_curve([0.5, 0.9, 0.8, 0.1], SMALL, LARGE)
    assert point_at_threshold(curve, 0.85) == 1  # only 0.9 goes large
    assert point_at_threshold(curve, 0.8) == 2
    assert point_at_threshold(curve, 2.0) == 0
    assert point_at_threshold(curve, 0.0) == 4


def test_equal_models_is_a_clear_error() -> None:
    with pytest.raises(DataError, match="PGR is undefined"):
        routing_curve([0.1, 0.2], [1, 0], [0, 1])


def test_random_and_oracle_on_a_synthetic_table() -> None:
    rng = np.random.default_rng(1)
    small = rng.integers(0, 2, 20_000).astype(float)
    large = np.maximum(small, rng.integers(0, 2, 20_000)).astype(float)
    random = summary(routing_curve(rng.random(20_000), small, large))
    assert random["apgr"] == pytest.approx(0.5, abs=0.02)
    assert random["cpt50"] == pytest.approx(0.5, abs=0.03)
    oracle = summary(routing_curve(large - small, small, large))
    assert oracle["apgr"] > 0.8 and oracle["cpt80"] < 0.3


@needs_shared
def test_random_router_on_real_mmlu_is_half() -> None:
    from tierroute.data import load_outcomes
    from tierroute.routers.random_router import RandomRouter

    o = load_outcomes(MMLU, MMLU_SMALL, MMLU_LARGE)
    assert len(o) == 14_042
    figures = summary(routing_curve(RandomRouter(seed=0).score_texts(o.prompts), o.small, o.large))
    assert figures["apgr"] == pytest.approx(0.50, abs=0.03)
    assert figures["cpt50"] == pytest.approx(0.50, abs=0.05)
