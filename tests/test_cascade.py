"""The cascade against real components: SmolLM2 run by llama.cpp answers, the verifiers judge
its real answers, a real llama_cpp.server sends logprobs over HTTP, and a real
`tierroute serve` runs the cascade when its config opts in."""

from __future__ import annotations

import asyncio
import importlib.util
import json
import math
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.smol import APPLES, SERVER_DEPS, SYSTEM, needs_llama, new_smol, two_smol_tiers
from tierroute.backends.base import ChatRequest, ChatResult
from tierroute.cascade import (
    AgreementVerifier,
    AllOf,
    Cascade,
    CascadeConfig,
    LogprobVerifier,
    final_answer,
    logprob_statistic,
)
from tierroute.errors import ConfigError
from tierroute.gateway.settings import parse_settings


def run(coro: Any) -> Any:
    return asyncio.run(coro)


class Recorder:
    """A real backend's `complete` that keeps every request and answer."""

    def __init__(self, backend: Any) -> None:
        self.backend = backend
        self.requests: list[ChatRequest] = []
        self.results: list[ChatResult] = []

    async def __call__(self, request: ChatRequest) -> ChatResult:
        result: ChatResult = await self.backend.complete(request, 120)
        self.requests.append(request)
        self.results.append(result)
        return result


@pytest.fixture(scope="module")
def smol() -> Iterator[Any]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    backend = new_smol()
    backend.load()
    yield backend
    run(backend.aclose())


def fresh_answer(request: ChatRequest) -> ChatResult:
    """The answer of a model that has seen no prompt yet. llama.cpp reuses the cached
    prefix of the previous prompt and evaluates the rest token by token, which moves
    logprobs by up to ~0.15 against evaluating the prompt in one batch, so comparisons
    of logprobs start from the same (empty) cache."""

    async def once() -> ChatResult:
        backend = new_smol()
        try:
            result: ChatResult = await backend.complete(request, 120)
            return result
        finally:
            await backend.aclose()

    return run(once())


# ---------------------------------------------------------------- pure parts, by hand


def test_final_answer_normalises_numbers_and_text() -> None:
    cases = {
        "2 * 3 = 6\n5 + 6 = 11\nAnswer: 11": "11",
        "Answer: 1,234 apples": "1234",
        "The answer is 7. Check: 3 + 4 = 7, so 10 were wrong.": "7",
        "2 * 3 = 6, 5 + 6 = 11": "11",  # "6, 5" is a list, not a thousands group
        "so 12.0 in total": "12",
        "Answer: 2.5": "2.5",
        "It fell to -5 degrees": "-5",
        "#### 42": "42",
        "He answered 5 of them, 12 in all": "12",  # "answered" is not a marker
        "Answer: 12345678901234567890": "12345678901234567890",  # exact, not a float
        "Answer: 3.50": "3.5",
        "The capital is Paris.": "the capital is paris",
        "Paris!": "paris",
        "": None,
        "  \n ": None,
    }
    for text, expected in cases.items():
        assert final_answer(text) == expected, text


def test_logprob_statistic_by_hand() -> None:
    assert logprob_statistic([-0.1, -0.5, -1.2], "mean") == pytest.approx(-0.6)
    assert logprob_statistic([-0.1, -0.5, -1.2], "min") == -1.2
    with pytest.raises(ValueError):
        logprob_statistic([], "mean")


# ---------------------------------------------------------------- logprobs from llama.cpp


@needs_llama
def test_local_logprobs_match_llama_cpp_own_and_count_like_usage(smol: Any) -> None:
    import llama_cpp

    ours = fresh_answer(LogprobVerifier().prepare(APPLES))
    assert ours.token_logprobs is not None
    assert len(ours.token_logprobs) == ours.completion_tokens > 0
    assert all(lp <= 0 for lp in ours.token_logprobs)
    # llama-cpp-python's own logprobs need logits for every position (logits_all=True).
    ref = llama_cpp.Llama(
        model_path=str(smol.model_path), n_ctx=512, n_threads=1, logits_all=True, verbose=False
    )
    try:
        out = ref.create_chat_completion(
            messages=APPLES.messages, max_tokens=24, temperature=0.0, logprobs=True, top_logprobs=1
        )
    finally:
        ref.close()
    choice = out["choices"][0]
    assert choice["message"]["content"] == ours.text
    theirs = [float(t["logprob"]) for t in choice["logprobs"]["content"]]
    assert theirs[: len(ours.token_logprobs)] == pytest.approx(ours.token_logprobs, abs=1e-3)
    # Not asked for: not computed.
    assert run(smol.complete(APPLES, 120)).token_logprobs is None


