"""Per-tenant threshold offsets learned from that tenant's own feedback.

A tenant (the request's `user`, else its API key) whose answers from the smaller tiers
are rated bad more often than expected gets its scores shifted up, so more of its
requests go to larger tiers; one that rates them well gets shifted down. The shift is
shrunk towards zero (the global policy) while the tenant has little feedback:

    shift = strength * (bad_rate - expected_bad_rate) * n / (n + prior_n),
            clipped to [-max_shift, max_shift]

It depends on that tenant's ratings alone, so one tenant's feedback never moves another
tenant's routing.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from tierroute.errors import ConfigError


@dataclass(frozen=True)
class PersonaliseConfig:
    strength: float = 0.5
    prior_n: float = 20.0
    expected_bad_rate: float = 0.2
    max_shift: float = 0.2

    def __post_init__(self) -> None:
        if self.strength < 0 or self.prior_n < 0 or not 0 <= self.expected_bad_rate <= 1:
            raise ConfigError("personalise: strength, prior_n >= 0 and expected_bad_rate in [0, 1]")
        if not 0 <= self.max_shift <= 1:
            raise ConfigError("personalise.max_shift must be within [0, 1]")


@dataclass
class Personaliser:
    config: PersonaliseConfig
    _counts: dict[str, list[float]] = field(default_factory=dict)  # tenant -> [n, bad]

    def observe(self, tenant: str, rating: float) -> None:
        """A rating of an answer a smaller tier gave this tenant."""
        counts = self._counts.setdefault(tenant, [0.0, 0.0])
        counts[0] += 1
        counts[1] += 1.0 - rating  # a rating in [0, 1]: 0 is fully bad

    def revise(self, tenant: str, old: float, new: float) -> None:
        """A rater changed their rating of one answer: the latest counts, once."""
        counts = self._counts.get(tenant)
        if counts is None:
            self.observe(tenant, new)
        else:
            counts[1] += old - new

    def counts(self) -> dict[str, list[float]]:
        """Every tenant's [ratings, bad], to share with other replicas."""
        return {t: list(c) for t, c in self._counts.items()}

    def replace_counts(self, counts: dict[str, list[float]]) -> None:
        """Take the counts all replicas share (the shift formula is unchanged)."""
        self._counts = {t: [float(c[0]), float(c[1])] for t, c in counts.items() if c[0] > 0}

    def shift(self, tenant: str | None) -> float:
        if tenant is None or tenant not in self._counts:
            return 0.0
        c = self.config
        n, bad = self._counts[tenant]
        raw = c.strength * (bad / n - c.expected_bad_rate) * n / (n + c.prior_n)
        return max(-c.max_shift, min(c.max_shift, raw))
