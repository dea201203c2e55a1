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
from typing import Any

from tierroute.errors import ConfigError
from tierroute.policy import Policy
from tierroute.types import Tier
from tierroute.yaml_files import read_yaml


def parse_tier(spec: Any, i: int, source: str) -> Tier:
    if not isinstance(spec, dict) or not spec.get("name") or not spec.get("model"):
        raise ConfigError(f"tier {i} in {source} needs a 'name' and a 'model'")
    try:
        return Tier(
            name=str(spec["name"]),
            model=str(spec["model"]),
            input_price_per_m=float(spec.get("input_price_per_m", 0.0)),
            output_price_per_m=float(spec.get("output_price_per_m", 0.0)),
            typical_latency_ms=float(spec.get("typical_latency_ms", 0.0)),
        )
    except (TypeError, ValueError):
        raise ConfigError(
            f"tier '{spec['name']}' in {source} has a price or latency that is not a number"
        ) from None


def parse_policy(doc: Any, source: str) -> Policy:
    if not isinstance(doc, dict) or not isinstance(doc.get("tiers"), list):
        raise ConfigError(f"{source} needs a 'tiers' list, smallest tier first")
    tiers = [parse_tier(spec, i, source) for i, spec in enumerate(doc["tiers"], start=1)]
    policy_doc = doc.get("policy") or {}
    if not isinstance(policy_doc, dict):
        raise ConfigError(f"'policy' in {source} must be a mapping")
    thresholds = policy_doc.get("thresholds")
    try:
        return Policy(
            tiers=tiers,
            thresholds=[float(t) for t in thresholds] if thresholds is not None else None,
            abstain_band=float(policy_doc.get("abstain_band", 0.0)),
        )
    except (TypeError, ValueError) as exc:
        raise ConfigError(f"{source}: {exc}") from None


def load_policy(path: str | Path | None = None) -> Policy:
    """The policy in `path`, or the built-in default tiers when no path is given."""
    return parse_policy(*read_yaml(path, "tiers.yaml", "tier config"))