@needs_llama
def test_remote_logprobs_are_parsed_from_a_real_openai_compatible_server(smol: Any) -> None:
    if any(importlib.util.find_spec(m) is None for m in ("aiohttp", *SERVER_DEPS)):
        pytest.skip("needs aiohttp and llama_cpp.server's dependencies")
    from tests.test_gateway import free_port
    from tierroute.backends.openai_http import OpenAIHTTPBackend

    asked_for = LogprobVerifier().prepare(APPLES)
    port = free_port()
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            [
                *(sys.executable, "-m", "llama_cpp.server", "--model", str(smol.model_path)),
                *("--port", str(port), "--n_ctx", "512", "--n_threads", "1"),
                *("--logits_all", "true"),
            ],
            stdout=subprocess.DEVNULL,
            stderr=log,
        )
        try:
            base = f"http://127.0.0.1:{port}/v1"
            deadline = time.monotonic() + 90
            while True:
                assert proc.poll() is None and time.monotonic() < deadline, "server did not start"
                try:
                    if httpx.get(f"{base}/models", timeout=1).status_code == 200:
                        break
                except httpx.HTTPError:
                    time.sleep(0.2)

            async def ask() -> tuple[ChatResult, ChatResult]:
                backend = OpenAIHTTPBackend("remote", base, model="smollm2")
                try:
                    # The server's default repeat penalty (1.1) would change the greedy answer.
                    asked = await backend.complete(
                        replace(asked_for, extra={**asked_for.extra, "repeat_penalty": 1.0}), 120
                    )
                    plain = await backend.complete(APPLES, 120)
                finally:
                    await backend.aclose()
                return asked, plain

            remote, plain = run(ask())
        finally:
            proc.kill()
            proc.wait(timeout=10)
    local = fresh_answer(asked_for)
    assert remote.text == local.text
    assert remote.token_logprobs is not None and local.token_logprobs is not None
    n = len(local.token_logprobs)
    assert remote.token_logprobs[:n] == pytest.approx(local.token_logprobs, abs=1e-3)
    assert plain.token_logprobs is None


# ---------------------------------------------------------------- verifiers on real answers


@needs_llama
def test_logprob_verifier_on_a_real_answer(smol: Any) -> None:
    small = Recorder(smol)
    for stat in ("mean", "min"):
        verifier = LogprobVerifier(stat)
        first = run(small(verifier.prepare(APPLES)))
        assert first.token_logprobs
        verdict = run(verifier.verify(APPLES, first, small, 0.5))
        value = logprob_statistic(first.token_logprobs, stat)
        assert verdict.confidence == pytest.approx(math.exp(value))
        assert 0 < verdict.confidence <= 1
        assert verdict.reason == f"{stat} token logprob {value:.2f}"
    assert len(small.results) == 2  # it never asks for more answers
    # An answer without logprobs (not asked for) cannot be trusted.
    bare = run(small(APPLES))
    verdict = run(LogprobVerifier().verify(APPLES, bare, small, 0.5))
    assert verdict.confidence == 0.0 and "no token logprobs" in verdict.reason


@needs_llama
def test_agreement_verifier_samples_real_answers_and_stops_when_settled(smol: Any) -> None:
    verifier = AgreementVerifier(samples=3, temperature=1.2)
    question = ChatRequest(
        messages=[
            {"role": "system", "content": SYSTEM},
            {
                "role": "user",
                "content": "A shop has 250 bottles, sells 37 and 58, then gets "
                "4 crates of 24. How many bottles now?",
            },
        ],
        max_tokens=24,
        temperature=0.0,
    )
    first = run(smol.complete(question, 120))
    mine = final_answer(first.text)
    assert mine is not None

    small = Recorder(smol)
    verdict = run(verifier.verify(question, first, small, 1.0))
    # The samples: sampled at the verifier's temperature, seeded 1, 2, ...
    assert [r.temperature for r in small.requests] == [1.2] * len(small.requests)
    assert [r.extra["seed"] for r in small.requests] == list(range(1, len(small.requests) + 1))
    agree = 1 + sum(final_answer(r.text) == mine for r in small.results)
    seen = 1 + len(small.results)
    if agree == seen:  # every answer agreed: all three were needed
        assert seen == 3 and verdict.confidence == 1.0
    else:  # the first disagreement settles a threshold of 1.0
        assert small.results and final_answer(small.results[-1].text) != mine
        assert verdict.confidence == pytest.approx((agree + 3 - seen) / 3)
        assert verdict.confidence < 1.0
    assert f"{agree} of {seen} answers agree on {mine!r}" in verdict.reason

    # Seeded samples: the same request gets the same verdict.
    again = Recorder(smol)
    assert run(verifier.verify(question, first, again, 1.0)) == verdict
    assert [r.text for r in again.results] == [r.text for r in small.results]
    # A threshold the first answer alone meets needs no samples.
    none = Recorder(smol)
    low = run(verifier.verify(question, first, none, 0.3))
    assert none.results == [] and low.confidence == pytest.approx(1 / 3)


