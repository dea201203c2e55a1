"""Collaboration strategies (tierroute.collab): the answer normaliser and the review parser
by hand; each strategy through the gateway's engine with backends this test defines (real
deterministic models of arithmetic, not stand-ins for tierroute's code), with the ledger's
row checked; and best-of-n and cross-model agreement on real SmolLM2 answers."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from tests.smol import APPLES, needs_llama, new_smol, server_missing, two_smol_tiers
from tierroute.backends.base import BackendError, ChatRequest, ChatResult, StreamDelta
from tierroute.cascade import Cascade, CascadeConfig
from tierroute.collab import (
    JUDGE_SYSTEM,
    BestOfNVerifier,
    Candidate,
    CrossModelVerifier,
    JudgeScorer,
    LogprobScorer,
    ReviewVerifier,
    answer_key,
    clip,
    code_block,
    judge_request,
    parse_pick,
    parse_review,
    review_request,
)
from tierroute.errors import ConfigError
from tierroute.gateway.engine import Engine, Hints, Outcome, new_request_id
from tierroute.gateway.settings import parse_settings
from tierroute.ledger import Ledger
from tierroute.routers import make_router

# ---------------------------------------------------------------- by hand


def test_answer_key_tags_numbers_choices_code_and_text() -> None:
    assert answer_key("3 + 4 = 7\nAnswer: 7") == "number:7"
    assert answer_key("The total is 1,234.0 apples.") == "number:1234"
    assert answer_key("so the answer is 7") == answer_key("Answer: 7.00")
    assert answer_key("Answer: 7") != answer_key("Answer: 8")
    assert answer_key("I think the answer is (b).") == "choice:B"
    assert answer_key("Option C") == answer_key("answer: c")
    assert answer_key("Answer: B, because 2 > 1") == "choice:B"
    assert answer_key("Paris.") == "text:paris"
    assert answer_key("  \n ") is None
    one = "```python\ndef f(x):\n    # double it\n    return 2 * x\n```"
    two = "Here:\n```\ndef f(x):\n        return 2 * x   \n```\nDone."
    assert answer_key(one) == answer_key(two) == "code:def f(x): return 2 * x"
    assert answer_key("```python\ndef f(x):\n    return x + x\n```") != answer_key(one)
    # A probe compares behaviour: two different programs that do the same thing agree.
    runs = {"return 2 * x": "2 4", "return x + x": "2 4", "return x": "1 2"}

    def probe(code: str) -> str | None:
        return next((out for body, out in runs.items() if body in code), None)

    same = "```python\ndef f(x):\n    return x + x\n```"
    assert answer_key(one, probe) == answer_key(same, probe) == "code:2 4"
    assert answer_key("```python\ndef f(x):\n    return x\n```", probe) == "code:1 2"
    # A probe that cannot tell falls back to the normalised source.
    assert answer_key("```python\nprint()\n```", probe) == "code:print()"
    assert code_block("```py\nx = 1\n") == "x = 1\n"  # cut at max_tokens: still the code


def test_parse_review_keep_correction_or_nothing() -> None:
    for keep in ("KEEP", "keep", " Keep.", "KEEP\n", "**KEEP**", "Keep\nThe draft is right."):
        review = parse_review(keep)
        assert review is not None and review.keep and review.correction is None, keep
    fix = parse_review("FIX: Answer: 12")
    assert fix is not None and not fix.keep and fix.correction == "Answer: 12"
    fix = parse_review("Corrected answer - 3 * 4 = 12\nAnswer: 12")
    assert fix is not None and fix.correction == "3 * 4 = 12\nAnswer: 12"
    plain = parse_review("3 * 4 = 12\nAnswer: 12")
    assert plain is not None and not plain.keep and plain.correction == "3 * 4 = 12\nAnswer: 12"
    # "Keeping", or keep in a sentence, is not the verdict KEEP.
    for other in ("Keeping 3 and adding 4 gives 7. Answer: 7", "keep it? no: Answer: 5"):
        review = parse_review(other)
        assert review is not None and not review.keep, other
    assert parse_review("") is None and parse_review(" \n") is None
    assert parse_review("FIX:") == parse_review("FIX:")  # a marker alone corrects to nothing
    marker_only = parse_review("FIX:")
    assert marker_only is not None and marker_only.correction is None


def test_review_request_shows_the_question_and_the_draft_bounded() -> None:
    asked = ChatRequest(
        messages=[
            {"role": "system", "content": "End with 'Answer: <number>'."},
            {"role": "user", "content": "What is 2 + 2?"},
        ],
        max_tokens=300,
        extra={"logprobs": True, "top_logprobs": 1, "seed": 3},
    )
    req = review_request(asked, "2 + 2 = 5\nAnswer: 5", 16)
    assert req.max_tokens == 16 and req.temperature == 0.0
    assert "logprobs" not in req.extra and req.extra["seed"] == 3
    system, user = req.messages
    assert system["role"] == "system" and "End with 'Answer: <number>'." in system["content"]
    assert "KEEP" in system["content"]
    assert "What is 2 + 2?" in user["content"] and "Answer: 5" in user["content"]


def test_parse_pick_reads_a_judge_reply() -> None:
    assert parse_pick("2", 3) == 1
    assert parse_pick(" 3.\n", 3) == 2
    assert parse_pick("Candidate 1", 3) == 0
    assert parse_pick("The correct one is candidate #2.", 3) == 1
    assert parse_pick("Answer: (3)", 3) == 2
    # A candidate's own answer (42) is no candidate number; the marked number wins.
    assert parse_pick("42, so candidate 2", 3) == 1
    assert parse_pick("The answer is 42", 3) is None
    assert parse_pick("4", 3) is None and parse_pick("0", 3) is None
    assert parse_pick("2.5", 3) is None  # a decimal is not a pick
    assert parse_pick("The second one.", 3) == 1
    assert parse_pick("the fourth", 3) is None
    assert parse_pick("", 2) is None and parse_pick("none of them", 2) is None


def test_judge_request_is_bounded_whatever_the_candidates_say() -> None:
    assert clip("short", 100) == "short"
    clipped = clip("a" * 500 + "Answer: 7", 100)
    assert len(clipped) <= 100 and clipped.startswith("aaa") and clipped.endswith("Answer: 7")
    asked = ChatRequest(
        messages=[
            {"role": "system", "content": "End with 'Answer: <number>'."},
            {"role": "user", "content": "What is 2 + 2? " * 400},
        ],
        max_tokens=300,
        extra={"seed": 3},
    )
    answers = ["x" * 10_000 + "\nAnswer: 4", "Answer: 5", "y" * 3000]
    req = judge_request(asked, answers, 6, 200)
    assert req.max_tokens == 6 and req.temperature == 0.0
    assert req.extra == {"seed": 3, "logprobs": True, "top_logprobs": 1}
    system, user = req.messages
    assert "number of the correct candidate" in system["content"]
    content = str(user["content"])
    # The question within 2 x 200 characters, each answer within 200, plus the framing.
    assert len(content) <= 2 * 200 + 3 * 200 + 200
    assert "Candidate 1:\n" in content and "Candidate 3:\n" in content
    assert "Answer: 4" in content and "Answer: 5" in content  # the ends are kept
    assert content.endswith("Which candidate is correct? Reply with its number only.")


def test_collaboration_config_is_checked(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="partner_tier"):
        CascadeConfig(enabled=True, verifier="cross")
    with pytest.raises(ConfigError, match="review_max_tokens"):
        CascadeConfig(verifier="review", review_max_tokens=0)
    with pytest.raises(ConfigError, match="verifier must be one of"):
        CascadeConfig(verifier="vote")

    def doc(cascade: dict[str, Any]) -> dict[str, Any]:
        return {
            "tiers": [tier("small"), tier("mate"), tier("large")],
            "policy": {"thresholds": [0.3, 0.6]},
            "gateway": {"cascade": {"enabled": True, **cascade}},
        }

    with pytest.raises(ConfigError, match="partner_tier 'large' must name a tier between"):
        parse_settings(doc({"verifier": "cross", "partner_tier": "large"}), "t.yaml")
    with pytest.raises(ConfigError, match="reviewer_tier 'small' must name a tier larger"):
        parse_settings(doc({"verifier": "review", "reviewer_tier": "small"}), "t.yaml")
    with pytest.raises(ConfigError, match="review_max_token"):  # unknown key: refused
        parse_settings(doc({"verifier": "review", "review_max_token": 5}), "t.yaml")
    settings = parse_settings(doc({"verifier": "review"}), "t.yaml")
    verifier = Cascade.from_config(settings.cascade, ["small", "mate", "large"]).verifier
    assert isinstance(verifier, ReviewVerifier) and verifier.reviewer == "large"

    # best_of_n's scorer and the judge's bounds.
    with pytest.raises(ConfigError, match="scorer must be one of logprob, judge"):
        CascadeConfig(verifier="best_of_n", scorer="vote")
    for key, bad in (("judge_max_tokens", 0), ("judge_max_tokens", 65), ("judge_max_chars", 63)):
        with pytest.raises(ConfigError, match=f"{key} must be a whole number in"):
            CascadeConfig(verifier="best_of_n", scorer="judge", **{key: bad})
    with pytest.raises(ConfigError, match="samples must be at most 16"):
        CascadeConfig(verifier="best_of_n", samples=17)
    with pytest.raises(ConfigError, match="judge_tier 'huge' must name one of the tiers"):
        parse_settings(doc({"verifier": "best_of_n", "judge_tier": "huge"}), "t.yaml")
    judged = doc({"verifier": "best_of_n", "scorer": "judge", "judge_max_chars": 300})
    settings = parse_settings(judged, "t.yaml")
    verifier = Cascade.from_config(settings.cascade, ["small", "mate", "large"]).verifier
    assert isinstance(verifier, BestOfNVerifier) and isinstance(verifier.scorer, JudgeScorer)
    assert verifier.scorer.tier is None and verifier.scorer.max_chars == 300
    settings = parse_settings(doc({"verifier": "best_of_n"}), "t.yaml")
    verifier = Cascade.from_config(settings.cascade, ["small", "mate", "large"]).verifier
    assert isinstance(verifier, BestOfNVerifier) and isinstance(verifier.scorer, LogprobScorer)


# ---------------------------------------------------------------- deterministic backends

SUM = re.compile(r"(\d+) \+ (\d+)")
PROPOSED = re.compile(r"Proposed answer:\n.*?Answer: (-?\d+)", re.DOTALL)
CANDIDATE = re.compile(r"Candidate (\d+):\n.*?Answer: (-?\d+)", re.DOTALL)


class Adder:
    """A model of sums: answers "a + b" as a + b + `error`; a sampled answer (temperature
    > 0) is off by its seed. Token logprobs, when asked, are -0.1 a token for a right sum
    and -1.5 for a wrong one. As a reviewer it checks the proposed answer's sum; as a judge
    it names the first candidate with the right sum ("none" when none has it)."""

    def __init__(self, name: str, error: int = 0, verbose_review: bool = False) -> None:
        self.name = name
        self.error = error
        self.verbose_review = verbose_review
        self.requests: list[ChatRequest] = []

    def _answer(self, request: ChatRequest) -> tuple[str, bool]:
        text = str(request.messages[-1]["content"])
        match = SUM.search(text)
        assert match is not None, text
        right = int(match.group(1)) + int(match.group(2))
        if "Candidate 1:" in text:  # a judge
            picks = [k for k, said in CANDIDATE.findall(text) if int(said) == right]
            return (picks[0], True) if picks else ("none", False)
        proposed = PROPOSED.search(text)
        if proposed is not None:  # a review
            if int(proposed.group(1)) == right:
                return "KEEP", True
            if self.verbose_review:
                return f"Let me check this carefully. {match.group(0)} is {right}. " * 5, True
            return f"FIX: Answer: {right}", True
        off = self.error
        if request.temperature:
            off += int(request.extra.get("seed", 0))
        return f"{match.group(0)} = {right + off}\nAnswer: {right + off}", off == 0

    async def complete(self, request: ChatRequest, timeout: float) -> ChatResult:
        self.requests.append(request)
        text, right = self._answer(request)
        words = text.split()
        limit = request.max_tokens or 256
        cut = len(words) > limit
        words = words[:limit]
        logprobs = None
        if request.extra.get("logprobs"):
            logprobs = tuple([-0.1 if right else -1.5] * len(words))
        return ChatResult(
            text=" ".join(words) if cut else text,
            finish_reason="length" if cut else "stop",
            prompt_tokens=len(str(request.messages).split()),
            completion_tokens=len(words),
            model=self.name,
            token_logprobs=logprobs,
        )

    async def stream(self, request: ChatRequest, timeout: float) -> AsyncIterator[StreamDelta]:
        result = await self.complete(request, timeout)
        yield StreamDelta(text=result.text)
        yield StreamDelta(
            text="",
            finish_reason=result.finish_reason,
            prompt_tokens=result.prompt_tokens,
            completion_tokens=result.completion_tokens,
        )


def tier(name: str) -> dict[str, Any]:
    price = {"small": 1.0, "mate": 2.0, "large": 100.0}[name]
    return {
        "name": name,
        "kind": "openai",
        "base_url": "http://127.0.0.1:9/v1",  # replaced by the test's backends
        "model": name,
        "input_price_per_m": price,
        "output_price_per_m": 2 * price,
    }


QUESTION = [{"role": "user", "content": "What is 17 + 25? End with 'Answer: <number>'."}]


def answer(
    tmp_path: Path, cascade: dict[str, Any], backends: dict[str, Any]
) -> tuple[ChatResult, Outcome, Any]:
    """One request through the engine's cascade (scope all), booked in a real ledger."""
    doc = {
        "tiers": [tier("small"), tier("mate"), tier("large")],
        "policy": {"thresholds": [0.3, 0.6]},
        "gateway": {"retries": 0, "cascade": {"enabled": True, "scope": "all", **cascade}},
    }
    settings = parse_settings(doc, "test")
    ledger = Ledger(tmp_path / "ledger.db")
    engine = Engine(settings, make_router("rules"), backends, ledger)
    try:

        async def go() -> tuple[ChatResult, Outcome]:
            request = ChatRequest(messages=QUESTION, max_tokens=64, temperature=0.0)
            routed = await engine.route(QUESTION, Hints(), 64)
            assert engine.cascades(routed, forced=False)
            outcome = Outcome(new_request_id(), routed)
            result = await engine.complete_cascade(outcome, request, Hints())
            engine.record(
                outcome,
                status=200,
                hints=Hints(),
                api_key_id=None,
                latency_ms=1.0,
                prompt_tokens=result.prompt_tokens,
                completion_tokens=result.completion_tokens,
            )
            return result, outcome

        result, outcome = asyncio.run(go())
    finally:
        engine.close()
        ledger.close()
    with Ledger(tmp_path / "ledger.db") as reopened:
        row = reopened.get(outcome.request_id)
    assert row is not None
    return result, outcome, row


