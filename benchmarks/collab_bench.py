"""Several models working together: routing among all of them, offline, and the
collaboration strategies, live (issue 13).

    python benchmarks/collab_bench.py --offline [--out bench-out]
        [--router default|factor|irt|mf]
        [--files routerbench mmlu_pro arenahard] [--cost-model neighbours|length|mean]
        [--calibrate] [--axis usd|size]
        [--candidates all|pareto|hull] [--diagnose]

--offline reproduces the N-model table and plots of the README: on RouterBench (11 models,
real dollar costs, its own train/test split), MMLU-Pro (30 models, grouped 5-fold CV by
question source) and Arena-Hard (40 model/judge columns, one table per judge, grouped
5-fold CV by topic cluster), the router (default: the factor router's P blended with
each model's success rate among the nearest training prompts) choosing argmax
P(m answers x) - lambda * cost_m over a sweep of lambda, against every single model, the
best two-model router and the convex hull of the single models. Files without dollar
costs are priced by src/tierroute/eval/prices.py (list prices; open weights by parameter
count). The router expects each model's cost from a line in the prompt's length
corrected by the nearest training prompts (--cost-model neighbours). Writes
OUT/nmodel.md, OUT/nmodel.json and one PNG per table, and prints the tables. About two
minutes with cached embeddings (the first run embeds MMLU-Pro's 12k prompts: ~6 min).
--axis size puts each model's published parameter count in place of dollars (open-weights
models only; OUT/nmodel-size.md and .json).
--diagnose adds, per table, the oracle's curve (every score known), bootstrap intervals
of the figures over the test rows, per hull segment whether the router's P difference
ranks the rows where the dearer model does better, the curve with two lambdas mixed per
request, and where the router and the oracle send each source's rows at the reference
model's quality (tierroute.eval.nmodel_check).

    python benchmarks/collab_bench.py --live [--arith 32] [--code 16] [--threads 1]
        [--thresholds logprob=0.7,best=0.75,judge=0.9] [--sweep]

--live measures the collaboration strategies of tierroute.collab (cross-model agreement,
draft and review, best-of-n) against each single tier and the two-tier cascade, with the
real local models, on generated tasks with checkable answers (see collab_live.py). Writes
OUT/collab_live.md, OUT/collab_live.jsonl and a journal of model calls that a rerun reuses.

Leave-one-dataset-out is not offered for the N-model choice: the three files share no
model (RouterBench's gpt-4-1106-preview and Mixtral are in no other file under these
columns), so a router trained on the other files knows nothing of the held-out file's
models' abilities, and learning them needs the held-out file's own rows.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
FILES = {
    "routerbench": "routerbench_arc_winogrande_mbpp.jsonl",
    "mmlu_pro": "mmlu_pro_30models.jsonl",
    "arenahard": "arenahard_v01_vs_gpt4_0314.jsonl",
}


def _short(model: str) -> str:
    return model.split(" (judge ")[0].split("/")[-1]


def _at(x: float, axis: str) -> str:
    return f"{x:.1f}B" if axis == "size" else f"${x:.6f}"


def _pct(x: float | None) -> str:
    return "never" if x is None or x != x else f"{x:.1%}"


def diagnose(r: Any, seed: int) -> dict[str, Any]:
    """Print and return the oracle, bootstrap intervals and hull segments of one result."""
    from dataclasses import asdict

    import numpy as np

    from tierroute.eval.nmodel_check import (
        bootstrap,
        closest_columns,
        mix_at_quality,
        mixed,
        oracle,
        segments,
    )

    o = oracle(r)
    ref = (
        ""
        if o.cost_at_reference_share is None
        else (f"; reference's quality at {_pct(o.cost_at_reference_share)} of its cost")
    )
    print(
        f"  oracle (knows every score): above the hull on {o.share:.1%}, mean margin "
        f"{o.mean_margin:+.4f}, best {o.best_quality:.4f}; best single's quality at "
        f"{_pct(o.cost_at_best_quality_share)} of its cost{ref}"
    )
    boot = bootstrap(r, seed=seed)
    print(
        "  bootstrap 90% (200 resamples of the test rows, router fixed): "
        + "; ".join(f"{k} {v}" for k, v in boot.items() if k != "mean_margin")
        + f"; mean_margin [{boot['mean_margin'].low:+.4f}, {boot['mean_margin'].high:+.4f}]"
    )
    segs = segments(r)
    for s in segs:
        print(
            f"  hull segment {_short(s.cheaper)} -> {_short(s.dearer)}: {s.range_share:.0%} "
            f"of the range, router above on {s.above:.0%}; scores differ on {s.differ:.0%} "
            f"of rows, AUC of P(dearer)-P(cheaper) there {s.auc:.3f}"
        )
    if r.reference is not None and r.cost_at_reference_share is not None:
        from tierroute.eval.hull import frontier

        k = r.table.models.index(r.reference)
        half = float(np.interp(0.5 * r.single_cost[k], *frontier(r.curve_cost, r.curve_quality)))
        print(
            f"  at half {_short(r.reference)}'s cost the router's quality is {half:.4f} "
            f"against its {r.single_quality[k]:.4f}"
        )
    m = mixed(r)
    ref = (
        ""
        if m.cost_at_reference_share is None
        else f", reference's quality at {_pct(m.cost_at_reference_share)} of its cost"
    )
    print(
        f"  two lambdas mixed per request at random (the hull of the router's own points): "
        f"best single's quality at {_pct(m.cost_at_best_quality_share)} of its cost{ref}; "
        f"mean margin {m.mean_margin:+.4f}"
    )
    target_model = r.reference if r.reference in r.table.models else r.best_single
    k = r.table.models.index(target_model)
    router_mix, oracle_mix = mix_at_quality(r, float(r.single_quality[k]))
    for who, mix in (("router", router_mix), ("oracle", oracle_mix)):
        if mix is None:
            print(f"  {who}: no single operating point reaches {_short(target_model)}'s quality")
            continue
        print(
            f"  {who}'s cheapest point at {_short(target_model)}'s quality: "
            f"{mix.quality:.4f} at {mix.cost / r.single_cost[k]:.1%} of its cost; per source: "
            + "; ".join(
                f"{source or 'all'} "
                + ", ".join(f"{_short(name)} {share:.0%}" for name, share in list(by.items())[:4])
                for source, by in mix.by_source.items()
            )
        )
    a, b, differ = closest_columns(r)
    print(f"  the two most alike columns, {_short(a)} and {_short(b)}, differ on {differ:.0%}")
    return {
        "mixed": asdict(m),
        "mix_at_reference_quality": {
            "router": None if router_mix is None else asdict(router_mix),
            "oracle": None if oracle_mix is None else asdict(oracle_mix),
        },
        "oracle": asdict(o),
        "bootstrap": {k: asdict(v) for k, v in boot.items()},
        "segments": [asdict(s) for s in segs],
        "closest_columns": {"models": [a, b], "differ": differ},
    }


def offline(args: argparse.Namespace) -> None:
    """The N-model table and plots over the shared outcome files."""
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.nmodel import (
        calibrated,
        cost_model_named,
        evaluate_nmodel,
        json_ready,
        load_tables,
        recipe_fitter,
        report_lines,
    )
    from tierroute.eval.plot import plot_nmodel

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = TextEncoder(Embedder(), EmbeddingCache())
    fitter = recipe_fitter(encoder, args.router)
    if args.calibrate:
        fitter = calibrated(fitter)
    cost_model = cost_model_named(args.cost_model, encoder)
    rows, docs = [], []
    for key in args.files:
        path = DATA / FILES[key]
        if not path.is_file():
            print(f"skipped {key}: {path} is absent")
            continue
        for table in load_tables(str(path), axis=args.axis):
            start = time.perf_counter()
            r = evaluate_nmodel(
                table, fitter, seed=args.seed, cost_model=cost_model, candidates=args.candidates
            )
            took = time.perf_counter() - start
            print("\n".join(report_lines(r)) + f"\n  ({took:.0f}s)", flush=True)
            d = r.as_dict()
            if args.diagnose:
                d["diagnosis"] = diagnose(r, args.seed)
            print(flush=True)
            slug = "".join(c if c.isalnum() else "-" for c in table.label).strip("-")
            plot_nmodel(r, out / f"nmodel-{slug}.png")
            docs.append(d)
            ref = d["cost_at_reference_quality_share"]
            pair = " + ".join(_short(m) for m in d["best_pair"]["models"])
            rows.append(
                f"| {table.label} | {len(table.models)} | {d['rows_tested']:,} | {d['split']} | "
                f"{d['above_hull_share']:.1%} | {d['worst_point']['margin']:+.4f} at "
                f"{_at(d['worst_point']['cost'], args.axis)} | "
                f"{d['mean_margin_above_hull']:+.4f} | "
                f"{_short(d['best_single']['model'])} "
                f"{d['best_single']['quality']:.3f} | {_pct(d['cost_at_best_quality_share'])} | "
                f"{'-' if ref is None else _pct(ref)} | "
                f"{pair} {d['best_pair']['above_hull_share']:.0%} |"
            )
    header = (
        "| table | models | rows tested | split | N-model above hull | worst point | "
        "mean margin | best single (quality) | cost to reach it | GPT-4 quality at | "
        "best pair, above hull |\n|---|---|---|---|---|---|---|---|---|---|---|"
    )
    text = (
        f"# N-model routing against the single models' hull (router {args.router}, cost "
        f"model {args.cost_model}{', calibrated' if args.calibrate else ''}"
        f"{', cost axis: model size' if args.axis == 'size' else ''}"
        f"{'' if args.candidates == 'all' else f', {args.candidates} candidates'})\n\n"
        "Share of the router's dollar range above the hull, its worst margin there "
        "(quality units), the mean margin; the cost at which the router reaches the best "
        "single model's quality, as a share of that model's cost ('never' if it does "
        "not).\n\n" + header + "\n" + "\n".join(rows) + "\n"
    )
    stem = "nmodel" if args.axis == "usd" else "nmodel-size"
    (out / f"{stem}.md").write_text(text)
    (out / f"{stem}.json").write_text(json.dumps(json_ready({"tables": docs}), indent=2) + "\n")
    print(text)
    print(f"wrote {out / stem}.md, {out / stem}.json and the PNGs")


def live(args: argparse.Namespace) -> None:
    import collab_live  # beside this file (main puts its folder on sys.path)

    collab_live.live(args)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--offline", action="store_true", help="the N-model table and plots on outcome files"
    )
    parser.add_argument("--live", action="store_true", help="the collaboration strategies, live")
    parser.add_argument("--out", default="bench-out")
    parser.add_argument(
        "--router",
        choices=("default", "factor", "irt", "mf"),
        default="default",
        help="default: factor router blended with knn per-model rates; factor: rank 2 alone",
    )
    parser.add_argument(
        "--diagnose",
        action="store_true",
        help="also the oracle, bootstrap intervals and what the router knows per hull segment",
    )
    parser.add_argument("--files", nargs="+", choices=list(FILES), default=list(FILES))
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--cost-model",
        choices=("neighbours", "length", "mean"),
        default="neighbours",
        help="what the router expects a model to cost: a line in the prompt's length "
        "corrected by the nearest training prompts (default), the line alone, or the "
        "training mean",
    )
    parser.add_argument(
        "--axis",
        choices=("usd", "size"),
        default="usd",
        help="the cost axis: dollars per query (default) or published parameter count "
        "(open-weights models only; the issue's 'dollar (or model-size) range')",
    )
    parser.add_argument(
        "--calibrate", action="store_true", help="per-model Platt calibration (tried: worse)"
    )
    parser.add_argument(
        "--candidates",
        choices=("all", "pareto", "hull"),
        default="all",
        help="models the router may choose: all (default), the training rows' Pareto front "
        "or their convex hull (both tried: worse on RouterBench's training split)",
    )
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import collab_live

    collab_live.add_arguments(parser)
    args = parser.parse_args()
    if not (args.offline or args.live):
        parser.error("say what to run: --offline and/or --live")
    if args.offline:
        offline(args)
    if args.live:
        live(args)


if __name__ == "__main__":
    main()
