"""Config typos are refused with the file, line and key, by `config check` and by loading."""

from __future__ import annotations

from pathlib import Path

import pytest

from tierroute.errors import ConfigError
from tierroute.gateway.settings import load_settings

from .conftest import run_cli
from .test_cli import assert_one_line_error

BASE = """\
tiers:
  - name: small
    kind: openai
    base_url: http://127.0.0.1:9/v1
    model: small-model
    input_price_per_m: 0.1
  - name: large
    kind: openai
    base_url: http://127.0.0.1:9/v1
    model: large-model
    input_price_per_m: 5
policy:
  thresholds: [0.5]
router: rules
gateway:
  retries: 1
"""


def _with(old: str, new: str) -> str:
    assert old in BASE
    return BASE.replace(old, new)


TYPOS = [
    # (what the file says, line, fragments the one-line error must hold)
    (
        _with("  retries: 1", "  breaker_failure: 3"),
        16,
        ["'gateway.breaker_failure'", "breaker_failures"],
    ),
    (
        _with("    input_price_per_m: 5", "    input_price_per_M: 5"),
        11,
        ["'tiers[1].input_price_per_M'", "input_price_per_m"],
    ),
    (_with("[0.5]", "[1.5]"), 13, ["'policy.thresholds[0]'", "less than or equal to 1", "1.5"]),
    (_with("router: rules", "router: defualt"), 14, ["router 'defualt'", "did you mean 'default'"]),
    (
        _with("  retries: 1", '  keep_prompts: "false"'),
        16,
        ["'gateway.keep_prompts'", "valid boolean", "'false'"],
    ),
    (
        _with("    input_price_per_m: 0.1", "    input_price_per_m: -1"),
        6,
        ["'tiers[0].input_price_per_m'", "greater than or equal to 0"],
    ),
    (_with("  retries: 1", "  retries: .nan"), 16, ["'gateway.retries'"]),
    (
        _with(
            "    kind: openai\n    base_url: http://127.0.0.1:9/v1\n    model: large-model",
            "    kind: openai\n    model: large-model",
        ),
        7,
        ["needs a base_url"],
    ),
    (BASE + "extra_section: {}\n", 17, ["unknown key 'extra_section'"]),
]


@pytest.mark.parametrize(("text", "line", "fragments"), TYPOS)
def test_typo_is_refused_naming_line_and_key(
    tmp_path: Path, text: str, line: int, fragments: list[str]
) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(text)
    with pytest.raises(ConfigError) as err:
        load_settings(f)
    message = str(err.value)
    assert message.startswith(f"{f}, line {line}: "), message
    for fragment in fragments:
        assert fragment in message, message


def test_config_check_refuses_a_typo_in_one_line(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(_with("  retries: 1", "  breaker_failure: 3"))
    proc = run_cli("config", "check", str(f))
    assert_one_line_error(proc, "line 16", "unknown key 'gateway.breaker_failure'")


def test_valid_config_and_builtin_default_still_load(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(BASE)
    settings = load_settings(f)
    assert [s.kind for s in settings.tiers] == ["openai", "openai"]
    assert settings.retries == 1 and settings.keep_prompts is False
    assert settings.tiers[1].tier.input_price_per_m == 5.0  # an int is a fine number
    default = load_settings()
    assert [s.kind for s in default.tiers] == ["local", "local"]


def test_config_check_calls_each_remote_tier(tmp_path: Path) -> None:
    f = tmp_path / "gateway.yaml"
    f.write_text(BASE)  # both tiers at 127.0.0.1:9, where nothing listens
    proc = run_cli("config", "check", str(f))
    assert_one_line_error(proc, "tier small: cannot reach http://127.0.0.1:9/v1")
    offline = run_cli("config", "check", "--offline", str(f))
    assert offline.returncode == 0 and "router rules: loaded" in offline.stdout
