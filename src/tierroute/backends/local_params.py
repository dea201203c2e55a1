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
    tools + tool_choice "auto" (or unset)  two steps: the model first names the function
    (or "required" with several tools)     that answers, or "none", under a grammar allowing
                                           only those names ("required": no "none"); then
                                           the forced path above, or a text answer
    logprobs, top_logprobs                 read from the sampler's logits (not streamed)
    n                                      up to MAX_LOCAL_N answers sampled in turn (not
                                           streamed)
    user, parallel_tool_calls              accepted (nothing to do locally)
    content parts                          text parts joined; any other part refused

Why two steps for "auto": llama.cpp has no parser for a free-form tool call in these
models' own formats, and a small model offered "prose or a call" under one grammar almost
never calls (SmolLM2-135M wrote prose for "What is the weather in Paris?" with every
wording tried), while asked "which function answers this, or none?" it names the right
one. The choice step costs one more prompt evaluation and a few tokens, which the answer's
usage includes.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field, replace
from typing import Any

from tierroute.backends.base import ChatRequest, Unsupported
from tierroute.backends.content import flatten, refuse_non_text

_NAME = re.compile(r"[A-Za-z0-9_-]{1,64}")  # OpenAI's rule for function names
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
    # tool_choice auto (or required with several tools): the functions a first step
    # chooses among (`choice_step`), and whether "none" (a text answer) is a choice.
    choose: tuple[str, ...] = ()
    choose_none: bool = False
    tools: list[dict[str, Any]] | None = None  # the request's, for the choice step's note
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
    tool, tools, choose = _tool(extra.get("tools"), extra.get("tool_choice"), refuse)
    messages = [_call_as_text(_text_only(m)) for m in flatten(request.messages)]
    if tool is not None:
        grammar = _gbnf(tool[1], "tools", refuse)
        kwargs["tools"] = tools  # the chat template describes them to the model
    return LocalPlan(
        messages=messages,
        kwargs=kwargs,
        grammar=grammar,
        tool=None if tool is None else tool[0],
        choose=() if tools is None or choose is None else _names(tools),
        choose_none=choose == "auto",
        tools=tools if choose is not None else None,
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
) -> tuple[tuple[str, dict[str, Any]] | None, list[dict[str, Any]] | None, str | None]:
    """((name, parameters schema) of the forced function, or None; the tools to show;
    "auto" or "required" when the model chooses among several, else None)."""
    if not tools or choice == "none":
        return None, None, None
    if not isinstance(tools, list):
        raise refuse("tools", "needs tools as an array")
    functions: dict[str, dict[str, Any]] = {}
    for i, tool in enumerate(tools):
        fn = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(fn, dict) or not isinstance(fn.get("name"), str):
            raise refuse(f"tools[{i}]", "needs each tool as {type: function, function: {name}}")
        params = fn.get("parameters")
        functions[fn["name"]] = params if isinstance(params, dict) else {}
    if isinstance(choice, dict):
        fn = choice.get("function")
        name = fn.get("name") if isinstance(fn, dict) else None
        if name not in functions:
            raise refuse("tool_choice", f"was asked for a function {name!r} not in tools")
        return (name, functions[name]), tools, None
    if choice == "required" and len(functions) == 1:
        name = next(iter(functions))
        return (name, functions[name]), tools, None
    if choice in (None, "auto", "required"):
        bad = [n for n in functions if not _NAME.fullmatch(n)]
        if bad:
            raise refuse(
                "tools", f"needs function names of letters, digits, _ and - (not {bad[0]!r})"
            )
        return None, tools, choice or "auto"
    raise refuse("tool_choice", f"does not know tool_choice {choice!r}")


def _names(tools: list[dict[str, Any]]) -> tuple[str, ...]:
    return tuple(t["function"]["name"] for t in tools)


CHOICE_TOKENS = 48  # a function name is at most 64 characters
CHOICE_NOTE = (
    "Functions:\n{specs}\nWhich function answers the user's last message? Reply with its "
    "name{none}."
)


def choice_step(local: LocalPlan) -> tuple[list[dict[str, Any]], str, str]:
    """The first step of tool_choice auto: the conversation with the functions listed
    and the question which one answers it, the grammar of the possible replies (each
    function's name, and "none" when a text answer may be chosen) and the reply that
    means none."""
    names = local.choose
    none = "none" if "none" not in names else "no function"
    options = [*names, none] if local.choose_none else list(names)
    grammar = "root ::= " + " | ".join(json.dumps(o) for o in options)
    specs = "\n".join(
        json.dumps(
            {k: v for k, v in t["function"].items() if k in ("name", "description")},
            ensure_ascii=False,
        )
        for t in local.tools or []
    )
    note = CHOICE_NOTE.format(specs=specs, none=f", or {none}" if local.choose_none else "")
    messages = local.messages
    if messages and messages[0].get("role") in ("system", "developer"):
        first = messages[0]
        messages = [{**first, "content": f"{first['content']}\n\n{note}"}, *messages[1:]]
    else:
        messages = [{"role": "system", "content": note}, *messages]
    return messages, grammar, none


def resolved(request: ChatRequest, choice: str, local: LocalPlan) -> ChatRequest:
    """The request once the choice step has named a function (forced from here on) or
    none (a text answer without tools)."""
    if choice in local.choose:
        tool_choice: Any = {"type": "function", "function": {"name": choice}}
    else:
        tool_choice = "none"
    return replace(request, extra={**request.extra, "tool_choice": tool_choice})


def _call_as_text(message: dict[str, Any]) -> dict[str, Any]:
    """An earlier assistant turn that called a tool, as the text the model writes for a
    call, so the conversation reads as the model's own format (templates drop tool_calls)."""
    calls = message.get("tool_calls")
    if message.get("role") != "assistant" or not isinstance(calls, list) or message["content"]:
        return message
    texts = []
    for call in calls:
        fn = call.get("function") if isinstance(call, dict) else None
        if isinstance(fn, dict):
            try:
                arguments = json.loads(fn.get("arguments") or "{}")
            except (TypeError, ValueError):
                arguments = fn.get("arguments")
            texts.append(json.dumps({"name": fn.get("name"), "arguments": arguments}))
    rest = {k: v for k, v in message.items() if k != "tool_calls"}
    return {**rest, "content": "\n".join(texts)}
