"""The OpenAI wire format: request validation and response bodies."""

from __future__ import annotations

import json
import math
import re
import time
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field

from tierroute.backends.base import ChatRequest, ChatResult, StreamDelta
from tierroute.gateway.engine import Hints

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
PRIORITIES = ("batch", "interactive", "critical")
# Parameters held in ChatRequest's own fields or read by the gateway alone (metadata holds
# its hints); everything else (max_completion_tokens, n, tools, user, unknown fields...)
# stays in ChatRequest.extra and reaches a remote tier as sent.
_KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "temperature",
    "top_p",
    "stop",
    "metadata",
}
# Bounds on what a request may carry, checked before any value is used: deeper documents,
# integers outside 64 bits and lone UTF-16 surrogates (valid JSON escapes that no encoder
# accepts) are refused with 400 naming the field, never passed on to fail later.
MAX_DEPTH = 64
MAX_INT = 2**63 - 1
MAX_TOKENS = 1_000_000
MAX_CHOICES = 128  # OpenAI's own bound on `n`
# Shapes of passed-through parameters, checked so a mistake is a 400 here, not upstream.
_SHAPES: tuple[tuple[str, type | tuple[type, ...], str], ...] = (
    ("logprobs", bool, "a boolean"),
    ("parallel_tool_calls", bool, "a boolean"),
    ("tools", list, "an array of tools"),
    ("tool_choice", (str, dict), "'none', 'auto', 'required' or a tool object"),
    ("response_format", dict, 'an object such as {"type": "json_object"}'),
)
_SURROGATE = re.compile("[\ud800-\udfff]")