def cost(*calls: tuple[str, int, int]) -> float:
    prices = {"small": 1.0, "mate": 2.0, "large": 100.0}
    return sum(prices[t] * (p + 2 * c) for t, p, c in calls) / 1e6


def test_cross_model_agreement_keeps_or_escalates_past_the_partner(tmp_path: Path) -> None:
    small, mate, large = Adder("small"), Adder("mate"), Adder("large")
    backends = {"small": small, "mate": mate, "large": large}
    cross = {"verifier": "cross", "partner_tier": "mate"}
    result, outcome, row = answer(tmp_path / "a", cross, backends)
    assert "Answer: 42" in result.text and outcome.tier == "small"
    assert outcome.cascade is not None
    assert outcome.cascade.startswith("accepted: cross: mate agrees on 'number:42'")
    assert "; cascade accepted: cross: mate agrees" in row.reason
    assert not large.requests and len(mate.requests) == 1
    assert row.cost_usd == pytest.approx(cost(*[("small", *usage(small)), ("mate", *usage(mate))]))

    # The partner says otherwise: escalate to the large tier, never to the partner.
    mate.error = 1
    result, outcome, row = answer(tmp_path / "b", cross, backends)
    assert outcome.tier == "large" and outcome.tried == ["small", "large"]
    assert outcome.cascade is not None and "mate says 'number:43', not 'number:42'" in (
        outcome.cascade
    )
    assert row.tier == "large" and row.fallback_chain == ("small", "large")
    assert row.cost_usd == pytest.approx(
        cost(("small", *usage(small)), ("mate", *usage(mate)), ("large", *usage(large)))
    )


