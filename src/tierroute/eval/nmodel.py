"""Offline evaluation of routing among every model of a file (issue 13, item 3).

For one outcome file: a router learns every model's chance of answering each prompt on
the training rows (by default the factor router of routers/factor.py blended with each
model's success rate among the nearest training prompts, `RECIPES`); on held-out rows
each prompt goes to argmax_m P(m answers x) - lambda * cost_m, and lambda is swept from
0 (the model predicted best) to where the cheapest model always wins. That curve of (mean cost,
mean quality) is set against

- every single model's point, and their upper convex hull (the "zero router": a random
  mix of two single models reaches any point of the segment between them);
- the best two-model router: for every pair, the same router's P difference ranks the
  prompts and a threshold sweep goes from all of the cheaper model to all of the dearer
  one; "best" is the pair with the largest area above the hull.

Splits are honest: RouterBench uses its own train/test split (meta.routerdc_split);
other files use grouped k-fold cross-validation (every row is tested by a router that
never saw its group: MMLU-Pro by meta.src, its question source, so re-worded questions
of one source never straddle; Arena-Hard by meta.cluster, its topic cluster). The
expected cost a router weighs is learned on the training rows too (`neighbour_cost`:
a line in the prompt's length, corrected by the nearest training prompts).

Files without dollar costs are priced by `eval/prices.py`; Arena-Hard's columns are
split by judge (verdicts of two judges are not comparable), each judge's columns a
table of its own. `load_tables(..., axis="size")` puts each model's published parameter
count where the dollars were (the issue's "dollar (or model-size) range"), keeping the
open-weights models only.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import numpy.typing as npt

from tierroute.data import ModelScores, field_value, read_rows
from tierroute.encoder import Encoder
from tierroute.errors import DataError
from tierroute.eval.folds import grouped_folds
from tierroute.eval.hull import (
    Gap,
    cost_at_quality,
    curve_of,
    frontier,
    gap,
    multi_model_choices,
    single_model_hull,
)
from tierroute.eval.metrics import routing_curve
from tierroute.eval.prices import (
    DEFAULT_OUTPUT_TOKENS,
    OUTPUT_TOKENS,
    base_model,
    price_of,
    size_of,
)
from tierroute.routers.base import logit, sigmoid

FloatArray = npt.NDArray[np.float64]
Index = npt.NDArray[np.int64]

# How each known file is split into training and test rows (by its `dataset` field).
SPLIT_FIELD = {"routerbench_subset": "meta.routerdc_split"}
GROUP_FIELD = {"mmlu_pro": "meta.src", "arenahard_v01": "meta.cluster"}
# The model whose quality-at-a-share-of-its-cost the issue asks for, where a file has it.
REFERENCE = {"routerbench_subset": "gpt-4-1106-preview"}
MIN_COVERAGE = 0.9  # a column scored on fewer rows than this share is left out
_WORDS = re.compile(r"[a-z]+")


@dataclass(frozen=True)
class ModelTable:
    """Every kept model's quality and cost on every kept row of one file (or judge)."""

    label: str
    path: str
    dataset: str
    ids: list[str]
    prompts: list[str]
    groups: list[str]  # rows of one group are never split between train and test
    split: list[str] | None  # the file's own "train"/"test" per row, when it has one
    models: list[str]
    quality: FloatArray  # (rows, models), the file's own scale
    cost: FloatArray  # (rows, models), USD per query
    cost_basis: str
    low: float  # the score scale's floor: 0, or -1 for pairwise verdicts
    left_out: dict[str, str] = field(default_factory=dict)  # column -> why
    sources: list[str] = field(default_factory=list)  # each row's `subset`, for diagnosis
    axis: str = "usd"  # what `cost` measures: "usd" per query, or "size" (billions)

    def __len__(self) -> int:
        return len(self.ids)

    def target(self) -> FloatArray:
        """Quality mapped to [0, 1], what the router learns to predict."""
        out: FloatArray = (self.quality - self.low) / (1.0 - self.low)
        return out


