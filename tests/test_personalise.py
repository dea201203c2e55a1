from __future__ import annotations

import pytest

from tierroute.errors import ConfigError
from tierroute.personalise import PersonaliseConfig, Personaliser


def test_shift_by_hand_and_shrinkage() -> None:
    p = Personaliser(
        PersonaliseConfig(strength=0.5, prior_n=20, expected_bad_rate=0.2, max_shift=0.2)
    )
    assert p.shift("nobody") == 0.0 and p.shift(None) == 0.0
    for _ in range(5):
        p.observe("alice", 0.0)  # five thumbs down
    # 0.5 * (1.0 - 0.2) * 5 / 25 = 0.08
    assert p.shift("alice") == pytest.approx(0.08)
    for _ in range(95):
        p.observe("alice", 0.0)
    assert p.shift("alice") == pytest.approx(0.2)  # 0.5 * 0.8 * 100/120 = 0.33, clipped
    for _ in range(30):
        p.observe("bob", 1.0)  # bob is happy: his requests may go cheaper
    assert p.shift("bob") == pytest.approx(0.5 * (0.0 - 0.2) * 30 / 50)
    assert p.shift("carol") == 0.0  # others' feedback never moves carol


def test_bad_config() -> None:
    with pytest.raises(ConfigError):
        PersonaliseConfig(expected_bad_rate=1.5)