def test_logprob_or_cross_asks_the_partner_only_when_the_logprobs_are_unsure(
    tmp_path: Path,
) -> None:
    small, mate, large = Adder("small"), Adder("mate"), Adder("large")
    backends = {"small": small, "mate": mate, "large": large}
    either = {"verifier": "logprob|cross", "partner_tier": "mate", "threshold": 0.5}
    # A right small answer (logprob -0.1 a token): kept on its logprobs, no partner call.
    result, outcome, row = answer(tmp_path / "a", either, backends)
    assert outcome.tier == "small" and not mate.requests and not large.requests
    assert outcome.cascade is not None and outcome.cascade.startswith(
        "accepted: mean token logprob -0.10"
    )
    # A wrong one (-1.5 a token, confidence 0.22): the partner is asked; it agrees on the
    # same wrong sum, so the answer stands (what agreement cannot catch) ...
    small.error = mate.error = 1
    result, outcome, row = answer(tmp_path / "b", either, backends)
    assert outcome.tier == "small" and len(mate.requests) == 1 and not large.requests
    assert outcome.cascade is not None and "; cross: mate agrees on 'number:43'" in outcome.cascade
    assert "(confidence 1.00 >= 0.50)" in outcome.cascade
    # ... and when it disagrees, the request escalates, past the partner, to large.
    mate.error = 0
    result, outcome, row = answer(tmp_path / "c", either, backends)
    assert outcome.tier == "large" and outcome.tried == ["small", "large"]
    assert "Answer: 42" in result.text and len(mate.requests) == 2
    assert row.cost_usd == pytest.approx(
        cost(("small", *usage(small)), ("mate", *usage(mate)), ("large", *usage(large)))
    )