def near_duplicate_key(prompt: str, words: int = 12) -> str:
    """Rows whose first words agree (case, digits and punctuation aside) share a group:
    templated questions that differ only in their numbers stay on one side."""
    return " ".join(_WORDS.findall(prompt.lower())[:words])


def _per_query_cost(rows: list[dict[str, Any]], column: str, dataset: str) -> FloatArray | None:
    if all("cost_usd" in row["models"].get(column, {}) for row in rows):
        return np.array([float(row["models"][column]["cost_usd"]) for row in rows])
    price = price_of(column)
    if price is None:
        return None
    out_tokens = OUTPUT_TOKENS.get(dataset, DEFAULT_OUTPUT_TOKENS)
    return np.array([price.per_query(len(row["prompt"]) / 4, out_tokens) for row in rows])


def _score(row: dict[str, Any], column: str) -> float:
    entry = row["models"].get(column)
    value = entry.get("score") if isinstance(entry, dict) else None
    return float(value) if isinstance(value, int | float) else float("nan")


AXES = ("usd", "size")


def load_tables(
    path: str, min_coverage: float = MIN_COVERAGE, axis: str = "usd"
) -> list[ModelTable]:
    """The file's model tables: one, or one per judge for `model (judge J)` columns.
    `axis` "size" puts each model's published parameter count where the dollars were,
    keeping only the open-weights models that publish one."""
    if axis not in AXES:
        raise DataError(f"axis must be one of {', '.join(AXES)}, not '{axis}'")
    rows = read_rows(path)
    dataset = str(rows[0].get("dataset", ""))
    columns = sorted({m for row in rows for m in row["models"]})
    judges: dict[str, list[str]] = {}
    for column in columns:
        judge = column.split(" (judge ", 1)[1].rstrip(")") if " (judge " in column else ""
        judges.setdefault(judge, []).append(column)
    name = path.rsplit("/", 1)[-1].removesuffix(".jsonl")
    by = ", by model size" if axis == "size" else ""
    return [
        _table(
            rows,
            dataset,
            f"{name} (judge {judge}{by})" if judge else f"{name}{f' ({by[2:]})' if by else ''}",
            path,
            cols,
            min_coverage,
            axis,
        )
        for judge, cols in sorted(judges.items())
    ]


def _table(
    rows: list[dict[str, Any]],
    dataset: str,
    label: str,
    path: str,
    columns: list[str],
    min_coverage: float,
    axis: str = "usd",
) -> ModelTable:
    left_out: dict[str, str] = {}
    kept: list[str] = []
    for column in columns:
        covered = np.mean([not np.isnan(_score(row, column)) for row in rows])
        if covered < min_coverage:
            left_out[column] = f"scored on {covered:.0%} of rows"
        elif axis == "size" and size_of(column) is None:
            left_out[column] = "no published parameter count"
        elif axis == "usd" and _per_query_cost(rows[:1], column, dataset) is None:
            left_out[column] = "no published price or size"
        else:
            kept.append(column)
    if len(kept) < 2:
        raise DataError(f"'{path}' ({label}) has fewer than two models with scores and costs")
    quality = np.array([[_score(row, c) for c in kept] for row in rows])
    complete = ~np.isnan(quality).any(axis=1)
    if not complete.any():
        raise DataError(f"no row of '{path}' ({label}) has a score for every priced model")
    rows = [row for row, ok in zip(rows, complete, strict=True) if ok]
    quality = quality[complete]
    if axis == "size":
        cost = np.tile([size_of(c) or 0.0 for c in kept], (len(rows), 1)).astype(np.float64)
        basis = "published parameter count in billions (eval/prices.py), not dollars"
    else:
        costs = [_per_query_cost(rows, c, dataset) for c in kept]
        cost = np.column_stack([c for c in costs if c is not None])
        has_dollars = all("cost_usd" in row["models"][c] for row in rows[:1] for c in kept)
        basis = "cost_usd from the file" if has_dollars else "per-token prices (eval/prices.py)"
    split_field, group_field = SPLIT_FIELD.get(dataset), GROUP_FIELD.get(dataset)
    split = [str(field_value(row, split_field)) for row in rows] if split_field else None
    groups = (
        [str(field_value(row, group_field)) for row in rows]
        if group_field
        else [near_duplicate_key(row["prompt"]) for row in rows]
    )
    return ModelTable(
        label=label,
        path=path,
        dataset=dataset,
        ids=[str(row["id"]) for row in rows],
        prompts=[row["prompt"] for row in rows],
        groups=groups,
        split=split,
        models=kept,
        quality=quality,
        cost=cost,
        cost_basis=basis,
        low=-1.0 if np.nanmin(quality) < 0 else 0.0,
        left_out=left_out,
        sources=[str(row.get("subset", "")) for row in rows],
        axis=axis,
    )


