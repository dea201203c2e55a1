"""The savings table: what routing saves against sending everything to the large tier."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Savings:
    queries_per_day: int
    price_small: float  # USD per query
    price_large: float
    small_share: float

    @property
    def all_large(self) -> float:
        return self.queries_per_day * self.price_large

    @property
    def routed(self) -> float:
        large = 1.0 - self.small_share
        return self.queries_per_day * (
            self.small_share * self.price_small + large * self.price_large
        )

    @property
    def saved_fraction(self) -> float:
        return 1.0 - self.routed / self.all_large if self.all_large else 0.0

    def as_dict(self) -> dict[str, float]:
        return {
            "queries_per_day": self.queries_per_day,
            "price_small_usd": self.price_small,
            "price_large_usd": self.price_large,
            "small_share": self.small_share,
            "all_large_usd": self.all_large,
            "routed_usd": self.routed,
            "saved_fraction": self.saved_fraction,
        }

    def lines(self) -> list[str]:
        return [
            f"{self.queries_per_day:,} queries/day at ${self.price_large:g} (large) vs "
            f"${self.price_small:g} (small) per query, {self.small_share:.0%} routed small:",
            f"  all-large ${self.all_large:,.2f}/day   routed ${self.routed:,.2f}/day   "
            f"saved {self.saved_fraction:.0%}",
        ]
