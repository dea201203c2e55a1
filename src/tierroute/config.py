"""Tier and policy configuration: one YAML file, read by a function (never at import).

tiers:                       # ordered, smallest first; two or more
  - name: small
    model: mistralai/Mixtral-8x7B-Instruct-v0.1
    input_price_per_m: 0.24  # USD per million tokens
    output_price_per_m: 0.24
    typical_latency_ms: 400
  - name: large
    model: gpt-4-1106-preview
    input_price_per_m: 10
    output_price_per_m: 30
policy:
  thresholds: [0.5]          # one per tier boundary, ascending
  abstain_band: 0.05         # scores this close below a boundary go up a tier
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

from pydantic import Field

from tierroute.errors import ConfigError
from tierroute.policy import Policy
from tierroute.strict import Lines, StrictModel, check, where
from tierroute.types import Tier
from tierroute.yaml_files import read_yaml_lines

# Bounds a real deployment stays far inside; beyond them the value is a typo.
Price = Annotated[float, Field(ge=0, le=10_000)]


class TierFields(StrictModel):
    """One tier as written in a tiers or gateway file."""

    name: str = Field(min_length=1, max_length=64, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
    model: str = Field(min_length=1, max_length=512)
    input_price_per_m: Price = 0.0
    output_price_per_m: Price = 0.0
    typical_latency_ms: float = Field(0.0, ge=0, le=3_600_000)

    def tier(self) -> Tier:
        return Tier(
            name=self.name,
            model=self.model,
            input_price_per_m=self.input_price_per_m,
            output_price_per_m=self.output_price_per_m,
            typical_latency_ms=self.typical_latency_ms,
        )


class PolicyFields(StrictModel):
    thresholds: list[Annotated[float, Field(ge=0, le=1)]] | None = Field(None, max_length=15)
    abstain_band: float = Field(0.0, ge=0, lt=1)


class TiersFile(StrictModel):
    tiers: list[TierFields] = Field(min_length=2, max_length=16)
    policy: PolicyFields | None = None


def build_policy(
    tiers: list[Tier], fields: PolicyFields | None, source: str, lines: Lines | None = None
) -> Policy:
    """The Policy of checked fields; its own consistency errors (count, order) name the file."""
    fields = fields or PolicyFields()
    try:
        return Policy(tiers=tiers, thresholds=fields.thresholds, abstain_band=fields.abstain_band)
    except ConfigError as exc:
        raise ConfigError(f"{where(source, lines, ('policy',))}: {exc}") from None


def parse_policy(doc: Any, source: str, lines: Lines | None = None) -> Policy:
    if not isinstance(doc, dict) or not isinstance(doc.get("tiers"), list):
        raise ConfigError(f"{source} needs a 'tiers' list, smallest tier first")
    checked = check(TiersFile, doc, source, lines)
    return build_policy([t.tier() for t in checked.tiers], checked.policy, source, lines)


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in `path`, or the built-in default tiers when no path is given."""
    return parse_policy(*read_yaml_lines(path, "tiers.yaml", "tier config"))