def folds_of(table: ModelTable, n_folds: int = 5, seed: int = 0) -> tuple[list[Index], str]:
    """Test rows of each fold, and how they were chosen."""
    if table.split is not None:
        test = np.flatnonzero(np.array(table.split) == "test")
        if len(test) == 0 or len(test) == len(table):
            raise DataError(f"'{table.path}' needs both train and test rows in its split")
        return [test], f"its own split: {len(table) - len(test):,} train / {len(test):,} test"
    field_name = GROUP_FIELD.get(table.dataset, "the first 12 words")
    n = min(n_folds, len(set(table.groups)))
    if n < 2:
        raise DataError(f"'{table.path}' has one group of rows; cross-validation needs two")
    return grouped_folds(table.groups, n, seed), f"grouped {n}-fold CV by {field_name}"


# A router maker: (prompts, target in [0, 1], models) of the training rows -> a function
# from prompts to P(each model answers well), one column per model in the same order.
Fitter = Callable[[Sequence[str], FloatArray, list[str]], Callable[[Sequence[str]], FloatArray]]


# The N-model router's recipes (with `length_cost`). "factor": a factor router of rank 2
# (an ability per model, a prompt difficulty, and two prompt directions along which models
# differ), l2 1e-2, chosen by 3-fold grouped CV inside RouterBench's training split among
# irt (rank 0) with l2 1e-4, 1e-3, 1e-2, irt on structure features, rank 2 (l2 1e-2) and
# rank 8 (l2 3e-2). "default": that factor router's logit averaged half and half with each
# model's success rate among the 200 nearest training prompts (`knn_fitter`); in the same
# CV (2,212 rows) it raised the mean margin above the hull from +0.0217 to +0.0245 and, at
# half GPT-4's cost, cut the shortfall to GPT-4's quality from 0.035 to 0.028, against
# knn alone (k 20-200) and weights 0.25/0.5; restricting the choice to the training
# rows' hull models lowered both (+0.0171). No test row and no other file was looked at.
RECIPES: dict[str, dict[str, Any]] = {
    "default": {"rank": 2, "l2": 1e-2, "knn": {"k": 200, "temperature": 1.0, "weight": 0.5}},
    "factor": {"rank": 2, "l2": 1e-2},
    "irt": {"rank": 0, "l2": 1e-3},
    "mf": {"rank": 16, "l2": 1e-3},
}


def recipe_fitter(encoder: Encoder, name: str) -> Fitter:
    """The fitter of a named recipe in `RECIPES`."""
    params = dict(RECIPES[name])
    knn = params.pop("knn", None)
    fitter = factor_fitter(encoder, **params)
    if knn is None:
        return fitter
    neighbours = knn_fitter(encoder, k=knn["k"], temperature=knn["temperature"])
    return blend(fitter, neighbours, knn["weight"])


