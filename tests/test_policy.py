from __future__ import annotations

from pathlib import Path

import pytest

from tierroute.config import load_policy
from tierroute.errors import ConfigError
from tierroute.policy import Policy
from tierroute.types import Explanation, Tier

TIERS = [Tier("tiny", "t"), Tier("small", "s"), Tier("medium", "m"), Tier("large", "l")]


def tier_for(policy: Policy, score: float, **kw: object) -> str:
    return policy.decide(Explanation(score=score, **kw)).tier.name  # type: ignore[arg-type]


def test_thresholds_pick_tiers() -> None:
    p = Policy(TIERS, [0.2, 0.5, 0.8])
    assert [tier_for(p, s) for s in (0.0, 0.19, 0.2, 0.5, 0.79, 0.8, 1.0)] == [
        "tiny",
        "tiny",
        "small",
        "medium",
        "medium",
        "large",
        "large",
    ]


def test_abstain_band_sends_unsure_requests_up() -> None:
    p = Policy(TIERS, [0.2, 0.5, 0.8], abstain_band=0.05)
    d = p.decide(Explanation(score=0.47))
    assert d.tier.name == "medium"
    assert "unsure" in d.reason
    assert tier_for(p, 0.44) == "small"


def test_rule_floor_raises_the_tier() -> None:
    p = Policy(TIERS, [0.2, 0.5, 0.8])
    d = p.decide(Explanation(score=0.1, min_tiers=("medium",)))
    assert d.tier.name == "medium" and "floor" in d.reason
    # a floor below the chosen tier changes nothing
    assert tier_for(p, 0.9, min_tiers=("small",)) == "large"
    # without a medium tier, "at least medium" means the next tier up by rank
    two = Policy([Tier("small", "s"), Tier("large", "l")], [0.5])
    assert two.decide(Explanation(score=0.1, min_tiers=("medium",))).tier.name == "large"
    d = two.decide(Explanation(score=0.1, min_tiers=("xl",)))
    assert d.tier.name == "small" and "ignored" in d.reason


def test_priority_shifts_the_score() -> None:
    p = Policy(TIERS, [0.2, 0.5, 0.8])
    assert p.decide(Explanation(score=0.7), priority="critical").tier.name == "large"
    assert p.decide(Explanation(score=0.55), priority="batch").tier.name == "small"
    assert p.decide(Explanation(score=0.55), priority="interactive").tier.name == "medium"
    with pytest.raises(ConfigError, match="unknown priority"):
        p.decide(Explanation(score=0.5), priority="urgent")


def test_with_threshold_moves_the_top_boundary() -> None:
    p = Policy(TIERS, [0.2, 0.4, 0.8]).with_threshold(0.4)
    assert p.thresholds == pytest.approx([0.1, 0.2, 0.4])


def test_a_calibrated_threshold_keeps_its_share_with_an_abstain_band() -> None:
    # scores on a compressed scale, like a learned router's (0.1-0.5)
    scores = [0.1 + 0.4 * i / 999 for i in range(1000)]
    calibrated = 0.38  # 30% of these scores are >= 0.38
    p = Policy(TIERS[2:], [0.5], abstain_band=0.05).with_threshold(calibrated)
    assert p.thresholds == pytest.approx([0.43]) and p.entry == pytest.approx(calibrated)
    decided = [tier_for(p, s) for s in scores]
    assert decided.count("large") == sum(s >= calibrated for s in scores) == 300
    # the band still marks the close calls, now above the calibrated threshold
    assert "unsure" in p.decide(Explanation(score=0.40)).reason
    assert tier_for(p, 0.379) == "medium"


@pytest.mark.parametrize(
    ("thresholds", "message"),
    [([0.5], "need 3 thresholds"), ([0.5, 0.4, 0.9], "ascend")],
)
def test_bad_thresholds(thresholds: list[float], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        Policy(TIERS, thresholds)


def test_default_and_file_config(tmp_path: Path) -> None:
    default = load_policy()
    assert [t.name for t in default.tiers] == ["tiny", "small", "medium", "large"]
    f = tmp_path / "tiers.yaml"
    f.write_text(
        "tiers:\n  - {name: a, model: x, input_price_per_m: 1}\n"
        "  - {name: b, model: y, output_price_per_m: 2}\npolicy: {thresholds: [0.3]}\n"
    )
    p = load_policy(f)
    assert p.tiers[1].cost(1_000_000, 1_000_000) == 2.0
    f.write_text("tiers:\n  - {name: a}\n")
    with pytest.raises(ConfigError, match=r"line 2: 'tiers\[0\].model' is required"):
        load_policy(f)
    f.write_text("tiers: [")
    with pytest.raises(ConfigError, match="not valid YAML"):
        load_policy(f)
