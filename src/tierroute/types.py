"""Plain frozen value types shared by every layer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal

Role = Literal["system", "user", "assistant", "tool", "developer"]

# A chat message as the OpenAI wire format has it: {"role": ..., "content": ...}.
Message = Mapping[str, object]
Messages = Sequence[Message]


@dataclass(frozen=True)
class Tier:
    """One model tier. Prices are USD per million tokens."""

    name: str
    model: str
    input_price_per_m: float = 0.0
    output_price_per_m: float = 0.0
    typical_latency_ms: float = 0.0

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        return (
            prompt_tokens * self.input_price_per_m + completion_tokens * self.output_price_per_m
        ) / 1e6


@dataclass(frozen=True)
class Explanation:
    """What a router says about one request: its score and why."""

    score: float
    reasons: tuple[str, ...] = ()
    # Tier floors set by rules (e.g. task=code -> at least medium); the policy takes the highest.
    min_tiers: tuple[str, ...] = ()
    tags: Mapping[str, str] = field(default_factory=dict)


@dataclass(frozen=True)
class Decision:
    """The policy's verdict for one request; the gateway logs it."""

    score: float
    tier: Tier
    reason: str
    tags: Mapping[str, str] = field(default_factory=dict)
    elapsed_ms: float = 0.0
