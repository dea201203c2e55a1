"""RouterBench's "zero router": the convex hull of the single models in (cost, quality).

Mixing two single models at random reaches any point on the segment between them, so a
router is only worth its keep where its cost-quality curve lies above this hull.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

FloatArray = npt.NDArray[np.float64]


@dataclass(frozen=True)
class Hull:
    """Upper-left frontier of (mean cost, mean quality) points, by increasing cost."""

    cost: FloatArray
    quality: FloatArray
    models: list[str]

    def at(self, cost: FloatArray) -> FloatArray:
        """The hull's quality at each cost (flat after its last point)."""
        out: FloatArray = np.interp(cost, self.cost, self.quality)
        return out


def single_model_hull(models: list[str], quality: FloatArray, cost: FloatArray) -> Hull:
    """The upper convex hull of the models' (mean cost, mean quality) points."""
    order = np.lexsort((-quality, cost))
    points: list[int] = []
    for i in order:
        if points and quality[i] <= quality[points[-1]]:
            continue  # costs more and is no better: never on the frontier
        while len(points) >= 2:
            a, b = points[-2], points[-1]
            # drop b if it lies on or under the segment a -> i
            cross = (cost[b] - cost[a]) * (quality[i] - quality[a]) - (quality[b] - quality[a]) * (
                cost[i] - cost[a]
            )
            if cross >= 0:
                points.pop()
            else:
                break
        points.append(int(i))
    idx = np.array(points)
    return Hull(cost=cost[idx], quality=quality[idx], models=[models[i] for i in idx])


@dataclass(frozen=True)
class Gap:
    """How a curve stands against the hull over the curve's own cost range."""

    share: float  # share of the cost range where the curve is above the hull
    worst: float  # the lowest margin (curve quality minus hull quality)
    worst_cost: float  # where that margin is
    area: float  # signed area between curve and hull, in quality x cost
    mean_margin: float  # area / cost range: the average margin


def frontier(cost: FloatArray, quality: FloatArray) -> tuple[FloatArray, FloatArray]:
    """A curve's points by increasing cost, each with the best quality reached at that
    cost or below (a router can always take a cheaper setting that does better);
    points of equal cost merge into their best."""
    order = np.argsort(cost, kind="stable")
    xs, ys = cost[order], np.maximum.accumulate(quality[order])
    keep = np.append(xs[1:] != xs[:-1], True)  # the last (best) of every run of equal cost
    return xs[keep], ys[keep]


def gap(hull: Hull, cost: FloatArray, quality: FloatArray) -> Gap:
    """The curve against the hull, exactly: between breakpoints both are straight lines,
    so the margin is linear and its sign change and area are computed per segment."""
    xs, ys = frontier(np.asarray(cost, float), np.asarray(quality, float))
    lo, hi = float(xs[0]), float(xs[-1])
    inner = hull.cost[(hull.cost > lo) & (hull.cost < hi)]
    grid = np.union1d(xs, inner)
    margin = np.interp(grid, xs, ys) - hull.at(grid)
    k = int(np.argmin(margin))
    if hi <= lo:  # a single point: above or not
        above = float(margin[0] > 1e-9)
        return Gap(above, float(margin[0]), lo, 0.0, float(margin[0]))
    width = np.diff(grid)
    m0, m1 = margin[:-1], margin[1:]
    pos0, pos1 = m0 > 1e-9, m1 > 1e-9
    # a segment whose margin changes sign is above the hull on the part past the root
    denom = np.where(m1 != m0, m1 - m0, 1.0)
    root = np.clip(-m0 / denom, 0.0, 1.0)
    part = np.where(pos0 & pos1, 1.0, np.where(pos0, root, np.where(pos1, 1.0 - root, 0.0)))
    area = float(np.sum((m0 + m1) / 2 * width))
    return Gap(
        share=float(np.sum(part * width) / (hi - lo)),
        worst=float(margin[k]),
        worst_cost=float(grid[k]),
        area=area,
        mean_margin=area / (hi - lo),
    )


def share_above(hull: Hull, cost: FloatArray, quality: FloatArray) -> tuple[float, float]:
    """(share of the curve's cost range where it is above the hull, worst margin)."""
    g = gap(hull, cost, quality)
    return g.share, g.worst


def cost_at_quality(cost: FloatArray, quality: FloatArray, target: float) -> float:
    """The least cost at which the curve reaches `target` quality, interpolating between
    its points (mixing two settings at random reaches any point between them); nan if
    the curve never gets there."""
    xs, ys = frontier(np.asarray(cost, float), np.asarray(quality, float))
    hits = np.flatnonzero(ys >= target - 1e-12)
    if len(hits) == 0:
        return float("nan")
    i = int(hits[0])
    if i == 0:
        return float(xs[0])
    frac = (target - ys[i - 1]) / (ys[i] - ys[i - 1])
    return float(xs[i - 1] + frac * (xs[i] - xs[i - 1]))


def lambda_grid(expected_cost: FloatArray) -> FloatArray:
    """The lambdas `multi_model_curve` sweeps: 0 (best predicted model), then 480 steps
    geometric in lambda * (cost spread) from 1e-4 to 1e3, where the cheapest model wins."""
    spread = float(expected_cost.max() - expected_cost.min()) or 1.0
    # fine steps: where many prompts switch model at nearly one lambda, coarse steps leave
    # a gap the curve can only bridge by mixing
    out: FloatArray = np.concatenate(([0.0], np.geomspace(1e-4, 1e3, 480) / spread))
    return out


def multi_model_choices(probs: FloatArray, expected_cost: FloatArray) -> npt.NDArray[np.int64]:
    """(lambdas, rows): the model each row goes to, argmax_m P_m - lambda * cost_m, for
    every lambda of `lambda_grid`."""
    return np.stack(
        [np.argmax(probs - lam * expected_cost, axis=1) for lam in lambda_grid(expected_cost)]
    )


def curve_of(
    choices: npt.NDArray[np.int64], quality: FloatArray, cost: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """(mean cost, mean quality) per row of `choices` (lambdas, rows)."""
    rows = np.arange(choices.shape[1])[None, :]
    return cost[rows, choices].mean(axis=1), quality[rows, choices].mean(axis=1)


def multi_model_curve(
    probs: FloatArray, quality: FloatArray, cost: FloatArray, expected_cost: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """(mean cost, mean quality) of routing each row to argmax_m P_m - lambda * cost_m,
    for lambdas from 0 (best predicted model) up to where the cheapest model wins.

    `probs` are a router's predicted chances of each model answering well; `expected_cost`
    is what the router expects each model to cost, per model or per row and model, from
    training data (what it knows before it sends the request). `quality` and `cost` are
    the measured outcomes."""
    return curve_of(multi_model_choices(probs, expected_cost), quality, cost)
