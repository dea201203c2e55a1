"""Continuous learning: labels from the ledger's feedback and shadow judgements.

A request answered by a smaller tier is labelled by what was said about that answer: its
shadow verdicts (1 good enough, 0 not) and its users' ratings (in [0, 1]) are averaged,
and the label is 1 (the small tier was not enough) when the average is below 0.5.
Requests the largest tier answered say nothing about whether a smaller one would have
done, so they are not used. Prompts must have been kept (`keep_prompts: true`).

A new router trained on the older 80% of the labelled requests is promoted only if it
beats the current router on the newest 20% (ROC AUC of scores against labels).
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from tierroute.errors import InputError
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
    for request_id, _, verdict in ledger.judgements(since):
        if verdict is not None:
            signals[request_id].append(verdict)
    ids, prompts, labels, ts = [], [], [], []
    missing_prompt = 0
    for row in ledger.rows(since=since):
        if row.tier == largest_tier or row.id not in signals or row.status != 200:
            continue
        if not row.prompt_text:
            missing_prompt += 1
            continue
        ids.append(row.id)
        prompts.append(row.prompt_text)
        labels.append(int(np.mean(signals[row.id]) < 0.5))
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


def require_rows(data: LedgerLabels, minimum: int = 20) -> None:
    if len(data.ids) < minimum:
        raise InputError(
            f"only {len(data.ids)} labelled requests in the ledger (at least {minimum} needed); "
            "collect more feedback or raise the shadow sampling rate"
        )
