from __future__ import annotations

from pathlib import Path

import pytest

from tierroute.errors import ConfigError
from tierroute.tagger import Tagger, load_prototypes


@pytest.mark.parametrize(
    ("text", "task"),
    [
        ("Write a Java method that checks if a string is a palindrome.", "code"),
        ("What is the integral of x^3 from 0 to 2?", "math"),
        ("Translate 'where is the train station' into Italian.", "translation"),
        ("Summarize the following article in two sentences.", "summarisation"),
        ("Write a haiku about the ocean.", "creative"),
        ("Hello! How's it going?", "faq_smalltalk"),
    ],
)
def test_task_tags(encoder, text: str, task: str) -> None:  # type: ignore[no-untyped-def]
    assert Tagger(encoder).tag(text)["task"] == task


def test_domain_tags(encoder) -> None:  # type: ignore[no-untyped-def]
    tagger = Tagger(encoder)
    assert tagger.tag("What are common side effects of statins?")["domain"] == "medical"
    assert tagger.tag("How do I sue my landlord for my security deposit?")["domain"] == "legal"


def test_bad_prototype_file(tmp_path: Path) -> None:
    f = tmp_path / "p.yaml"
    f.write_text("task:\n  classes:\n    code: not-a-list\n")
    with pytest.raises(ConfigError, match="list of example utterances"):
        load_prototypes(f)
