from __future__ import annotations

from pathlib import Path

import pytest

from tierroute.errors import ConfigError
from tierroute.routers.rules import RulesRouter, load_rules


def write(tmp_path: Path, text: str) -> Path:
    f = tmp_path / "rules.yaml"
    f.write_text(text)
    return f


def test_weights_add_up_in_logit_space(tmp_path: Path) -> None:
    rules = load_rules(
        write(
            tmp_path,
            """
bias: 0
rules:
  - {name: proof, keywords: [prove], weight: 2.0}
  - {name: long, min_chars: 30, weight: 1.0}
""",
        )
    )
    router = RulesRouter(rules)
    assert router.score("hello") == pytest.approx(0.5)
    short = router.explain([{"role": "user", "content": "prove it"}])
    assert short.score == pytest.approx(0.8808, abs=1e-4)  # sigmoid(2)
    assert short.reasons == ("rule proof (+2.0)",)
    assert router.score("please prove this statement about primes") == pytest.approx(
        0.9526, abs=1e-4
    )


def test_keywords_match_whole_words_only(tmp_path: Path) -> None:
    router = RulesRouter(
        load_rules(write(tmp_path, "rules:\n  - {keywords: [prove], weight: 3}\n"))
    )
    assert router.score("improve my essay") == pytest.approx(0.5)


def test_whole_conversation_is_seen(tmp_path: Path) -> None:
    router = RulesRouter(load_rules(write(tmp_path, "rules:\n  - {regex: '```', weight: 3}\n")))
    convo = [
        {"role": "user", "content": "```python\nprint(1)\n```"},
        {"role": "assistant", "content": "ok"},
        {"role": "user", "content": "and now?"},
    ]
    assert router.score(convo) > 0.9


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("rules: 3", "'rules' list"),
        ("rules:\n  - {regex: '(', weight: 1}\n", "bad regex"),
        ("rules:\n  - {weight: 1}\n", "no condition"),
        ("rules:\n  - {regex: a, weight: 1, colour: red}\n", "unknown keys: colour"),
        ("rules:\n  - {regex: a}\n", "needs at least a 'weight'"),
    ],
)
def test_bad_rule_files(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        load_rules(write(tmp_path, text))


def test_tag_rules_need_the_tagger() -> None:
    with pytest.raises(ConfigError, match="tagger"):
        RulesRouter(load_rules(), tagger=None)


def test_default_rules_with_tags(encoder) -> None:  # type: ignore[no-untyped-def]
    from tierroute.tagger import Tagger

    router = RulesRouter(load_rules(), Tagger(encoder))
    easy = router.explain([{"role": "user", "content": "Hi! What is the capital of France?"}])
    hard = router.explain(
        [
            {
                "role": "user",
                "content": "Prove that the sum of two odd numbers is even, step by step.",
            }
        ]
    )
    assert easy.score < 0.2 < 0.5 < hard.score
    code = router.explain(
        [{"role": "user", "content": "Write a Python function to merge two sorted lists."}]
    )
    assert code.tags["task"] == "code"
    assert "medium" in code.min_tiers
