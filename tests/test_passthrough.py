"""Pass-through in pieces, without servers: what a request keeps on its way to a tier, what
a local tier makes of each parameter, and how answers are put back together.
(tests/test_openai_sdk.py drives the whole gateway with the openai SDK.)"""

from __future__ import annotations

import importlib.util
from typing import Any

import pytest

from tierroute.backends.base import ChatRequest, ChatResult, Unsupported
from tierroute.backends.content import flatten, non_text_part
from tierroute.gateway import passthrough
from tierroute.gateway.schema import ApiError, answer_body, parse_chat

HI = [{"role": "user", "content": "Hi"}]
TOOL = {"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}
needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None, reason="needs llama-cpp-python"
)


def chat(doc: dict[str, Any], aliases: dict[str, str] | None = None) -> Any:
    return parse_chat({"messages": HI, **doc}, ["auto", "small", "large"], {}, 256, aliases)


def test_a_request_keeps_every_parameter_and_gains_no_limit() -> None:
    call = chat(
        {
            "max_completion_tokens": 30,
            "n": 3,
            "user": "u",
            "seed": 4,
            "tools": [TOOL],
            "parallel_tool_calls": False,
            "x_unknown": {"a": 1},
            "metadata": {"priority": "batch"},
        }
    )
    request = call.request
    assert request.max_tokens is None and request.limit == 30
    assert request.extra == {
        "max_completion_tokens": 30,
        "n": 3,
        "user": "u",
        "seed": 4,
        "tools": [TOOL],
        "parallel_tool_calls": False,
        "x_unknown": {"a": 1},
    }
    assert chat({}).request.limit is None


@pytest.mark.parametrize(
    ("doc", "param"),
    [
        ({"n": 0}, "n"),
        ({"n": 129}, "n"),
        ({"top_logprobs": 21}, "top_logprobs"),
        ({"max_completion_tokens": 0}, "max_completion_tokens"),
        ({"logprobs": "yes"}, "logprobs"),
        ({"tools": {"type": "function"}}, "tools"),
        ({"response_format": "json"}, "response_format"),
    ],
)
def test_passed_through_parameters_are_still_checked(doc: dict[str, Any], param: str) -> None:
    with pytest.raises(ApiError) as caught:
        chat(doc)
    assert caught.value.status == 400 and caught.value.param == param


def test_the_model_name_of_a_tier_names_the_tier() -> None:
    assert chat({"model": "gpt-x"}, {"gpt-x": "large"}).model == "large"
    with pytest.raises(ApiError, match="does not exist"):
        chat({"model": "gpt-y"}, {"gpt-x": "large"})


def test_answers_keep_the_tiers_choices_fields_and_usage_details() -> None:
    choices = [{"index": 0, "message": {"role": "assistant", "content": None}, "x": 1}]
    result = ChatResult(
        text="",
        finish_reason="tool_calls",
        prompt_tokens=3,
        completion_tokens=4,
        model="m",
        choices=choices,
        fields={"system_fingerprint": "fp", "usage": {"reasoning": 2, "prompt_tokens": 99}},
    )
    body = answer_body("chatcmpl-1", "m", result)
    assert body["choices"] == choices and body["system_fingerprint"] == "fp"
    assert body["usage"] == {
        "reasoning": 2,
        "prompt_tokens": 3,
        "completion_tokens": 4,
        "total_tokens": 7,
    }
    assert body["id"] == "chatcmpl-1"


def test_content_parts_are_joined_for_text_only_tiers() -> None:
    messages = [
        {"role": "system", "content": "s"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
    ]
    assert flatten(messages)[1] == {"role": "user", "content": "a\nb"}
    assert non_text_part(messages) is None
    image = {"type": "image_url", "image_url": {"url": "x"}}
    assert non_text_part([{"role": "user", "content": ["x", image]}]) == (
        "messages[0].content[0]",
        "None",
    )


@needs_llama
@pytest.mark.parametrize(
    ("extra", "param"),
    [
        ({"logit_bias": {"1": 2}}, "logit_bias"),
        ({"tools": [TOOL], "tool_choice": "sometimes"}, "tool_choice"),
        ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "tools"),
        (
            {"tools": [TOOL], "tool_choice": {"type": "function", "function": {"name": "g"}}},
            "tool_choice",
        ),
        ({"n": 9}, "n"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, "response_format"),
        ({"response_format": {"type": "xml"}}, "response_format"),
    ],
)
def test_a_local_tier_refuses_what_it_cannot_do(extra: dict[str, Any], param: str) -> None:
    from tierroute.backends.local_params import plan

    with pytest.raises(Unsupported) as caught:
        plan(ChatRequest(HI, extra=extra), "small", stream=False)
    assert caught.value.param == param and caught.value.status == 400
    assert not caught.value.retryable and "'small'" in str(caught.value)