class Down(Adder):
    """A tier whose every call fails as an unreachable upstream does."""

    async def complete(self, request: ChatRequest, timeout: float) -> ChatResult:
        self.requests.append(request)
        raise BackendError(f"{self.name}: connection refused", retryable=True)


def test_a_failing_helper_escalates_and_the_draft_survives(tmp_path: Path) -> None:
    small, large = Adder("small"), Adder("large")
    backends = {"small": small, "mate": Down("mate"), "large": large}
    result, outcome, _ = answer(
        tmp_path / "a", {"verifier": "cross", "partner_tier": "mate"}, backends
    )
    assert outcome.cascade is not None
    assert outcome.cascade.startswith("escalated: cross: mate failed (mate: connection refused)")
    assert outcome.tier == "large" and len(large.requests) == 1
    # The reviewer (the largest tier) is down too: nothing larger answers, the draft stands.
    backends["large"] = Down("large")
    result, outcome, _ = answer(tmp_path / "b", {"verifier": "review"}, backends)
    assert outcome.tier == "small" and result.text.endswith("Answer: 42")
    assert outcome.cascade is not None and "review: large failed" in outcome.cascade
    assert "kept: no larger tier answered" in outcome.cascade


def usage(backend: Adder) -> tuple[int, int]:
    """The prompt and completion tokens of the backend's last request, recomputed."""
    return usage_of(backend, backend.requests[-1])


