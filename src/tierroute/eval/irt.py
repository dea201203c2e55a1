"""Item-response maths for pair-aware routing (issue 9). Pure numpy/scipy on arrays.

Under a 3PL item-response model a model of ability theta answers prompt x well with

    P(theta, x) = c_x + (1 - c_x) * sigmoid(a_x * (theta - b_x))

(b_x the prompt's difficulty, a_x how sharply it separates abilities, c_x a guessing
floor: 1/options for multiple choice, 0 otherwise). Routing x to the large tier gains
P(theta_large, x) - P(theta_small, x): largest for prompts between the two abilities,
not for the hardest ones, which both models fail. A monotone difficulty score cannot
express that; `expected_gain` does.
"""

from __future__ import annotations

import numpy as np
import numpy.typing as npt

Array = npt.NDArray[np.float64]


def _sigmoid(x: Array) -> Array:
    out: Array = 0.5 * (1.0 + np.tanh(0.5 * x))  # overflow-free logistic
    return out


def probability(theta: float | Array, a: Array, b: Array, c: Array | float = 0.0) -> Array:
    """P(a model of ability theta answers each item well)."""
    out: Array = c + (1.0 - np.asarray(c)) * _sigmoid(a * (theta - b))
    return out


def expected_gain(
    a: Array, b: Array, theta_small: float, theta_large: float, c: Array | float = 0.0
) -> Array:
    """P(large answers well) - P(small answers well), per item."""
    return probability(theta_large, a, b, c) - probability(theta_small, a, b, c)


def ability_for_rate(
    rate: float, a: Array, b: Array, c: Array | float = 0.0, weights: Array | None = None
) -> float:
    """The ability whose mean P over these items equals `rate` (a model's overall success
    rate): bisection on a monotone function, clipped to the reachable range."""
    w = np.ones(len(a)) if weights is None else np.asarray(weights, dtype=np.float64)
    w = w / w.sum()
    lo, hi = -30.0, 30.0
    for _ in range(80):
        mid = 0.5 * (lo + hi)
        if float(w @ probability(mid, a, b, c)) < rate:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def fit_items(
    scores: Array,
    c: Array | float = 0.0,
    l2: float = 0.5,
    discrimination: bool = True,
    max_iter: int = 500,
) -> tuple[Array, Array, Array]:
    """Fit a 2PL/3PL model to a (items x models) score matrix in [0, 1] (NaN: not run):
    (abilities per model, a per item, b per item), by penalised maximum likelihood with
    soft targets (a score of 0.7 counts as 0.7 of a success). `discrimination=False`
    fixes every a_x at 1 (the 1PL/Rasch model). A Gaussian prior on b, log a and theta
    (`l2` pseudo-observations' worth each) keeps items every model got right (or wrong)
    finite."""
    from scipy.optimize import minimize

    y = np.asarray(scores, dtype=np.float64)
    seen = ~np.isnan(y)
    target = np.where(seen, y, 0.0)
    n, m = y.shape
    floor = np.broadcast_to(np.asarray(c, dtype=np.float64), (n,))[:, None]
    n_obs = float(seen.sum())
    rate = np.clip(np.nanmean(y, axis=1), 0.02, 0.98)
    start = np.concatenate([np.zeros(m), -np.log(rate / (1 - rate)), np.zeros(n)])

    def loss(v: Array) -> tuple[float, Array]:
        theta, b, log_a = v[:m], v[m : m + n], v[m + n :]
        a = np.exp(log_a) if discrimination else np.ones(n)
        s = _sigmoid(a[:, None] * (theta[None, :] - b[:, None]))
        p = np.clip(floor + (1 - floor) * s, 1e-9, 1 - 1e-9)
        nll = -(target * np.log(p) + (1 - target) * np.log(1 - p))
        # d nll / d p, then through p = c + (1-c) s and s' = s(1-s)
        dp = np.where(seen, (p - target) / (p * (1 - p)), 0.0) / n_obs
        ds = dp * (1 - floor) * s * (1 - s)
        z = theta[None, :] - b[:, None]
        ridge = 2 * l2 / n_obs
        g_theta = (ds * a[:, None]).sum(axis=0) + ridge * theta
        g_b = -(ds * a[:, None]).sum(axis=1) + ridge * b
        g_log_a = (ds * z).sum(axis=1) * a + ridge * log_a if discrimination else 0 * log_a
        value = float(np.where(seen, nll, 0.0).sum() / n_obs)
        value += l2 / n_obs * float(theta @ theta + b @ b + log_a @ log_a)
        return value, np.concatenate([g_theta, g_b, g_log_a])

    result = minimize(loss, start, jac=True, method="L-BFGS-B", options={"maxiter": max_iter})
    v = result.x
    a = np.exp(v[m + n :]) if discrimination else np.ones(n)
    return v[:m], a, v[m : m + n]