@needs_llama
def test_a_local_tier_turns_schemas_and_forced_tools_into_grammars() -> None:
    from tierroute.backends.local_params import plan

    schema = {"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}
    fmt = {"type": "json_schema", "json_schema": {"name": "x", "schema": schema}}
    local = plan(ChatRequest(HI, extra={"response_format": fmt}), "small", stream=False)
    assert local.grammar is not None and "root" in local.grammar and local.tool is None
    local = plan(
        ChatRequest(HI, extra={"tools": [TOOL], "tool_choice": "required"}), "small", stream=True
    )
    assert local.tool == "f" and local.kwargs["tools"] == [TOOL] and local.grammar
    local = plan(ChatRequest(HI, extra={"tools": [TOOL], "tool_choice": "none"}), "s", stream=True)
    assert local.tool is None and local.grammar is None and "tools" not in local.kwargs
    with pytest.raises(Unsupported, match="only without stream"):
        plan(ChatRequest(HI, extra={"logprobs": True}), "small", stream=True)


def test_tool_choice_auto_first_asks_which_function_then_forces_it() -> None:
    from tierroute.backends.local_params import choice_step, plan, resolved

    tools = [TOOL, {"type": "function", "function": {"name": "g", "description": "Gets"}}]
    convo = [
        {"role": "system", "content": "Be brief."},
        *HI,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "g", "arguments": '{"x": 1}'}}
            ],
        },
        {"role": "tool", "tool_call_id": "c1", "content": "42"},
    ]
    for extra in ({"tools": tools}, {"tools": tools, "tool_choice": "auto"}):
        local = plan(ChatRequest(convo, extra=extra), "small", stream=True)
        assert local.choose == ("f", "g") and local.choose_none
        assert local.grammar is None and "tools" not in local.kwargs
        # an earlier call reads as the model's own words: templates drop tool_calls
        assert local.messages[2] == {
            "role": "assistant",
            "content": '{"name": "g", "arguments": {"x": 1}}',
        }
        messages, grammar, none = choice_step(local)
        assert grammar == 'root ::= "f" | "g" | "none"' and none == "none"
        assert messages[0]["content"].startswith("Be brief.\n\nFunctions:\n")
        assert '{"name": "g", "description": "Gets"}' in messages[0]["content"]
        assert messages[1:] == local.messages[1:]
    local = plan(ChatRequest(HI, extra={"tools": tools, "tool_choice": "required"}), "s", False)
    assert choice_step(local)[1] == 'root ::= "f" | "g"' and not local.choose_none
    request = ChatRequest(HI, extra={"tools": tools})
    assert resolved(request, "g", local).extra["tool_choice"] == {
        "type": "function",
        "function": {"name": "g"},
    }
    assert resolved(request, "none", local).extra["tool_choice"] == "none"
    named_none = [{"type": "function", "function": {"name": "none"}}, TOOL]
    local = plan(ChatRequest(HI, extra={"tools": named_none}), "s", False)
    assert choice_step(local)[1:] == ('root ::= "none" | "f" | "no function"', "no function")


def test_completions_and_embeddings_requests_are_checked() -> None:
    models, aliases = ["auto", "small", "large"], {"gpt-x": "large"}
    call = passthrough.parse(
        {"model": "gpt-x", "prompt": ["a", "b"]}, passthrough.COMPLETIONS, models, aliases, {}
    )
    assert call.model == "large" and call.request.messages[0]["content"] == "a\nb"
    for doc, path, param in (
        ({"model": "auto", "input": "x"}, passthrough.EMBEDDINGS, "model"),
        ({"prompt": "x", "stream": True}, passthrough.COMPLETIONS, "stream"),
        ({"prompt": [1, 2]}, passthrough.COMPLETIONS, "prompt"),
        ({"model": "large", "input": ""}, passthrough.EMBEDDINGS, "input"),
    ):
        with pytest.raises(ApiError) as caught:
            passthrough.parse(doc, path, models, aliases, {})
        assert caught.value.param == param
    body = {"id": "up", "model": "up-model", "x": 1, "metadata": {"priority": "batch"}}
    assert passthrough.body_for_tier(body) == {"id": "up", "model": "up-model", "x": 1}
    assert passthrough.answer(body, "ours", "m")["id"] == "ours"
    assert passthrough.usage({"usage": {"prompt_tokens": 2, "completion_tokens": "3"}}) == (2, 0)


def test_local_embedding_names_are_checked_and_requests_parsed() -> None:
    from tierroute.errors import ConfigError
    from tierroute.gateway import embeddings
    from tierroute.gateway.settings import parse_settings

    tiers = [
        {"name": "small", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "m"},
        {"name": "large", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "n"},
    ]
    assert parse_settings({"tiers": tiers}, "t").embedding_models == ("all-MiniLM-L6-v2",)
    off = parse_settings({"tiers": tiers, "gateway": {"embedding_models": []}}, "t")
    assert off.embedding_models == ()
    for clash in ("large", "n", "auto"):
        with pytest.raises(ConfigError, match=r"embedding_models.*names a tier"):
            parse_settings({"tiers": tiers, "gateway": {"embedding_models": [clash]}}, "t")
    call = embeddings.parse({"model": "e", "input": [1, 2], "encoding_format": "base64"}, "e")
    assert call.ids == [[1, 2]] and call.texts is None and call.base64
    call = embeddings.parse({"model": "e", "input": "a", "user": "u", "dimensions": 384}, "e")
    assert call.texts == ["a"] and not call.base64
    with pytest.raises(ApiError) as caught:
        embeddings.parse({"input": ["x"] * (embeddings.MAX_INPUTS + 1)}, "e")
    assert caught.value.param == "input"
    with pytest.raises(ApiError) as caught:
        embeddings.parse({"input": [[1] * 300] * 1500}, "e")  # 1500 x 256 tokens read
    assert caught.value.param == "input" and "300000" in caught.value.message
