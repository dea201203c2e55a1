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

from tierroute.routers.base import BaseRouter, Scores, logit, sigmoid
from tierroute.routers.rules import RulesRouter
from tierroute.types import Explanation


class RulePriorRouter(BaseRouter):
    kind: ClassVar[str] = "rule-prior"

    def __init__(self, base: BaseRouter, rules: RulesRouter, weight: float = 0.25) -> None:
        self.base = base
        self.rules = rules
        self.weight = weight
        self.encoder = getattr(base, "encoder", None)

    def _combine(self, learned: Scores, ruled: Scores) -> Scores:
        # the rules' logit minus their bias: only the weights of the rules that matched
        z = logit(learned) + self.weight * (logit(ruled) - self.rules.rules.bias)
        return sigmoid(z)

    def score_texts(self, texts: Sequence[str]) -> Scores:
        return self._combine(self.base.score_texts(texts), self.rules.score_texts(texts))

    def explain_text(self, text: str) -> Explanation:
        learned = self.base.explain_text(text)
        ruled = self.rules.explain_text(text)  # its score is the rules' score: not run twice
        score = self._combine(np.array([learned.score]), np.array([ruled.score]))[0]
        matched = tuple(f"{r} x{self.weight:g}" for r in ruled.reasons if r != "no rule matched")
        return Explanation(
            score=float(score),
            reasons=(f"learned {learned.score:.2f}", *learned.reasons, *matched),
            min_tiers=ruled.min_tiers,
            tags={**learned.tags, **ruled.tags},
        )
