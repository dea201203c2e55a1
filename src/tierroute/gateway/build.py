"""Builds the gateway's parts from settings: router, backends (loading local models), ledger."""

from __future__ import annotations

import logging
import os
from pathlib import Path

from tierroute.backends.base import Backend
from tierroute.errors import ConfigError
from tierroute.gateway.app import Parts
from tierroute.gateway.settings import GatewaySettings, TierSpec, apply_calibration
from tierroute.ledger import Ledger, default_path
from tierroute.ledger.location import ledger_target

log = logging.getLogger("tierroute.gateway")


def make_backend(spec: TierSpec, max_tokens_default: int = 256) -> Backend:
    if spec.kind == "openai":
        from tierroute.backends.openai_http import OpenAIHTTPBackend

        key = None
        if spec.api_key_env:
            key = os.environ.get(spec.api_key_env)
            if not key:
                raise ConfigError(
                    f"tier '{spec.key}' reads its API key from ${spec.api_key_env}, "
                    "which is not set"
                )
        assert spec.base_url is not None
        return OpenAIHTTPBackend(
            spec.key,
            spec.base_url,
            spec.tier.model,
            api_key=key,
            timeout=spec.timeout_s,
            max_response_bytes=spec.max_response_bytes,
            vision=spec.vision,
        )
    from tierroute.backends.few_shot import FewShot
    from tierroute.backends.llamacpp import LlamaCppBackend
    from tierroute.backends.models import MODELS, resolve_model

    path = resolve_model(spec.tier.model)
    return LlamaCppBackend(
        spec.key,
        path,
        n_ctx=spec.n_ctx,
        n_threads=spec.n_threads,
        max_tokens_default=max_tokens_default,
        few_shot=None if MODELS[spec.tier.model].chat else FewShot(),
    )


def build_parts(settings: GatewaySettings, data_dir: Path | None = None) -> Parts:
    """Everything the app needs, loaded and warm (the first request pays no start-up)."""
    from tierroute.artifact import open_router
    from tierroute.backends.llamacpp import LlamaCppBackend

    router, artifact = open_router(settings.router)
    if artifact is not None and artifact.threshold is not None:
        log.info(apply_calibration(settings, artifact.threshold))
    router.explain_text("warm up")  # loads the embedding model and tag prototypes
    if any(spec.models for spec in settings.tiers):
        from tierroute.gateway.choose import ModelChooser

        ModelChooser(settings, router, settings.choose)  # a bad router_model fails here
    backends: dict[str, Backend] = {}
    for spec in (t for tier in settings.tiers for t in tier.targets):
        backend = make_backend(spec, settings.max_tokens_default)
        if isinstance(backend, LlamaCppBackend):
            backend.load()
        backends[spec.key] = backend
    ledger = Ledger(
        ledger_target(settings.ledger, data_dir),
        keep_prompts=settings.keep_prompts,
        spill_max_rows=settings.ledger_spill_max_rows,
    )
    learned = default_path(data_dir).parent / "learned"
    return Parts(router=router, backends=backends, ledger=ledger, learned_dir=learned)
