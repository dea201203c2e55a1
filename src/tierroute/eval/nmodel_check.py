"""Why an N-model result misses its target: the oracle's ceiling, bootstrap intervals,
and how much the router knows on each segment of the hull.

- `oracle`: the same argmax Q - lambda * cost sweep with the measured scores and costs
  in place of the router's guesses: no router on these rows can do better.
- `bootstrap`: the test rows resampled with replacement, the router's choices per lambda
  kept, the hull and curve recomputed: how far the share above the hull and the cost
  shares move with the sample alone.
- `segments`: for each pair of neighbouring hull models, the share of the router's
  dollar range the segment spans, how often the two models' scores differ, and whether
  the router's P difference ranks the rows where the dearer one does better (AUC; 0.5 is
  no signal). Beating the hull along a segment needs that signal; the two most alike
  columns of the table show how often scores differ by noise alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierroute.eval.hull import (
    cost_at_quality,
    curve_of,
    frontier,
    gap,
    multi_model_choices,
    single_model_hull,
)
from tierroute.eval.nmodel import NModelResult

FloatArray = npt.NDArray[np.float64]


def _rows(r: NModelResult) -> tuple[FloatArray, FloatArray]:
    return r.table.quality[r.tested], r.table.cost[r.tested]


def _share_at(xs: FloatArray, ys: FloatArray, quality: float, cost: float) -> float:
    return cost_at_quality(xs, ys, quality) / cost


@dataclass(frozen=True)
class Oracle:
    share: float  # of its dollar range above the hull
    mean_margin: float
    best_quality: float
    cost_at_best_quality_share: float
    cost_at_reference_share: float | None


def oracle(r: NModelResult) -> Oracle:
    """The ceiling: each row to argmax (measured quality - lambda * measured cost)."""
    quality, cost = _rows(r)
    xs, ys = curve_of(multi_model_choices(quality, cost), quality, cost)
    hull = single_model_hull(r.table.models, r.single_quality, r.single_cost)
    g = gap(hull, xs, ys)
    best = r.table.models.index(r.best_single)
    ref = None
    if r.reference is not None and r.reference in r.table.models:
        k = r.table.models.index(r.reference)
        ref = _share_at(xs, ys, float(r.single_quality[k]), float(r.single_cost[k]))
    return Oracle(
        share=g.share,
        mean_margin=g.mean_margin,
        best_quality=float(ys.max()),
        cost_at_best_quality_share=_share_at(
            xs, ys, float(r.single_quality[best]), float(r.single_cost[best])
        ),
        cost_at_reference_share=ref,
    )


@dataclass(frozen=True)
class Interval:
    low: float
    high: float
    never: float  # share of resamples where the figure is nan (quality never reached)

    def __str__(self) -> str:
        def fmt(x: float) -> str:
            return "never" if np.isnan(x) else f"{x:.1%}"

        text = f"[{fmt(self.low)}, {fmt(self.high)}]"
        return text + (f" (never in {self.never:.0%})" if self.never > 0 else "")


def _interval(values: FloatArray, level: float) -> Interval:
    """Percentile interval; nan (never reached) counts as +inf, above every cost."""
    filled = np.where(np.isnan(values), np.inf, values)
    lo, hi = np.quantile(filled, [(1 - level) / 2, (1 + level) / 2])
    return Interval(
        low=float("nan") if np.isinf(lo) else float(lo),
        high=float("nan") if np.isinf(hi) else float(hi),
        never=float(np.mean(np.isnan(values))),
    )


def bootstrap(
    r: NModelResult, n: int = 200, seed: int = 0, level: float = 0.9
) -> dict[str, Interval]:
    """Percentile intervals over `n` resamples of the test rows, the router fixed:
    `above_hull_share`, `mean_margin`, `cost_at_best_quality_share` and (where the file
    has one) `cost_at_reference_share`. The best single model and the hull are chosen
    again in every resample, as the evaluation chooses them."""
    quality, cost = _rows(r)
    # lambdas that send every row to the same models give the same point: keep one
    choices = np.unique(r.choices, axis=0)
    ref = r.table.models.index(r.reference) if r.reference in r.table.models else None
    rng = np.random.default_rng(seed)
    out: dict[str, list[float]] = {k: [] for k in ("share", "margin", "best", "ref")}
    for _ in range(n):
        idx = rng.integers(0, len(quality), len(quality))
        q, c = quality[idx], cost[idx]
        single_q, single_c = q.mean(axis=0), c.mean(axis=0)
        hull = single_model_hull(r.table.models, single_q, single_c)
        xs, ys = curve_of(choices[:, idx], q, c)
        g = gap(hull, xs, ys)
        top = int(np.argmax(single_q))
        top = int(min(np.flatnonzero(single_q == single_q[top]), key=lambda k: single_c[k]))
        out["share"].append(g.share)
        out["margin"].append(g.mean_margin)
        out["best"].append(_share_at(xs, ys, float(single_q[top]), float(single_c[top])))
        if ref is not None:
            out["ref"].append(_share_at(xs, ys, float(single_q[ref]), float(single_c[ref])))
    result = {
        "above_hull_share": _interval(np.array(out["share"]), level),
        "mean_margin": _interval(np.array(out["margin"]), level),
        "cost_at_best_quality_share": _interval(np.array(out["best"]), level),
    }
    if ref is not None:
        result["cost_at_reference_share"] = _interval(np.array(out["ref"]), level)
    return result


def auc(score: FloatArray, positive: npt.NDArray[np.bool_]) -> float:
    """P(a positive row scores above a negative one), ties half: the Mann-Whitney AUC."""
    from scipy.stats import rankdata

    pos = int(positive.sum())
    neg = len(positive) - pos
    if pos == 0 or neg == 0:
        return float("nan")
    ranks = rankdata(score)  # ties get their average rank
    return float((ranks[positive].sum() - pos * (pos + 1) / 2) / (pos * neg))


@dataclass(frozen=True)
class Segment:
    cheaper: str
    dearer: str
    range_share: float  # of the router's dollar range
    differ: float  # share of rows where the two models' scores differ
    auc: float  # of P(dearer) - P(cheaper) for "dearer scored higher", on rows that differ
    above: float  # share of the segment's dollar span where the router is above the hull


def segments(r: NModelResult) -> list[Segment]:
    """Each segment of the hull inside the router's dollar range, with what the router
    knows there."""
    quality, _ = _rows(r)
    models = r.table.models
    hull = single_model_hull(models, r.single_quality, r.single_cost)
    lo, hi = float(r.curve_cost.min()), float(r.curve_cost.max())
    out = []
    for a, b in zip(hull.models, hull.models[1:], strict=False):
        i, j = models.index(a), models.index(b)
        left, right = max(lo, float(r.single_cost[i])), min(hi, float(r.single_cost[j]))
        if right <= left:
            continue
        inside = (r.curve_cost >= left) & (r.curve_cost <= right)
        xs = np.concatenate([[left], r.curve_cost[inside], [right]])
        ys = np.interp(xs, *frontier(r.curve_cost, r.curve_quality))
        differ = quality[:, i] != quality[:, j]
        out.append(
            Segment(
                cheaper=a,
                dearer=b,
                range_share=(right - left) / (hi - lo) if hi > lo else 1.0,
                differ=float(differ.mean()),
                auc=auc(
                    (r.probs[:, j] - r.probs[:, i])[differ], (quality[:, j] > quality[:, i])[differ]
                ),
                above=gap(hull, xs, ys).share,
            )
        )
    return out


@dataclass(frozen=True)
class Mixed:
    """The figures of the upper convex hull of the router's own operating points: a
    deployment that sends each request by one of two lambdas, chosen at random in a set
    proportion, reaches any point between the two (the same interpolation that makes the
    single models' hull the "zero router"). Reported beside the plain curve's, never in
    its place."""

    cost_at_best_quality_share: float
    cost_at_reference_share: float | None
    mean_margin: float


def mixed(r: NModelResult) -> Mixed:
    """The router's curve with any two of its lambdas mixed per request."""
    labels = [str(i) for i in range(len(r.curve_cost))]
    own = single_model_hull(labels, r.curve_quality, r.curve_cost)
    hull = single_model_hull(r.table.models, r.single_quality, r.single_cost)
    best = r.table.models.index(r.best_single)
    ref = None
    if r.reference is not None and r.reference in r.table.models:
        k = r.table.models.index(r.reference)
        ref = _share_at(own.cost, own.quality, float(r.single_quality[k]), float(r.single_cost[k]))
    return Mixed(
        cost_at_best_quality_share=_share_at(
            own.cost, own.quality, float(r.single_quality[best]), float(r.single_cost[best])
        ),
        cost_at_reference_share=ref,
        mean_margin=gap(hull, own.cost, own.quality).mean_margin,
    )


MAX_SOURCES = 12  # more sources than this are shown as one


@dataclass(frozen=True)
class Mix:
    """Where one operating point sends the rows of each source (the rows' `subset`)."""

    cost: float  # mean cost per row at this point
    quality: float
    by_source: dict[str, dict[str, float]]  # source -> model -> share of its rows


def _mix(
    choices: npt.NDArray[np.int64], r: NModelResult, target: float, quality: FloatArray
) -> Mix | None:
    """The cheapest operating point of `choices` (lambdas, rows) whose mean quality
    reaches `target`, and its models per source."""
    _, cost = _rows(r)
    xs, ys = curve_of(choices, quality, cost)
    reaching = np.flatnonzero(ys >= target - 1e-12)
    if len(reaching) == 0:
        return None
    k = int(reaching[np.argmin(xs[reaching])])
    sources = np.array(r.table.sources)[r.tested] if r.table.sources else np.full(len(cost), "")
    if len(set(sources.tolist())) > MAX_SOURCES:  # e.g. Arena-Hard's topic per prompt
        sources = np.full(len(cost), "")
    by_source: dict[str, dict[str, float]] = {}
    for source in sorted(set(sources.tolist())):
        picked = choices[k, sources == source]
        counts = np.bincount(picked, minlength=len(r.table.models)) / len(picked)
        by_source[source] = {
            r.table.models[m]: float(counts[m]) for m in np.argsort(-counts) if counts[m] > 0
        }
    return Mix(cost=float(xs[k]), quality=float(ys[k]), by_source=by_source)


def mix_at_quality(r: NModelResult, target: float) -> tuple[Mix | None, Mix | None]:
    """Where the router and the oracle send each source's rows at their cheapest single
    operating point reaching `target` quality (None: never reached without mixing):
    where the router's curve loses money against what the data allow."""
    quality, cost = _rows(r)
    return _mix(r.choices, r, target, quality), _mix(
        multi_model_choices(quality, cost), r, target, quality
    )


def closest_columns(r: NModelResult) -> tuple[str, str, float]:
    """The two columns whose scores differ on the fewest test rows, and that share: how
    often scores differ between near-copies (noise, when they are copies of one model)."""
    quality, _ = _rows(r)
    best: tuple[str, str, float] | None = None
    for i in range(quality.shape[1]):
        for j in range(i + 1, quality.shape[1]):
            d = float(np.mean(quality[:, i] != quality[:, j]))
            if best is None or d < best[2]:
                best = (r.table.models[i], r.table.models[j], d)
    assert best is not None
    return best