def usage_of(backend: Adder, request: ChatRequest) -> tuple[int, int]:
    text, _ = backend._answer(request)
    return len(str(request.messages).split()), min(len(text.split()), request.max_tokens or 256)


def test_review_keeps_a_right_draft_and_returns_a_correction(tmp_path: Path) -> None:
    small, large = Adder("small"), Adder("large")
    backends = {"small": small, "mate": Adder("mate"), "large": large}
    review = {"verifier": "review", "review_max_tokens": 8}
    result, outcome, row = answer(tmp_path / "a", review, backends)
    assert outcome.tier == "small" and "Answer: 42" in result.text
    assert outcome.cascade is not None
    assert outcome.cascade.startswith("accepted: review: large keeps the draft")
    (reviewed,) = large.requests
    assert reviewed.max_tokens == 8
    assert "Proposed answer:\n17 + 25 = 42" in reviewed.messages[-1]["content"]
    # The reviewer read the draft (input) and said one word (output).
    assert row.cost_usd == pytest.approx(cost(("small", *usage(small)), ("large", *usage(large))))
    assert usage(large)[1] == 1

    small.error = 3
    large.requests.clear()
    result, outcome, row = answer(tmp_path / "b", review, backends)
    assert outcome.tier == "large" and result.text == "FIX: Answer: 42"
    assert outcome.cascade is not None and "review: large corrected the draft" in outcome.cascade
    assert len(large.requests) == 1  # the correction is the answer: no second large call
    assert row.tier == "large" and row.completion_tokens == usage(small)[1] + 3

    # A correction cut at max_tokens is not trusted: the request escalates as any other,
    # to the next tier of the routed chain (here the middle one).
    large.verbose_review = True
    large.requests.clear()
    result, outcome, _ = answer(tmp_path / "c", review, backends)
    assert outcome.cascade is not None and "correction was cut at max_tokens" in outcome.cascade
    assert outcome.tier == "mate" and result.text.endswith("Answer: 42")
    assert [r.max_tokens for r in large.requests] == [8]


