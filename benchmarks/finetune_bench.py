"""The fine-tuned encoder router ("bert") against logistic regression, in one command.

    python benchmarks/finetune_bench.py [--layers 1] [--epochs 1] [--threads 1] [--no-baseline]

MMLU (GPT-4 vs Mixtral): grouped 5-fold CV by subject through tierroute.eval.harness.
RouterBench (GPT-4 vs Mistral-7B, vs Mixtral): trained on the file's train split, scored on
its test split. Prints a markdown table (and writes bench-out/finetune.md) with APGR,
CPT(50%), seconds per fit, and scoring latency: one query at a time (the gateway's case)
and per query in a batch of 500. Training runs with `--threads` torch threads; scoring
with as many onnxruntime threads. Frozen-layer outputs are memoised in the process, so
the first MMLU fold pays for most of the frozen forward passes.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"
MMLU = ("mmlu_gpt4_mixtral.jsonl", "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview")
ROUTERBENCH = "routerbench_arc_winogrande_mbpp.jsonl"
RB_PAIRS = (
    ("mistralai/mistral-7b-chat", "gpt-4-1106-preview"),
    ("mistralai/mixtral-8x7b-chat", "gpt-4-1106-preview"),
)


@dataclass
class Row:
    setup: str
    router: str
    apgr: float
    cpt50: float
    fit_s: float
    single_ms: float | None = None
    batch_ms: float | None = None
    note: str = ""

    def line(self) -> str:
        def ms(v: float | None) -> str:
            return "-" if v is None else f"{v:.1f}"

        return (
            f"| {self.setup} | {self.router} | {self.apgr:.3f} | {self.cpt50:.1%} | "
            f"{self.fit_s:.0f} | {ms(self.single_ms)} | {ms(self.batch_ms)} | {self.note} |"
        )


def latency(score: Callable[[Sequence[str]], Any], prompts: Sequence[str]) -> tuple[float, float]:
    """(median ms of one query scored alone over 100 queries, ms/query in a batch of 500)."""
    score(prompts[:2])  # warm: builds the ONNX session
    singles = []
    for p in prompts[:100]:
        begin = time.perf_counter()
        score([p])
        singles.append((time.perf_counter() - begin) * 1000)
    batch = list(prompts[:500])
    begin = time.perf_counter()
    score(batch)
    return statistics.median(singles), (time.perf_counter() - begin) * 1000 / len(batch)


def figures(
    scores: npt.NDArray[np.float64], small: npt.NDArray[Any], large: npt.NDArray[Any]
) -> dict[str, float]:
    from tierroute.eval.metrics import routing_curve, summary

    return summary(routing_curve(scores, small, large))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    # Router parameters; unset ones keep FineTunedRouter's defaults.
    parser.add_argument("--layers", type=int)
    parser.add_argument("--epochs", type=int)
    parser.add_argument("--lr", type=float)
    parser.add_argument("--head-lr", type=float)
    parser.add_argument("--val-fraction", type=float)
    parser.add_argument("--no-amp", dest="amp", action="store_false", default=None)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--folds", type=int, default=5)
    parser.add_argument("--skip", nargs="*", default=[], choices=["mmlu", "routerbench"])
    parser.add_argument("--no-baseline", action="store_true", help="skip the logreg rows")
    parser.add_argument("--out", default="bench-out")
    args = parser.parse_args()

    from tierroute.data import load_outcomes
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.harness import evaluate
    from tierroute.routers import make_router
    from tierroute.routers.finetuned import FineTunedRouter

    given = ("layers", "epochs", "lr", "head_lr", "val_fraction", "amp", "threads")
    params: dict[str, Any] = {k: getattr(args, k) for k in given if getattr(args, k) is not None}
    name = "bert " + ", ".join(
        f"{k}={v}" for k, v in FineTunedRouter(**params).get_params().items()
    )
    fits: list[tuple[float, FineTunedRouter]] = []

    def bert() -> FineTunedRouter:
        class Timed(FineTunedRouter):
            def fit(self, texts: Sequence[str], labels: npt.ArrayLike) -> Timed:
                begin = time.perf_counter()
                super().fit(texts, labels)
                fits.append((time.perf_counter() - begin, self))
                return self

        return Timed(**params)

    encoder = TextEncoder(Embedder(), EmbeddingCache())
    rows: list[Row] = []
    print(f"router: {name}", flush=True)

    if "mmlu" not in args.skip and (DATA / MMLU[0]).is_file():
        o = load_outcomes(DATA / MMLU[0], MMLU[1], MMLU[2])
        setup = f"MMLU Mixtral->GPT-4, {args.folds}-fold CV by subject"
        begin = time.perf_counter()
        ev = evaluate("bert", o, factory=bert, cv_group="meta.domain", n_folds=args.folds)
        total = time.perf_counter() - begin
        last = fits[-1][1]
        single, batch = latency(last.score_texts, o.prompts)
        size = sum(v.nbytes for v in last.get_state().values()) / 1e6
        rows.append(
            Row(
                setup,
                "bert",
                ev.figures["apgr"],
                ev.figures["cpt50"],
                statistics.mean(f for f, _ in fits),
                single,
                batch,
                f"CV {total / 60:.1f} min; fits {', '.join(f'{f:.0f}' for f, _ in fits)} s; "
                f"state {size:.1f} MB; val-kept check per fold "
                + ", ".join(str(r.best_check_) for _, r in fits),
            )
        )
        print(rows[-1].line(), flush=True)
        if not args.no_baseline:
            begin = time.perf_counter()
            ev = evaluate(
                "logreg",
                o,
                factory=lambda: make_router("logreg", lambda: encoder),
                cv_group="meta.domain",
                n_folds=args.folds,
            )
            fit_s = (time.perf_counter() - begin) / args.folds
            rows.append(Row(setup, "logreg", ev.figures["apgr"], ev.figures["cpt50"], fit_s))
            print(rows[-1].line(), flush=True)

    if "routerbench" not in args.skip and (DATA / ROUTERBENCH).is_file():
        for small, large in RB_PAIRS:
            train = load_outcomes(DATA / ROUTERBENCH, small, large, ["meta.routerdc_split=train"])
            test = load_outcomes(DATA / ROUTERBENCH, small, large, ["meta.routerdc_split=test"])
            setup = f"RouterBench {small.split('/')[-1]}->GPT-4, own split"
            candidates: list[tuple[str, Callable[[], Any]]] = [("bert", bert)]
            if not args.no_baseline:
                candidates.append(("logreg", lambda: make_router("logreg", lambda: encoder)))
            for label, factory in candidates:
                router = factory()
                begin = time.perf_counter()
                router.fit(train.prompts, train.labels)
                fit_s = time.perf_counter() - begin
                f = figures(router.score_texts(test.prompts), test.small, test.large)
                row = Row(setup, label, f["apgr"], f["cpt50"], fit_s)
                if label == "bert":
                    row.single_ms, row.batch_ms = latency(router.score_texts, test.prompts)
                    row.note = f"val-kept check {router.best_check_}"
                rows.append(row)
                print(row.line(), flush=True)

    header = (
        "| setup | router | APGR | CPT50 | fit s | ms/query alone | ms/query in batch | notes |\n"
        "|---|---|---|---|---|---|---|---|"
    )
    table = "\n".join([header, *(r.line() for r in rows)])
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "finetune.md").write_text(f"# Fine-tuned encoder router\n\n{name}\n\n{table}\n")
    print(f"\n{name}\n\n{table}\n\nwrote {out / 'finetune.md'}")


if __name__ == "__main__":
    main()
