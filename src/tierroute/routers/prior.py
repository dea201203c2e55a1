"""A learned router with the rule set as a prior: learned evidence plus operators' rules.

    score = sigmoid(logit(learned score) + weight * sum of the matching rules' weights)

Outcome data from benchmarks holds no small talk, no thanks and no greetings, so a
router learned from it alone can rate "hi, thanks!" as hard as a proof. The rules
(`rules.yaml`, editable) carry what every operator knows about such traffic, and their
`min_tier` floors still apply. `weight` keeps the prior from drowning the learned
evidence: the default router's learned logits span about +-0.5, the rules +-1.5 each.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import numpy as np

from tierroute.routers.base import BaseRouter, Scores
from tierroute.routers.rules import RulesRouter
from tierroute.types import Explanation


def _logit(p: Scores) -> Scores:
    q = np.clip(p, 1e-6, 1 - 1e-6)
    out: Scores = np.log(q / (1 - q))
    return out


class RulePriorRouter(BaseRouter):
    kind: ClassVar[str] = "rule-prior"

    def __init__(self, base: BaseRouter, rules: RulesRouter, weight: float = 0.25) -> None:
        self.base = base
        self.rules = rules
        self.weight = weight
        self.encoder = getattr(base, "encoder", None)

    def _shift(self, texts: Sequence[str]) -> Scores:
        # the rules' score minus their bias: only the weights of the rules that matched
        shift: Scores = _logit(self.rules.score_texts(texts)) - self.rules.rules.bias
        return self.weight * shift

    def score_texts(self, texts: Sequence[str]) -> Scores:
        z = _logit(self.base.score_texts(texts)) + self._shift(texts)
        out: Scores = 1.0 / (1.0 + np.exp(-z))
        return out

    def explain_text(self, text: str) -> Explanation:
        learned = self.base.explain_text(text)
        ruled = self.rules.explain_text(text)
        z = float(_logit(np.array([learned.score]))[0] + self._shift([text])[0])
        matched = tuple(f"{r} x{self.weight:g}" for r in ruled.reasons if r != "no rule matched")
        return Explanation(
            score=1.0 / (1.0 + np.exp(-z)),
            reasons=(f"learned {learned.score:.2f}", *learned.reasons, *matched),
            min_tiers=ruled.min_tiers,
            tags={**learned.tags, **ruled.tags},
        )
