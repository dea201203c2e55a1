"""The policy: turns a router's score into a tier.

Tiers are ordered smallest first; boundary i (a threshold) separates tier i from tier
i+1, and a request goes to the largest tier whose boundary its score reaches. When the
score falls within `abstain_band` below a boundary the router is unsure, and the
request goes up to the larger tier of that boundary. Rule floors (`min_tiers`) and the
request's priority hint can only move a request up or down as documented on `decide`.
"""

from __future__ import annotations

import bisect
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tierroute.errors import ConfigError
from tierroute.routers.base import BaseRouter
from tierroute.types import Decision, Explanation, Messages, Tier

# How much each priority shifts the score before thresholds apply.
PRIORITY_SHIFT = {"batch": -0.1, "interactive": 0.0, "critical": 0.15}
# Conventional tier names, smallest first: a rule's floor names one of these, and a policy
# without that exact tier honours it with the next configured tier of the same or higher
# rank (e.g. "at least medium" with tiers small/large means large).
CANONICAL = ("tiny", "small", "medium", "large")


@dataclass
class Policy:
    tiers: Sequence[Tier]
    thresholds: Sequence[float] | None = None
    abstain_band: float = 0.0
    priority_shift: Mapping[str, float] = field(default_factory=lambda: dict(PRIORITY_SHIFT))

    def __post_init__(self) -> None:
        if len(self.tiers) < 2:
            raise ConfigError("a policy needs at least two tiers, smallest first")
        names = [t.name for t in self.tiers]
        if len(set(names)) != len(names):
            raise ConfigError(f"tier names must be unique, got {names}")
        if self.thresholds is None:
            n = len(self.tiers)
            self.thresholds = [i / n for i in range(1, n)]
        self.thresholds = [float(t) for t in self.thresholds]
        if len(self.thresholds) != len(self.tiers) - 1:
            raise ConfigError(
                f"{len(self.tiers)} tiers need {len(self.tiers) - 1} thresholds, "
                f"got {len(self.thresholds)}"
            )
        if any(b < a for a, b in zip(self.thresholds, self.thresholds[1:], strict=False)):
            raise ConfigError(f"thresholds must ascend, got {self.thresholds}")
        if not 0.0 <= self.abstain_band < 1.0:
            raise ConfigError(f"abstain_band must be in [0, 1), got {self.abstain_band}")

    def tier(self, name: str) -> Tier:
        for tier in self.tiers:
            if tier.name == name:
                return tier
        raise ConfigError(f"no tier named '{name}'; tiers are {[t.name for t in self.tiers]}")

    @property
    def entry(self) -> float:
        """The lowest score that reaches the largest tier: its boundary minus the abstain
        band (a score within the band below a boundary is unsure and goes up)."""
        assert self.thresholds is not None
        return self.thresholds[-1] - self.abstain_band

    def with_threshold(self, threshold: float) -> Policy:
        """A copy whose largest tier takes exactly the scores >= the calibrated `threshold`.

        A calibration promises a large share or a quality for the scores from its
        threshold up, so the abstain band goes above it: the top boundary is threshold +
        band, scores in [threshold, threshold + band) reach the largest tier as unsure, and
        none below it do (a band below would send more than the calibrated share up: with
        the default router's scores, 45% instead of 30%). Lower boundaries keep their
        configured share of the range below the threshold.
        """
        assert self.thresholds is not None
        top = self.thresholds[-1]
        scale = threshold / top if top > 0 else 1.0
        lower = [t * scale for t in self.thresholds[:-1]]
        return Policy(
            self.tiers,
            [*lower, threshold + self.abstain_band],
            self.abstain_band,
            self.priority_shift,
        )

    def decide(
        self,
        explanation: Explanation,
        priority: str | None = None,
        offset: float = 0.0,
        offset_reason: str = "",
    ) -> Decision:
        """The tier for a scored request.

        1. effective score = score + the priority's shift (batch -0.1, critical +0.15);
        2. tier = the largest whose boundary the effective score reaches, where a score
           within `abstain_band` below a boundary counts as reaching it;
        3. the tier is raised to the highest floor a rule set (unknown tier names in a
           floor are ignored and said so in the reason).
        """
        assert self.thresholds is not None
        reasons = list(explanation.reasons)
        score = explanation.score
        if priority is not None:
            if priority not in self.priority_shift:
                raise ConfigError(
                    f"unknown priority '{priority}'; use one of {sorted(self.priority_shift)}"
                )
            shift = self.priority_shift[priority]
            if shift:
                reasons.append(f"priority {priority} {shift:+.2f}")
            score = min(1.0, max(0.0, score + shift))
        if offset:
            reasons.append(f"{offset_reason or 'offset'} {offset:+.2f}")
            score = min(1.0, max(0.0, score + offset))
        index = bisect.bisect_right(self.thresholds, score)
        unsure = bisect.bisect_right(self.thresholds, score + self.abstain_band)
        if unsure > index:
            reasons.append(
                f"unsure: within {self.abstain_band:g} of threshold {self.thresholds[index]:.3g}, "
                "sent up a tier"
            )
            index = unsure
        for floor in explanation.min_tiers:
            floor_index = self._floor_index(floor)
            if floor_index is None:
                reasons.append(f"floor {floor} ignored: no such tier")
            elif floor_index > index:
                index = floor_index
                name = self.tiers[index].name
                # a rule's conventional floor, told in the configured tiers' names
                reasons.append(
                    f"floor: at least {name}" if name == floor else f"floor {floor}: {name}"
                )
        tags = ", ".join(f"{k}={v}" for k, v in explanation.tags.items())
        if tags:
            reasons.insert(0, tags)
        return Decision(
            score=explanation.score,
            tier=self.tiers[index],
            reason="; ".join(reasons),
            tags=dict(explanation.tags),
        )

    def _floor_index(self, floor: str) -> int | None:
        names = [t.name for t in self.tiers]
        if floor in names:
            return names.index(floor)
        if floor not in CANONICAL:
            return None
        rank = CANONICAL.index(floor)
        for i, name in enumerate(names):
            if name in CANONICAL and CANONICAL.index(name) >= rank:
                return i
        return None

    def route(
        self, router: BaseRouter, messages: Messages, priority: str | None = None
    ) -> Decision:
        start = time.perf_counter()
        decision = self.decide(router.explain(messages), priority)
        elapsed = (time.perf_counter() - start) * 1000
        return Decision(decision.score, decision.tier, decision.reason, decision.tags, elapsed)
