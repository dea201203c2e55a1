from __future__ import annotations

import pytest

from tierroute.conversation import routing_text
from tierroute.errors import InputError


def test_single_turn_is_the_prompt() -> None:
    assert routing_text([{"role": "user", "content": "What is 2+2?"}]) == "What is 2+2?"


def test_latest_user_turn_first_then_context_newest_first() -> None:
    text = routing_text(
        [
            {"role": "system", "content": "You are terse."},
            {"role": "user", "content": "Write a sorting function."},
            {"role": "assistant", "content": "def sort(xs): return sorted(xs)"},
            {"role": "user", "content": "Now make it a merge sort."},
        ]
    )
    assert text.split("\n\n") == [
        "Now make it a merge sort.",
        "assistant: def sort(xs): return sorted(xs)",
        "user: Write a sorting function.",
        "system: You are terse.",
    ]


def test_content_parts_are_joined() -> None:
    messages = [
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]}
    ]
    assert routing_text(messages) == "a\nb"


@pytest.mark.parametrize(
    "messages",
    [[], [{"role": "user", "content": "   "}], [{"role": "system", "content": "only system"}]],
)
def test_requests_without_a_prompt_are_refused(messages: list[dict[str, str]]) -> None:
    with pytest.raises(InputError):
        routing_text(messages)
