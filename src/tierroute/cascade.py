"""A cascade: the smallest tier answers first, a verifier decides whether that answer stands.

    request -> small tier -> verifier -> confidence >= threshold ? small answer
                                                                 : the next tier's answer

Routing decides from the prompt alone; a cascade also sees the small tier's answer, at the
price of that answer (its tokens and its latency) whenever it escalates. Verifiers share one
protocol: `prepare` says what the first small call must ask for (token logprobs), `verify`
returns a `Verdict`, a confidence in [0, 1] and a reason, and may ask the small tier for more
answers through the `ask` it is given. The threshold is passed in so a sampling verifier can
stop as soon as the outcome is settled.

    LogprobVerifier     exp(mean or min token logprob) of the first answer; no extra calls
    AgreementVerifier   share of n small answers (the first plus n-1 sampled at a
                        temperature > 0) whose final answers equal the first one's
    AllOf               members in order, confidence = the lowest; stops at the first
                        member below the threshold (so "logprob+agreement" only samples
                        when the logprobs look confident)
    AnyOf               members in order, confidence = the highest; stops at the first
                        member at or above it (so "logprob|cross" asks the partner model
                        only when the logprobs look unsure)

Collaboration strategies (tierroute.collab) follow the same protocol: `ask` takes a tier
name, and a verdict may carry the answer to return instead of the first one.

    CrossModelVerifier  a second, different small model answers too; kept when the two
                        final answers agree
    ReviewVerifier      a larger tier checks the draft: "KEEP", or its corrected answer
    BestOfNVerifier     n small answers; the one with the best mean token logprob, or
                        the one a (small) judge model picks

`Cascade.draft` runs the small tier and the verifier; `Cascade.run` adds the escalation.
The gateway uses `draft` with its own fallbacks and budgets (tierroute.gateway.engine).

Logprobs from a local model move by up to ~0.15 (nats, per token) with llama.cpp's prompt
cache: a prompt whose prefix is cached has its last tokens evaluated one by one instead of
in one batch. A threshold within that distance of an answer's confidence can go either way.
"""

from __future__ import annotations

import math
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, replace
from decimal import Decimal
from typing import Protocol

from tierroute.backends.base import ChatRequest, ChatResult
from tierroute.errors import ConfigError


class Ask(Protocol):
    """Ask a tier for an answer: the cascade's smallest tier, or the tier named (the
    collaboration strategies of tierroute.collab ask a second small model or a reviewer)."""

    def __call__(self, request: ChatRequest, tier: str | None = None) -> Awaitable[ChatResult]: ...


# A plain "ask the small tier" function, as the cascade took before verifiers asked others.
SmallOnly = Callable[[ChatRequest], Awaitable[ChatResult]]

VERIFIERS = (
    "logprob",
    "agreement",
    "logprob+agreement",
    "cross",
    "logprob|cross",
    "review",
    "best_of_n",
)
STATS = ("mean", "min")
SCORERS = ("logprob", "judge")  # best_of_n: how the returned answer is chosen
MAX_SAMPLES = 16
SCOPES = ("small", "all")

# A number as written in an answer: thousands groups only with commas ("1,234", not "6, 5").
_NUMBER = re.compile(r"-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?")
_MARKER = re.compile(r"\banswer\b(?:\s+is)?\s*[:=]?", re.IGNORECASE)
_NON_WORD = re.compile(r"[^\w]+")


def _canonical_number(raw: str) -> str:
    # Decimal, not float: two long integers must not round to the same value.
    value = Decimal(raw.replace(",", ""))
    return str(int(value)) if value == value.to_integral_value() else str(value.normalize())


