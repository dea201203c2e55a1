"""Gateway configuration: tiers with their backends, the policy, the router, limits.

One YAML file (`tierroute serve --config FILE`); without one, the embedded default in
resources/gateway.yaml. A tier is either `kind: local` (a GGUF model from the registry in
`tierroute.backends.models`, run in-process) or `kind: openai` (any OpenAI-compatible
endpoint: base_url, model, the name of the env variable holding its API key, timeout).
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any, TypeVar

from tierroute.cascade import CascadeConfig
from tierroute.config import parse_policy, parse_tier
from tierroute.controller import ControllerConfig
from tierroute.errors import ConfigError
from tierroute.gateway.shadow import ShadowConfig
from tierroute.learning import LearningConfig
from tierroute.personalise import PersonaliseConfig
from tierroute.policy import Policy
from tierroute.types import Tier
from tierroute.yaml_files import read_yaml

KINDS = ("local", "openai")
S = TypeVar("S")


@dataclass(frozen=True)
class TierSpec:
    tier: Tier
    kind: str
    timeout_s: float = 60.0
    base_url: str | None = None
    api_key_env: str | None = None
    n_ctx: int = 2048
    n_threads: int | None = None

    @property
    def name(self) -> str:
        return self.tier.name


@dataclass(frozen=True)
class GatewaySettings:
    tiers: tuple[TierSpec, ...]
    policy: Policy
    router: str = "default"
    max_body_bytes: int = 1 << 20
    keep_prompts: bool = False
    retries: int = 2
    breaker_failures: int = 3
    breaker_cooldown_s: float = 30.0
    cache_size: int = 10_000
    cache_ttl_s: float = 600.0
    max_tokens_default: int = 256
    api_key_hashes: frozenset[str] = field(default_factory=frozenset)
    controller: ControllerConfig | None = None
    shadow: ShadowConfig | None = None
    personalise: PersonaliseConfig | None = None
    cascade: CascadeConfig | None = None
    learning: LearningConfig | None = None
    source: str = "built-in gateway.yaml"

    def spec(self, name: str) -> TierSpec:
        for spec in self.tiers:
            if spec.name == name:
                return spec
        raise ConfigError(f"no tier named '{name}'")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


def _tier_spec(raw: Any, i: int, source: str) -> TierSpec:
    if not isinstance(raw, dict):
        raise ConfigError(f"tier {i} in {source} must be a mapping")
    kind = raw.get("kind", "openai" if "base_url" in raw else "local")
    if kind not in KINDS:
        raise ConfigError(f"tier '{raw.get('name')}' in {source}: kind must be local or openai")
    if kind == "openai" and not raw.get("base_url"):
        raise ConfigError(f"tier '{raw.get('name')}' in {source} is remote and needs a base_url")
    try:
        return TierSpec(
            tier=parse_tier(raw, i, source),
            kind=str(kind),
            timeout_s=float(raw.get("timeout_s", 60.0)),
            base_url=str(raw["base_url"]) if raw.get("base_url") else None,
            api_key_env=str(raw["api_key_env"]) if raw.get("api_key_env") else None,
            n_ctx=int(raw.get("n_ctx", 2048)),
            n_threads=int(raw["n_threads"]) if raw.get("n_threads") is not None else None,
        )
    except (TypeError, ValueError):
        raise ConfigError(f"tier '{raw.get('name')}' in {source} has a bad number") from None


def _section(gw: dict[str, Any], name: str, kind: Callable[..., S], source: str) -> S | None:
    """The optional `gateway.<name>` mapping, built into its config class."""
    raw = gw.get(name)
    if not raw:
        return None
    if not isinstance(raw, dict):
        raise ConfigError(f"'gateway.{name}' in {source} must be a mapping")
    known = [f.name for f in fields(kind)] if isinstance(kind, type) and is_dataclass(kind) else []
    unknown = sorted(set(raw) - set(known)) if known else []
    if unknown:
        raise ConfigError(
            f"'gateway.{name}' in {source} has unknown key(s) {', '.join(map(str, unknown))}; "
            f"use {', '.join(known)}"
        )
    try:
        return kind(**raw)
    except (TypeError, ConfigError) as exc:
        raise ConfigError(f"'gateway.{name}' in {source}: {exc}") from None


def parse_settings(doc: Any, source: str) -> GatewaySettings:
    if not isinstance(doc, dict) or not isinstance(doc.get("tiers"), list):
        raise ConfigError(f"{source} needs a 'tiers' list, smallest tier first")
    specs = tuple(_tier_spec(raw, i, source) for i, raw in enumerate(doc["tiers"], start=1))
    policy = parse_policy({"tiers": doc["tiers"], "policy": doc.get("policy")}, source)
    gw = doc.get("gateway") or {}
    if not isinstance(gw, dict):
        raise ConfigError(f"'gateway' in {source} must be a mapping")
    keys = gw.get("api_keys_sha256") or []
    env_keys = os.environ.get("TIERROUTE_API_KEYS", "")
    hashes = {str(k).lower() for k in keys} | {hash_key(k) for k in env_keys.split(",") if k}
    if any(len(h) != 64 for h in hashes):
        raise ConfigError(f"api_keys_sha256 in {source} must hold sha256 hex digests")
    controller = _section(gw, "controller", ControllerConfig, source)
    shadow = _section(gw, "shadow", ShadowConfig, source)
    personalise = _section(gw, "personalise", PersonaliseConfig, source)
    cascade = _section(gw, "cascade", CascadeConfig, source)
    learning = _section(gw, "learning", LearningConfig, source)
    if learning is not None and learning.enabled and not gw.get("keep_prompts"):
        raise ConfigError(
            f"'gateway.learning' in {source} learns from prompts: set 'keep_prompts: true'"
        )
    try:
        return GatewaySettings(
            tiers=specs,
            policy=policy,
            router=str(doc.get("router", "default")),
            max_body_bytes=int(gw.get("max_body_bytes", 1 << 20)),
            keep_prompts=bool(gw.get("keep_prompts", False)),
            retries=int(gw.get("retries", 2)),
            breaker_failures=int(gw.get("breaker_failures", 3)),
            breaker_cooldown_s=float(gw.get("breaker_cooldown_s", 30.0)),
            cache_size=int(gw.get("cache_size", 10_000)),
            cache_ttl_s=float(gw.get("cache_ttl_s", 600.0)),
            max_tokens_default=int(gw.get("max_tokens_default", 256)),
            api_key_hashes=frozenset(hashes),
            controller=controller,
            shadow=shadow,
            personalise=personalise,
            cascade=cascade,
            learning=learning if learning is not None and learning.enabled else None,
            source=source,
        )
    except (TypeError, ValueError):
        raise ConfigError(f"a value under 'gateway' in {source} is not a number") from None


def apply_calibration(settings: GatewaySettings, threshold: float) -> str:
    """Let a saved router's calibrated threshold set the policy's top boundary, the lower
    ones keeping their share of the range below it (`Policy.with_threshold`, as
    `tierroute route` does). Configured thresholds are for uncalibrated routers: a saved
    router's scores live on its own scale. Returns what changed, for the log."""
    before = list(settings.policy.thresholds or [])
    settings.policy.thresholds = settings.policy.with_threshold(threshold).thresholds
    after = ", ".join(f"{t:.4g}" for t in settings.policy.thresholds or [])
    band = settings.policy.abstain_band
    return (
        f"policy: router {settings.router} is calibrated (threshold {threshold:.4g}): "
        f"thresholds [{after}] instead of the configured {before}; the largest tier takes "
        f"scores >= {threshold:.4g}"
        + (f" ({threshold:.4g} to {threshold + band:.4g} as unsure)" if band else "")
    )


def load_settings(path: str | Path | None = None) -> GatewaySettings:
    return parse_settings(*read_yaml(path, "gateway.yaml", "gateway config"))
