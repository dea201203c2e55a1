"""How a whole conversation becomes the text a router scores.

Routers see every turn, not only the last message. The routing text puts the
latest user message first, then the earlier turns newest-first with their roles,
then the system prompt. The embedding model reads at most 256 tokens, so the
latest request always counts in full and older context fills what room is left;
rules and text features read the whole text. A single-turn request's routing text
is just its prompt, so offline outcome files and live traffic score identically.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from tierroute.errors import InputError
from tierroute.types import Message, Messages


def message_text(message: Message) -> str:
    """The text of one message; list content (OpenAI content parts) is joined."""
    content = message.get("content")
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if isinstance(part, dict) and isinstance(part.get("text"), str):
                parts.append(part["text"])
            elif isinstance(part, str):
                parts.append(part)
        return "\n".join(parts)
    raise InputError(
        f"message content must be a string or a list of parts, not {type(content).__name__}"
    )


def routing_text(messages: Messages) -> str:
    """Flatten a conversation into the text routers score (see module docstring)."""
    if isinstance(messages, str):
        messages = [{"role": "user", "content": messages}]
    if not isinstance(messages, Sequence) or not all(isinstance(m, Mapping) for m in messages):
        raise InputError(
            'messages must be a list of chat messages like {"role": "user", "content": "..."}'
        )
    if not messages:
        raise InputError("the request has no messages; send at least one user message")
    turns = [(str(m.get("role", "user")), message_text(m)) for m in messages]
    last_user = max((i for i, (role, _) in enumerate(turns) if role == "user"), default=None)
    if last_user is None or not turns[last_user][1].strip():
        raise InputError("the request has no non-empty user message; send a prompt to route")
    if len(turns) == 1:
        return turns[0][1]
    head = turns[last_user][1]
    system = [text for role, text in turns if role in ("system", "developer") and text.strip()]
    context = [
        f"{role}: {text}"
        for i, (role, text) in reversed(list(enumerate(turns)))
        if i != last_user and role not in ("system", "developer") and text.strip()
    ]
    return "\n\n".join([head, *context, *(f"system: {s}" for s in system)])


def estimate_tokens(text: str) -> int:
    """Tokens in `text` without a tokenizer: ~4 characters a token, as budgets need only."""
    return len(text) // 4 + 1


def as_messages(prompt: str) -> list[dict[str, str]]:
    return [{"role": "user", "content": prompt}]