def final_answer(text: str) -> str | None:
    """The final answer of a reply, normalised so that equal answers compare equal.

    The first number after the last "answer:" / "answer is", else the last number in the
    text, as a canonical decimal ("1,234.0" -> "1234"); for a reply with no number, its
    last non-empty line lowercased with punctuation collapsed. None for an empty reply.
    """
    markers = list(_MARKER.finditer(text))
    if markers:
        after = _NUMBER.search(text, markers[-1].end())
        if after is not None:
            return _canonical_number(after.group())
    numbers = _NUMBER.findall(text)
    if numbers:
        return _canonical_number(numbers[-1])
    lines = [line for line in text.splitlines() if line.strip()]
    if not lines:
        return None
    words = _NON_WORD.sub(" ", lines[-1].lower()).strip()
    return words or None


def logprob_statistic(logprobs: Sequence[float], stat: str) -> float:
    """The mean or the min of the token logprobs (natural log)."""
    if not logprobs:
        raise ValueError("no token logprobs to summarise")
    return min(logprobs) if stat == "min" else math.fsum(logprobs) / len(logprobs)


@dataclass(frozen=True)
class Verdict:
    confidence: float  # in [0, 1]
    reason: str
    # A combiner's pick: one of the answers it was given or asked for, returned instead of
    # the first one when the verdict is accepted (best-of-n, a reviewer's correction).
    answer: ChatResult | None = None


class Verifier(Protocol):
    name: str

    def prepare(self, request: ChatRequest) -> ChatRequest:
        """The request for the first small call (e.g. asking for token logprobs)."""
        ...

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        """How far to trust `first`, the small tier's answer to `request`."""
        ...


class LogprobVerifier:
    """Confidence exp(stat) of the answer's token logprobs: the geometric-mean token
    probability for `mean`, the least likely token's probability for `min`."""

    name = "logprob"

    def __init__(self, stat: str = "mean") -> None:
        if stat not in STATS:
            raise ConfigError(f"logprob_stat must be one of {', '.join(STATS)}, not {stat!r}")
        self.stat = stat

    def prepare(self, request: ChatRequest) -> ChatRequest:
        # top_logprobs too: llama.cpp's OpenAI server sends no logprobs without it.
        extra = {"top_logprobs": 1, **request.extra, "logprobs": True}
        return replace(request, extra=extra)

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        if first.token_logprobs is None:
            return Verdict(0.0, "the small tier returned no token logprobs")
        if not first.token_logprobs:
            return Verdict(0.0, "the small tier's answer is empty")
        value = logprob_statistic(first.token_logprobs, self.stat)
        return Verdict(math.exp(value), f"{self.stat} token logprob {value:.2f}")


class AgreementVerifier:
    """Confidence = the share of `samples` small answers whose final answer (see
    `final_answer`) equals the first one's. The first answer is the request as sent; the
    others are sampled at `temperature` with seeds 1..samples-1 (plus the request's own
    seed), so they are reproducible."""

    name = "agreement"

    def __init__(self, samples: int = 3, temperature: float = 0.7) -> None:
        if samples < 2:
            raise ConfigError(
                f"samples must be at least 2 (the first answer and more), not {samples}"
            )
        if not temperature > 0:
            raise ConfigError(
                f"sample_temperature must be above 0 so the samples can differ, not {temperature}"
            )
        self.samples = samples
        self.temperature = temperature

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return request

    def sample_request(self, request: ChatRequest, i: int) -> ChatRequest:
        extra = {k: v for k, v in request.extra.items() if k not in ("logprobs", "top_logprobs")}
        seed = extra.get("seed")
        base = seed if isinstance(seed, int) and not isinstance(seed, bool) else 0
        extra["seed"] = base + i
        return replace(request, temperature=self.temperature, extra=extra)

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        answer = final_answer(first.text)
        if answer is None:
            return Verdict(0.0, "the small tier's answer is empty")
        n = self.samples
        agree, seen = 1, 1
        while seen < n:
            # Stop once the rest cannot change the outcome: the confidence is then reported
            # as the bound that settled it.
            if agree / n >= threshold:
                break
            if (agree + n - seen) / n < threshold:
                break
            sample = await ask(self.sample_request(request, seen))
            agree += final_answer(sample.text) == answer
            seen += 1
        # Accepted: the share even if every unseen answer disagreed; escalated: the share
        # even if every unseen answer agreed. Both are the plain share once all are seen.
        accepted = agree / n >= threshold
        confidence = agree / n if accepted else (agree + n - seen) / n
        stopped = f", stopped after {seen} of {n}" if seen < n else ""
        return Verdict(confidence, f"{agree} of {seen} answers agree on {answer!r}{stopped}")


