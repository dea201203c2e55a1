"""Routing quality of every router, in domain and across datasets, in one command.

    python benchmarks/quality_bench.py [--out bench-out] [--routers random rules knn ...]
    python benchmarks/quality_bench.py --leave-one-out [--recipes NAME ...]

--leave-one-out is the yardstick that chooses the shipped default: for each file in turn
(MMLU, MMLU-Pro, RouterBench, Arena-Hard; AlpacaEval only as a test, its licence forbids
training a shipped router) a recipe is trained on every other licence-ok file and tested
on the one left out, for that file's strongest model against a clearly weaker one
(LOO_FILES). MMLU-Pro's ori_mmlu* rows are MMLU questions: they are dropped from MMLU-Pro
whenever MMLU is on the other side. Writes bench-out/leave_one_out.md. Beside the
recipes: the difficulty ceiling and the pair-aware ceilings (an item-response model's
expected gain for the pair, a model-profile gap), which need no embedding: `--recipes`
with no name prints only those. `--sample N` cuts every file to N random rows.
`--train-on static` trains and tests every recipe on the static table distilled from
MiniLM (the `default-static` router's embedding) instead of MiniLM fp32.

Writes bench-out/quality.md (markdown tables) and PNG plots, and prints the tables.

- In domain: MMLU under grouped 5-fold CV by subject (no subject in both parts);
  RouterBench on its own train/test split (meta.routerdc_split) for Mistral-7B and
  Mixtral against GPT-4, with the dollar curve against the convex hull of the 11
  single models (RouterBench's "zero router"); AlpacaEval 2 under grouped CV (its data
  is CC BY-NC: evaluation only, never in a shipped router).
- Across datasets: trained on RouterBench, tested on MMLU; trained on MMLU, tested on
  RouterBench's test rows; trained on MMLU + RouterBench (the default router's recipe),
  tested on AlpacaEval. A router trained on one pair and tested on another keeps its
  training pair (named in the row).
- Beside each: random, oracle, RouteLLM's published figures, fit time and scoring time
  (per query in a batch, embeddings from the disk cache; benchmarks/route_bench.py
  measures latency with the embedding). "ensemble" averages the ranks of the mf and
  knn scores of the same run.
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
DATA = ROOT.parent / "shared" / "data"

MMLU = "mmlu_gpt4_mixtral.jsonl"
RB = "routerbench_arc_winogrande_mbpp.jsonl"
ALPACA = "alpacaeval2_vs_gpt4turbo.jsonl"
GPT4 = "gpt-4-1106-preview"
MIXTRAL = "mistralai/mixtral-8x7b-chat"  # MMLU's "mistralai/Mixtral-8x7B-Instruct-v0.1"
MISTRAL = "mistralai/mistral-7b-chat"
ALPACA_SMALL, ALPACA_LARGE = "FuseChat-Llama-3.2-1B-Instruct", "gpt4_1106_preview"
TRAIN, TEST = "meta.routerdc_split=train", "meta.routerdc_split=test"
PRO = "mmlu_pro_30models.jsonl"
ARENA = "arenahard_v01_vs_gpt4_0314.jsonl"


@dataclass(frozen=True)
class LooFile:
    name: str
    file: str
    small: str  # a clearly weaker model of the file
    large: str  # the file's strongest model
    trains: bool = True  # False: its licence allows evaluation only


LOO_FILES = (
    LooFile("MMLU", MMLU, MIXTRAL, GPT4),
    LooFile("MMLU-Pro", PRO, "Meta-Llama-3_1-8B-Instruct", "gpt-4o-2024-05-13"),
    LooFile("RouterBench", RB, MISTRAL, GPT4),
    LooFile("Arena-Hard", ARENA, "llama3_1_8b (judge gpt-4o)", "gpt-4o (judge gpt-4o)"),
    LooFile("AlpacaEval 2", ALPACA, ALPACA_SMALL, ALPACA_LARGE, trains=False),
)


@dataclass(frozen=True)
class Part:
    files: tuple[str, ...]
    small: str
    large: str
    where: tuple[str, ...] = ()


@dataclass(frozen=True)
class Setup:
    name: str
    test: Part
    train: Part | None = None  # None: grouped cross-validation on the test part
    cv_group: str | None = None
    folds: int = 5
    hull: bool = False  # compare the dollar curve with the single models' hull


SETUPS = (
    Setup("MMLU, grouped CV by subject", Part((MMLU,), MIXTRAL, GPT4), cv_group="meta.domain"),
    Setup(
        "RouterBench Mistral-7B, own split",
        Part((RB,), MISTRAL, GPT4, (TEST,)),
        Part((RB,), MISTRAL, GPT4, (TRAIN,)),
        hull=True,
    ),
    Setup(
        "RouterBench Mixtral, own split",
        Part((RB,), MIXTRAL, GPT4, (TEST,)),
        Part((RB,), MIXTRAL, GPT4, (TRAIN,)),
        hull=True,
    ),
    Setup(
        "AlpacaEval 2, grouped CV by subset (eval-only data)",
        Part((ALPACA,), ALPACA_SMALL, ALPACA_LARGE),
        cv_group="subset",
    ),
    Setup("cross: RouterBench -> MMLU", Part((MMLU,), MIXTRAL, GPT4), Part((RB,), MIXTRAL, GPT4)),
    Setup(
        "cross: MMLU -> RouterBench Mistral-7B test (trained on the Mixtral pair)",
        Part((RB,), MISTRAL, GPT4, (TEST,)),
        Part((MMLU,), MIXTRAL, GPT4),
    ),
    Setup(
        "cross: MMLU -> RouterBench Mixtral test",
        Part((RB,), MIXTRAL, GPT4, (TEST,)),
        Part((MMLU,), MIXTRAL, GPT4),
    ),
    Setup(
        "cross: MMLU + RouterBench -> AlpacaEval 2 (trained on the Mixtral pair)",
        Part((ALPACA,), ALPACA_SMALL, ALPACA_LARGE),
        Part((MMLU, RB), MIXTRAL, GPT4),
    ),
)


def load(part: Part) -> Any:
    from tierroute.data import concat_outcomes, load_outcomes

    return concat_outcomes(
        [load_outcomes(DATA / f, part.small, part.large, part.where) for f in part.files]
    )


def rank_average(*scores: np.ndarray) -> np.ndarray:
    from scipy.stats import rankdata

    return np.mean([rankdata(s) / len(s) for s in scores], axis=0)


def hull_figures(test: Any, router: Any, train: Any) -> tuple[str, str]:
    """(pair router vs hull, factor router over all 11 models vs hull)."""
    from tierroute.eval.hull import multi_model_curve, share_above, single_model_hull
    from tierroute.eval.metrics import routing_curve

    quality, costs = test.model_scores(), test.model_scores("cost_usd")
    hull = single_model_hull(
        quality.models, np.nanmean(quality.scores, 0), np.nanmean(costs.scores, 0)
    )
    scores = router.score_texts(test.prompts)
    curve = routing_curve(scores, test.small, test.large, test.small_cost, test.large_cost)
    share, worst = share_above(hull, curve.cost, curve.quality)
    pair = f"{share:.0%} of its $ range (worst {worst:+.3f})"
    if not hasattr(router, "model_probabilities"):
        return pair, "-"
    probs = router.model_probabilities(test.prompts)
    columns = [router.models_.index(m) for m in quality.models]
    expected = np.nanmean(train.model_scores("cost_usd").scores, 0)
    xs, ys = multi_model_curve(probs[:, columns], quality.scores, costs.scores, expected)
    share_all, worst_all = share_above(hull, xs, ys)
    return pair, f"{share_all:.0%} (worst {worst_all:+.3f}; best {ys.max():.3f})"


def loo_outcomes(f: LooFile, drop_ori_mmlu: bool) -> Any:
    from tierroute.data import load_outcomes

    o = load_outcomes(DATA / f.file, f.small, f.large)
    if drop_ori_mmlu:
        keep = [
            i
            for i, row in enumerate(o.rows)
            if not str(row.get("meta", {}).get("src", "")).startswith("ori_mmlu")
        ]
        o = o.subset(keep)
    return o


def loo_parts(held_out: LooFile, files: list[LooFile]) -> tuple[Any, list[tuple[LooFile, Any]]]:
    """(the held-out file's test rows, [(file, rows)] of every other licence-ok file)."""
    others = [f for f in files if f.trains and f != held_out]
    names = {f.file for f in others}
    test = loo_outcomes(held_out, held_out.file == PRO and MMLU in names)
    train = [(f, loo_outcomes(f, f.file == PRO and held_out.file == MMLU)) for f in others]
    return test, train


def difficulty_ceiling(test: Any) -> float:
    """APGR of the prompt's measured difficulty: 1 - the mean score of the file's other
    models (not the pair). A router that knew each prompt's difficulty exactly scores
    about this, so it bounds what a difficulty score (all this table's recipes) can reach;
    nan when the file has no other models (MMLU)."""
    from tierroute.data import canonical_model
    from tierroute.eval.metrics import apgr, routing_curve

    table = test.model_scores()
    pair = {canonical_model(test.small_model), canonical_model(test.large_model)}
    others = [j for j, m in enumerate(table.models) if m not in pair]
    if not others:
        return float("nan")
    scores = table.scores[:, others]
    if np.nanmin(scores) < 0:  # pairwise verdicts in [-1, 1]
        scores = (scores + 1.0) / 2.0
    counts = np.sum(~np.isnan(scores), axis=1)
    mean = np.nansum(scores, axis=1) / np.maximum(counts, 1)
    difficulty = np.where(counts > 0, 1.0 - mean, 0.5)
    return apgr(routing_curve(difficulty, test.small, test.large))


# Guessing floors of the multiple-choice files (1 / options), per subset where they differ:
# the c of a 3PL item-response model. Open-ended and pairwise files have none.
GUESS_FLOORS: dict[str, dict[str, float]] = {
    MMLU: {"*": 0.25},
    PRO: {"*": 0.1},
    RB: {"arc-challenge": 0.25, "winogrande": 0.5, "*": 0.0},
}


def guess_floor(test: Any) -> np.ndarray:
    """Each row's guessing floor, from its file's (or subset's) number of options."""
    floors = next((v for k, v in GUESS_FLOORS.items() if test.path.endswith(k)), {"*": 0.0})
    return np.array([floors.get(s, floors["*"]) for s in test.field("subset")])


def _other_models(test: Any) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(the file's other models' scores, small's, large's), all mapped to [0, 1]."""
    from tierroute.data import canonical_model

    table = test.model_scores()
    pair = {canonical_model(test.small_model), canonical_model(test.large_model)}
    others = [j for j, m in enumerate(table.models) if m not in pair]
    scores, small, large = table.scores[:, others], test.small, test.large
    if min(np.nanmin(table.scores), small.min(), large.min()) < 0:  # verdicts in [-1, 1]
        scores, small, large = (scores + 1) / 2, (small + 1) / 2, (large + 1) / 2
    return scores, small, large


def pair_aware_ceilings(test: Any) -> dict[str, float]:
    """APGR of scores that know what the *pair* differs on, not only how hard a prompt is.

    - "pair-aware ceiling (IRT)": a 2PL item-response model (3PL with the guessing floor
      on multiple-choice files) fitted on the file's other models gives each prompt a
      difficulty b_x and discrimination a_x; the pair's abilities are those matching its
      overall success rates on the file (two numbers, what a tier's configured `prior`
      says); the score is the expected gain P(large right) - P(small right), which peaks
      between the two abilities. A large model whose scores never vary is the verdicts'
      reference (AlpacaEval): its P is that constant.
    - "pair-aware ceiling (1PL)": the same with every a_x = 1 (only b_x per prompt).
    - "model-profile ceiling": mean score of the 3 other models nearest the large one's
      success rate minus that of the 3 nearest the small one's.
    nan where the file has no other models (MMLU)."""
    from tierroute.eval import irt
    from tierroute.eval.metrics import apgr, routing_curve

    scores, small, large = _other_models(test)
    if scores.shape[1] == 0:
        return dict.fromkeys(PAIR_CEILINGS, float("nan"))

    def score_apgr(s: np.ndarray) -> float:
        return apgr(routing_curve(s, test.small, test.large))

    floor = guess_floor(test)
    out = {}
    for name, discrimination in (("IRT", True), ("1PL", False)):
        _, a, b = irt.fit_items(scores, floor, discrimination=discrimination)
        p_small = irt.probability(irt.ability_for_rate(small.mean(), a, b, floor), a, b, floor)
        p_large = irt.probability(irt.ability_for_rate(large.mean(), a, b, floor), a, b, floor)
        if np.ptp(large) == 0:
            p_large = np.full(len(large), large[0])
        out[f"pair-aware ceiling ({name})"] = score_apgr(p_large - p_small)
    means = np.nanmean(scores, axis=0)
    near_large = np.argsort(np.abs(means - large.mean()))[:3]
    near_small = np.argsort(np.abs(means - small.mean()))[:3]
    profile_large = _row_mean(scores[:, near_large]) if np.ptp(large) else large
    profile = profile_large - _row_mean(scores[:, near_small])
    out["model-profile ceiling"] = score_apgr(profile)
    return out


PAIR_CEILINGS = (
    "pair-aware ceiling (IRT)",
    "pair-aware ceiling (1PL)",
    "model-profile ceiling",
)


def _row_mean(scores: np.ndarray) -> np.ndarray:
    counts = np.sum(~np.isnan(scores), axis=1)
    return np.where(counts > 0, np.nansum(scores, axis=1) / np.maximum(counts, 1), 0.5)


def _old_default(train: list[tuple[LooFile, Any]], encoder: Any) -> Any:
    """The recipe shipped before issue 9: irt on MMLU + RouterBench, Mixtral -> GPT-4."""
    from tierroute.data import concat_outcomes
    from tierroute.routers.factor import FactorRouter

    parts = [o for f, o in train if f.file in (MMLU, RB)]  # every model's scores, any pair
    router = FactorRouter(encoder, rank=0, small=MIXTRAL, large=GPT4)
    return router.fit_outcomes(concat_outcomes(parts))


def _irt_files(
    train: list[tuple[LooFile, Any]], encoder: Any, equal_files: bool = False, **params: Any
) -> Any:
    """irt over every model of every training file, one ability per model per file;
    `equal_files`: every file's observations weigh the same in total."""
    from tierroute.data import concat_outcomes, file_model_scores
    from tierroute.routers.factor import FactorRouter

    router = FactorRouter(encoder, rank=0, score_by="difficulty", **params)
    table = file_model_scores([(f.name, o) for f, o in train])
    weights = None
    if equal_files:
        counts = [np.sum(~np.isnan(o.model_scores().scores)) for _, o in train]
        per_row = [np.full(len(o), 1.0 / c) for (_, o), c in zip(train, counts, strict=True)]
        weights = np.concatenate(per_row)
        weights /= weights.mean()
    return router.fit_scores(concat_outcomes([o for _, o in train]).prompts, table, weights)


def _knn_difficulty(train: list[tuple[LooFile, Any]], encoder: Any, k: int = 200) -> Any:
    """A kNN vote of each prompt's difficulty quantile within its own training file
    (1 - mean score over the file's models, ranked in the file), so files of different
    difficulty and scoring scales share one [0, 1] scale without a linear model."""
    from scipy.stats import rankdata

    from tierroute.routers.knn import KnnRouter

    texts: list[str] = []
    labels: list[np.ndarray] = []
    for _, o in train:
        scores = o.model_scores().scores
        if np.nanmin(scores) < 0:  # pairwise verdicts in [-1, 1]
            scores = (scores + 1.0) / 2.0
        seen = np.sum(~np.isnan(scores), axis=1) > 0
        mean = np.nansum(scores, axis=1) / np.maximum(np.sum(~np.isnan(scores), axis=1), 1)
        difficulty = 1.0 - mean[seen]
        labels.append((rankdata(difficulty) - 0.5) / len(difficulty))
        texts.extend(t for t, ok in zip(o.prompts, seen, strict=True) if ok)
    return KnnRouter(encoder, k=k).fit(texts, np.concatenate(labels))


def _rules(train: list[tuple[LooFile, Any]], encoder: Any) -> Any:
    from tierroute.routers import make_router

    return make_router("rules", lambda: encoder)


class PairGain:
    """A difficulty router's scores turned into the served pair's expected gain (issue 9).

    b_x = logit(difficulty score) is read as the prompt's 1PL difficulty (for the irt
    recipes it is exactly -w . z); the pair's abilities are those whose mean P over the
    scored prompts (the traffic, unlabelled) matches the pair's success rates, and the
    score is sigmoid(a (theta_large - b_x)) - sigmoid(a (theta_small - b_x)). The rates
    come from the first labelled rows of the traffic (`first_label_rates`), never from
    the held-out file's full outcomes."""

    def __init__(self, router: Any, rate_small: float, rate_large: float, a: float = 1.0):
        self.router, self.rates, self.a = router, (rate_small, rate_large), a

    def score_texts(self, texts: list[str]) -> np.ndarray:
        from tierroute.eval import irt
        from tierroute.routers.base import logit

        b = np.asarray(logit(self.router.score_texts(texts)), dtype=np.float64)
        a = np.full(len(b), self.a)
        small, large = (irt.ability_for_rate(r, a, b) for r in self.rates)
        gain: np.ndarray = irt.expected_gain(a, b, small, large)
        return np.clip(gain, 1e-6, 1 - 1e-6)


def first_label_rates(test: Any, n: int = 100, seed: int = 0) -> tuple[float, float]:
    """The pair's success rates on n random rows: what a deployment learns from its first
    n shadow verdicts (scores mapped to [0, 1])."""
    rows = np.random.default_rng(seed).choice(len(test), min(n, len(test)), replace=False)
    small, large = test.small[rows], test.large[rows]
    if min(test.small.min(), test.large.min()) < 0:  # verdicts in [-1, 1]
        small, large = (small + 1) / 2, (large + 1) / 2
    return float(small.mean()), float(large.mean())


RECIPES: dict[str, Callable[[list[tuple[LooFile, Any]], Any], Any]] = {
    "old-default": _old_default,
    "rules": _rules,
    "irt-files": _irt_files,
    "irt-files-structure": lambda t, e: _irt_files(t, e, features="structure"),
    "irt-files-structure-only": lambda t, e: _irt_files(t, e, features="structure-only"),
    "irt-files-no-pro": lambda t, e: _irt_files([(f, o) for f, o in t if f.file != PRO], e),
    "irt-files-structure-equal": lambda t, e: _irt_files(
        t, e, features="structure", equal_files=True
    ),
    "irt-files-structure-l2-1e-2": lambda t, e: _irt_files(t, e, features="structure", l2=1e-2),
    "knn-difficulty": _knn_difficulty,
}
# Pair-aware recipes: a difficulty recipe above, scored by the served pair's expected gain
# (PairGain) with the pair's success rates from the held-out file's first 100 labels.
PAIR_RECIPES = {"irt-gain": "irt-files-structure"}
# The shipped default's recipe (scripts/train_default_router.sh), with its rule prior. No
# recipe here beat it by more than the noise of the table while keeping face validity
# (tests/test_face_validity.py; see the default router's CARD.md).
SHIPPED_RECIPE = "old-default"
DEFAULT_RULE_PRIOR = 0.5


def with_rule_prior(router: Any, encoder: Any, weight: float, rules_file: str = "") -> Any:
    from tierroute.routers.prior import RulePriorRouter
    from tierroute.routers.rules import RulesRouter, load_rules
    from tierroute.tagger import Tagger

    rules = load_rules(rules_file or None)
    tagger = Tagger(encoder) if rules.uses_tags else None
    return RulePriorRouter(router, RulesRouter(rules, tagger), weight)


def sample_rows(o: Any, n: int) -> Any:
    """n random rows of `o` (seed 0; all of them when n is 0 or more than it has)."""
    if not n or n >= len(o):
        return o
    return o.subset(np.sort(np.random.default_rng(0).choice(len(o), n, replace=False)))


def served(router: Any, encoder: Any) -> Any:
    """A twin of a trained router reading `encoder`'s embeddings: what `load_router` builds
    when the router is served at another embedding precision or token limit."""
    twin = type(router)(encoder, **router.get_params())
    twin.set_state(router.get_state())
    return twin


def parse_variant(spec: str) -> tuple[str, int]:
    """'int8' or 'int8/128': a serving precision and token limit (default 256)."""
    precision, _, tokens = spec.partition("/")
    return precision, int(tokens or 256)


def leave_one_out(
    recipes: list[str],
    out: Path,
    rule_prior: float,
    only: list[str],
    sample: int = 0,
    serve: tuple[str, ...] = (),
    rules_file: str = "",
    train_on: str = "fp32",
) -> None:
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.harness import evaluate
    from tierroute.eval.metrics import apgr, routing_curve
    from tierroute.routers.random_router import RandomRouter

    # A static table costs less than the disk cache's lookup: it is not cached.
    encoder = TextEncoder(
        Embedder(precision=train_on), None if train_on == "static" else EmbeddingCache()
    )
    # Serving variants: each recipe is trained on fp32 embeddings, as the shipped router
    # was, then scored on the test file with the variant's embeddings.
    variants = {
        spec: TextEncoder(
            Embedder(precision=parse_variant(spec)[0], max_length=parse_variant(spec)[1]),
            EmbeddingCache(),
        )
        for spec in serve
    }
    held = [f for f in LOO_FILES if (DATA / f.file).is_file() and (not only or f.name in only)]
    bases = ["random", "oracle", "difficulty ceiling", *PAIR_CEILINGS]
    rows = [
        *recipes,
        *(f"{r} served {v}" for r in recipes if r not in PAIR_RECIPES for v in variants),
    ]
    cells: dict[str, dict[str, float]] = {name: {} for name in [*bases, *rows]}
    pairs = {}
    agreement: list[str] = []
    for f in held:
        test, train = loo_parts(f, held)
        test, train = sample_rows(test, sample), [(g, sample_rows(o, sample)) for g, o in train]
        pairs[f.name] = f"{f.small} -> {f.large}, {len(test):,} rows"
        for base, scores in (
            ("random", RandomRouter(seed=0).score_texts(test.prompts)),
            ("oracle", test.large - test.small),
        ):
            cells[base][f.name] = apgr(routing_curve(scores, test.small, test.large))
        cells["difficulty ceiling"][f.name] = difficulty_ceiling(test)
        for base, value in pair_aware_ceilings(test).items():
            cells[base][f.name] = value
        for name in recipes:
            start = time.perf_counter()
            trained = None
            if name in PAIR_RECIPES:
                difficulty = RECIPES[PAIR_RECIPES[name]](train, encoder)
                router = PairGain(difficulty, *first_label_rates(test))
            else:
                router = trained = RECIPES[name](train, encoder)
            if rule_prior and name != "rules":
                router = with_rule_prior(router, encoder, rule_prior, rules_file)
            ev = evaluate(name, test, fixed=router)
            cells[name][f.name] = ev.figures["apgr"]
            for spec, other in variants.items() if trained is not None else ():
                if name == "rules":
                    twin = RECIPES[name](train, other)
                else:
                    twin = served(trained, other)
                    if rule_prior:
                        twin = with_rule_prior(twin, other, rule_prior, rules_file)
                ev_v = evaluate(name, test, fixed=twin)
                cells[f"{name} served {spec}"][f.name] = ev_v.figures["apgr"]
                a, b = encoder.encode(test.prompts), other.encode(test.prompts)
                cos = np.sum(a * b, axis=1)
                sa, sb = router.score_texts(test.prompts), twin.score_texts(test.prompts)
                line = (
                    f"{f.name} {name} fp32 vs {spec}: cosine mean {cos.mean():.4f} min "
                    f"{cos.min():.4f}; score |diff| mean {np.abs(sa - sb).mean():.4f} max "
                    f"{np.abs(sa - sb).max():.4f}, corr {np.corrcoef(sa, sb)[0, 1]:.4f}; APGR "
                    f"{ev.figures['apgr']:.3f} -> {ev_v.figures['apgr']:.3f}"
                )
                agreement.append(line)
                print(line, flush=True)
            print(
                f"held out {f.name}: {name} APGR {ev.figures['apgr']:.3f} (random "
                f"{ev.baselines['random']['apgr']:.3f}, oracle {ev.baselines['oracle']['apgr']:.3f}"
                f"; {time.perf_counter() - start:.0f}s)",
                flush=True,
            )
    names = [f.name for f in held]
    lines = [
        "| recipe | " + " | ".join(names) + " | mean | min |",
        "|---|" + "---|" * (len(names) + 2),
    ]
    for name, row in cells.items():
        values = [row[n] for n in names]
        lines.append(
            f"| {name} | "
            + " | ".join("-" if np.isnan(v) else f"{v:.3f}" for v in values)
            + f" | {_summary(np.mean, values)} | {_summary(np.min, values)} |"
        )
    table = "\n".join(lines)
    if agreement:
        table += "\n\nServed variants against fp32 on each test file:\n\n" + "\n".join(
            f"- {line}" for line in agreement
        )
    pair_lines = "\n".join(f"- {n}: {p}" for n, p in pairs.items())
    out.mkdir(parents=True, exist_ok=True)
    text = (
        "# Leave-one-dataset-out APGR\n\nEach column: trained on every other licence-ok "
        "file (AlpacaEval never), tested on this one for the pair below. random and oracle "
        f"are APGR on the same rows. Rule prior weight {rule_prior:g}. difficulty ceiling: "
        "the APGR of each prompt's measured difficulty (1 - mean score of the file's "
        "models other than the pair), about the best a difficulty score can do. "
        "pair-aware ceilings: what a score that knows each prompt's item-response "
        "parameters (fitted on the other models) or the other models' profile near each "
        "of the pair can do (`pair_aware_ceilings`). irt-gain: irt-files-structure scored "
        "by the pair's expected gain, abilities from the file's first 100 labels."
        + (f" On at most {sample:,} random rows of each file." if sample else "")
        + f" Recipes trained and tested on {train_on} embeddings."
        + "\n\n"
        f"{pair_lines}\n\n{table}\n"
    )
    (out / "leave_one_out.md").write_text(text)
    print(f"\n{text}\nwrote {out / 'leave_one_out.md'}")


def _summary(reduce: Callable[[list[float]], Any], values: list[float]) -> str:
    return "-" if any(np.isnan(values)) else f"{float(reduce(values)):.3f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="bench-out")
    parser.add_argument(
        "--leave-one-out", action="store_true", help="the leave-one-dataset-out table"
    )
    names = [*RECIPES, *PAIR_RECIPES]
    parser.add_argument(
        "--recipes",
        nargs="*",
        default=names,
        choices=names,
        help="recipes to train (none: only the baselines and ceilings, which need no embedding)",
    )
    parser.add_argument(
        "--files",
        nargs="*",
        default=[],
        choices=[f.name for f in LOO_FILES],
        help="leave-one-out over these files only (default: all)",
    )
    parser.add_argument(
        "--serve",
        nargs="*",
        default=[],
        metavar="PRECISION[/TOKENS]",
        help="leave-one-out: also score each recipe, trained on fp32 embeddings, with these "
        "serving embeddings (e.g. int8 int8/128): rows 'RECIPE served int8', plus cosine "
        "and score agreement with fp32",
    )
    parser.add_argument(
        "--train-on",
        default="fp32",
        choices=["fp32", "int8", "static"],
        help="leave-one-out: the embedding every recipe is trained and tested on (static: "
        "the table distilled from MiniLM, static_embed.py)",
    )
    parser.add_argument(
        "--sample",
        type=int,
        default=0,
        help="leave-one-out on at most this many random rows of each file (0: all); "
        "for a quick look, the first run embeds far fewer prompts",
    )
    parser.add_argument(
        "--rule-prior",
        type=float,
        default=DEFAULT_RULE_PRIOR,
        help="weight of the rule prior (0: none)",
    )
    parser.add_argument(
        "--rules",
        default="",
        metavar="FILE",
        help="leave-one-out: the rule prior's rules file (default: the built-in rules.yaml), "
        "e.g. an older rules.yaml to compare on the same rows",
    )
    parser.add_argument(
        "--routers",
        nargs="+",
        default=["random", "rules", "knn", "logreg", "irt", "mf", "ensemble", "default"],
        help="add bert for the fine-tuned encoder (about an hour on 2 cores)",
    )
    parser.add_argument("--setups", nargs="*", help="only setups whose name contains one of these")
    args = parser.parse_args()
    if args.leave_one_out:
        leave_one_out(
            args.recipes,
            Path(args.out),
            args.rule_prior,
            args.files,
            args.sample,
            args.serve,
            args.rules,
            args.train_on,
        )
        return

    from tierroute.artifact import open_router
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.eval.harness import evaluate
    from tierroute.eval.plot import plot_evaluation
    from tierroute.routers import LEARNED, make_router

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    encoder = TextEncoder(Embedder(), EmbeddingCache())
    header = (
        "| setup | router | APGR | CPT50 | CPT80 | random | oracle | published (APGR/CPT50) "
        "| $ curve above single-model hull | mf over all 11 models above hull "
        "| fit s | score ms/query |\n|---|---|---|---|---|---|---|---|---|---|---|---|"
    )
    lines = [header]
    default_trained_on = {MMLU, RB}
    for setup in SETUPS:
        if args.setups and not any(s.lower() in setup.name.lower() for s in args.setups):
            continue
        files = set(setup.test.files) | set(setup.train.files if setup.train else ())
        missing = [f for f in files if not (DATA / f).is_file()]
        if missing:
            print(f"skipped {setup.name}: {', '.join(missing)} absent from {DATA}")
            continue
        test = load(setup.test)
        train = load(setup.train) if setup.train else None
        results: dict[str, Any] = {}
        for name in args.routers:
            if name == "ensemble":
                if not {"mf", "knn"} <= set(results):
                    continue
                scores = rank_average(results["mf"][0].scores, results["knn"][0].scores)
                ev = evaluate(name, test, fixed=_Fixed(test.prompts, scores))
                results[name] = (ev, None, 0.0, 0.0)
            elif name == "default":
                # Trained on MMLU and RouterBench: only a fair test on other data.
                if files & default_trained_on:
                    continue
                router, _ = open_router("default", lambda: encoder)
                ev = evaluate(name, test, fixed=router)
                results[name] = (ev, router, 0.0, _score_ms(router, test.prompts))
            else:
                results[name] = run_one(name, setup, test, train, encoder, evaluate, make_router)
            ev, router, fit_s, score_ms = results[name]
            f, b = ev.figures, ev.baselines
            published = (
                "; ".join(f"{k}: {v['apgr']:.3f}/{v['cpt50']:.1%}" for k, v in ev.published.items())
                or "-"
            )
            pair_hull, all_hull = "-", "-"
            if setup.hull and router is not None and train is not None and name in LEARNED:
                pair_hull, all_hull = hull_figures(test, router, train)
            lines.append(
                f"| {setup.name} | {name} | {f['apgr']:.3f} | {f['cpt50']:.1%} | "
                f"{f['cpt80']:.1%} | {b['random']['apgr']:.3f} | {b['oracle']['apgr']:.3f} | "
                f"{published} | {pair_hull} | {all_hull} | {fit_s:.1f} | {score_ms:.3f} |"
            )
            slug = "".join(c if c.isalnum() else "_" for c in setup.name.lower())[:60]
            plot_evaluation(ev, out / f"{slug}_{name}.png")
            if setup.hull and ev.curve.cost is not None:
                plot_evaluation(ev, out / f"{slug}_{name}_cost.png", x="cost")
            print(lines[-1], flush=True)
    table = "\n".join(lines)
    (out / "quality.md").write_text(
        "# tierroute routing quality\n\n"
        "APGR and CPT from out-of-fold scores (grouped CV) or a held-out test set. "
        "random and oracle are APGR on the same rows. fit s: seconds per fit (per fold "
        "under CV; embeddings from the disk cache). score ms/query: batch scoring of up to "
        "500 prompts with cached embeddings. Hull columns: share of the router's dollar "
        "range where its curve is above the convex hull of the single models' (cost, "
        "quality) points, and the smallest margin.\n\n" + table + "\n"
    )
    print(f"\n{table}\n\nwrote {out / 'quality.md'} and the plots")


class _Fixed:
    """Scores already computed, looked up by prompt (for the rank-average ensemble)."""

    def __init__(self, prompts: list[str], scores: np.ndarray) -> None:
        self._by_prompt = dict(zip(prompts, scores, strict=True))

    def score_texts(self, texts: list[str]) -> np.ndarray:
        return np.array([self._by_prompt[t] for t in texts])


def _score_ms(router: Any, prompts: list[str]) -> float:
    probe = prompts[:500]
    begin = time.perf_counter()
    router.score_texts(probe)
    return (time.perf_counter() - begin) * 1000 / len(probe)


def run_one(
    name: str,
    setup: Setup,
    test: Any,
    train: Any,
    encoder: Any,
    evaluate: Callable[..., Any],
    make_router: Callable[..., Any],
) -> tuple[Any, Any, float, float]:
    """(evaluation, a router fitted on the training part, fit s, score ms/query)."""
    from tierroute.routers import LEARNED

    learned = name in LEARNED
    made: list[Any] = []

    def new() -> Any:
        made.append(make_router(name, lambda: encoder))
        return made[-1]

    start = time.perf_counter()
    if train is not None:
        router = new()
        if learned:
            router.fit_outcomes(train)
        fit_s = time.perf_counter() - start
        ev = evaluate(name, test, fixed=router)
    elif learned:
        ev = evaluate(name, test, factory=new, cv_group=setup.cv_group, n_folds=setup.folds)
        fit_s = (time.perf_counter() - start) / setup.folds
        router = made[-1]  # the last fold's, for the scoring time
    else:
        router = new()
        ev = evaluate(name, test, fixed=router, cv_group=setup.cv_group, n_folds=setup.folds)
        fit_s = 0.0
    return ev, router, fit_s, _score_ms(router, test.prompts)


if __name__ == "__main__":
    main()
