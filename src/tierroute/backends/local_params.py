"""What a local llama.cpp tier does with each OpenAI chat parameter, decided before the
model is asked: supported ones become llama-cpp-python arguments, the rest are refused
with 400 naming the parameter and the tier (`Unsupported`), never silently ignored.

    temperature, top_p, stop, seed,        passed to llama.cpp
    presence/frequency_penalty
    max_tokens, max_completion_tokens      the limit (else the tier's bounded default)
    response_format                        text; json_object (any JSON, or its "schema");
                                           json_schema: the schema as a llama.cpp grammar
    tools + tool_choice naming a function  the call's arguments generated under a grammar
    (or "required" with one tool)          from its parameters; tools reach the chat
                                           template; tool_choice "none" answers in text
    logprobs, top_logprobs                 read from the sampler's logits (not streamed)
    n                                      up to MAX_LOCAL_N answers sampled in turn (not
                                           streamed)
    user, parallel_tool_calls              accepted (nothing to do locally)
    content parts                          text parts joined; any other part refused

Refused: tools with tool_choice "auto" (or none given): llama.cpp has no parser for a
free-form tool call of these models' formats, so the answer would be prose with 200.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

from tierroute.backends.base import ChatRequest, Unsupported
from tierroute.backends.content import flatten, refuse_non_text

MAX_LOCAL_N = 8  # each answer is a full generation on a shared CPU
_PASSED = ("seed", "presence_penalty", "frequency_penalty")
_ACCEPTED = {
    *_PASSED,
    "max_completion_tokens",
    "response_format",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "logprobs",
    "top_logprobs",
    "n",
    "user",
}


@dataclass(frozen=True)
class LocalPlan:
    messages: list[dict[str, Any]]
    kwargs: dict[str, Any] = field(default_factory=dict)  # for create_chat_completion
    grammar: str | None = None  # GBNF the answer must follow
    tool: str | None = None  # the function whose arguments the answer is
    n: int = 1
    logprobs: bool = False
    top_logprobs: int = 0


def plan(request: ChatRequest, tier: str, stream: bool) -> LocalPlan:
    """The local tier's reading of `request`, or Unsupported naming what it cannot do."""
    extra = request.extra

    def refuse(param: str, why: str) -> Unsupported:
        return Unsupported(
            f"Tier {tier!r} (a local llama.cpp model) {why}; drop '{param}' or name a remote tier.",
            param=param,
        )

    for key in extra:
        if key not in _ACCEPTED:
            raise refuse(key, f"does not support the parameter '{key}'")
    refuse_non_text(request.messages, tier, "a local model reads text only")
    n = extra.get("n") or 1
    if not isinstance(n, int):
        raise refuse("n", "needs n as a whole number")
    if n > 1 and stream:
        raise refuse("n", "streams one answer only (n > 1 works without stream)")
    if n > MAX_LOCAL_N:
        raise refuse("n", f"samples at most {MAX_LOCAL_N} answers a request")
    logprobs = bool(extra.get("logprobs"))
    top = extra.get("top_logprobs") or 0
    if (logprobs or top) and stream:
        raise refuse("logprobs", "gives logprobs only without stream")
    kwargs = {k: extra[k] for k in _PASSED if extra.get(k) is not None}
    grammar = _response_grammar(extra.get("response_format"), refuse)
    tool, tools = _tool(extra.get("tools"), extra.get("tool_choice"), refuse)
    if tool is not None:
        grammar = _gbnf(tool[1], "tools", refuse)
        kwargs["tools"] = tools  # the chat template describes them to the model
    messages = [_text_only(m) for m in flatten(request.messages)]
    return LocalPlan(
        messages=messages,
        kwargs=kwargs,
        grammar=grammar,
        tool=None if tool is None else tool[0],
        n=n,
        logprobs=logprobs or bool(top),
        top_logprobs=top,
    )


def _text_only(message: dict[str, Any]) -> dict[str, Any]:
    """A message as chat templates expect it: content a string (an assistant turn that
    only called tools has None)."""
    if message.get("content") is None:
        return {**message, "content": ""}
    return message


def _response_grammar(fmt: Any, refuse: Any) -> str | None:
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise refuse("response_format", "needs response_format as an object")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        schema = fmt.get("schema")  # llama.cpp's extension; plain JSON without it
        return _gbnf(schema if isinstance(schema, dict) else {}, "response_format", refuse)
    if kind == "json_schema":
        spec = fmt.get("json_schema")
        schema = spec.get("schema") if isinstance(spec, dict) else None
        if not isinstance(schema, dict):
            raise refuse("response_format", "needs response_format.json_schema.schema")
        return _gbnf(schema, "response_format", refuse)
    raise refuse("response_format", f"does not know response_format type {kind!r}")


def _gbnf(schema: dict[str, Any], param: str, refuse: Any) -> str:
    """The llama.cpp grammar for a JSON schema ({}: any JSON object)."""
    from llama_cpp import llama_grammar

    if not schema:
        return str(llama_grammar.JSON_GBNF)
    try:
        return str(llama_grammar.json_schema_to_gbnf(json.dumps(schema)))
    except Exception as exc:  # the converter raises bare Exception / KeyError / ValueError
        raise refuse(param, f"cannot turn this JSON schema into a grammar ({exc})") from None


def _tool(
    tools: Any, choice: Any, refuse: Any
) -> tuple[tuple[str, dict[str, Any]] | None, list[dict[str, Any]] | None]:
    """((name, parameters schema) of the forced function, or None; the tools to show)."""
    if not tools or choice == "none":
        return None, None
    if not isinstance(tools, list):
        raise refuse("tools", "needs tools as an array")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise refuse(f"tools[{i}]", "needs each tool as {type: function, function: {name}}")
        params = fn.get("parameters")
        functions[fn["name"]] = params if isinstance(params, dict) else {}
    name = None
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in functions:
            raise refuse("tool_choice", f"was asked for a function {name!r} not in tools")
    elif choice == "required" and len(functions) == 1:
        name = next(iter(functions))
    else:
        raise refuse(
            "tool_choice",
            "calls a tool only when tool_choice names it (or is 'required' with one tool)",
        )
    return (name, functions[name]), tools
