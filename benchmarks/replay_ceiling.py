"""What N labels of a deployment's own traffic can teach, on `tierroute replay`'s rows.

    python benchmarks/replay_ceiling.py --data FILE --small M --large M [--skip F=P]
        [--limit 4000] [--seeds 0 1] [--labels 100 250 500 1000 0]

The same seeded order and evaluation set as `tierroute replay` (`replay.split`), the
same cold router (`--router`, default `default`) and embedding; each learner is fitted
directly on the first N traffic rows' labels (0: every traffic row), with no gateway
and no promotion check, and scored by APGR on the evaluation rows:

- resid L2: the gateway learner's correction (`ResidualRouter`) at a fixed penalty;
- knn: the label rate of the 100 nearest labelled prompts (cosine, temperature 0.1);
- knn+cold: that rate shrunk toward the cold router's score, recalibrated on the labels
  (weight 10 pseudo-neighbours).

It bounds what the replay learner can reach: when no learner here moves APGR by 0.05
at 500 labels, the gateway's learner cannot either, with these inputs.
"""

from __future__ import annotations

import argparse
from typing import Any

import numpy as np


def knn_rate(xt: Any, yt: Any, xe: Any, k: int = 100, temp: float = 0.1) -> tuple[Any, Any]:
    """(weighted count of positive neighbours, total weight) of each row of `xe`."""
    sims = xe @ xt.T
    k = min(k, len(yt))
    idx = np.argpartition(-sims, k - 1, axis=1)[:, :k]
    top = np.take_along_axis(sims, idx, axis=1)
    w = np.exp((top - top.max(axis=1, keepdims=True)) / temp)
    return (w * yt[idx]).sum(axis=1), w.sum(axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", required=True)
    parser.add_argument("--small", required=True)
    parser.add_argument("--large", required=True)
    parser.add_argument("--skip", action="append", default=[], metavar="FIELD=PREFIX")
    parser.add_argument("--router", default="default")
    parser.add_argument("--limit", type=int)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    parser.add_argument("--labels", type=int, nargs="+", default=[100, 250, 500, 1000, 0])
    args = parser.parse_args()

    from sklearn.linear_model import LogisticRegression

    from tierroute.artifact import open_router
    from tierroute.data import load_outcomes
    from tierroute.embed import EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.metrics import routing_curve, summary
    from tierroute.replay import skip_prefixed, split
    from tierroute.routers.residual import ResidualRouter

    o = skip_prefixed(load_outcomes(args.data, args.small, args.large, ()), args.skip)
    cold, _ = open_router(args.router, lambda: TextEncoder(disk_cache=EmbeddingCache()))
    encoder = getattr(cold, "encoder", None) or TextEncoder(disk_cache=EmbeddingCache())

    def apgr(scores: Any, rows: Any) -> float:
        return float(summary(routing_curve(scores, rows.small, rows.large))["apgr"])

    print(f"{o.path}: {args.small} vs {args.large}, {len(o)} rows (limit {args.limit})")
    for seed in args.seeds:
        evaluation, traffic = split(o, seed, args.limit, None)
        probe = ResidualRouter(cold, args.router, encoder)
        ze, xe = probe.inputs(evaluation.prompts)
        cold_apgr = apgr(ze, evaluation)
        random_apgr = apgr(np.random.default_rng(seed).random(len(evaluation)), evaluation)
        oracle = apgr(evaluation.large - evaluation.small, evaluation)
        print(
            f"seed {seed}: {len(evaluation)} evaluation rows, random {random_apgr:.3f}, "
            f"cold {cold_apgr:.3f}, oracle {oracle:.3f}"
        )
        for n in args.labels:
            rows = traffic.subset(np.arange(len(traffic) if n == 0 else min(n, len(traffic))))
            z, x = probe.inputs(rows.prompts)
            y = rows.labels
            found: dict[str, float] = {}
            for l2 in (1.0, 10.0, 100.0):
                r = ResidualRouter(cold, args.router, encoder, l2=l2).fit_inputs(z, x, y)
                found[f"resid {l2:g}"] = apgr(r.score_inputs(ze, xe), evaluation)
            votes, weight = knn_rate(x, y, xe)
            found["knn"] = apgr(votes / weight, evaluation)
            prior = LogisticRegression().fit(z[:, None], y).predict_proba(ze[:, None])[:, 1]
            found["knn+cold"] = apgr((votes + 10 * prior) / (weight + 10), evaluation)
            cells = "  ".join(f"{k} {v:.3f} ({v - cold_apgr:+.3f})" for k, v in found.items())
            print(f"  {len(rows):5d} labels: {cells}", flush=True)


if __name__ == "__main__":
    main()
