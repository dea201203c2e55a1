"""Several models in one tier: the config's two forms, the choice's arithmetic worked by
hand, learning from verdicts (order-free, revisable, rebuilt from the ledger), and
fallback from a failing model to its tier's next model before the next tier, with real
HTTP upstreams (a loopback one and a port where nothing listens)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest

from tierroute.backends.base import ChatRequest
from tierroute.errors import ConfigError
from tierroute.gateway.build import make_backend
from tierroute.gateway.choose import Abilities, ChooseConfig, ModelChooser, shrink
from tierroute.gateway.engine import Engine, Hints, Outcome, new_request_id
from tierroute.gateway.settings import GatewaySettings, parse_settings
from tierroute.ledger import Ledger
from tierroute.routers import make_router

from .conftest import fast_upstream
from .test_gateway import free_port

EASY = [{"role": "user", "content": "What is the capital of France?"}]
CODE = [{"role": "user", "content": "Write a Python function that reverses a string."}]


def model(name: str, price: float, url: str = "http://127.0.0.1:9/v1", **extra: Any) -> dict:
    return {
        "name": name,
        "kind": "openai",
        "base_url": url,
        "model": f"{name}-model",
        "input_price_per_m": price,
        "output_price_per_m": price,
        **extra,
    }


def settings_of(
    small: list[dict], gateway: dict | None = None, large_url: str = "http://127.0.0.1:9/v1"
) -> GatewaySettings:
    doc: dict[str, Any] = {
        "tiers": [{"name": "small", "models": small}, model("large", 10.0, large_url)],
        "router": "rules",
        "policy": {"thresholds": [0.5]},
    }
    if gateway:
        doc["gateway"] = gateway
    return parse_settings(doc, "test.yaml")


# ---------------------------------------------------------------------- config


def test_a_tier_of_several_models_parses_and_the_single_form_is_unchanged() -> None:
    s = settings_of([model("coder", 0.2, tasks={"code": 0.9}), model("chat", 0.1, prior=0.7)])
    small = s.spec("small")
    assert [m.key for m in small.models] == ["small/coder", "small/chat"]
    assert small.tier.model == "coder-model"  # the tier's own fields are its first model's
    assert s.spec("small/chat").tier.name == "small"
    assert s.spec("small/chat").tier.model == "chat-model"
    assert s.spec("small/chat").prior == 0.7 and s.spec("small/coder").tasks == {"code": 0.9}
    assert s.spec("large").models == () and s.spec("large").key == "large"
    assert [t.key for t in s.spec("large").targets] == ["large"]


@pytest.mark.parametrize(
    ("small", "message"),
    [
        ([model("a", 1), model("a", 2)], "distinct names"),
        ([model("a", 1, prior=1.5)], "prior"),
        ([model("a", 1, tasks={"code": 0}), model("b", 1)], "tasks"),
        ([model("a", 1, priors=0.5)], "priors"),  # unknown key: refused, as everywhere
        ([{"name": "a", "kind": "openai", "model": "m"}], "base_url"),
        ([], "models"),
    ],
)
def test_a_bad_model_entry_is_refused_naming_it(small: list[dict], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        settings_of(small)


def test_a_tier_with_models_takes_no_model_fields_of_its_own() -> None:
    doc = {
        "tiers": [
            {"name": "small", "model": "x", "base_url": "http://h/v1", "models": [model("a", 1)]},
            model("large", 10),
        ]
    }
    with pytest.raises(ConfigError, match="takes no base_url, model of its own"):
        parse_settings(doc, "test.yaml")


def test_choose_section_is_checked() -> None:
    with pytest.raises(ConfigError, match="lambda_per_usd"):
        settings_of([model("a", 1)], {"choose": {"lambda_per_usd": -1}})
    with pytest.raises(ConfigError, match="lambda"):
        settings_of([model("a", 1)], {"choose": {"lambda": 5}})
    s = settings_of([model("a", 1)], {"choose": {"lambda_per_usd": 250, "prior_strength": 2}})
    assert s.choose == ChooseConfig(lambda_per_usd=250, prior_strength=2)


# ---------------------------------------------------------------------- arithmetic


def test_shrinkage_and_revision_worked_by_hand() -> None:
    assert shrink(0.9, 5, 0.0, 3) == pytest.approx(4.5 / 8)
    a = Abilities(strength=5)
    for _ in range(3):
        a.observe("small/coder", "code", 0.0)
    a.observe("small/coder", "math", 1.0)
    # other tasks first: p1 = (5*0.9 + 1) / 6; then code: (5*p1 + 0) / 8
    p1 = (4.5 + 1) / 6
    p, n = a.estimate("small/coder", "code", 0.9)
    assert p == pytest.approx(5 * p1 / 8) and n == 4
    # a changed rating replaces the old one: the count stays, the sum moves
    a.observe("small/coder", "code", 1.0, previous=0.0)
    p, n = a.estimate("small/coder", "code", 0.9)
    assert p == pytest.approx((5 * p1 + 1) / 8) and n == 4
    # a model never judged keeps its prior
    assert a.estimate("small/chat", "code", 0.6) == (0.6, 0)


def test_rank_trades_probability_against_cost() -> None:
    s = settings_of(
        [model("coder", 20.0, tasks={"code": 0.9}), model("chat", 1.0, prior=0.7)],
        {"choose": {"lambda_per_usd": 100}},
    )
    chooser = ModelChooser(s, make_router("rules"), s.choose)
    tier = s.spec("small")
    # 1,000 prompt + 1,000 output tokens: coder $0.04 (4 points at 100/USD), chat $0.002
    code = chooser.rank(tier, {"task": "code"}, {}, 1000, 1000)
    assert code.keys == ["small/chat", "small/coder"]
    assert code.ranked[0].value == pytest.approx(0.7 - 100 * 0.002)
    assert code.ranked[1].value == pytest.approx(0.9 - 100 * 0.04)
    # short prompt and answer: cost hardly matters, the code prior wins on code
    short = chooser.rank(tier, {"task": "code"}, {}, 10, 10)
    assert short.keys == ["small/coder", "small/chat"]
    note = short.note()
    assert note.startswith("model small/coder: P 0.90 (prior for task=code) - 100/USD x")
    assert "over small/chat" in note
    # not a code prompt: coder has no prior of its own, so it takes its tier's (chat's 0.7)
    chat = chooser.rank(tier, {"task": "general"}, {}, 10, 10)
    assert chat.keys == ["small/chat", "small/coder"]
    assert chat.ranked[1].basis == "tier prior"
    # a request's cost cap puts a model that would break it after those that keep it
    capped = chooser.rank(tier, {"task": "code"}, {}, 10, 10, max_cost_usd=0.0001)
    assert capped.keys == ["small/chat", "small/coder"]  # coder's $0.0004 breaks it
    assert chooser.rank(tier, {"task": "code"}, {}, 10, 10, max_cost_usd=0.001).keys == [
        "small/coder",
        "small/chat",
    ]


def test_lambda_comes_from_the_budget_when_not_configured() -> None:
    s = settings_of([model("a", 1.0), model("b", 2.0)])
    budget: list[float | None] = [None]
    chooser = ModelChooser(s, make_router("rules"), s.choose, lambda: budget[0])
    assert chooser.lam() == 10.0  # the default until the request rate is known
    budget[0] = 0.002  # USD per request
    assert chooser.lam() == pytest.approx(500.0)


def test_router_model_needs_a_factor_router_and_a_trained_column() -> None:
    s = settings_of([model("a", 1.0, router_model="gpt-4-1106-preview"), model("b", 1.0)])
    with pytest.raises(ConfigError, match="needs a factor router"):
        ModelChooser(s, make_router("rules"), s.choose)


# ---------------------------------------------------------------------- engine


def test_a_failing_model_falls_back_within_its_tier_then_learns(tmp_path: Path) -> None:
    dead = f"http://127.0.0.1:{free_port()}/v1"
    with fast_upstream() as base:
        s = settings_of(
            [model("first", 0.1, dead, prior=0.9), model("second", 0.1, base, prior=0.6)],
            {
                "retries": 0,
                "breaker_failures": 1,
                "breaker_cooldown_s": 600,
                "shadow": {"rate": 0.0, "judge": "llm"},
            },
            large_url=base,
        )
        backends = {t.key: make_backend(t) for spec in s.tiers for t in spec.targets}
        ledger = Ledger(tmp_path / "ledger.db")
        engine = Engine(s, make_router("rules"), backends, ledger)

        async def ask() -> Outcome:
            routed = await engine.route(EASY, Hints(), 8)
            outcome = Outcome(request_id=new_request_id(), routed=routed)
            result = await engine.complete(outcome, ChatRequest(messages=EASY, max_tokens=8))
            engine.record(
                outcome,
                status=200,
                hints=Hints(),
                api_key_id=None,
                latency_ms=1.0,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )
            return outcome

        async def scenario() -> None:
            first = await ask()
            assert first.routed.chain == ["small/first", "small/second", "large"]
            assert "model small/first: P 0.90 (prior)" in first.routed.decision.reason
            assert first.tried == ["small/first", "small/second"] and first.tier == "small/second"
            assert engine.health() == ["tier small/first: breaker open"]
            again = await ask()
            assert again.tried == ["small/second"]  # the open breaker skips the model
            assert "small/first skipped: breaker open" in again.notes
            ledger.flush()
            row = ledger.get(again.request_id)
            assert row is not None and (row.tier, row.model) == ("small", "second-model")
            assert row.fallback_chain == ("small/second",)
            # a rating of small/second's answer lowers its estimate
            owner = await engine.request_owner(again.request_id)
            assert owner is not None and owner.target == "small/second"
            engine.feedback(owner, 0.0, (again.request_id, ""))
            assert engine.chooser is not None
            p, n = engine.chooser.abilities.estimate("small/second", "general", 0.6)
            assert n == 1 and p == pytest.approx(3.0 / 6)
            # a shadow verdict on it counts too (the shadow tells the engine)
            assert engine.shadow is not None and engine.shadow.on_verdict is not None
            engine.shadow.on_verdict(again.request_id, 1.0)
            p, n = engine.chooser.abilities.estimate("small/second", "general", 0.6)
            assert n == 2 and p == pytest.approx(4.0 / 7)
            for b in backends.values():
                await b.aclose()

        try:
            asyncio.run(scenario())
        finally:
            engine.close()
            ledger.close()


def test_a_domain_prior_comes_after_the_task_prior() -> None:
    s = settings_of(
        [
            model("med", 1.0, domains={"medical": 0.9}, tasks={"code": 0.2}),
            model("gen", 1.0, prior=0.6),
        ]
    )
    chooser = ModelChooser(s, make_router("rules"), s.choose)
    tier = s.spec("small")
    medical = chooser.rank(tier, {"task": "general", "domain": "medical"}, {}, 10, 10)
    assert medical.keys == ["small/med", "small/gen"]
    assert medical.ranked[0].basis == "prior for domain=medical"
    code = chooser.rank(tier, {"task": "code", "domain": "medical"}, {}, 10, 10)
    assert code.keys == ["small/gen", "small/med"]
    assert code.ranked[1].basis == "prior for task=code"


def test_the_cascade_drafts_on_the_smallest_tier_s_chosen_model(tmp_path: Path) -> None:
    with fast_upstream() as base:
        s = settings_of(
            [model("cheap", 0.1, base, prior=0.5), model("good", 0.1, base, prior=0.8)],
            {"cascade": {"enabled": True, "verifier": "agreement", "samples": 2}},
            large_url=base,
        )
        backends = {t.key: make_backend(t) for spec in s.tiers for t in spec.targets}
        ledger = Ledger(tmp_path / "ledger.db")
        engine = Engine(s, make_router("rules"), backends, ledger)

        async def scenario() -> Outcome:
            routed = await engine.route(EASY, Hints(), 8)
            assert engine.cascades(routed, forced=False)
            outcome = Outcome(request_id=new_request_id(), routed=routed)
            request = ChatRequest(messages=EASY, max_tokens=8)
            await engine.complete_cascade(outcome, request, Hints())
            engine.record(outcome, status=200, hints=Hints(), api_key_id=None, latency_ms=1.0)
            for b in backends.values():
                await b.aclose()
            return outcome

        try:
            outcome = asyncio.run(scenario())
            # the loopback always answers "ok": the two samples agree, the draft stands
            assert outcome.tier == "small/good" and outcome.tried[0] == "small/good"
            assert outcome.cascade is not None and not outcome.escalated
            ledger.flush()
            row = ledger.get(outcome.request_id)
            assert row is not None and (row.tier, row.model) == ("small", "good-model")
        finally:
            engine.close()
            ledger.close()


def test_route_names_the_model_serve_would_start_with(tmp_path: Path) -> None:
    import json

    import yaml

    from .conftest import run_cli

    doc = {
        "tiers": [
            model("small", 0.1),
            {
                "name": "large",
                "models": [
                    model("coder", 0.8, tasks={"code": 0.95}, prior=0.4),
                    model("general", 10.0, router_model="gpt-4-1106-preview"),
                ],
            },
        ],
        "gateway": {"choose": {"lambda_per_usd": 20}},
    }
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(doc))
    proc = run_cli("route", "--config", str(path), "--json", "Write a Python function that sorts.")
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["tier"] == "large" and out["model_key"] == "large/coder"
    assert out["model"] == "coder-model"
    assert out["model_choice"].startswith("model large/coder: P 0.95 (prior for task=code)")


def test_budgets_judge_each_model_by_its_own_price_and_latency(tmp_path: Path) -> None:
    """The tier's first model no longer stands in for the tier: a tier fits a budget when
    one of its models does, that model is tried first, and /metrics names the model."""
    doc: dict[str, Any] = {
        "tiers": [
            model("small", 0.1, typical_latency_ms=100),
            {
                "name": "large",
                "models": [
                    model("big", 100.0, typical_latency_ms=5000, prior=0.95),
                    model("lite", 1.0, typical_latency_ms=300, prior=0.6),
                ],
            },
        ],
        "router": "rules",
        "policy": {"thresholds": [0.1]},
    }
    s = parse_settings(doc, "test.yaml")
    engine = Engine(s, make_router("rules"), {}, Ledger(tmp_path / "ledger.db"))
    hard = [{"role": "user", "content": "Prove that sqrt(2) is irrational, step by step."}]
    try:
        plain = asyncio.run(engine.route(hard, Hints(), 100))
        assert plain.chain[:2] == ["large/big", "large/lite"]  # big is worth its price here
        # 100 output tokens: big ~$0.01+, lite ~$0.0001+; the first model alone breaks the cap
        capped = asyncio.run(engine.route(hard, Hints(max_cost_usd=0.001), 100))
        assert capped.decision.tier.name == "large" and "budget" not in capped.decision.reason
        assert capped.chain[:2] == ["large/lite", "large/big"]
        quick = asyncio.run(engine.route(hard, Hints(latency_budget_ms=1000), 100))
        assert quick.decision.tier.name == "large" and quick.chain[0] == "large/lite"
        for _ in range(3):  # lite turns out slow too: now no model of large fits
            engine.latency["large/lite"].add(3000)
        slow = asyncio.run(engine.route(hard, Hints(latency_budget_ms=1000), 100))
        assert slow.decision.tier.name == "small"
        assert "budget: large/big p50 5000 ms > budget; using small" in slow.decision.reason
        outcome = Outcome(request_id=new_request_id(), routed=capped, tier="large/lite")
        engine.record(
            outcome,
            status=200,
            hints=Hints(),
            api_key_id=None,
            latency_ms=5.0,
            prompt_tokens=10,
            completion_tokens=20,
        )
        text = engine.metrics.render().decode()
        assert 'tierroute_requests_total{model="lite-model",status="200",tier="large"} 1.0' in text
        assert 'tierroute_cost_usd_total{model="lite-model",tier="large"} 3e-05' in text
    finally:
        engine.close()
        engine.ledger.close()
