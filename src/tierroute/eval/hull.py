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


def share_above(hull: Hull, cost: FloatArray, quality: FloatArray) -> tuple[float, float]:
    """(share of the curve's cost range where it is above the hull, worst margin).

    The curve is sampled on 200 evenly spaced costs between its cheapest and dearest
    points; the margin is curve quality minus hull quality, in quality units."""
    grid = np.linspace(float(cost.min()), float(cost.max()), 200)
    order = np.argsort(cost, kind="stable")
    # at equal cost keep the best quality the curve reaches there
    curve = np.interp(grid, cost[order], np.maximum.accumulate(quality[order]))
    margin = curve - hull.at(grid)
    return float(np.mean(margin > 1e-9)), float(margin.min())


def multi_model_curve(
    probs: FloatArray, quality: FloatArray, cost: FloatArray, expected_cost: FloatArray
) -> tuple[FloatArray, FloatArray]:
    """(mean cost, mean quality) of routing each row to argmax_m P_m - lambda * cost_m,
    for lambdas from 0 (best predicted model) up to where the cheapest model wins.

    `probs` are a router's predicted chances of each model answering well; `expected_cost`
    is each model's mean cost per query from training data (what a router knows before
    it sends the request). `quality` and `cost` are the measured outcomes."""
    spread = float(expected_cost.max() - expected_cost.min()) or 1.0
    lambdas = np.concatenate(([0.0], np.geomspace(1e-4, 1e3, 120) / spread))
    rows = np.arange(len(probs))
    xs, ys = [], []
    for lam in lambdas:
        choice = np.argmax(probs - lam * expected_cost, axis=1)
        xs.append(float(cost[rows, choice].mean()))
        ys.append(float(quality[rows, choice].mean()))
    return np.array(xs), np.array(ys)
