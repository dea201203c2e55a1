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
        return self.explain_texts([text])[0]

    def explain_texts(self, texts: Sequence[str]) -> list[Explanation]:
        learned = self.base.explain_texts(texts)
        ruled = self.rules.explain_texts(texts)  # their scores are the rules': not run twice
        scores = self._combine(
            np.array([e.score for e in learned]), np.array([e.score for e in ruled])
        )
        out = []
        for score, mine, rules in zip(scores, learned, ruled, strict=True):
            matched = tuple(
                f"{r} x{self.weight:g}" for r in rules.reasons if r != "no rule matched"
            )
            out.append(
                Explanation(
                    score=float(score),
                    reasons=(f"learned {mine.score:.2f}", *mine.reasons, *matched),
                    min_tiers=rules.min_tiers,
                    tags={**mine.tags, **rules.tags},
                )
            )
        return out