def test_best_of_n_returns_the_most_likely_answer(tmp_path: Path) -> None:
    # The greedy answer is off by 2; samples with seeds 1 and 2 are off by 2 - 1 = 1 and
    # 2 - 2 = 0 (see Adder): the right one has the best logprobs and is returned.
    small = Adder("small", error=-2)
    backends = {"small": small, "mate": Adder("mate"), "large": Adder("large")}
    best = {"verifier": "best_of_n", "samples": 3, "threshold": 0.8}
    result, outcome, row = answer(tmp_path / "a", best, backends)
    assert outcome.tier == "small" and result.text.endswith("Answer: 42")
    assert outcome.cascade is not None and "best_of_n: sample 2 of 3" in outcome.cascade
    assert [r.extra.get("seed") for r in small.requests] == [None, 1, 2]
    assert all(r.extra.get("logprobs") for r in small.requests)
    # Three small calls in the books, the returned one's usage in the response.
    assert row.cost_usd == pytest.approx(3 * cost(("small", *usage(small))))

    # All three are wrong, so the best confidence exp(-1.5) < 0.8: escalate (the middle
    # tier is next; a partner tier would be skipped, as for cross).
    small.error = 5
    result, outcome, _ = answer(tmp_path / "b", best, backends)
    assert outcome.tier == "mate" and result.text.endswith("Answer: 42")
    assert outcome.cascade is not None and "(confidence 0.22 < 0.80)" in outcome.cascade
    # With a partner its answer is a candidate too: here the only right one, returned.
    result, outcome, row = answer(tmp_path / "c", {**best, "partner_tier": "mate"}, backends)
    assert outcome.tier == "mate" and result.text.endswith("Answer: 42")
    assert outcome.cascade is not None and "best_of_n: mate of 4" in outcome.cascade
    assert row.tier == "mate" and row.fallback_chain == ("small",)


