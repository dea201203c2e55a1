"""A base (completion-only) model as a tier: a few-shot prompt turns a chat request into
"Q: ... / A:" text and the model completes one line.

A base model has no chat template and answers a chat prompt with nothing, but it continues
a pattern: shown a few questions each followed by a one-line answer, it writes a one-line
answer to the next question and the newline stops it. That makes it a usable second small
model for checkable questions (a number, a one-line Python function), which is
what cross-model agreement compares (tierroute.collab). It is no assistant: the system
message and earlier turns are not shown (the examples set the format), and only the last
user message is asked, on one line. The examples are word problems and one-line
functions, the kinds the live benchmark checks (benchmarks/collab_live.py).

The default examples are short on purpose: every call pays for them as prompt tokens.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from tierroute.errors import ConfigError

MAX_QUESTION_CHARS = 4000  # a longer question is clipped from its start (the end asks)
_SPACES = re.compile(r"\s+")

# (question, one-line answer): word problems with the calculation before "Answer: N" (tried
# on generated problems of another seed, 1 of 12 right against 0 of 12 with the bare
# number), and one-line Python functions.
DEFAULT_EXAMPLES: tuple[tuple[str, str], ...] = (
    (
        "Sam has 4 boxes of 6 pens and gives away 5 pens. How many pens are left?",
        "4 * 6 = 24. 24 - 5 = 19. Answer: 19",
    ),
    (
        "Mia has 8 shells and buys 5 more. How many shells does Mia have now?",
        "8 + 5 = 13. Answer: 13",
    ),
    (
        "A bus has 30 people. 12 get off and 7 get on. How many people are on the bus now?",
        "30 - 12 = 18. 18 + 7 = 25. Answer: 25",
    ),
    (
        "Write a Python function double_odds(xs) that returns the odd numbers of the list "
        "xs multiplied by 2.",
        "def double_odds(xs): return [2 * x for x in xs if x % 2 == 1]",
    ),
    (
        "Write a Python function count_a(s) that returns how many times 'a' occurs in the "
        "string s.",
        "def count_a(s): return s.count('a')",
    ),
)


@dataclass(frozen=True)
class FewShot:
    """The prompt a base model completes: the examples, then the question, then "A:"."""

    examples: tuple[tuple[str, str], ...] = DEFAULT_EXAMPLES
    stop: tuple[str, ...] = ("\n",)

    def __post_init__(self) -> None:
        if not 1 <= len(self.examples) <= 32:
            raise ConfigError(f"a few-shot prompt needs 1 to 32 examples, not {len(self.examples)}")
        for question, answer in self.examples:
            if not question.strip() or not answer.strip() or "\n" in answer:
                raise ConfigError(
                    f"few-shot example {question[:40]!r}: the question and a one-line answer "
                    "must both be non-empty"
                )

    def render(self, messages: Sequence[dict[str, Any]]) -> str:
        """The completion prompt for a chat request's messages (text content only)."""
        shots = "".join(f"Q: {one_line(q)}\nA: {a.strip()}\n\n" for q, a in self.examples)
        return f"{shots}Q: {one_line(last_user(messages))}\nA:"


def last_user(messages: Sequence[dict[str, Any]]) -> str:
    """The last user message's text: what a few-shot tier answers."""
    for message in reversed(messages):
        if message.get("role") == "user":
            content = message.get("content")
            return content if isinstance(content, str) else ""
    return ""


def one_line(text: str) -> str:
    """Whitespace collapsed to single spaces (the answer line must come after "A:"),
    clipped to its last MAX_QUESTION_CHARS characters."""
    flat = _SPACES.sub(" ", text).strip()
    return flat[-MAX_QUESTION_CHARS:]
