"""The backend seam: one tier's model behind one small async interface.

A backend answers a chat request, whole (`complete`) or as a stream of deltas
(`stream`). Local llama.cpp models and remote OpenAI-compatible endpoints both
implement it, so the gateway's fallbacks, timeouts and ledger never care which.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from tierroute.errors import TierrouteError


@dataclass(frozen=True)
class ChatRequest:
    messages: list[dict[str, Any]]
    max_tokens: int | None = None
    temperature: float | None = None
    top_p: float | None = None
    stop: list[str] | None = None
    # Any other OpenAI chat parameters (max_completion_tokens, n, tools, logprobs, user,
    # unknown ones...), passed through to remote backends as they are.
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def limit(self) -> int | None:
        """The client's output limit: max_completion_tokens, else max_tokens, else None."""
        value = self.extra.get("max_completion_tokens")
        return value if isinstance(value, int) and not isinstance(value, bool) else self.max_tokens


@dataclass(frozen=True)
class ChatResult:
    text: str
    finish_reason: str
    prompt_tokens: int
    completion_tokens: int
    model: str
    # The log-probability of each answer token under the model (natural log), when the
    # request asked for it with extra={"logprobs": True} and the backend can tell.
    token_logprobs: tuple[float, ...] | None = None
    # The answer's OpenAI `choices` as the model gave them (tool_calls, logprobs, n > 1...)
    # and the other top-level fields of its body (system_fingerprint, ...): the client gets
    # them as they are. None: the body is built from `text` alone.
    choices: list[dict[str, Any]] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class StreamDelta:
    """One piece of a streamed answer; the last one carries finish_reason and usage."""

    text: str
    finish_reason: str | None = None
    prompt_tokens: int | None = None
    completion_tokens: int | None = None
    # The chunk's OpenAI `choices` (deltas with tool_calls, logprobs, several indexes) and
    # its other top-level fields, forwarded as they are; None: a chunk is built from `text`.
    choices: list[dict[str, Any]] | None = None
    fields: dict[str, Any] = field(default_factory=dict)


class BackendError(TierrouteError):
    """A tier failed to answer. `retryable` errors (connect, timeout, 5xx, 429) may be
    retried or sent to the next tier; others (e.g. a 400 from upstream) may not."""

    def __init__(self, message: str, *, retryable: bool, status: int | None = None) -> None:
        super().__init__(message)
        self.retryable = retryable
        self.status = status


class Unsupported(BackendError):
    """The request asks a tier for something it cannot do (a parameter, an image): the
    client's mistake, answered with 400 naming `param` and the tier, never a tier failure."""

    def __init__(self, message: str, *, param: str | None) -> None:
        super().__init__(message, retryable=False, status=400)
        self.param = param


class Backend(Protocol):
    name: str

    async def complete(self, request: ChatRequest, timeout: float) -> ChatResult: ...

    def stream(self, request: ChatRequest, timeout: float) -> AsyncIterator[StreamDelta]: ...

    async def aclose(self) -> None: ...


@runtime_checkable
class Poster(Protocol):
    """A backend that also passes whole bodies to other endpoints of its API (a remote
    tier: /completions, /embeddings); local models do not."""

    async def post(self, path: str, body: dict[str, Any], timeout: float) -> dict[str, Any]: ...