def test_best_of_n_by_a_judge_returns_its_pick_and_books_the_judge(tmp_path: Path) -> None:
    # Greedy off by 2, samples off by 1 and 0 (see Adder): three distinct answers; the
    # judge (the smallest tier by default) names the third, the right one.
    small = Adder("small", error=-2)
    backends = {"small": small, "mate": Adder("mate"), "large": Adder("large")}
    judged = {"verifier": "best_of_n", "scorer": "judge", "threshold": 0.8}
    result, outcome, row = answer(tmp_path / "a", judged, backends)
    assert outcome.tier == "small" and result.text.endswith("Answer: 42")
    assert outcome.cascade is not None
    assert "best_of_n (judge): judge picks sample 2 of 3 distinct (of 3)" in outcome.cascade
    judge = small.requests[-1]
    assert len(small.requests) == 4 and judge.max_tokens == 8 and judge.temperature == 0.0
    assert "Candidate 3:" in str(judge.messages[-1]["content"])
    # The books hold the three candidates and the judge's call.
    spent = [usage_of(small, r) for r in small.requests]
    assert row.prompt_tokens == sum(p for p, _ in spent)
    assert row.cost_usd == pytest.approx(sum(cost(("small", *u)) for u in spent))

    # A judge on the large tier: its call is booked at the large tier's price.
    small.requests.clear()
    large = backends["large"]
    result, outcome, row = answer(tmp_path / "b", {**judged, "judge_tier": "large"}, backends)
    assert outcome.tier == "small" and result.text.endswith("Answer: 42")
    assert len(small.requests) == 3 and len(large.requests) == 1
    assert row.cost_usd == pytest.approx(
        sum(cost(("small", *usage_of(small, r))) for r in small.requests)
        + cost(("large", *usage(large)))
    )

    # No right candidate: the judge names none, so the first answer has confidence 0 and
    # the request escalates (past the small tier to the next one).
    small.error = 5
    result, outcome, _ = answer(tmp_path / "c", judged, backends)
    assert outcome.tier == "mate" and result.text.endswith("Answer: 42")
    assert outcome.cascade is not None and "the judge's reply 'none' names none of 3" in (
        outcome.cascade
    )


# ---------------------------------------------------------------- real answers


@needs_llama
def test_best_of_n_and_cross_on_real_small_model_answers() -> None:
    smol = new_smol()
    calls: list[tuple[str | None, ChatRequest, ChatResult]] = []

    async def ask(request: ChatRequest, tier: str | None = None) -> ChatResult:
        result: ChatResult = await smol.complete(request, 120)
        calls.append((tier, request, result))
        return result

    async def go() -> tuple[Any, Any]:
        try:
            best = await Cascade(BestOfNVerifier(3, 0.7), 0.0).draft(ask, APPLES)
            cross = await Cascade(CrossModelVerifier("mate"), 0.5).draft(ask, APPLES)
            return best, cross
        finally:
            await smol.aclose()

    best, cross = asyncio.run(go())
    # Best-of-3: three real answers with logprobs, the returned one has the best mean.
    assert len(best.calls) == 3 and all(c.token_logprobs for c in best.calls)
    means = [sum(c.token_logprobs) / len(c.token_logprobs) for c in best.calls]
    assert best.result is best.calls[means.index(max(means))]
    assert best.verdict.confidence == pytest.approx(2.718281828 ** max(means), rel=1e-6)
    # Cross with the same greedy model as its partner: same answer, so they agree.
    assert cross.tiers == (None, "mate") and cross.accepted
    assert cross.calls[0].text == cross.calls[1].text


def said(text: str) -> ChatResult:
    return ChatResult(text, "stop", 30, len(text.split()), "hand")


