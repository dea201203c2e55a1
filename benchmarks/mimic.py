"""Answers shaped exactly as OpenAI's API shapes them, for `fast_upstream.py --mimic`.

Given a request body, `chat` / `chat_chunks` / `completion` / `embeddings` build what
api.openai.com returns for it: `n` choices, tool calls when tools are offered (streamed as
tool_calls deltas: id, type and name first, then argument pieces), logprobs with
top_logprobs when asked, JSON content for response_format, `system_fingerprint` and
`service_tier`, usage with its details. Each body also carries `x_received`: the request
exactly as it arrived, so a test can see what the gateway sent on (an unknown field, which
a client must get back as it is).
"""

from __future__ import annotations

import json
import time
from typing import Any

FINGERPRINT = "fp_mimic_0001"


def _tool_call(request: dict[str, Any]) -> dict[str, Any] | None:
    tools = request.get("tools") or []
    choice = request.get("tool_choice", "auto")
    if not tools or choice == "none":
        return None
    name = tools[0]["function"]["name"]
    if isinstance(choice, dict):
        name = choice["function"]["name"]
    params = next(
        t["function"].get("parameters") or {} for t in tools if t["function"]["name"] == name
    )
    args = {key: "Paris" for key in (params.get("properties") or {})}
    return {"name": name, "arguments": json.dumps(args)}


def _text(request: dict[str, Any], index: int) -> str:
    fmt = request.get("response_format") or {}
    if fmt.get("type") in ("json_object", "json_schema"):
        return json.dumps({"answer": f"ok {index}"})
    return f"ok {index}"


def _logprobs(request: dict[str, Any], text: str) -> dict[str, Any] | None:
    if not request.get("logprobs"):
        return None
    k = request.get("top_logprobs") or 0
    content = []
    for i, word in enumerate(text.split(" ")):
        token = word if i == 0 else " " + word
        alts = [{"token": token, "logprob": -0.1, "bytes": list(token.encode())}]
        alts += [
            {"token": f"alt{j}", "logprob": -2.0 - j, "bytes": list(b"alt")} for j in range(k - 1)
        ]
        content.append(
            {
                "token": token,
                "logprob": -0.1,
                "bytes": list(token.encode()),
                "top_logprobs": alts[:k],
            }
        )
    return {"content": content, "refusal": None}


def _usage(request: dict[str, Any], completion: int) -> dict[str, Any]:
    prompt = len(json.dumps(request.get("messages") or request.get("prompt") or "")) // 4 + 1
    return {
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "total_tokens": prompt + completion,
        "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
        "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0},
    }


def _head(request: dict[str, Any], kind: str) -> dict[str, Any]:
    return {
        "id": "chatcmpl-mimic",
        "object": kind,
        "created": int(time.time()),
        "model": request.get("model", "mimic"),
        "service_tier": "default",
        "system_fingerprint": FINGERPRINT,
    }


def chat(request: dict[str, Any]) -> dict[str, Any]:
    call = _tool_call(request)
    choices = []
    tokens = 0
    for i in range(request.get("n") or 1):
        if call is not None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": f"call_{i}", "type": "function", "function": call}],
                "refusal": None,
            }
            text, finish = call["arguments"], "tool_calls"
        else:
            text, finish = _text(request, i), "stop"
            message = {"role": "assistant", "content": text, "refusal": None}
        tokens += len(text.split(" "))
        choices.append(
            {
                "index": i,
                "message": message,
                "logprobs": _logprobs(request, text),
                "finish_reason": finish,
            }
        )
    return {
        **_head(request, "chat.completion"),
        "choices": choices,
        "usage": _usage(request, tokens),
        "x_received": request,
    }


def chat_chunks(request: dict[str, Any]) -> list[dict[str, Any]]:
    head = _head(request, "chat.completion.chunk")
    call = _tool_call(request)
    out = []
    tokens = 0
    for i in range(request.get("n") or 1):

        def chunk(
            delta: dict[str, Any], finish: str | None = None, logprobs: Any = None, i: int = i
        ) -> None:
            choice = {"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}
            out.append({**head, "choices": [choice]})

        if call is not None:
            chunk(
                {
                    "role": "assistant",
                    "content": None,
                    "tool_calls": [
                        {
                            "index": 0,
                            "id": f"call_{i}",
                            "type": "function",
                            "function": {"name": call["name"], "arguments": ""},
                        }
                    ],
                }
            )
            arguments = call["arguments"]
            for piece in (arguments[: len(arguments) // 2], arguments[len(arguments) // 2 :]):
                chunk({"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
            tokens += 2
            chunk({}, "tool_calls")
            continue
        chunk({"role": "assistant", "content": "", "refusal": None})
        text = _text(request, i)
        for j, word in enumerate(text.split(" ")):
            piece = word if j == 0 else " " + word
            lp = _logprobs(request, piece.strip())
            chunk({"content": piece}, logprobs=lp)
            tokens += 1
        chunk({}, "stop")
    if (request.get("stream_options") or {}).get("include_usage"):
        out.append({**head, "choices": [], "usage": _usage(request, tokens)})
    out[0]["x_received"] = request
    return out


def completion(request: dict[str, Any]) -> dict[str, Any]:
    return {
        **_head(request, "text_completion"),
        "id": "cmpl-mimic",
        "choices": [{"index": 0, "text": " ok", "logprobs": None, "finish_reason": "stop"}],
        "usage": _usage(request, 1),
        "x_received": request,
    }


def embeddings(request: dict[str, Any]) -> dict[str, Any]:
    inputs = request.get("input")
    items = inputs if isinstance(inputs, list) else [inputs]
    return {
        "object": "list",
        "data": [
            {"object": "embedding", "index": i, "embedding": [0.25, -0.5, float(len(str(x)))]}
            for i, x in enumerate(items)
        ],
        "model": request.get("model", "mimic"),
        "usage": {"prompt_tokens": len(items), "total_tokens": len(items)},
        "x_received": request,
    }
