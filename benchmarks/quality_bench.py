"""Routing quality of every router on every outcome file, in one command.

    python benchmarks/quality_bench.py [--out bench-out] [--routers random rules knn logreg]

Writes bench-out/quality.md (a markdown table) and one PNG per (data, router), and prints
the table. Each row is a cross-validated evaluation (grouped as named) or a train/test
split, with random, oracle and RouteLLM's published figures beside it, and the router's
fitting time and scoring time (per query, in a batch, embeddings from the disk cache;
benchmarks/route_bench.py measures latency with the embedding) measured in the same run.
AlpacaEval (CC BY-NC) is used for evaluation only.
"""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"


@dataclass(frozen=True)
class Setup:
    name: str
    file: str
    small: str
    large: str
    cv_group: str | None = None
    folds: int = 5
    train_where: str | None = None
    test_where: str | None = None


SETUPS = (
    Setup(
        "MMLU, grouped by subject",
        "mmlu_gpt4_mixtral.jsonl",
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "gpt-4-1106-preview",
        "meta.domain",
    ),
    Setup(
        "RouterBench Mistral-7B, own split",
        "routerbench_arc_winogrande_mbpp.jsonl",
        "mistralai/mistral-7b-chat",
        "gpt-4-1106-preview",
        train_where="meta.routerdc_split=train",
        test_where="meta.routerdc_split=test",
    ),
    Setup(
        "RouterBench Mixtral, own split",
        "routerbench_arc_winogrande_mbpp.jsonl",
        "mistralai/mixtral-8x7b-chat",
        "gpt-4-1106-preview",
        train_where="meta.routerdc_split=train",
        test_where="meta.routerdc_split=test",
    ),
    Setup(
        "RouterBench Mistral-7B, grouped by subset",
        "routerbench_arc_winogrande_mbpp.jsonl",
        "mistralai/mistral-7b-chat",
        "gpt-4-1106-preview",
        "subset",
        folds=3,
    ),
    Setup(
        "AlpacaEval 2, grouped by subset",
        "alpacaeval2_vs_gpt4turbo.jsonl",
        "FuseChat-Llama-3.2-1B-Instruct",
        "gpt4_1106_preview",
        "subset",
    ),
)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument("--routers", nargs="+", default=["random", "rules", "knn", "logreg"])
    args = parser.parse_args()

    from tierroute.data import load_outcomes
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.harness import evaluate
    from tierroute.eval.plot import plot_evaluation
    from tierroute.routers import make_router

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = TextEncoder(Embedder(), EmbeddingCache())
    lines = [
        "| data | router | APGR | CPT50 | CPT80 | random APGR | oracle APGR | published "
        "| fit s | score ms/query (cached embeddings) |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for setup in SETUPS:
        path = DATA / setup.file
        if not path.is_file():
            print(f"skipped {setup.name}: {path} is absent")
            continue
        for name in args.routers:
            start = time.perf_counter()
            if setup.train_where:
                train = load_outcomes(path, setup.small, setup.large, [setup.train_where])
                test = load_outcomes(path, setup.small, setup.large, [str(setup.test_where)])
                router = make_router(name, lambda: encoder)
                router.fit(train.prompts, train.labels)
                train_s = time.perf_counter() - start
                ev = evaluate(name, test, fixed=router)
            else:
                data = load_outcomes(path, setup.small, setup.large)
                learned = name in ("knn", "logreg")
                ev = evaluate(
                    name,
                    data,
                    factory=(lambda n=name: make_router(n, lambda: encoder)) if learned else None,
                    fixed=None if learned else make_router(name, lambda: encoder),
                    cv_group=setup.cv_group,
                    n_folds=setup.folds,
                )
                train_s = (time.perf_counter() - start) / setup.folds if learned else 0.0
                router = make_router(name, lambda: encoder)
                if learned:
                    router.fit(data.prompts, data.labels)
            probe = ev.outcomes.prompts[:500]
            begin = time.perf_counter()
            router.score_texts(probe)
            score_ms = (time.perf_counter() - begin) * 1000 / len(probe)
            f, b = ev.figures, ev.baselines
            published = (
                "; ".join(f"{k}: {v['apgr']:.3f}/{v['cpt50']:.1%}" for k, v in ev.published.items())
                or "-"
            )
            lines.append(
                f"| {setup.name} | {name} | {f['apgr']:.3f} | {f['cpt50']:.1%} | "
                f"{f['cpt80']:.1%} | {b['random']['apgr']:.3f} | {b['oracle']['apgr']:.3f} | "
                f"{published} | {train_s:.1f} | {score_ms:.2f} |"
            )
            slug = "".join(c if c.isalnum() else "_" for c in setup.name.lower())
            plot_evaluation(ev, out / f"{slug}_{name}.png")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    (out / "quality.md").write_text(
        "# tierroute routing quality\n\nAPGR and CPT from out-of-fold scores (grouped CV) or "
        "the file's own train/test split. fit s: seconds per fit (per fold under CV, with "
        "embeddings from the disk cache); score ms/query: batch scoring of 500 prompts with "
        "cached embeddings. End-to-end latency with the embedding is benchmarks/route_bench.py."
        "\n\n" + table + "\n"
    )
    print(f"\n{table}\n\nwrote {out / 'quality.md'} and the plots")


if __name__ == "__main__":
    main()
