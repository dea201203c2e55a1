"""Continuous learning: labels from the ledger's feedback and shadow judgements.

A request answered by a smaller tier is labelled by what was said about that answer: its
shadow verdicts (1 good enough, 0 not) and its users' ratings (in [0, 1]) are averaged,
and the label is 1 (the small tier was not enough) when the average is below 0.5.
A request the largest tier answered says nothing about whether a smaller one would have
done, unless a smaller tier's answer to it was judged too (a shadow verdict naming that
tier, as `tierroute replay` records): then those verdicts alone label it, since its
users' ratings are about the large answer. Prompts must have been kept
(`keep_prompts: true`).

`tierroute train --from-ledger` trains on the older 80% of the labelled requests and
promotes only if the new router beats the current one on the newest 20% (ROC AUC of
scores against labels). The gateway's learner checks by cross-validation over every
label instead (`stratified_folds`, `cross_validate`): at 100 labels a 20% held-out is 20
rows, whose AUC moves by +-0.1 from one draw to the next, so that check mostly blocked
or waved through corrections by chance.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierroute.errors import ConfigError, InputError
from tierroute.ledger import Ledger
from tierroute.routers.base import BaseRouter


@dataclass(frozen=True)
class LedgerLabels:
    ids: list[str]
    prompts: list[str]
    labels: npt.NDArray[np.int64]
    ts: npt.NDArray[np.float64]


def ledger_labels(ledger: Ledger, largest_tier: str, since: float | None = None) -> LedgerLabels:
    signals: dict[str, list[float]] = defaultdict(list)
    for request_id, _, rating in ledger.feedback_since(since):
        signals[request_id].append(rating)
    judged: dict[str, list[float]] = defaultdict(list)  # verdicts on a smaller tier's answer
    for request_id, tier, verdict in ledger.judgements(since):
        if verdict is not None:
            signals[request_id].append(verdict)
            if tier != largest_tier:
                judged[request_id].append(verdict)
    ids, prompts, labels, ts = [], [], [], []
    missing_prompt = 0
    for row in ledger.rows(since=since):
        about_small = judged if row.tier == largest_tier else signals
        if row.id not in about_small or row.status != 200:
            continue
        if not row.prompt_text:
            missing_prompt += 1
            continue
        ids.append(row.id)
        prompts.append(row.prompt_text)
        labels.append(int(np.mean(about_small[row.id]) < 0.5))
        ts.append(row.ts)
    if missing_prompt and not ids:
        raise InputError(
            f"{missing_prompt} rated requests have no prompt text in the ledger; set "
            "'keep_prompts: true' in the gateway config to learn from traffic"
        )
    return LedgerLabels(ids, prompts, np.array(labels, dtype=np.int64), np.array(ts))


def roc_auc(scores: npt.ArrayLike, labels: npt.ArrayLike) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(np.asarray(labels), np.asarray(scores)))


def split_by_time(data: LedgerLabels, held_out: float = 0.2) -> tuple[list[int], list[int]]:
    order = np.argsort(data.ts, kind="stable")
    cut = round(len(order) * (1 - held_out))
    train, test = [int(i) for i in order[:cut]], [int(i) for i in order[cut:]]
    for part, name in ((train, "training"), (test, "held-out")):
        if len({int(data.labels[i]) for i in part}) < 2:
            raise InputError(
                f"the {name} part of the {len(data.ids)} labelled ledger requests has only one "
                "kind of label; collect more feedback or shadow judgements first"
            )
    return train, test


def compare(
    new: BaseRouter, current: BaseRouter, data: LedgerLabels, test: list[int]
) -> tuple[float, float]:
    """(AUC of the new router, AUC of the current one) on the held-out requests."""
    texts = [data.prompts[i] for i in test]
    labels = data.labels[test]
    return roc_auc(new.score_texts(texts), labels), roc_auc(current.score_texts(texts), labels)


def stratified_folds(labels: npt.ArrayLike, folds: int, seed: int = 0) -> list[list[int]]:
    """`folds` disjoint test parts covering every label once, each with both kinds of
    label (as many folds as the rarer kind allows, at least 2)."""
    y = np.asarray(labels)
    rarer = min(int((y == 1).sum()), int((y == 0).sum()))
    if rarer < 2:
        raise InputError(
            f"{len(y)} labelled requests with {rarer} of the rarer kind of label; collect "
            "more feedback or shadow judgements first"
        )
    k = min(folds, rarer)
    rng = np.random.default_rng(seed)
    parts: list[list[int]] = [[] for _ in range(k)]
    for value in (0, 1):  # each kind of label dealt round the folds from a random start
        rows = rng.permutation(np.flatnonzero(y == value))
        offset = int(rng.integers(k))
        for j, row in enumerate(rows):
            parts[(j + offset) % k].append(int(row))
    return [sorted(p) for p in parts]


def cross_validate(
    fit_score: Callable[[list[int], list[int]], npt.NDArray[np.float64]],
    reference: npt.ArrayLike,
    labels: npt.ArrayLike,
    parts: list[list[int]],
) -> tuple[float, float, npt.NDArray[np.float64]]:
    """(mean test-fold AUC of what `fit_score(train, test)` returns, mean AUC of the
    label-free `reference` scores on the same folds, the out-of-fold scores).
    Per-fold AUCs, not one over the pooled scores: each fold's model has its own scale."""
    y = np.asarray(labels)
    ref = np.asarray(reference, dtype=np.float64)
    every = set(range(len(y)))
    out = np.zeros(len(y))
    new, old = [], []
    for test in parts:
        train = sorted(every - set(test))
        out[test] = fit_score(train, test)
        new.append(roc_auc(out[test], y[test]))
        old.append(roc_auc(ref[test], y[test]))
    return float(np.mean(new)), float(np.mean(old)), out


def require_rows(data: LedgerLabels, minimum: int = 20) -> None:
    if len(data.ids) < minimum:
        raise InputError(
            f"only {len(data.ids)} labelled requests in the ledger (at least {minimum} needed); "
            "collect more feedback or raise the shadow sampling rate"
        )


@dataclass(frozen=True)
class LearningConfig:
    """`gateway.learning`: the gateway's continuous learner (tierroute.gateway.learner)."""

    enabled: bool = True
    interval_s: float = 3600.0
    min_new_labels: int = 50
    # Cross-validation folds of the promotion check (fewer when a kind of label is rare).
    folds: int = 5
    # The cross-validated AUC a candidate must gain over the cold router to be promoted.
    min_gain: float = 0.0
    # The correction's L2 penalty: the candidates are l2 / 10, l2 and l2 * 10, and the
    # cross-validation picks one (large: few labels move the router little).
    l2: float = 10.0
    # Only requests this recent teach (None: the whole ledger).
    since_days: float | None = None
    # Recent prompts on which the largest tier's share is kept across a promotion.
    share_sample: int = 2000

    def __post_init__(self) -> None:
        if self.interval_s <= 0 or self.min_new_labels < 0 or self.share_sample < 1:
            raise ConfigError("learning: interval_s > 0, min_new_labels >= 0, share_sample >= 1")
        if not 2 <= self.folds <= 20:
            raise ConfigError("learning.folds must be within [2, 20]")
        if self.l2 <= 0:
            raise ConfigError("learning.l2 must be positive")
