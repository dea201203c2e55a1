"""The OpenAI wire format: request validation and response bodies."""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from typing import Any

from tierroute.backends.base import ChatRequest
from tierroute.gateway.engine import Hints

ROLES = {"system", "user", "assistant", "tool", "developer", "function"}
PRIORITIES = ("batch", "interactive", "critical")
# Parameters we read ourselves; everything else is passed through to remote tiers.
_KNOWN = {
    "model",
    "messages",
    "stream",
    "stream_options",
    "max_tokens",
    "max_completion_tokens",
    "temperature",
    "top_p",
    "stop",
    "metadata",
    "user",
    "n",
}


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
    ) -> None:
        super().__init__(message)
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


def parse_json(body: bytes) -> dict[str, Any]:
    try:
        doc = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ApiError(400, f"The request body is not valid JSON ({exc}).") from None
    if not isinstance(doc, dict):
        raise ApiError(400, "The request body must be a JSON object.")
    return doc


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
        if m.get("role") not in ROLES:
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


def hints_from(metadata: Any, headers: dict[str, str], user: Any = None) -> Hints:
    """Hints from the request's `metadata`, overridden by X-Tierroute-* headers."""
    meta = metadata if isinstance(metadata, dict) else {}
    priority = headers.get("x-tierroute-priority") or meta.get("priority")
    budget = headers.get("x-tierroute-latency-budget-ms") or meta.get("latency_budget_ms")
    cap = headers.get("x-tierroute-max-cost-usd") or meta.get("max_cost_usd")
    if priority is not None and priority not in PRIORITIES:
        raise ApiError(400, f"priority must be one of {', '.join(PRIORITIES)}.", param="priority")
    try:
        budget_ms = float(budget) if budget is not None else None
        cap_usd = float(cap) if cap is not None else None
    except (TypeError, ValueError):
        raise ApiError(400, "latency budget and cost cap must be numbers.") from None
    tenant = meta.get("tenant") or user
    if tenant is not None and not isinstance(tenant, str):
        raise ApiError(400, "'user' and metadata.tenant must be strings.", param="user")
    return Hints(
        priority=priority, latency_budget_ms=budget_ms, max_cost_usd=cap_usd, tenant=tenant
    )


def parse_chat(
    doc: dict[str, Any], models: list[str], headers: dict[str, str], max_tokens_default: int
) -> ChatCall:
    model = doc.get("model", "auto")
    if not isinstance(model, str):
        raise ApiError(400, "'model' must be a string.", param="model")
    if model not in models:
        raise ApiError(
            400,
            f"The model '{model}' does not exist; use one of {models}.",
            param="model",
            code="model_not_found",
        )
    messages = _messages(doc)
    stream = doc.get("stream", False)
    if not isinstance(stream, bool):
        raise ApiError(400, "'stream' must be a boolean.", param="stream")
    raw_max = doc.get("max_completion_tokens", doc.get("max_tokens"))
    if raw_max is not None and (
        isinstance(raw_max, bool) or not isinstance(raw_max, int) or raw_max < 1
    ):
        raise ApiError(400, "'max_tokens' must be a positive integer.", param="max_tokens")
    stop = doc.get("stop")
    if isinstance(stop, str):
        stop = [stop]
    if stop is not None and not (isinstance(stop, list) and all(isinstance(s, str) for s in stop)):
        raise ApiError(400, "'stop' must be a string or an array of strings.", param="stop")
    options = doc.get("stream_options") or {}
    request = ChatRequest(
        messages=messages,
        max_tokens=raw_max or max_tokens_default,
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