def knn_fitter(
    encoder: Encoder, k: int = 200, temperature: float = 1.0, prior: float = 5.0
) -> Fitter:
    """Each model's success rate among the k training prompts nearest in embedding,
    weighted by exp(similarity / temperature) and pulled to the model's overall rate by
    `prior` pseudo-rows: local abilities the factor router's two directions can miss
    (RouterBench's three tasks rank its models differently)."""
    from tierroute.encoder import normalise_rows

    def fit(
        prompts: Sequence[str], target: FloatArray, models: list[str]
    ) -> Callable[[Sequence[str]], FloatArray]:
        base = normalise_rows(encoder.encode(prompts)).astype(np.float32)
        overall = target.mean(axis=0)
        n = min(k, len(prompts))

        def predict(texts: Sequence[str]) -> FloatArray:
            out = np.empty((len(texts), target.shape[1]))
            for start in range(0, len(texts), 256):
                query = normalise_rows(encoder.encode(texts[start : start + 256]))
                sims = query.astype(np.float32) @ base.T
                idx = np.argpartition(-sims, n - 1, axis=1)[:, :n]
                top = np.take_along_axis(sims, idx, axis=1).astype(np.float64)
                w = np.exp((top - top.max(axis=1, keepdims=True)) / temperature)
                votes = np.einsum("rk,rkm->rm", w, target[idx])
                out[start : start + len(query)] = (votes + prior * overall) / (
                    w.sum(axis=1)[:, None] + prior
                )
            clipped: FloatArray = np.clip(out, 1e-3, 1 - 1e-3)
            return clipped

        return predict

    return fit


def blend(first: Fitter, second: Fitter, weight: float) -> Fitter:
    """Both fitters trained on the same rows; their probabilities averaged in logit
    space, `weight` on the second."""

    def fit(
        prompts: Sequence[str], target: FloatArray, models: list[str]
    ) -> Callable[[Sequence[str]], FloatArray]:
        a, b = first(prompts, target, models), second(prompts, target, models)

        def predict(texts: Sequence[str]) -> FloatArray:
            return sigmoid((1 - weight) * logit(a(texts)) + weight * logit(b(texts)))

        return predict

    return fit


def factor_fitter(
    encoder: Encoder, rank: int = 0, l2: float = 1e-3, features: str = "text", max_iter: int = 300
) -> Fitter:
    """The factor router (rank 0: an IRT ability per model and a difficulty per prompt)."""

    def fit(
        prompts: Sequence[str], target: FloatArray, models: list[str]
    ) -> Callable[[Sequence[str]], FloatArray]:
        from tierroute.routers.factor import FactorRouter

        router = FactorRouter(encoder, rank=rank, l2=l2, features=features, max_iter=max_iter)
        router.fit_scores(prompts, ModelScores(models=models, scores=target))
        return router.model_probabilities

    return fit


def platt(
    logits: FloatArray, target: FloatArray, l2: float = 1e-3
) -> tuple[FloatArray, FloatArray]:
    """Per-model calibration: (a, c) per column so that sigmoid(a * logit + c) fits the
    column's target (which may be fractional) by cross-entropy; Newton steps on the two
    parameters of every column at once, with a small pull of a to 1 and c to 0."""
    a, c = np.ones(logits.shape[1]), np.zeros(logits.shape[1])
    for _ in range(25):
        p = sigmoid(a * logits + c)
        w = p * (1 - p)
        g_a = np.mean((p - target) * logits, axis=0) + l2 * (a - 1)
        g_c = np.mean(p - target, axis=0) + l2 * c
        h_aa = np.mean(w * logits**2, axis=0) + l2
        h_ac = np.mean(w * logits, axis=0)
        h_cc = np.mean(w, axis=0) + l2
        det = h_aa * h_cc - h_ac**2
        a = a - (h_cc * g_a - h_ac * g_c) / det
        c = c - (h_aa * g_c - h_ac * g_a) / det
    return a, c


def calibrated(fitter: Fitter, n_folds: int = 3, seed: int = 0) -> Fitter:
    """`fitter` with per-model Platt calibration learned on out-of-fold predictions within
    the training rows (grouped by `near_duplicate_key`), so each model's probabilities are
    comparable when argmax P - lambda * cost weighs them against each other."""

    def fit(
        prompts: Sequence[str], target: FloatArray, models: list[str]
    ) -> Callable[[Sequence[str]], FloatArray]:
        groups = [near_duplicate_key(p) for p in prompts]
        oof = np.empty_like(target)
        for test in grouped_folds(groups, min(n_folds, len(set(groups))), seed):
            train = np.setdiff1d(np.arange(len(prompts)), test)
            inner = fitter([prompts[i] for i in train], target[train], models)
            oof[test] = inner([prompts[i] for i in test])
        a, c = platt(logit(oof), target)
        predict_all = fitter(prompts, target, models)

        def predict(texts: Sequence[str]) -> FloatArray:
            return sigmoid(a * logit(predict_all(texts)) + c)

        return predict

    return fit


