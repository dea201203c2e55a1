"""Plots of routing curves a person can read: PGR or quality against share or cost."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

from tierroute.eval.harness import Evaluation
from tierroute.eval.metrics import Curve
from tierroute.eval.nmodel import NModelResult

XAxis = Literal["share", "cost"]


def plot_evaluation(ev: Evaluation, out: str | Path, x: XAxis = "share") -> None:
    import matplotlib

    matplotlib.use("Agg")  # no display here; the CLI only writes files
    import matplotlib.pyplot as plt

    o = ev.outcomes
    if x == "cost" and ev.curve.cost is None:
        raise ValueError("this data has no cost_usd, so the curve cannot be drawn against dollars")

    def xs(curve: Curve) -> list[float]:
        values = curve.cost if x == "cost" else curve.share
        assert values is not None
        return [float(v) * (1.0 if x == "cost" else 100.0) for v in values]

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    fig_figures = ev.figures
    ax.plot(
        xs(ev.curve),
        ev.curve.quality,
        lw=2.2,
        color="#1f77b4",
        label=f"{ev.router} (APGR {fig_figures['apgr']:.3f}, CPT50 {fig_figures['cpt50']:.1%})",
    )
    styles = {"random": ("#7f7f7f", "--"), "oracle": ("#2ca02c", ":")}
    for name, curve in ev.baseline_curves.items():
        color, style = styles[name]
        b = ev.baselines[name]
        ax.plot(
            xs(curve),
            curve.quality,
            style,
            color=color,
            lw=1.6,
            label=f"{name} (APGR {b['apgr']:.3f})",
        )
    for name, marker in (("all-small", "o"), ("all-large", "s")):
        b = ev.baselines[name]
        px = b.get("cost_per_query", 0.0) if x == "cost" else b["large_share"] * 100
        model = o.small_model if name == "all-small" else o.large_model
        ax.plot([px], [b["quality"]], marker, color="black", ms=8)
        ax.annotate(
            f"{name}\n{model.split('/')[-1]}",
            (px, b["quality"]),
            textcoords="offset points",
            xytext=(6, -22 if name == "all-small" else 6),
            fontsize=8,
        )
    op = ev.operating
    op_x = op.get("cost_per_query", 0.0) if x == "cost" else op["large_share"] * 100
    ax.plot(
        [op_x],
        [op["quality"]],
        "*",
        color="#d62728",
        ms=14,
        label=f"calibrated ({ev.target.describe()}): {op['large_share']:.0%} large, "
        f"PGR {op['pgr']:.2f}",
    )
    ax.set_xlabel(
        "mean cost per query (USD)" if x == "cost" else "calls sent to the large model (%)"
    )
    cv = f"grouped {ev.folds}-fold CV by {ev.cv_group}" if ev.cv_group else f"{ev.folds}-fold CV"
    title = (
        f"{Path(o.path).name}: {o.small_model.split('/')[-1]} -> "
        f"{o.large_model.split('/')[-1]}\n{len(o):,} queries, {cv}"
    )
    _finish(plt, fig, ax, title, out)


def _finish(plt: Any, fig: Any, ax: Any, title: str, out: str | Path) -> None:
    """The tail both plots share: quality axis, title, grid, legend, saved and closed."""
    ax.set_ylabel("mean quality of routed answers")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(out)
    plt.close(fig)


def plot_nmodel(result: NModelResult, out: str | Path) -> None:
    """Quality against dollars: the N-model router, the best pair, every single model
    and their convex hull (the "zero router")."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    from tierroute.eval.hull import frontier

    t = result.table
    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    hull = [t.models.index(m) for m in result.hull_models]

    def dense(xs: Any, ys: Any) -> tuple[Any, Any]:
        # straight in dollars is curved on a log axis: draw every line on a fine grid
        grid = np.geomspace(float(xs[0]), float(xs[-1]), 400) if xs[-1] > xs[0] else xs
        return grid, np.interp(grid, xs, ys)

    ax.plot(
        *dense(result.single_cost[hull], result.single_quality[hull]),
        "--",
        color="#7f7f7f",
        lw=1.6,
        label="convex hull of single models (zero router)",
    )
    ax.plot(result.single_cost, result.single_quality, "o", color="black", ms=5)
    for k in hull:
        ax.annotate(
            t.models[k].split(" (judge ")[0].split("/")[-1],
            (result.single_cost[k], result.single_quality[k]),
            textcoords="offset points",
            xytext=(4, -10),
            fontsize=7,
        )
    px, py = dense(*frontier(result.pair_cost, result.pair_quality))
    pair = " + ".join(m.split(" (judge ")[0].split("/")[-1] for m in result.best_pair)
    ax.plot(px, py, ":", color="#2ca02c", lw=1.8, label=f"best pair: {pair}")
    xs, ys = dense(*frontier(result.curve_cost, result.curve_quality))
    g = result.vs_hull
    ax.plot(
        xs,
        ys,
        lw=2.2,
        color="#1f77b4",
        label=f"N-model router: above hull on {g.share:.0%} of its $ range (worst {g.worst:+.3f})",
    )
    ax.set_xscale("log")
    ax.set_xlim(float(np.min(result.single_cost)) * 0.8, float(np.max(result.single_cost)) * 1.25)
    what = "model size (billion parameters" if t.axis == "size" else "mean cost per query (USD"
    ax.set_xlabel(f"{what}, log scale; {t.cost_basis})")
    title = f"{t.label}: {len(t.models)} models\n{result.test_rows:,} rows tested, {result.split}"
    _finish(plt, fig, ax, title, out)