@needs_llama
def test_a_real_small_judge_picks_among_distinct_answers_within_bounds() -> None:
    smol = new_smol()
    calls: list[tuple[ChatRequest, ChatResult]] = []

    async def ask(request: ChatRequest, tier: str | None = None) -> ChatResult:
        assert tier is None  # the smallest tier judges by default
        result: ChatResult = await smol.complete(request, 120)
        calls.append((request, result))
        return result

    # Two distinct answers (the first and the third say the same): two candidates shown.
    seven, twelve = said("3 + 4 = 7\nAnswer: 7"), said("3 * 4 = 12\nAnswer: 12")
    again = said("Tom has 3 + 4 = 7 apples. Answer: 7")
    candidates = [Candidate(seven, "small"), Candidate(twelve, "sample 1"), Candidate(again, "s2")]
    scorer = JudgeScorer(max_tokens=4, max_chars=200)

    async def go() -> tuple[Any, Any]:
        try:
            picked = await scorer.pick(APPLES, candidates, ask)
            agreed = await scorer.pick(APPLES, [candidates[0], candidates[2]], ask)
            return picked, agreed
        finally:
            await smol.aclose()

    pick, agreed = asyncio.run(go())
    assert len(calls) == 1  # none for the second pick: both answers agree on 7
    assert agreed.index == 0 and agreed.confidence == 1.0 and "agree on 'number:7'" in agreed.reason
    request, reply = calls[0]
    content = str(request.messages[-1]["content"])
    assert "Candidate 2:" in content and "Candidate 3:" not in content
    assert len(content) <= 2 * 200 + 2 * 200 + 200
    assert reply.completion_tokens <= 4 and reply.token_logprobs
    k = parse_pick(reply.text, 2)
    if k is None:  # a 135M judge may say anything: then the first answer, escalating
        assert pick.index is None and pick.confidence == 0.0
        assert "names none of 2" in pick.reason
    else:
        assert pick.index == [0, 1][k]
        mean = sum(reply.token_logprobs) / len(reply.token_logprobs)
        assert pick.confidence == pytest.approx(2.718281828**mean, rel=1e-6)
        assert f"judge picks {candidates[pick.index].who} of 2 distinct (of 3)" in pick.reason


@needs_llama
def test_best_of_n_judged_by_the_real_small_model_returns_a_candidate() -> None:
    smol = new_smol()
    requests: list[ChatRequest] = []

    async def ask(request: ChatRequest, tier: str | None = None) -> ChatResult:
        requests.append(request)
        result: ChatResult = await smol.complete(request, 120)
        return result

    async def go() -> Any:
        try:
            verifier = BestOfNVerifier(3, 0.7, scorer=JudgeScorer())
            return await Cascade(verifier, 0.0).draft(ask, APPLES)
        finally:
            await smol.aclose()

    draft = asyncio.run(go())
    # Three candidates, then a judge call only when they differ; the answer is a candidate.
    assert draft.chosen in (0, 1, 2) and draft.result is draft.calls[draft.chosen]
    keys = {answer_key(c.text) for c in draft.calls[:3]}
    assert len(draft.calls) == (3 if len(keys) == 1 else 4)
    if len(draft.calls) == 4:
        assert requests[3].messages[0]["content"] == JUDGE_SYSTEM
    assert draft.verdict.reason.startswith("best_of_n (judge): ")
    assert 0.0 <= draft.verdict.confidence <= 1.0


def test_gateway_serves_a_review_cascade_with_headers_and_ledger(tmp_path: Path) -> None:
    """`tierroute serve` with real SmolLM2 tiers and verifier review: the header and the
    ledger row say the reviewer decided, and the row books both tiers' calls."""
    from tests.test_gateway import start, write_yaml
    from tierroute.ledger import default_path

    missing = server_missing()
    if missing is not None:
        pytest.skip(missing)
    config = write_yaml(
        tmp_path / "gateway.yaml",
        two_smol_tiers("{enabled: true, scope: all, verifier: review, review_max_tokens: 6}"),
    )
    server = start(config, tmp_path / "data")
    try:
        import httpx

        r = httpx.post(
            f"{server.url}/v1/chat/completions",
            json={
                "model": "auto",
                "messages": [{"role": "user", "content": "What is 2 + 3? Answer: <number>"}],
                "max_tokens": 12,
                "temperature": 0,
            },
            timeout=300,
        )
    finally:
        server.stop()
    assert r.status_code == 200, r.text
    note = r.headers["x-tierroute-cascade"]
    assert re.match(r"(accepted|escalated): review: large\b", note), note
    with Ledger(default_path(server.data_dir)) as ledger:
        row = ledger.get(r.headers["x-tierroute-request-id"])
    assert row is not None and f"; cascade {note}" in row.reason
    usage = r.json()["usage"]
    # The row holds more than the returned answer: the draft and the review at least.
    assert row.prompt_tokens > usage["prompt_tokens"] and row.tier == r.headers["x-tierroute-tier"]