class ApiError(Exception):
    """An error the client sees, in OpenAI's format, with its HTTP status."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        type: str = "invalid_request_error",
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.headers = headers  # e.g. Retry-After on a 429
        self.status = status
        self.message = message
        self.type = type
        self.param = param
        self.code = code

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": self.type,
                "param": self.param,
                "code": self.code,
            }
        }


@dataclass(frozen=True)
class ChatCall:
    model: str
    request: ChatRequest
    stream: bool
    include_usage: bool
    hints: Hints


def _refuse_constant(name: str) -> float:
    raise ValueError(f"{name} is not a JSON number")


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body, parse_constant=_refuse_constant)
    except RecursionError:
        raise ApiError(400, f"The request body is nested deeper than {MAX_DEPTH} levels.") from None
    except (ValueError, UnicodeDecodeError) as exc:  # JSONDecodeError, NaN, ints > 4300 digits
        raise ApiError(400, f"The request body is not valid JSON ({exc}).") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    check_values(doc)
    return doc


def check_values(doc: dict[str, Any]) -> None:
    """Refuse (400, naming the field) nesting deeper than MAX_DEPTH, integers outside 64
    bits and strings holding lone surrogates, anywhere in the document (keys included)."""
    stack: list[tuple[str, Any, int]] = [("", doc, 1)]
    while stack:
        where, value, depth = stack.pop()
        if depth > MAX_DEPTH:
            raise ApiError(400, f"'{where}' is nested deeper than {MAX_DEPTH} levels.", param=where)
        if isinstance(value, dict):
            for key, item in value.items():
                path = f"{where}.{key}" if where else str(key)
                if _SURROGATE.search(key):
                    raise ApiError(400, _surrogate(where or "body"), param=where or None)
                stack.append((path, item, depth + 1))
        elif isinstance(value, list):
            stack.extend((f"{where}[{i}]", item, depth + 1) for i, item in enumerate(value))
        elif isinstance(value, str):
            if _SURROGATE.search(value):
                raise ApiError(400, _surrogate(where), param=where)
        elif isinstance(value, int) and not -MAX_INT - 1 <= value <= MAX_INT:
            raise ApiError(400, f"'{where}' must be an integer within 64 bits.", param=where)


def _surrogate(where: str) -> str:
    return f"'{where}' holds a lone UTF-16 surrogate (\\ud800-\\udfff), which is not text."


def _number(doc: dict[str, Any], key: str, lo: float, hi: float) -> float | None:
    value = doc.get(key)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        raise ApiError(400, f"'{key}' must be a number.", param=key)
    if not lo <= value <= hi:
        raise ApiError(400, f"'{key}' must be between {lo:g} and {hi:g}.", param=key)
    return float(value)


def _messages(doc: dict[str, Any]) -> list[dict[str, Any]]:
    if "messages" not in doc:
        raise ApiError(
            400,
            "Missing required parameter: 'messages'.",
            param="messages",
            code="missing_required_parameter",
        )
    messages = doc["messages"]
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty array of messages.", param="messages")
    for i, m in enumerate(messages):
        where = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ApiError(400, f"'{where}' must be an object.", param=where)
        role = m.get("role")
        if not isinstance(role, str) or role not in ROLES:
            raise ApiError(
                400, f"'{where}.role' must be one of {sorted(ROLES)}.", param=f"{where}.role"
            )
        content = m.get("content")
        if content is not None and not isinstance(content, str | list):
            raise ApiError(
                400,
                f"'{where}.content' must be a string or an array of parts.",
                param=f"{where}.content",
            )
    if not any(m.get("role") == "user" and m.get("content") for m in messages):
        raise ApiError(
            400, "'messages' needs at least one non-empty user message.", param="messages"
        )
    return messages


MAX_TENANT_CHARS = 256


def hints_from(metadata: Any, headers: dict[str, str], user: Any = None) -> Hints:
    """Hints from the request's `metadata`, overridden by X-Tierroute-* headers."""
    meta = metadata if isinstance(metadata, dict) else {}
    priority = headers.get("x-tierroute-priority") or meta.get("priority")
    budget = headers.get("x-tierroute-latency-budget-ms") or meta.get("latency_budget_ms")
    cap = headers.get("x-tierroute-max-cost-usd") or meta.get("max_cost_usd")
    if priority is not None and priority not in PRIORITIES:
        raise ApiError(400, f"priority must be one of {', '.join(PRIORITIES)}.", param="priority")
    budget_ms = _hint(budget, "latency_budget_ms")
    cap_usd = _hint(cap, "max_cost_usd")
    tenant = meta.get("tenant") or user
    if tenant is not None and not isinstance(tenant, str):
        raise ApiError(400, "'user' and metadata.tenant must be strings.", param="user")
    # A tenant is kept per key (personalisation, the ledger, Redis): a long one would let
    # one key hold megabytes per tenant there.
    if tenant is not None and len(tenant) > MAX_TENANT_CHARS:
        raise ApiError(
            400,
            f"'user' and metadata.tenant must be at most {MAX_TENANT_CHARS} characters.",
            param="user",
        )
    return Hints(
        priority=priority, latency_budget_ms=budget_ms, max_cost_usd=cap_usd, tenant=tenant
    )


def _hint(value: Any, name: str) -> float | None:
    """A numeric hint from a header (a string) or metadata: finite and >= 0."""
    if value is None:
        return None
    try:
        if isinstance(value, bool) or not isinstance(value, str | int | float):
            raise ValueError
        number = float(value)
    except (ValueError, OverflowError):
        number = math.nan
    if not math.isfinite(number) or number < 0:
        raise ApiError(400, f"'{name}' must be a finite number >= 0.", param=name)
    return number


def model_of(doc: dict[str, Any], models: list[str], aliases: dict[str, str] | None) -> str:
    """'auto' or the tier a request names: by the tier's name, or by the upstream model name
    its answers report (`aliases`: model name -> tier)."""
    model = doc.get("model", "auto")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string.", param="model")
    if model not in models and aliases and model in aliases:
        return aliases[model]
    if model not in models:
        raise ApiError(
            400,
            f"The model '{model}' does not exist; use one of {models}.",
            param="model",
            code="model_not_found",
        )
    return model


