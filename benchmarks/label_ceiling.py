"""How much N in-domain labels can buy: the learning curve of a plain learner that sees the
pair's own outcomes, beside the cold default router, on one file.

    python benchmarks/label_ceiling.py [--file MMLU-Pro] [--labels 100 250 500 1000 0]

For each N (0: every row of the other folds), 5-fold CV repeated `--repeats` times: a ridge
regression of the pair's quality gap (large - small) on the router's own inputs (MiniLM
embedding + text features), fitted on N rows drawn from four folds, scored on the fifth.
The penalty is chosen per N from a small grid on the training rows alone (inner 3-fold
CV). It is a yardstick for `tierroute replay`'s +0.05-after-500-labels target: if a
learner that gets the labels directly, with no prior to fight, cannot move APGR by 0.05
on these inputs, the replay learner cannot either, and the signal has to come from
elsewhere (another encoder, the tiers' own answers).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

PENALTIES = (10.0, 100.0, 1000.0, 10000.0)


def ridge_fit(x: np.ndarray, y: np.ndarray, penalty: float) -> tuple[np.ndarray, ...]:
    mean, scale = x.mean(0), x.std(0) + 1e-9
    z = (x - mean) / scale
    beta = np.linalg.solve(z.T @ z + penalty * np.eye(z.shape[1]), z.T @ (y - y.mean()))
    return mean, scale, beta


def ridge_predict(model: tuple[np.ndarray, ...], x: np.ndarray) -> np.ndarray:
    mean, scale, beta = model
    out: np.ndarray = ((x - mean) / scale) @ beta
    return out


def pick_penalty(x: np.ndarray, y: np.ndarray, rng: np.random.Generator) -> float:
    folds = rng.integers(0, 3, len(y))
    errors = []
    for penalty in PENALTIES:
        err = 0.0
        for k in range(3):
            fit = folds != k
            model = ridge_fit(x[fit], y[fit], penalty)
            err += float(np.sum((ridge_predict(model, x[~fit]) - y[~fit]) ** 2))
        errors.append(err)
    return PENALTIES[int(np.argmin(errors))]


def main() -> None:
    import quality_bench as qb

    from tierroute.artifact import open_router
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.metrics import apgr, routing_curve
    from tierroute.features import prompt_features

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    names = [f.name for f in qb.LOO_FILES]
    parser.add_argument("--file", default="MMLU-Pro", choices=names)
    parser.add_argument("--labels", nargs="+", type=int, default=[100, 250, 500, 1000, 0])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()

    held = next(f for f in qb.LOO_FILES if f.name == args.file)
    test, _ = qb.loo_parts(held, list(qb.LOO_FILES))
    encoder = TextEncoder(Embedder(), EmbeddingCache())
    x = prompt_features(encoder, test.prompts)
    small, large = np.asarray(test.small), np.asarray(test.large)
    gap = large - small
    router, _ = open_router("default", lambda: encoder)

    def score(s: np.ndarray) -> float:
        return apgr(routing_curve(s, small, large))

    print(f"{held.name}: {held.small} -> {held.large}, {len(test):,} rows")
    print(f"random {score(np.random.default_rng(0).random(len(gap))):.3f}")
    print(f"cold default router {score(router.score_texts(test.prompts)):.3f}")
    print(f"difficulty ceiling {qb.difficulty_ceiling(test):.3f}")
    rng = np.random.default_rng(0)
    for n in args.labels:
        results = []
        for _ in range(args.repeats):
            folds = rng.integers(0, 5, len(gap))
            pred = np.zeros(len(gap))
            for k in range(5):
                pool = np.flatnonzero(folds != k)
                if n:
                    pool = rng.choice(pool, min(n, len(pool)), replace=False)
                penalty = pick_penalty(x[pool], gap[pool], rng)
                model = ridge_fit(x[pool], gap[pool], penalty)
                pred[folds == k] = ridge_predict(model, x[folds == k])
            results.append(score(pred))
        label = f"{n} labels" if n else "all labels (4/5 of the file)"
        print(f"{label}: APGR {np.mean(results):.3f} (sd {np.std(results):.3f})", flush=True)


if __name__ == "__main__":
    main()
