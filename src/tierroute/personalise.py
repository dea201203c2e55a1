"""Per-tenant threshold offsets learned from that tenant's own feedback.

A tenant (the request's `user`, else its API key) whose answers from the smaller tiers
are rated bad more often than expected gets its scores shifted up, so more of its
requests go to larger tiers; one that rates them well gets shifted down. The shift is
shrunk towards zero (the global policy) while the tenant has little feedback:

    shift = strength * (bad_rate - expected_bad_rate) * n / (n + prior_n),
            clipped to [-max_shift, max_shift]

It depends on that tenant's ratings alone, so one tenant's feedback never moves another
tenant's routing.

Tenants are named by the caller (its `user` field), so one key could rate answers for a
million made-up users and grow this table without end: each key (its owner id) may bring
at most `max_tenants_per_key` tenants; ratings for a further new one are kept in the ledger
but move no routing. The count is per process: with shared state, N replicas can hold up to
N times that per key, still bounded.
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
    max_tenants_per_key: int = 10_000

    def __post_init__(self) -> None:
        if not 1 <= self.max_tenants_per_key <= 10_000_000:
            raise ConfigError("personalise.max_tenants_per_key must be within [1, 1e7]")
        if self.strength < 0 or self.prior_n < 0 or not 0 <= self.expected_bad_rate <= 1:
            raise ConfigError("personalise: strength, prior_n >= 0 and expected_bad_rate in [0, 1]")
        if not 0 <= self.max_shift <= 1:
            raise ConfigError("personalise.max_shift must be within [0, 1]")


@dataclass
class Personaliser:
    config: PersonaliseConfig
    _counts: dict[str, list[float]] = field(default_factory=dict)  # tenant -> [n, bad]
    _owned: dict[str, set[str]] = field(default_factory=dict)  # owner -> tenants it brought
    refused: int = 0  # ratings not learned: their owner had brought its cap of tenants

    def _admits(self, tenant: str, owner: str) -> bool:
        """Whether `tenant` may learn: one already known, or a new one within its owner's cap."""
        if tenant in self._counts:
            return True
        owned = self._owned.setdefault(owner, set())
        if tenant not in owned and len(owned) >= self.config.max_tenants_per_key:
            self.refused += 1
            return False
        owned.add(tenant)
        return True

    def observe(self, tenant: str, rating: float, owner: str = "") -> bool:
        """A rating of an answer a smaller tier gave this tenant, whose requests came with
        `owner`'s key; False when it was not learned (the owner's cap of tenants)."""
        if not self._admits(tenant, owner):
            return False
        counts = self._counts.setdefault(tenant, [0.0, 0.0])
        counts[0] += 1
        counts[1] += 1.0 - rating  # a rating in [0, 1]: 0 is fully bad
        return True

    def revise(self, tenant: str, old: float, new: float, owner: str = "") -> bool:
        """A rater changed their rating of one answer: the latest counts, once."""
        counts = self._counts.get(tenant)
        if counts is None:
            return self.observe(tenant, new, owner)
        counts[1] += old - new
        return True

    @property
    def tenants(self) -> int:
        return len(self._counts)

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