class _Combined:
    """Members asked in order until one settles the check; the subclass says which verdict
    settles it and how the confidences combine."""

    joiner = ""

    def __init__(self, members: Sequence[Verifier]) -> None:
        if not members:
            raise ConfigError("a combined verifier needs at least one member")
        self.members = tuple(members)
        self.name = self.joiner.join(m.name for m in self.members)

    def prepare(self, request: ChatRequest) -> ChatRequest:
        for member in self.members:
            request = member.prepare(request)
        return request

    def settles(self, confidence: float, threshold: float) -> bool:
        raise NotImplementedError

    def combine(self, confidences: list[float]) -> float:
        raise NotImplementedError

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        verdicts: list[Verdict] = []
        for member in self.members:
            verdicts.append(await member.verify(request, first, ask, threshold))
            if self.settles(verdicts[-1].confidence, threshold):
                break
        confidence = self.combine([v.confidence for v in verdicts])
        return Verdict(confidence, "; ".join(v.reason for v in verdicts))


class AllOf(_Combined):
    """Every member must be confident: confidence = the lowest member's; members run in
    order and the first one below the threshold ends the check."""

    joiner = "+"

    def settles(self, confidence: float, threshold: float) -> bool:
        return confidence < threshold

    def combine(self, confidences: list[float]) -> float:
        return min(confidences)


class AnyOf(_Combined):
    """One confident member is enough: confidence = the highest member's; members run in
    order and the first one at or above the threshold ends the check (so "logprob|cross"
    asks the partner model only when the logprobs look unsure)."""

    joiner = "|"

    def settles(self, confidence: float, threshold: float) -> bool:
        return confidence >= threshold

    def combine(self, confidences: list[float]) -> float:
        return max(confidences)