# ---------------------------------------------------------------- the cascade


@needs_llama
def test_cascade_accepts_or_escalates_and_counts_every_call(smol: Any) -> None:
    small, large = Recorder(smol), Recorder(smol)
    accepted = run(Cascade(LogprobVerifier("mean"), 0.0).run(small, large, APPLES))
    assert not accepted.escalated and large.results == []
    assert accepted.answer == accepted.draft.result == small.results[0]
    assert accepted.draft.note.startswith("accepted: mean token logprob")

    small, large = Recorder(smol), Recorder(smol)
    escalated = run(Cascade(LogprobVerifier("mean"), 1.0).run(small, large, APPLES))
    assert escalated.escalated and escalated.answer is escalated.large is large.results[0]
    assert escalated.draft.note.startswith("escalated: mean token logprob")
    assert "< 1.00" in escalated.draft.note
    assert escalated.draft.completion_tokens == small.results[0].completion_tokens

    # Combined: unconfident logprobs end the check before any sample is drawn.
    small, large = Recorder(smol), Recorder(smol)
    both = AllOf([LogprobVerifier("mean"), AgreementVerifier(3, 0.7)])
    combined = run(Cascade(both, 1.0).run(small, large, APPLES))
    assert combined.escalated and len(small.results) == 1 and len(large.results) == 1
    assert small.requests[0].extra["logprobs"] is True


# ---------------------------------------------------------------- configuration