def json_ready(value: Any) -> Any:
    """JSON has no NaN: a figure never reached (an infinite or NaN float) is written as null,
    in nested dicts and lists too."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_ready(v) for k, v in value.items()}
    if isinstance(value, list):
        return [json_ready(v) for v in value]
    return value


@dataclass
class NModelResult:
    table: ModelTable
    split: str
    test_rows: int
    single_cost: FloatArray
    single_quality: FloatArray
    hull_models: list[str]
    curve_cost: FloatArray
    curve_quality: FloatArray
    vs_hull: Gap
    best_pair: tuple[str, str]
    pair_cost: FloatArray
    pair_quality: FloatArray
    pair_vs_hull: Gap
    best_single: str
    cost_at_best_quality_share: float  # nan when the router never reaches it
    reference: str | None
    cost_at_reference_share: float | None
    tested: Index  # the table's rows, in the order of the arrays below
    probs: FloatArray  # (tested rows, models): the router's out-of-fold P
    choices: npt.NDArray[np.int64]  # (lambdas, tested rows): the model each row went to

    def as_dict(self) -> dict[str, Any]:
        t = self.table
        best = t.models.index(self.best_single)
        return {
            "file": t.path,
            "table": t.label,
            "rows_tested": self.test_rows,
            "split": self.split,
            "cost_basis": t.cost_basis,
            "axis": t.axis,
            "models": len(t.models),
            "left_out": t.left_out,
            "above_hull_share": self.vs_hull.share,
            "worst_point": {"cost": self.vs_hull.worst_cost, "margin": self.vs_hull.worst},
            "area_above_hull": self.vs_hull.area,
            "mean_margin_above_hull": self.vs_hull.mean_margin,
            "dollar_range": [float(self.curve_cost.min()), float(self.curve_cost.max())],
            "router_best_quality": float(self.curve_quality.max()),
            "best_single": {
                "model": self.best_single,
                "quality": float(self.single_quality[best]),
                "cost": float(self.single_cost[best]),
            },
            "cost_at_best_quality_share": self.cost_at_best_quality_share,
            "reference": self.reference,
            "cost_at_reference_quality_share": self.cost_at_reference_share,
            "best_pair": {
                "models": list(self.best_pair),
                "above_hull_share": self.pair_vs_hull.share,
                "area_above_hull": self.pair_vs_hull.area,
                "worst_margin": self.pair_vs_hull.worst,
            },
            "hull": self.hull_models,
            "singles": {
                m: {"cost": float(c), "quality": float(q)}
                for m, c, q in zip(t.models, self.single_cost, self.single_quality, strict=True)
            },
            "curve": {
                "cost": self.curve_cost.tolist(),
                "quality": self.curve_quality.tolist(),
            },
        }


# A cost model: (training prompts, their cost per model) -> expected cost of new prompts.
CostModel = Callable[[Sequence[str], FloatArray], Callable[[Sequence[str]], FloatArray]]


def mean_cost(prompts: Sequence[str], cost: FloatArray) -> Callable[[Sequence[str]], FloatArray]:
    """Each model's mean cost on the training rows, whatever the prompt."""
    mean = cost.mean(axis=0)
    return lambda texts: np.tile(mean, (len(texts), 1))


