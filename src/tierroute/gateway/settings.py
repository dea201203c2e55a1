"""Gateway configuration: tiers with their backends, the policy, the router, limits.

One YAML file (`tierroute serve --config FILE`); without one, the embedded default in
resources/gateway.yaml. A tier is either `kind: local` (a GGUF model from the registry in
`tierroute.backends.models`, run in-process) or `kind: openai` (any OpenAI-compatible
endpoint: base_url, model, the name of the env variable holding its API key, timeout).
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal, TypeVar

from pydantic import Field, model_validator

from tierroute.backends.openai_http import DEFAULT_MAX_RESPONSE_BYTES
from tierroute.cascade import CascadeConfig
from tierroute.config import PolicyFields, TierFields, build_policy
from tierroute.controller import ControllerConfig
from tierroute.errors import ConfigError
from tierroute.gateway.choose import ChooseConfig
from tierroute.gateway.limits import BudgetPressure, KeyLimits
from tierroute.gateway.shadow import ShadowConfig
from tierroute.learning import LearningConfig
from tierroute.ledger.location import LEDGER_PATTERN, MAX_LENGTH
from tierroute.personalise import PersonaliseConfig
from tierroute.policy import Policy
from tierroute.strict import Lines, StrictModel, build_section, check, where
from tierroute.types import Tier
from tierroute.yaml_files import read_yaml_lines

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
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES  # a remote tier's answer, at most
    vision: bool = False  # may image parts be sent to it (local tiers: never)
    # A tier of several models lists them here, each a spec of its own whose `model_name`
    # is set (see tierroute.gateway.choose); the tier's own fields are its first model's.
    models: tuple[TierSpec, ...] = ()
    model_name: str | None = None
    router_model: str | None = None  # the trained router's column for this model
    prior: float | None = None  # P(answers well) before any verdict, when not trained on
    tasks: Mapping[str, float] = field(default_factory=dict)  # per tagged task, instead
    domains: Mapping[str, float] = field(default_factory=dict)  # per tagged domain, likewise

    @property
    def name(self) -> str:
        return self.tier.name

    @property
    def key(self) -> str:
        """What backends, breakers and fallback chains call it: the tier's name, or
        tier/model for one model of a tier of several."""
        return f"{self.tier.name}/{self.model_name}" if self.model_name else self.tier.name

    @property
    def targets(self) -> tuple[TierSpec, ...]:
        """What can answer for this tier: its models, or itself."""
        return self.models or (self,)


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
    forced_fallback: bool = False  # may a request that names its tier fall back to another?
    # A client gets this long to send its request headers, and again its body (slow-loris).
    client_timeout_s: float = 10.0
    api_key_hashes: frozenset[str] = field(default_factory=frozenset)
    virtual_keys: bool = False
    key_cache_ttl_s: float = 5.0  # a revoked virtual key is refused everywhere within this
    key_stale_s: float = 300.0  # a looked-up key still works this long into a database outage
    # /v1/route and /v1/feedback per virtual key and minute (None: unlimited)
    side_requests_per_minute: int | None = 600
    public_metrics: bool = False  # /metrics without a key (a scraper on a private network)
    controller: ControllerConfig | None = None
    shadow: ShadowConfig | None = None
    personalise: PersonaliseConfig | None = None
    cascade: CascadeConfig | None = None
    on_ledger_failure: str = "queue"
    ledger_spill_max_rows: int = 100_000
    learning: LearningConfig | None = None
    ledger: str | None = None  # a postgresql:// URL or sqlite:PATH; see ledger.location
    # Shared state (gateway/sync.py, tierroute.state): None keeps it in the process.
    state_url: str | None = None
    state_prefix: str = "tierroute:"
    state_sync_s: float = 0.25
    key_limits: KeyLimits | None = None
    budget_pressure: BudgetPressure | None = None
    # Fresh prompts routed together: up to this many per embedding call (1: one at a time),
    # those that queued while the routing thread was busy; an idle thread waits this long
    # for company first (0: none). See gateway/batcher.py.
    route_batch_max: int = 32
    route_batch_wait_ms: float = 0.0
    choose: ChooseConfig | None = None  # how a tier of several models picks one
    # `model` names that /v1/embeddings answers with the packaged all-MiniLM-L6-v2
    # (gateway/embeddings.py); empty: every embeddings request goes to a remote tier.
    embedding_models: tuple[str, ...] = ("all-MiniLM-L6-v2",)
    source: str = "built-in gateway.yaml"

    def spec(self, name: str) -> TierSpec:
        """A tier by name, or one model of a tier of several by its key (tier/model)."""
        for spec in self.tiers:
            if spec.name == name:
                return spec
            for model in spec.models:
                if model.key == name:
                    return model
        raise ConfigError(f"no tier named '{name}'")


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


class _Backed(TierFields):
    """A model and where it runs: a local GGUF model or a remote OpenAI-compatible endpoint."""

    kind: Literal["local", "openai"] | None = None
    timeout_s: float = Field(60.0, gt=0, le=3600)
    base_url: str | None = Field(None, pattern=r"^https?://", max_length=2048)
    api_key_env: str | None = Field(None, pattern=r"^[A-Za-z_][A-Za-z0-9_]*$", max_length=128)
    n_ctx: int = Field(2048, ge=128, le=1 << 20)
    n_threads: int | None = Field(None, ge=1, le=256)
    # An answer larger than this is a tier failure (and falls back), never a memory spike.
    max_response_bytes: int = Field(DEFAULT_MAX_RESPONSE_BYTES, ge=1024, le=1 << 31)
    # Image parts go to a tier that can see; unset: remote tiers yes, local tiers no.
    vision: bool | None = None

    @model_validator(mode="after")
    def _remote_needs_url(self) -> _Backed:
        if self.kind == "openai" and not self.base_url:
            raise ValueError("a remote tier (kind: openai) needs a base_url")
        if self.vision and self.kind != "openai" and not self.base_url:
            raise ValueError("a local tier cannot read images: leave vision unset or false")
        return self

    def spec(self) -> TierSpec:
        return TierSpec(
            tier=self.tier(),
            kind=self.kind or ("openai" if self.base_url else "local"),
            timeout_s=self.timeout_s,
            base_url=self.base_url,
            api_key_env=self.api_key_env,
            n_ctx=self.n_ctx,
            n_threads=self.n_threads,
            max_response_bytes=self.max_response_bytes,
            vision=self.vision if self.vision is not None else bool(self.base_url),
        )


Probability = Annotated[float, Field(gt=0, lt=1)]
Tag = Annotated[str, Field(min_length=1, max_length=64)]


class TierModel(_Backed):
    """One of several models of a tier; `name` names it within its tier."""

    router_model: str | None = Field(None, min_length=1, max_length=512)
    prior: Probability | None = None
    tasks: dict[Tag, Probability] = Field(default_factory=dict, max_length=64)
    domains: dict[Tag, Probability] = Field(default_factory=dict, max_length=64)


class GatewayTier(_Backed):
    """A tier of the gateway: one model, or several (`models`) chosen per request."""

    model: str | None = Field(None, min_length=1, max_length=512)  # type: ignore[assignment]
    models: list[TierModel] | None = Field(None, min_length=1, max_length=32)

    @model_validator(mode="after")
    def _one_form(self) -> GatewayTier:
        if self.models is None:
            if self.model is None:
                raise ValueError("a tier needs a model (or a list of models)")
            return self
        own = sorted(self.model_fields_set - {"name", "models"})
        if own:
            raise ValueError(
                f"a tier with a list of models takes no {', '.join(own)} of its own: "
                "put them under each of its models"
            )
        names = [m.name for m in self.models]
        if len(set(names)) < len(names):
            raise ValueError(f"the models of tier '{self.name}' need distinct names: {names}")
        return self

    def spec(self) -> TierSpec:
        if self.models is None:
            return super().spec()
        models = tuple(
            replace(
                m.spec(),
                tier=replace(m.tier(), name=self.name),
                model_name=m.name,
                router_model=m.router_model,
                prior=m.prior,
                tasks=dict(m.tasks),
                domains=dict(m.domains),
            )
            for m in self.models
        )
        return replace(models[0], models=models, model_name=None)


ModelName = Annotated[str, Field(min_length=1, max_length=256)]
Sha256Hex = Annotated[str, Field(pattern=r"^[0-9a-fA-F]{64}$")]
Section = dict[str, Any] | None


class GatewayFields(StrictModel):
    max_body_bytes: int = Field(1 << 20, ge=1024, le=64 << 20)
    keep_prompts: bool = False
    retries: int = Field(2, ge=0, le=10)
    breaker_failures: int = Field(3, ge=1, le=10_000)
    breaker_cooldown_s: float = Field(30.0, gt=0, le=86_400)
    cache_size: int = Field(10_000, ge=0, le=10_000_000)
    cache_ttl_s: float = Field(600.0, ge=0, le=30 * 86_400)
    max_tokens_default: int = Field(256, ge=1, le=1 << 20)
    forced_fallback: bool = False
    client_timeout_s: float = Field(10.0, gt=0, le=3600)
    # While the ledger cannot write: queue keeps rows in memory and answers, refuse answers 503.
    on_ledger_failure: Literal["queue", "refuse"] = "queue"
    ledger_spill_max_rows: int = Field(100_000, ge=0, le=10_000_000)
    route_batch_max: int = Field(32, ge=1, le=256)  # <= the encoder's memo (512)
    route_batch_wait_ms: float = Field(0.0, ge=0, le=100)
    api_keys_sha256: list[Sha256Hex] = Field(default_factory=list, max_length=100_000)
    # Also accept the keys of `tierroute keys create` (in the ledger database); every
    # request then needs a key.
    virtual_keys: bool = False
    # How long a replica trusts a virtual key it looked up: a revocation (or a new key)
    # reaches every replica within this. 0 asks the database on every request.
    key_cache_ttl_s: float = Field(5.0, ge=0, le=300)
    # While the database cannot be read, a key it confirmed within this many seconds is
    # still accepted (availability); older ones get a 503 (security). 0: none is.
    key_stale_s: float = Field(300.0, ge=0, le=86_400)
    # /v1/route and /v1/feedback spend nothing but CPU and ledger rows: each virtual key
    # gets this many of them per minute (null: no limit), apart from its own limits.
    side_requests_per_minute: int | None = Field(600, ge=1, le=1_000_000_000)
    # With keys configured /metrics needs a config key; true opens it to any scraper
    # (per-key spend included): only where the port is reachable from a private network.
    public_metrics: bool = False
    # Checked against their own dataclasses below, so each names its own keys.
    controller: Section = None
    shadow: Section = None
    personalise: Section = None
    cascade: Section = None
    learning: Section = None
    key_limits: Section = None
    budget_pressure: Section = None
    # Every shared-state key starts with it, so gateways (or tests) can share one Redis.
    state_prefix: str = Field("tierroute:", pattern=r"^[A-Za-z0-9_.:/-]{1,100}$")
    state_sync_s: float = Field(0.25, ge=0.02, le=10)
    choose: Section = None
    embedding_models: list[ModelName] = Field(
        default_factory=lambda: ["all-MiniLM-L6-v2"], max_length=16
    )


StateUrl = Annotated[str, Field(pattern=r"^(memory|(redis|rediss|unix)://\S+)$", max_length=2048)]


class GatewayFile(StrictModel):
    tiers: list[GatewayTier] = Field(min_length=2, max_length=16)
    policy: PolicyFields | None = None
    router: str = Field("default", min_length=1, max_length=4096)
    ledger: str | None = Field(None, pattern=LEDGER_PATTERN, max_length=MAX_LENGTH)
    gateway: GatewayFields | None = None
    # memory (this process) or redis://host:port/db; TIERROUTE_STATE_URL overrides it.
    state: StateUrl | None = None


def _check_router(spec: str, source: str, lines: Lines | None) -> None:
    """A router name that is neither built in nor a saved folder is a typo: say so now,
    not as a traceback when `serve` loads it."""
    from tierroute.artifact import SHIPPED
    from tierroute.routers import BUILTIN

    if spec in SHIPPED or spec in BUILTIN or Path(spec).is_dir():
        return
    close = difflib.get_close_matches(spec, [*SHIPPED, *BUILTIN], n=1)
    hint = f"did you mean '{close[0]}'? " if close else ""
    raise ConfigError(
        f"{where(source, lines, ('router',))}: router '{spec}' is neither a built-in "
        f"router nor a saved router folder; {hint}use {', '.join([*SHIPPED, *BUILTIN])} "
        "or a folder"
    )


def parse_settings(doc: Any, source: str, lines: Lines | None = None) -> GatewaySettings:
    if not isinstance(doc, dict) or not isinstance(doc.get("tiers"), list):
        raise ConfigError(f"{source} needs a 'tiers' list, smallest tier first")
    checked = check(GatewayFile, doc, source, lines)
    specs = tuple(t.spec() for t in checked.tiers)
    policy = build_policy([s.tier for s in specs], checked.policy, source, lines)
    _check_router(checked.router, source, lines)
    gw = checked.gateway or GatewayFields()
    env_keys = os.environ.get("TIERROUTE_API_KEYS", "")
    hashes = {k.lower() for k in gw.api_keys_sha256} | {
        hash_key(k) for k in env_keys.split(",") if k
    }

    def section(name: str, kind: type[S]) -> S | None:
        raw = getattr(gw, name)
        if raw is None:
            return None
        return build_section(kind, raw, source, lines, ("gateway", name))

    learning = section("learning", LearningConfig)
    cascade = section("cascade", CascadeConfig)
    if cascade is not None:
        try:
            cascade.check_tiers([s.tier.name for s in specs])
        except ConfigError as exc:
            raise ConfigError(f"{where(source, lines, ('gateway', 'cascade'))}: {exc}") from None
    taken = {"auto", *(s.name for s in specs), *(t.tier.model for s in specs for t in s.targets)}
    clash = next((m for m in gw.embedding_models if m in taken), None)
    if clash is not None:
        raise ConfigError(
            f"{where(source, lines, ('gateway', 'embedding_models'))}: 'gateway."
            f"embedding_models' entry '{clash}' already names a tier (or a tier's model); "
            "give the local embedding model a name of its own"
        )
    if learning is not None and learning.enabled and not gw.keep_prompts:
        raise ConfigError(
            f"{where(source, lines, ('gateway', 'learning'))}: 'gateway.learning' learns from "
            "prompts: set 'gateway.keep_prompts: true'"
        )
    return GatewaySettings(
        tiers=specs,
        policy=policy,
        router=checked.router,
        max_body_bytes=gw.max_body_bytes,
        keep_prompts=gw.keep_prompts,
        retries=gw.retries,
        breaker_failures=gw.breaker_failures,
        breaker_cooldown_s=gw.breaker_cooldown_s,
        cache_size=gw.cache_size,
        cache_ttl_s=gw.cache_ttl_s,
        max_tokens_default=gw.max_tokens_default,
        forced_fallback=gw.forced_fallback,
        client_timeout_s=gw.client_timeout_s,
        on_ledger_failure=gw.on_ledger_failure,
        ledger_spill_max_rows=gw.ledger_spill_max_rows,
        api_key_hashes=frozenset(hashes),
        virtual_keys=gw.virtual_keys,
        key_cache_ttl_s=gw.key_cache_ttl_s,
        key_stale_s=gw.key_stale_s,
        side_requests_per_minute=gw.side_requests_per_minute,
        public_metrics=gw.public_metrics,
        controller=section("controller", ControllerConfig),
        shadow=section("shadow", ShadowConfig),
        personalise=section("personalise", PersonaliseConfig),
        cascade=cascade,
        learning=learning if learning is not None and learning.enabled else None,
        ledger=checked.ledger,
        state_url=_state_url(checked.state),
        state_prefix=gw.state_prefix,
        state_sync_s=gw.state_sync_s,
        key_limits=section("key_limits", KeyLimits),
        budget_pressure=section("budget_pressure", BudgetPressure),
        route_batch_max=gw.route_batch_max,
        route_batch_wait_ms=gw.route_batch_wait_ms,
        choose=section("choose", ChooseConfig),
        embedding_models=tuple(gw.embedding_models),
        source=source,
    )


def _state_url(configured: str | None) -> str | None:
    url = os.environ.get("TIERROUTE_STATE_URL") or configured
    if url is not None and not re.fullmatch(r"memory|(redis|rediss|unix)://\S+", url):
        raise ConfigError(
            f"TIERROUTE_STATE_URL '{url[:100]}' is neither 'memory' nor a redis:// URL"
        )
    return None if url == "memory" else url


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
    return parse_settings(*read_yaml_lines(path, "gateway.yaml", "gateway config"))