def test_bad_cascade_config_is_a_clear_error(tmp_path: Path) -> None:
    tiers = [
        {"name": "small", "kind": "local", "model": "smollm2-135m"},
        {"name": "large", "kind": "local", "model": "smollm2-135m"},
    ]
    cases = [
        ({"verifier": "vibes"}, "verifier must be one of logprob, agreement, logprob+agreement"),
        ({"threshold": 1.5}, "threshold is a confidence and must be within [0, 1], not 1.5"),
        ({"threshold": "high"}, "gateway.cascade.threshold' input should be a valid number"),
        ({"samples": 1, "verifier": "agreement"}, "samples must be at least 2"),
        ({"sample_temperature": 0}, "sample_temperature must be above 0"),
        ({"logprob_stat": "median"}, "logprob_stat must be one of mean, min"),
        ({"scope": "large"}, "scope must be one of small, all"),
        ({"enabled": "yes"}, "gateway.cascade.enabled' input should be a valid boolean"),
        ({"treshold": 0.5}, "unknown key 'gateway.cascade.treshold'; did you mean 'threshold'?"),
    ]
    for raw, fragment in cases:
        with pytest.raises(ConfigError) as err:
            parse_settings({"tiers": tiers, "gateway": {"cascade": raw}}, "my.yaml")
        assert str(err.value).startswith("my.yaml: ") and fragment in str(err.value)
        assert "gateway.cascade" in str(err.value)
    ok = parse_settings({"tiers": tiers, "gateway": {"cascade": {"enabled": True}}}, "my.yaml")
    assert ok.cascade == CascadeConfig(enabled=True)
    assert parse_settings({"tiers": tiers}, "my.yaml").cascade is None  # off by default

    # From the command line: one line, exit status 2, no traceback.
    bad = tmp_path / "bad.yaml"
    bad.write_text(
        "tiers:\n  - {name: a, kind: local, model: smollm2-135m}\n"
        "  - {name: b, kind: local, model: smollm2-135m}\n"
        "gateway:\n  cascade: {enabled: true, verifier: agreement, samples: 1}\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "tierroute.cli", "config", "check", str(bad)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "samples must be at least 2" in proc.stderr.strip().splitlines()[-1]


# ---------------------------------------------------------------- the gateway, opted in


@needs_llama
def test_gateway_cascade_escalates_keeps_streams_and_books_both_attempts(tmp_path: Path) -> None:
    from tests.test_gateway import start, write_yaml
    from tierroute.ledger import Ledger, default_path

    # Two real SmolLM2 tiers; a threshold of 1.0 escalates every answer it checks. The rules
    # router sends the greeting to the small tier and code (a rule floor) to the large one.
    config = write_yaml(
        tmp_path / "gateway.yaml",
        two_smol_tiers("{enabled: true, verifier: logprob, threshold: 1.0}"),
    )
    server = start(config, tmp_path / "data")
    hello = [{"role": "user", "content": "Hi there! What is the capital of France?"}]

    def chat(messages: Any = hello, **extra: Any) -> httpx.Response:
        body = {"model": "auto", "messages": messages, "max_tokens": 12, "temperature": 0}
        headers = extra.pop("headers", {})
        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={**body, **extra},
            headers=headers,
            timeout=120,
        )
        assert r.status_code == 200, r.text
        return r

    def streamed(r: httpx.Response) -> str:
        lines = [line[6:] for line in r.text.splitlines() if line.startswith("data: ")]
        assert lines[-1] == "[DONE]"
        chunks = [json.loads(line) for line in lines[:-1]]
        return "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)

    try:
        up = chat()
        assert up.headers["x-tierroute-tier"] == "large"
        assert up.headers["x-tierroute-cascade"].startswith("escalated: mean token logprob")
        assert up.headers["x-tierroute-fallback"] == "small,large"
        up_stream = chat(stream=True)
        assert up_stream.headers["x-tierroute-tier"] == "large"
        assert up_stream.headers["x-tierroute-cascade"].startswith("escalated:")
        assert streamed(up_stream) == up.json()["choices"][0]["message"]["content"]

        # A cost cap the large tier breaks: the small answer is kept, whole or streamed.
        cap = {"X-Tierroute-Max-Cost-Usd": "0.00001"}
        kept = chat(headers=cap)
        assert kept.headers["x-tierroute-tier"] == "small"
        assert (
            "kept: escalating breaks the budget (large est $"
            in (kept.headers["x-tierroute-cascade"])
        )
        kept_stream = chat(stream=True, headers=cap)
        assert kept_stream.headers["x-tierroute-tier"] == "small"
        assert streamed(kept_stream) == kept.json()["choices"][0]["message"]["content"]

        # Not through the cascade: a named tier, and (scope small) a request routed large.
        forced = chat(model="small")
        assert "x-tierroute-cascade" not in forced.headers
        code = [{"role": "user", "content": "Write a Python function that reverses a list."}]
        routed_large = chat(messages=code)
        assert routed_large.headers["x-tierroute-tier"] == "large"
        assert "x-tierroute-cascade" not in routed_large.headers
    finally:
        server.stop()

    with Ledger(default_path(server.data_dir)) as ledger:
        rows = {row.id: row for row in ledger.rows()}
    small_price, large_price = (0.01, 0.02), (1.0, 2.0)
    for r in (up, up_stream):
        row = rows[r.headers["x-tierroute-request-id"]]
        assert row.tier == "large" and row.fallback_chain == ("small", "large")
        assert row.status == 200 and row.stream == (r is up_stream)
    # Both tiers run the same model on the same prompt: the ledger holds both attempts.
    row = rows[up.headers["x-tierroute-request-id"]]
    usage = up.json()["usage"]
    p, c = usage["prompt_tokens"], usage["completion_tokens"]
    small_c = row.completion_tokens - c
    assert row.prompt_tokens == 2 * p and small_c > 0
    cost = p * small_price[0] + small_c * small_price[1] + p * large_price[0] + c * large_price[1]
    assert row.cost_usd == pytest.approx(cost / 1e6)
    assert float(up.headers["x-tierroute-cost-usd"]) == pytest.approx(cost / 1e6, abs=1e-8)
    for r in (kept, kept_stream):
        row = rows[r.headers["x-tierroute-request-id"]]
        assert row.tier == "small" and row.fallback_chain == ("small",)
        assert row.prompt_tokens == p and row.cost_usd < cost / 1e6