@dataclass(frozen=True)
class CascadeConfig:
    """The gateway's `cascade:` section (see resources/gateway.yaml)."""

    enabled: bool = False
    # "small": auto requests the router sends to the smallest tier; "all": every auto request.
    scope: str = "small"
    verifier: str = "logprob"
    threshold: float = 0.5  # accept the small answer when confidence >= threshold
    logprob_stat: str = "mean"
    samples: int = 3  # agreement: answers compared, the first included; best_of_n: candidates
    sample_temperature: float = 0.7
    # cross: the tier of the second small model (never escalated to); best_of_n: optional,
    # its answer joins the candidates.
    partner_tier: str | None = None
    reviewer_tier: str | None = None  # review: the tier that checks the draft; None: largest
    review_max_tokens: int = 128  # review: "KEEP" is ~2 tokens, a correction needs room
    scorer: str = "logprob"  # best_of_n: best mean token logprob, or a judge model's pick
    judge_tier: str | None = None  # best_of_n judge: the tier that judges; None: the smallest
    judge_max_tokens: int = 8  # the judge replies with a candidate's number
    judge_max_chars: int = 800  # each candidate is clipped to this (the question to twice it)

    def __post_init__(self) -> None:
        if not isinstance(self.enabled, bool):
            raise ConfigError(f"enabled must be true or false, not {self.enabled!r}")
        if self.scope not in SCOPES:
            raise ConfigError(f"scope must be one of {', '.join(SCOPES)}, not {self.scope!r}")
        if self.verifier not in VERIFIERS:
            raise ConfigError(
                f"verifier must be one of {', '.join(VERIFIERS)}, not {self.verifier!r}"
            )
        for key in ("threshold", "sample_temperature"):
            value = getattr(self, key)
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ConfigError(f"{key} must be a number, not {value!r}")
        if not 0.0 <= self.threshold <= 1.0:
            raise ConfigError(
                f"threshold is a confidence and must be within [0, 1], not {self.threshold}"
            )
        if isinstance(self.samples, bool) or not isinstance(self.samples, int):
            raise ConfigError(f"samples must be a whole number, not {self.samples!r}")
        if self.samples > MAX_SAMPLES:
            raise ConfigError(
                f"samples must be at most {MAX_SAMPLES} (each is a model call), not {self.samples}"
            )
        if self.scorer not in SCORERS:
            raise ConfigError(f"scorer must be one of {', '.join(SCORERS)}, not {self.scorer!r}")
        LogprobVerifier(self.logprob_stat)  # each raises a ConfigError for a bad setting
        AgreementVerifier(self.samples, float(self.sample_temperature))
        for key in ("partner_tier", "reviewer_tier", "judge_tier"):
            value = getattr(self, key)
            if value is not None and (not isinstance(value, str) or not 0 < len(value) <= 64):
                raise ConfigError(f"{key} must be a tier name, not {value!r}")
        if self.verifier in ("cross", "logprob|cross") and self.partner_tier is None:
            raise ConfigError(
                f"verifier {self.verifier} needs partner_tier: the second small model's tier"
            )
        n = self.review_max_tokens
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4096:
            raise ConfigError(f"review_max_tokens must be a whole number in [1, 4096], not {n!r}")
        for key, low, high in (("judge_max_tokens", 1, 64), ("judge_max_chars", 64, 8000)):
            n = getattr(self, key)
            if isinstance(n, bool) or not isinstance(n, int) or not low <= n <= high:
                raise ConfigError(f"{key} must be a whole number in [{low}, {high}], not {n!r}")

    def check_tiers(self, tiers: Sequence[str]) -> None:
        """Raise a ConfigError unless the named tiers exist where they make sense: a
        partner is a smaller tier than the largest (it is never escalated to), a reviewer
        is larger than the smallest."""
        if self.partner_tier is not None and self.partner_tier not in tiers[1:-1]:
            raise ConfigError(
                f"partner_tier {self.partner_tier!r} must name a tier between the smallest "
                f"and the largest ({', '.join(tiers[1:-1]) or 'this config has none'})"
            )
        if self.reviewer_tier is not None and self.reviewer_tier not in tiers[1:]:
            raise ConfigError(
                f"reviewer_tier {self.reviewer_tier!r} must name a tier larger than the "
                f"smallest ({', '.join(tiers[1:])})"
            )
        if self.judge_tier is not None and self.judge_tier not in tiers:
            raise ConfigError(
                f"judge_tier {self.judge_tier!r} must name one of the tiers ({', '.join(tiers)})"
            )

    @property
    def helper_tiers(self) -> tuple[str, ...]:
        """Tiers that help judge the small answer and are never escalated to."""
        return (self.partner_tier,) if self.partner_tier is not None else ()

    def build_verifier(self, tiers: Sequence[str] = ()) -> Verifier:
        """The configured verifier; `tiers` (smallest first) gives the default reviewer."""
        from tierroute import collab  # it builds on this module

        if self.verifier in ("cross", "logprob|cross"):
            assert self.partner_tier is not None
            cross = collab.CrossModelVerifier(self.partner_tier)
            if self.verifier == "cross":
                return cross
            return AnyOf([LogprobVerifier(self.logprob_stat), cross])
        if self.verifier == "review":
            reviewer = self.reviewer_tier or (tiers[-1] if tiers else None)
            if reviewer is None:
                raise ConfigError("verifier review needs reviewer_tier (or the gateway's tiers)")
            return collab.ReviewVerifier(reviewer, self.review_max_tokens)
        if self.verifier == "best_of_n":
            scorer: collab.Scorer = collab.LogprobScorer()
            if self.scorer == "judge":
                scorer = collab.JudgeScorer(
                    self.judge_tier, self.judge_max_tokens, self.judge_max_chars
                )
            return collab.BestOfNVerifier(
                self.samples, float(self.sample_temperature), self.partner_tier, scorer
            )
        logprob = LogprobVerifier(self.logprob_stat)
        if self.verifier == "logprob":
            return logprob
        agreement = AgreementVerifier(self.samples, float(self.sample_temperature))
        if self.verifier == "agreement":
            return agreement
        return AllOf([logprob, agreement])


