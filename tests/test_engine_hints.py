"""How the engine applies a request's latency budget and cost cap, with three tiers and
latencies set by hand (the gateway test can only bracket real, machine-dependent ones),
and how a calibrated router's threshold becomes the policy's top boundary."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest

from tierroute.errors import InputError
from tierroute.gateway.engine import Engine, Hints
from tierroute.gateway.settings import parse_settings
from tierroute.ledger import Ledger
from tierroute.routers import make_router
from tierroute.types import Explanation

from .conftest import run_cli

HARD = [{"role": "user", "content": "Prove that sqrt(2) is irrational, step by step."}]


def tier(name: str, price: float, latency_ms: int) -> dict[str, object]:
    return {
        "name": name,
        "kind": "openai",
        "base_url": "http://127.0.0.1:9/v1",  # never called: these tests only route
        "model": name,
        "input_price_per_m": price,
        "output_price_per_m": price,
        "typical_latency_ms": latency_ms,
    }


def make_engine(tmp_path: Path) -> Engine:
    doc = {
        "tiers": [tier("small", 0.1, 200), tier("medium", 1.0, 800), tier("large", 10.0, 3000)],
        "policy": {"thresholds": [0.05, 0.1]},
    }
    settings = parse_settings(doc, "test")
    return Engine(settings, make_router("rules"), {}, Ledger(tmp_path / "ledger.db"))


def test_latency_budget_steps_down_to_the_largest_tier_that_fits(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    try:
        plain = asyncio.run(engine.route(HARD, Hints(), 64))
        assert plain.decision.tier.name == "large"
        routed = asyncio.run(engine.route(HARD, Hints(latency_budget_ms=1000), 64))
        assert routed.decision.tier.name == "medium"
        assert "large p50 3000 ms > budget; using medium" in routed.decision.reason
        assert routed.chain == ["medium", "large", "small"]
        # measured latencies replace the configured ones once the tier has answered
        for _ in range(3):
            engine.latency["large"].add(500)
        fast = asyncio.run(engine.route(HARD, Hints(latency_budget_ms=1000), 64))
        assert fast.decision.tier.name == "large"
        none_fit = asyncio.run(engine.route(HARD, Hints(latency_budget_ms=10), 64))
        assert none_fit.decision.tier.name == "small"
        assert "no tier meets the budget" in none_fit.decision.reason
    finally:
        engine.ledger.close()


def test_cost_cap_steps_down_by_estimated_cost(tmp_path: Path) -> None:
    engine = make_engine(tmp_path)
    try:
        # 1000 output tokens: large $0.01+, medium $0.001+, small $0.0001+
        capped = asyncio.run(engine.route(HARD, Hints(max_cost_usd=0.005), 1000))
        assert capped.decision.tier.name == "medium" and "cap" in capped.decision.reason
        roomy = asyncio.run(engine.route(HARD, Hints(max_cost_usd=1.0), 1000))
        assert roomy.decision.tier.name == "large"
    finally:
        engine.ledger.close()


def test_a_calibrated_router_sets_the_top_boundary_for_any_number_of_tiers(
    tmp_path: Path,
) -> None:
    from tierroute.artifact import calibrated_threshold
    from tierroute.gateway.settings import apply_calibration

    threshold = calibrated_threshold("default")
    assert threshold is not None and 0 < threshold < 1
    assert calibrated_threshold("rules") is None  # built-in routers carry no calibration
    doc = {
        "tiers": [tier("small", 0.1, 200), tier("medium", 1.0, 800), tier("large", 10.0, 3000)],
        "policy": {"thresholds": [0.2, 0.6]},
        "router": "default",
    }
    settings = parse_settings(doc, "test")
    note = apply_calibration(settings, threshold)
    # the lower boundary keeps its third of the range below the top one
    assert settings.policy.thresholds == pytest.approx([threshold / 3, threshold])
    assert "instead of the configured [0.2, 0.6]" in note
    # `config check` shows the thresholds the gateway will use, not only the configured ones
    config = tmp_path / "gateway.yaml"
    config.write_text(json.dumps(doc))  # JSON is YAML
    proc = run_cli("config", "check", "--offline", str(config))  # its tiers are never called
    assert proc.returncode == 0, proc.stderr
    assert f"thresholds [{threshold / 3:.4g}, {threshold:.4g}]" in proc.stdout


def test_the_controller_holds_the_share_sent_up_with_an_abstain_band(tmp_path: Path) -> None:
    doc = {
        "tiers": [tier("small", 0.1, 200), tier("large", 10.0, 3000)],
        "policy": {"thresholds": [0.5], "abstain_band": 0.05},
        "gateway": {
            "controller": {"target_large_share": 0.3, "window": 400, "every": 50, "max_step": 1}
        },
    }
    engine = Engine(
        parse_settings(doc, "test"), make_router("rules"), {}, Ledger(tmp_path / "l.db")
    )
    try:
        assert engine.controller is not None and engine.controller.threshold == 0.45
        scores = [0.1 + 0.4 * ((i * 7919) % 1000) / 999 for i in range(2000)]
        for s in scores:
            engine._calibrate(s)
        policy = engine.settings.policy
        assert policy.entry == pytest.approx(engine.controller.threshold)
        sent_up = [policy.decide(Explanation(score=s)).tier.name == "large" for s in scores]
        assert sum(sent_up) / len(sent_up) == pytest.approx(0.3, abs=0.01)
    finally:
        engine.ledger.close()


IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def test_an_image_goes_to_a_tier_that_can_see_it(tmp_path: Path) -> None:
    """An image alone has no text to score: the smallest vision tier takes it. With text,
    the router decides and a tier that cannot see moves to the nearest one that can; the
    chain keeps only tiers that can read it, and the reason says why."""
    tiers = [tier("small", 0.1, 200), tier("medium", 1.0, 800), tier("large", 10.0, 3000)]
    tiers[0]["vision"] = False
    doc = {"tiers": tiers, "policy": {"thresholds": [0.05, 0.1]}}
    engine = Engine(parse_settings(doc, "test"), make_router("rules"), {}, Ledger(tmp_path / "l"))
    try:
        alone = [{"role": "user", "content": [IMAGE]}]
        routed = asyncio.run(engine.route(alone, Hints(), 64))
        assert routed.decision.tier.name == "medium" and routed.chain == ["medium", "large"]
        assert "image without text" in routed.decision.reason
        assert routed.decision.score != routed.decision.score  # NaN: nothing was scored
        easy = [{"role": "user", "content": [{"type": "text", "text": "Hi, what is this?"}, IMAGE]}]
        routed = asyncio.run(engine.route(easy, Hints(), 64))
        assert routed.chain == ["medium", "large"]
        assert "images: small cannot read them, using medium" in routed.decision.reason
        # The client named its tier: it answers or refuses the image itself (400).
        assert asyncio.run(engine.route(alone, Hints(), 64, forced="small")).chain == ["small"]
        # Text only: nothing changes.
        assert asyncio.run(engine.route(HARD, Hints(), 64)).chain == ["large", "medium", "small"]
    finally:
        engine.ledger.close()
    settings = parse_settings(
        {
            "tiers": [{**tier(n, 1.0, 100), "vision": False} for n in ("a", "b")],
            "policy": {"thresholds": [0.5]},
        },
        "test",
    )
    engine = Engine(settings, make_router("rules"), {}, Ledger(tmp_path / "l2"))
    try:
        with pytest.raises(InputError, match="no tier here reads images"):
            asyncio.run(engine.route([{"role": "user", "content": [IMAGE]}], Hints(), 64))
    finally:
        engine.ledger.close()