def length_cost(prompts: Sequence[str], cost: FloatArray) -> Callable[[Sequence[str]], FloatArray]:
    """Each model's cost as a straight line in the prompt's length, fitted on the training
    rows: what a router knows before it sends (the input is priced by its length; a long
    prompt tends to ask for a long answer). Never below the cheapest training cost."""

    def design(texts: Sequence[str]) -> FloatArray:
        chars = np.array([len(t) for t in texts], dtype=np.float64) / 1000.0
        return np.column_stack([np.ones(len(texts)), chars])

    coef, *_ = np.linalg.lstsq(design(prompts), cost, rcond=None)
    floor = cost.min(axis=0)

    def predict(texts: Sequence[str]) -> FloatArray:
        out: FloatArray = np.maximum(design(texts) @ coef, floor)
        return out

    return predict


def neighbour_cost(encoder: Encoder, k: int = 200) -> CostModel:
    """`length_cost` plus the mean of its errors on the k training prompts nearest in
    embedding. The length line prices the input; the answer's length, which sets most of
    a long answer's price, follows the kind of prompt: RouterBench's MBPP prompts are
    short, yet GPT-4's answers to them cost 2.7 times its Winogrande answers, which the
    line alone spreads over every short prompt. Where the file's cost is a line in the
    prompt's length (the priced files), the errors are nil and this is `length_cost`.
    Chosen by 3-fold grouped CV (3 seeds) inside RouterBench's training split against
    the line alone, neighbours' mean cost (k 10, 50, 200) and residuals with k 50: mean
    margin above the hull +0.0240 -> +0.0288, shortfall to GPT-4's quality at half its
    cost 0.029 -> 0.019."""
    from tierroute.encoder import normalise_rows

    def fit(prompts: Sequence[str], cost: FloatArray) -> Callable[[Sequence[str]], FloatArray]:
        line = length_cost(prompts, cost)
        errors = cost - line(prompts)
        floor = cost.min(axis=0)
        if np.abs(errors).max() <= 1e-9 * max(float(np.abs(cost).max()), 1e-30):
            return line  # the line is exact: nothing for the neighbours to add
        base = normalise_rows(encoder.encode(prompts))
        n = min(k, len(prompts))

        def predict(texts: Sequence[str]) -> FloatArray:
            out = line(texts)
            for start in range(0, len(texts), 256):
                query = normalise_rows(encoder.encode(texts[start : start + 256]))
                sims = query @ base.T
                idx = np.argpartition(-sims, n - 1, axis=1)[:, :n]
                out[start : start + len(query)] += errors[idx].mean(axis=1)
            clipped: FloatArray = np.maximum(out, floor)
            return clipped

        return predict

    return fit


COST_MODELS = ("neighbours", "length", "mean")


def cost_model_named(name: str, encoder: Encoder) -> CostModel:
    """The cost model of a name in `COST_MODELS`."""
    if name == "neighbours":
        return neighbour_cost(encoder)
    if name == "length":
        return length_cost
    if name == "mean":
        return mean_cost
    raise DataError(f"cost model must be one of {', '.join(COST_MODELS)}, not '{name}'")


CANDIDATES = ("all", "pareto", "hull")


def out_of_fold(
    table: ModelTable,
    fitter: Fitter,
    folds: list[Index],
    cost_model: CostModel | None = None,
    candidates: str = "all",
) -> tuple[Index, FloatArray, FloatArray, npt.NDArray[np.bool_]]:
    """(tested rows, P per tested row and model, expected cost per tested row and model,
    from the training rows' costs, and which models the router may choose: `candidates`
    "all"; "pareto", those no other model beat on the training rows at no more cost;
    "hull", those on the training rows' convex hull)."""
    if candidates not in CANDIDATES:
        raise DataError(f"candidates must be one of {', '.join(CANDIDATES)}, not '{candidates}'")
    tested = np.concatenate(folds)
    probs = np.empty((len(tested), len(table.models)))
    expected = np.empty_like(probs)
    allowed = np.ones_like(probs, dtype=bool)
    target = table.target()
    at = 0
    for test in folds:
        train = np.setdiff1d(np.arange(len(table)), test)
        predict = fitter([table.prompts[i] for i in train], target[train], table.models)
        probs[at : at + len(test)] = predict([table.prompts[i] for i in test])
        expect = (cost_model or length_cost)([table.prompts[i] for i in train], table.cost[train])
        expected[at : at + len(test)] = expect([table.prompts[i] for i in test])
        train_q, train_c = table.quality[train].mean(axis=0), table.cost[train].mean(axis=0)
        if candidates == "pareto":
            allowed[at : at + len(test)] = pareto_front(train_q, train_c)
        elif candidates == "hull":
            on_hull = single_model_hull(table.models, train_q, train_c).models
            allowed[at : at + len(test)] = np.isin(table.models, on_hull)
        at += len(test)
    return tested, probs, expected, allowed