@dataclass(frozen=True)
class Draft:
    """The small tier's answer, every small call made for it, and the verdict."""

    result: ChatResult
    calls: tuple[ChatResult, ...]  # the first (== result) and any samples, in order
    verdict: Verdict
    threshold: float
    # Which of `calls` is `result` (a combiner may pick another than the first), and the
    # tier each call asked (None: the smallest tier).
    chosen: int = 0
    tiers: tuple[str | None, ...] = ()

    @property
    def accepted(self) -> bool:
        return self.verdict.confidence >= self.threshold

    @property
    def prompt_tokens(self) -> int:
        return sum(c.prompt_tokens for c in self.calls)

    @property
    def completion_tokens(self) -> int:
        return sum(c.completion_tokens for c in self.calls)

    @property
    def note(self) -> str:
        """For the X-Tierroute-Cascade header, e.g. "escalated: mean token logprob -0.92
        (confidence 0.40 < 0.50)"."""
        c, t = self.verdict.confidence, self.threshold
        if self.accepted:
            return f"accepted: {self.verdict.reason} (confidence {c:.2f} >= {t:.2f})"
        return f"escalated: {self.verdict.reason} (confidence {c:.2f} < {t:.2f})"


@dataclass(frozen=True)
class CascadeResult:
    answer: ChatResult
    draft: Draft
    escalated: bool
    large: ChatResult | None = None  # the next tier's answer when escalated


class Cascade:
    def __init__(self, verifier: Verifier, threshold: float) -> None:
        self.verifier = verifier
        self.threshold = threshold

    @classmethod
    def from_config(cls, config: CascadeConfig, tiers: Sequence[str] = ()) -> Cascade:
        return cls(config.build_verifier(tiers), float(config.threshold))

    async def draft(self, small: Ask | SmallOnly, request: ChatRequest) -> Draft:
        """Ask the small tier and judge its answer; raises what `small` raises. `small`
        takes a tier name too when the verifier asks other tiers (tierroute.collab)."""
        calls: list[ChatResult] = []
        tiers: list[str | None] = []

        async def counted(request: ChatRequest, tier: str | None = None) -> ChatResult:
            # A plain small-tier function is never asked for another tier by the verifiers
            # that need one: those come with the gateway's (or a benchmark's) `ask`.
            result = await (small(request) if tier is None else small(request, tier))  # type: ignore[call-arg]
            calls.append(result)
            tiers.append(tier)
            return result

        first = await counted(self.verifier.prepare(request))
        verdict = await self.verifier.verify(request, first, counted, self.threshold)
        chosen = 0
        if verdict.answer is not None:
            picked = [i for i, c in enumerate(calls) if c is verdict.answer]
            if not picked:
                raise ValueError(f"verifier {self.verifier.name} picked an answer it never got")
            chosen = picked[0]
        return Draft(calls[chosen], tuple(calls), verdict, self.threshold, chosen, tuple(tiers))

    async def run(
        self, small: Ask | SmallOnly, large: SmallOnly, request: ChatRequest
    ) -> CascadeResult:
        """The small answer if the verifier accepts it, else the large tier's."""
        draft = await self.draft(small, request)
        if draft.accepted:
            return CascadeResult(draft.result, draft, escalated=False)
        answer = await large(request)
        return CascadeResult(answer, draft, escalated=True, large=answer)
