"""OpenAI content parts (`"content": [{"type": "text", "text": ...}, ...]`) at the backends.

Remote tiers get messages as the client sent them. A local model reads text only: its
messages have their text parts joined into one string, and any other part (an image, audio,
a file) is refused with 400 naming the part and the tier, before the model is asked.
"""

from __future__ import annotations

from typing import Any

from tierroute.backends.base import Unsupported


def non_text_part(messages: list[dict[str, Any]]) -> tuple[str, str] | None:
    """(where, type) of the first content part that is not text, or None."""
    for i, message in enumerate(messages):
        content = message.get("content")
        if not isinstance(content, list):
            continue
        for j, part in enumerate(content):
            kind = part.get("type") if isinstance(part, dict) else None
            if kind != "text":
                return f"messages[{i}].content[{j}]", str(kind)
    return None


def refuse_non_text(messages: list[dict[str, Any]], tier: str, why: str) -> None:
    found = non_text_part(messages)
    if found is not None:
        where, kind = found
        raise Unsupported(
            f"'{where}' is a {kind!r} part, which tier {tier!r} cannot read ({why}); "
            "send text only, or name a tier that has vision: true.",
            param=where,
        )


def flatten(messages: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The messages with list content joined into one string (text parts, newline-joined)."""
    out = []
    for message in messages:
        content = message.get("content")
        if isinstance(content, list):
            text = "\n".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
            message = {**message, "content": text}
        out.append(message)
    return out