def pareto_front(quality: FloatArray, cost: FloatArray) -> npt.NDArray[np.bool_]:
    """True for each model that no other model matches in quality at no more cost
    (strictly better in one of the two)."""
    no_dearer = cost[None, :] <= cost[:, None]  # [k, j]: j costs no more than k
    no_worse = quality[None, :] >= quality[:, None]
    strictly = (cost[None, :] < cost[:, None]) | (quality[None, :] > quality[:, None])
    dominated = np.any(no_dearer & no_worse & strictly, axis=1)
    out: npt.NDArray[np.bool_] = np.logical_not(dominated)
    return out


def best_pair(
    probs: FloatArray, quality: FloatArray, cost: FloatArray, models: list[str], hull: Any
) -> tuple[tuple[int, int], FloatArray, FloatArray, Gap]:
    """The two-model router with the largest area above the hull."""
    mean_cost = cost.mean(axis=0)
    best: tuple[tuple[int, int], FloatArray, FloatArray, Gap] | None = None
    for i in range(len(models)):
        for j in range(len(models)):
            if mean_cost[i] >= mean_cost[j] or i == j:
                continue  # each pair once, cheaper model first
            if quality[:, i].mean() == quality[:, j].mean():
                continue  # no gain to route for
            curve = routing_curve(
                probs[:, j] - probs[:, i], quality[:, i], quality[:, j], cost[:, i], cost[:, j]
            )
            assert curve.cost is not None
            g = gap(hull, curve.cost, curve.quality)
            if best is None or g.area > best[3].area:
                best = ((i, j), curve.cost, curve.quality, g)
    if best is None:
        raise DataError("no two models here differ in quality, so no pair can be routed")
    return best


def evaluate_nmodel(
    table: ModelTable,
    fitter: Fitter,
    n_folds: int = 5,
    seed: int = 0,
    cost_model: CostModel | None = None,
    candidates: str = "all",
) -> NModelResult:
    """The N-model router's curve on held-out rows against the single models, the best
    pair and the hull. `cost_model` (default `length_cost`; the CLI and the bench use
    `neighbour_cost`) is what the router expects each model to cost; `candidates` which
    models it may choose (see `out_of_fold`). Both, and `calibrated`, were compared in
    3-fold CV inside RouterBench's training split: length_cost gained a little over
    mean_cost (mean margin +0.0215 vs +0.0208), neighbour_cost more (with the default
    router, +0.0240 -> +0.0288); Pareto candidates (+0.0158), hull candidates (+0.0156)
    and per-model calibration (+0.0188) lost."""
    folds, how = folds_of(table, n_folds, seed)
    tested, probs, expected, allowed = out_of_fold(table, fitter, folds, cost_model, candidates)
    quality, cost = table.quality[tested], table.cost[tested]
    single_q, single_c = quality.mean(axis=0), cost.mean(axis=0)
    hull = single_model_hull(table.models, single_q, single_c)
    choices = multi_model_choices(np.where(allowed, probs, -1.0), expected)
    xs, ys = curve_of(choices, quality, cost)
    (i, j), pair_x, pair_y, pair_gap = best_pair(probs, quality, cost, table.models, hull)
    top = int(np.argmax(single_q))
    # the best single model at the least cost, when several tie on quality
    top = int(min(np.flatnonzero(single_q == single_q[top]), key=lambda k: single_c[k]))
    reference = REFERENCE.get(table.dataset)
    ref_share = None
    if reference is not None and reference in table.models:
        r = table.models.index(reference)
        ref_share = cost_at_quality(xs, ys, float(single_q[r])) / float(single_c[r])
    return NModelResult(
        table=table,
        split=how,
        test_rows=len(tested),
        single_cost=single_c,
        single_quality=single_q,
        hull_models=hull.models,
        curve_cost=xs,
        curve_quality=ys,
        vs_hull=gap(hull, xs, ys),
        best_pair=(table.models[i], table.models[j]),
        pair_cost=pair_x,
        pair_quality=pair_y,
        pair_vs_hull=pair_gap,
        best_single=table.models[top],
        cost_at_best_quality_share=cost_at_quality(xs, ys, float(single_q[top]))
        / float(single_c[top]),
        reference=reference,
        cost_at_reference_share=ref_share,
        tested=tested,
        probs=probs,
        choices=choices,
    )