def _count(doc: dict[str, Any], key: str, lo: int, hi: int) -> int | None:
    value = doc.get(key)
    if value is not None and (
        isinstance(value, bool) or not isinstance(value, int) or not lo <= value <= hi
    ):
        raise ApiError(400, f"'{key}' must be an integer from {lo} to {hi}.", param=key)
    return value


def parse_chat(
    doc: dict[str, Any],
    models: list[str],
    headers: dict[str, str],
    max_tokens_default: int,
    aliases: dict[str, str] | None = None,
) -> ChatCall:
    """A chat request, checked. `max_tokens_default` is not added to the request: a remote
    tier gets no limit the client did not set, and a local tier applies its own."""
    del max_tokens_default  # kept for callers; see the docstring
    model = model_of(doc, models, aliases)
    messages = _messages(doc)
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean.", param="stream")
    raw_max = _count(doc, "max_tokens", 1, MAX_TOKENS)
    _count(doc, "max_completion_tokens", 1, MAX_TOKENS)
    _count(doc, "n", 1, MAX_CHOICES)
    _count(doc, "top_logprobs", 0, 20)
    _count(doc, "seed", -MAX_INT - 1, MAX_INT)
    for key, kinds, what in _SHAPES:
        if doc.get(key) is not None and not isinstance(doc[key], kinds):
            raise ApiError(400, f"'{key}' must be {what}.", param=key)
    stop = doc.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or an array of strings.", param="stop")
    options = doc.get("stream_options") or {}
    request = ChatRequest(
        messages=messages,
        max_tokens=raw_max,
        temperature=_number(doc, "temperature", 0, 2),
        top_p=_number(doc, "top_p", 0, 1),
        stop=stop,
        extra={k: v for k, v in doc.items() if k not in _KNOWN},
    )
    return ChatCall(
        model=model,
        request=request,
        stream=stream,
        include_usage=bool(isinstance(options, dict) and options.get("include_usage")),
        hints=hints_from(doc.get("metadata"), headers, doc.get("user")),
    )


def completion_body(
    request_id: str, model: str, text: str, finish: str, prompt_tokens: int, completion_tokens: int
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion",
        "created": int(time.time()),
        "model": model,
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": text},
                "finish_reason": finish,
                "logprobs": None,
            }
        ],
        "usage": {
            "prompt_tokens": prompt_tokens,
            "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
        },
    }


def answer_body(request_id: str, model: str, result: ChatResult) -> dict[str, Any]:
    """The body of an answer: the tier's own choices and fields when it gave them (tool
    calls, logprobs, n choices, system_fingerprint...), with our id, model and usage."""
    body = completion_body(
        request_id,
        model,
        result.text,
        result.finish_reason,
        result.prompt_tokens,
        result.completion_tokens,
    )
    if result.choices is not None:
        body["choices"] = result.choices
    usage = result.fields.get("usage")
    if isinstance(usage, dict):  # the tier's details (cached, reasoning tokens) stay
        body["usage"] = {**usage, **body["usage"]}
    return {**result.fields, **body}


def forwarded_chunk(
    request_id: str, model: str, created: int, delta: StreamDelta
) -> dict[str, Any]:
    """A tier's streamed chunk as it sent it, under our id and model."""
    return {
        **delta.fields,
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": delta.choices,
    }


def usage_fields(fields: dict[str, Any]) -> dict[str, Any]:
    """A tier's top-level fields for the usage chunk (system_fingerprint...), without the
    usage itself, which the caller merges with the counts it books."""
    return {k: v for k, v in fields.items() if k != "usage"}


def chunk_body(
    request_id: str, model: str, created: int, delta: dict[str, Any], finish: str | None
) -> dict[str, Any]:
    return {
        "id": request_id,
        "object": "chat.completion.chunk",
        "created": created,
        "model": model,
        "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}],
    }


def sse(data: dict[str, Any] | str) -> bytes:
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {payload}\n\n".encode()


