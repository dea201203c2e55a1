"""Item-response maths behind the pair-aware ceilings (tierroute.eval.irt), by hand."""

from __future__ import annotations

import math

import numpy as np

from tierroute.eval import irt


def test_probability_has_the_guessing_floor_and_is_a_half_above_it_at_b() -> None:
    a, b = np.array([1.0, 2.0]), np.array([0.0, 1.0])
    assert np.allclose(irt.probability(0.0, a, b), [0.5, 1 / (1 + math.exp(2.0))])
    # at theta = b, halfway between the floor and 1
    assert np.allclose(irt.probability(1.0, a, b, 0.25), [0.25 + 0.75 / (1 + math.exp(-1)), 0.625])


def test_expected_gain_peaks_between_the_abilities_not_at_the_hardest_prompt() -> None:
    b = np.array([-6.0, 0.0, 1.0, 2.0, 8.0])
    gain = irt.expected_gain(np.ones(5), b, theta_small=0.0, theta_large=2.0)
    assert int(np.argmax(gain)) == 2  # b = 1, midway
    assert gain[4] < 0.01 and gain[0] < 0.01  # both fail / both succeed: nothing to gain
    assert gain[1] == gain[3]  # symmetric about the midpoint


def test_ability_for_rate_inverts_the_mean_probability() -> None:
    a, b = np.array([1.0, 1.5, 0.5]), np.array([-1.0, 0.5, 2.0])
    theta = irt.ability_for_rate(0.6, a, b, 0.1)
    assert abs(float(irt.probability(theta, a, b, 0.1).mean()) - 0.6) < 1e-6
    assert irt.ability_for_rate(0.05, a, b, 0.1) < -25  # below the floor: clipped, not a crash


def test_fit_items_recovers_simulated_abilities_and_difficulties() -> None:
    rng = np.random.default_rng(0)
    n, m = 600, 12
    theta, b = np.linspace(-2, 2, m), rng.normal(0, 1.5, n)
    a = np.exp(rng.normal(0, 0.3, n))
    p = irt.probability(theta[None, :], a[:, None], b[:, None], 0.25)
    y = (rng.random((n, m)) < p).astype(float)
    y[rng.random((n, m)) < 0.1] = np.nan  # models missing on some items
    fitted_theta, fitted_a, fitted_b = irt.fit_items(y, 0.25)
    assert np.corrcoef(fitted_theta, theta)[0, 1] > 0.97
    assert np.corrcoef(fitted_b, b)[0, 1] > 0.7  # 12 models pin items near their abilities only
    assert np.all(fitted_a > 0)
    _, ones, _ = irt.fit_items(y, 0.25, discrimination=False)
    assert np.all(ones == 1.0)


def test_on_item_response_data_the_expected_gain_routes_better_than_difficulty() -> None:
    """The premise of the pair-aware ceilings: when outcomes follow the model, ranking by
    the pair's expected gain beats ranking by difficulty (which sends prompts both fail)."""
    from tierroute.eval.metrics import apgr, routing_curve

    rng = np.random.default_rng(1)
    b = rng.normal(0, 2.0, 20_000)
    a = np.ones(len(b))
    small = (rng.random(len(b)) < irt.probability(-1.0, a, b)).astype(float)
    large = (rng.random(len(b)) < irt.probability(1.0, a, b)).astype(float)
    by_difficulty = apgr(routing_curve(b, small, large))
    theta_small = irt.ability_for_rate(float(small.mean()), a, b)
    theta_large = irt.ability_for_rate(float(large.mean()), a, b)
    by_gain = apgr(routing_curve(irt.expected_gain(a, b, theta_small, theta_large), small, large))
    assert abs(theta_small + 1.0) < 0.1 and abs(theta_large - 1.0) < 0.1
    assert by_gain > by_difficulty + 0.05