def _short(model: str) -> str:
    return base_model(model).split("/")[-1]


def _amount(t: ModelTable, x: float) -> str:
    return f"{x:.1f}B" if t.axis == "size" else f"${x:.6f}"


def report_lines(r: NModelResult) -> list[str]:
    """The table `tierroute eval --models all` prints for one file (or judge)."""
    t = r.table
    g = r.vs_hull
    best = t.models.index(r.best_single)
    lines = [
        f"{t.label}: {len(t.models)} models, {r.test_rows:,} rows tested ({r.split}); "
        f"cost: {t.cost_basis}",
    ]
    if t.left_out:
        lines.append(
            "  left out: " + "; ".join(f"{_short(m)} ({why})" for m, why in t.left_out.items())
        )
    lo, hi = float(r.curve_cost.min()), float(r.curve_cost.max())
    lines += [
        f"  N-model router (argmax P - lambda*cost): above the hull on {g.share:.1%} of "
        f"{_amount(t, lo)}-{_amount(t, hi)}{'' if t.axis == 'size' else '/query'}; worst "
        f"point {g.worst:+.4f} at {_amount(t, g.worst_cost)}; "
        f"mean margin {g.mean_margin:+.4f} (area {g.area:+.3g})",
        f"  best single {_short(r.best_single)}: quality {r.single_quality[best]:.4f} at "
        f"{_amount(t, r.single_cost[best])}; router reaches it at "
        + (
            f"-- never (best {r.curve_quality.max():.4f})"
            if np.isnan(r.cost_at_best_quality_share)
            else f"{r.cost_at_best_quality_share:.1%} of its cost"
        ),
    ]
    if r.reference is not None and r.cost_at_reference_share is not None:
        share = r.cost_at_reference_share
        lines.append(
            f"  {_short(r.reference)}'s quality at "
            + ("-- never reached" if np.isnan(share) else f"{share:.1%} of its cost")
        )
    pg = r.pair_vs_hull
    lines.append(
        f"  best pair {_short(r.best_pair[0])} + {_short(r.best_pair[1])}: above the hull on "
        f"{pg.share:.1%} of its range, worst {pg.worst:+.4f} (area {pg.area:+.3g})"
    )
    unit = "params (B)" if t.axis == "size" else "$/query"
    lines.append(f"  {'model':<44} {unit:>10} {'quality':>8} {'router there':>12}")
    order = np.argsort(r.single_cost, kind="stable")
    router_at = np.interp(r.single_cost, *frontier(r.curve_cost, r.curve_quality))
    for k in order:
        inside = r.curve_cost.min() <= r.single_cost[k] <= r.curve_cost.max()
        there = f"{router_at[k] - r.single_quality[k]:+12.4f}" if inside else f"{'-':>12}"
        mark = "*" if t.models[k] in r.hull_models else " "
        lines.append(
            f"  {mark}{_short(t.models[k])[:43]:<43} "
            f"{r.single_cost[k]:10.{1 if t.axis == 'size' else 6}f} "
            f"{r.single_quality[k]:8.4f} {there}"
        )
    lines.append("  (* on the hull; router there: its quality minus the model's at that cost)")
    return lines