# ------------------------------------------------------------------ the OpenAPI description
# Pydantic models that describe the wire format for /openapi.json (and so for schema-driven
# clients and fuzzers). Requests are still validated by the functions above, which give
# OpenAI-style errors; these models only document what they accept and return.


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImageUrl(BaseModel):
    url: str
    detail: Literal["auto", "low", "high"] | None = None


class ImagePart(BaseModel):
    """Sent to tiers with vision: true; any other tier answers 400 naming itself."""

    type: Literal["image_url"]
    image_url: ImageUrl


class Message(BaseModel):
    """Other fields (tool_calls, tool_call_id, ...) pass through to the tier."""

    model_config = ConfigDict(extra="allow")

    role: Literal["system", "user", "assistant", "tool", "developer", "function"]
    content: str | list[TextPart | ImagePart] | None = None
    name: str | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class RequestMetadata(BaseModel):
    priority: Literal["batch", "interactive", "critical"] | None = None
    latency_budget_ms: float | None = Field(default=None, ge=0)
    max_cost_usd: float | None = Field(default=None, ge=0)
    tenant: str | None = Field(default=None, max_length=MAX_TENANT_CHARS)


# At least one user message with content (blank content is refused too, unsaid here).
_USER_TURN: dict[str, Any] = {
    "type": "object",
    "required": ["role", "content"],
    "properties": {
        "role": {"const": "user"},
        "content": {"type": "string", "minLength": 1},
    },
}


class ChatCompletionRequest(BaseModel):
    """An OpenAI chat completion request; at least one user message must have content.
    Every parameter but `metadata` (the gateway's hints) reaches a remote tier as sent,
    unknown ones too; a local tier refuses what llama.cpp cannot do with 400."""

    model_config = ConfigDict(extra="allow")

    model: str = Field(default="auto", description="'auto' or a tier name")
    messages: list[Message] = Field(min_length=1, json_schema_extra={"contains": _USER_TURN})
    stream: bool = False
    stream_options: StreamOptions | None = None
    max_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    max_completion_tokens: int | None = Field(default=None, ge=1, le=MAX_TOKENS)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    stop: str | list[str] | None = None
    n: int | None = Field(default=None, ge=1, le=MAX_CHOICES)
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=20)
    seed: int | None = Field(default=None, ge=-MAX_INT - 1, le=MAX_INT)
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
    parallel_tool_calls: bool | None = None
    response_format: dict[str, Any] | None = None
    user: str | None = Field(
        default=None,
        max_length=MAX_TENANT_CHARS,
        description="The tenant, for personalisation; with API keys, scoped to the key",
    )
    metadata: RequestMetadata | None = None


class AssistantMessage(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["assistant"]
    content: str | None
    tool_calls: list[dict[str, Any]] | None = None


class Choice(BaseModel):
    model_config = ConfigDict(extra="allow")

    index: int
    message: AssistantMessage
    finish_reason: str
    logprobs: dict[str, Any] | None = None


class Usage(BaseModel):
    model_config = ConfigDict(extra="allow")

    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class ChatCompletion(BaseModel):
    """The tier's answer: its choices and other fields (system_fingerprint...) as it gave
    them, under the gateway's id and the tier's model name."""

    model_config = ConfigDict(extra="allow")

    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[Choice]
    usage: Usage


class RouteDecision(BaseModel):
    tier: str
    model: str
    score: float | None
    reason: str
    tags: dict[str, Any]
    fallback_chain: list[str]
    cache_hit: bool
    routing_ms: float


class FeedbackRequest(BaseModel):
    request_id: str = Field(
        min_length=1, max_length=128, description="The id of a completion (chatcmpl-...)"
    )
    rating: float = Field(ge=0, le=1, description="1 thumbs up, 0 thumbs down, or a score")
    comment: str | None = Field(None, max_length=4000)


class FeedbackRecorded(BaseModel):
    object: Literal["feedback"]
    request_id: str
    rating: float
    status: Literal["recorded"]


class ErrorDetail(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorBody(BaseModel):
    """OpenAI's error object."""

    error: ErrorDetail
