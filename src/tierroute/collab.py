"""Collaboration strategies: several models judge or pick the cascade's answer.

Each is a verifier of tierroute.cascade (one protocol): it gets the smallest tier's first
answer and an `ask` that reaches any tier by name, and returns a Verdict. A verdict may
carry the answer to return instead of the first one (a combiner).

    CrossModelVerifier  a second, different small model (`partner`) answers the same
                        request; confidence 1 when the two final answers agree (see
                        `answer_key`), else 0. Different models make different mistakes,
                        which one model's samples do not.
    ReviewVerifier      a larger tier reads the draft and replies "KEEP" or a corrected
                        answer, with max_tokens bounded: it pays the large model's input
                        price for the draft, and few output tokens when it agrees. A
                        complete correction is returned as the answer; a truncated or
                        empty reply escalates.
    BestOfNVerifier     n small answers (the first, n-1 samples, and the partner's when
                        set); a scorer picks the one returned:
        LogprobScorer   the best mean token logprob, confidence exp(that mean)
        JudgeScorer     a (small) judge model is shown the question and the distinct
                        answers, each clipped, and replies with a candidate's number;
                        confidence exp(the mean token logprob of that reply). No judge
                        call when every candidate says the same thing (confidence 1).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import Protocol

from tierroute.backends.base import BackendError, ChatRequest, ChatResult
from tierroute.cascade import (
    AgreementVerifier,
    Ask,
    LogprobVerifier,
    Verdict,
    final_answer,
    logprob_statistic,
)
from tierroute.errors import ConfigError

# "Answer: B", "answer is (c)", "The correct option is D." -> the letter.
_CHOICE = re.compile(
    r"\b(?:answer|option|choice)\b(?:\s+is)?\s*[:=]?\s*\(?([A-Ja-j])\)?(?![\w])", re.IGNORECASE
)
_FENCE = re.compile(r"```[\w+-]*\n(.*?)(?:```|\Z)", re.DOTALL)
_BARE_DEF = re.compile(r"\s*def \w+\s*\(")
_PY_COMMENT = re.compile(r"(?m)\s*#.*$")
_SPACES = re.compile(r"\s+")

# What a code answer does, e.g. its output on some inputs, run in a sandbox; None when it
# cannot tell. The gateway runs no code: only a caller that can (a benchmark) passes one.
CodeProbe = Callable[[str], str | None]


def code_block(text: str) -> str | None:
    """The last fenced code block of a reply (an unterminated last one too), or None."""
    blocks = _FENCE.findall(text)
    return blocks[-1] if blocks else None


def answer_key(text: str, probe: CodeProbe | None = None) -> str | None:
    """The normalised final answer of a reply, tagged with its kind, so that answers from
    two different models compare equal when they say the same thing:

    - "code:" the behaviour `probe` reports for the last fenced code block (or a reply
      that is a bare `def`, as a few-shot base model writes one on one line), or without
      a probe (or when it cannot tell) the code with comments and whitespace removed;
    - "choice:" a letter after "answer"/"option"/"choice" ("Answer: (b)" -> "choice:B");
    - "number:" the final number (tierroute.cascade.final_answer, "1,234.0" -> "1234");
    - "text:" the last non-empty line, lowercased with punctuation collapsed.

    None for an empty reply.
    """
    code = code_block(text)
    if code is None and _BARE_DEF.match(text):
        code = text.strip()  # a completion starts after "A:", often with a space
    if code is not None and code.strip():
        behaviour = probe(code) if probe is not None else None
        if behaviour is not None:
            return f"code:{behaviour}"
        return "code:" + _SPACES.sub(" ", _PY_COMMENT.sub("", code)).strip()
    choices = _CHOICE.findall(text)
    if choices:
        return f"choice:{str(choices[-1]).upper()}"
    final = final_answer(text)
    if final is None:
        return None
    kind = "number" if re.fullmatch(r"-?\d+(?:\.\d+)?", final) else "text"
    return f"{kind}:{final}"


def _without_logprobs(request: ChatRequest) -> ChatRequest:
    extra = {k: v for k, v in request.extra.items() if k not in ("logprobs", "top_logprobs")}
    return replace(request, extra=extra)


async def _helper(ask: Ask, request: ChatRequest, tier: str) -> ChatResult | str:
    """Another tier's answer, or why it gave none: a helper that fails (after the
    gateway's retries) makes the verdict escalate, and the draft is still kept when no
    larger tier answers either."""
    try:
        return await ask(request, tier)
    except BackendError as exc:
        if not exc.retryable:
            raise
        return f"{tier} failed ({exc})"


def _tokens(result: ChatResult) -> str:
    return f"{result.prompt_tokens}+{result.completion_tokens} tokens"


class CrossModelVerifier:
    """Kept when a second small model's final answer agrees with the first one's."""

    name = "cross"

    def __init__(self, partner: str, probe: CodeProbe | None = None) -> None:
        self.partner = partner
        self.probe = probe

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return request

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        mine = answer_key(first.text, self.probe)
        if mine is None:
            return Verdict(0.0, "cross: the small tier's answer is empty")
        other = await _helper(ask, _without_logprobs(request), self.partner)
        if isinstance(other, str):
            return Verdict(0.0, f"cross: {other}")
        theirs = answer_key(other.text, self.probe)
        cost = f"partner {self.partner} {_tokens(other)}"
        if theirs == mine:
            return Verdict(1.0, f"cross: {self.partner} agrees on {_short(mine)} ({cost})")
        return Verdict(
            0.0, f"cross: {self.partner} says {_short(theirs)}, not {_short(mine)} ({cost})"
        )


def _short(key: str | None, width: int = 40) -> str:
    if key is None:
        return "nothing"
    return repr(key if len(key) <= width else key[: width - 3] + "...")


@dataclass(frozen=True)
class Review:
    keep: bool
    correction: str | None  # the reviewer's answer when it does not keep the draft


_KEEP = re.compile(r"^\W*keep\b\W*$", re.IGNORECASE)
_KEEP_FIRST = re.compile(r"^\W*keep\b[\s.!:;,-]*(?:\n|$)", re.IGNORECASE)
_FIX_MARKER = re.compile(r"^\W*(?:fix|corrected(?: answer)?|correction)\s*[:\-]\s*", re.IGNORECASE)


def parse_review(text: str) -> Review | None:
    """A reviewer's reply: "KEEP" (any case, alone or on the first line), or a corrected
    answer (a leading "FIX:" / "Corrected answer:" is dropped). None for an empty reply,
    which says neither."""
    stripped = text.strip()
    if not stripped:
        return None
    if _KEEP.match(stripped) or _KEEP_FIRST.match(stripped):
        return Review(keep=True, correction=None)
    correction = _FIX_MARKER.sub("", stripped, count=1).strip()
    return Review(keep=False, correction=correction or None)


REVIEW_SYSTEM = (
    "You check another assistant's answer. If the proposed answer is correct, reply with "
    "the single word KEEP and nothing else. If it is wrong, reply with the correct answer "
    "only, in the format the question asks for."
)


def review_request(request: ChatRequest, draft: str, max_tokens: int) -> ChatRequest:
    """The reviewer's request: the conversation as asked, then the draft to check."""
    body = [m for m in request.messages if m.get("role") != "system"]
    asked = "\n\n".join(str(m.get("content", "")) for m in body if m.get("role") == "user")
    system = [m for m in request.messages if m.get("role") == "system"]
    instructions = "\n\n".join([*(str(m.get("content", "")) for m in system), REVIEW_SYSTEM])
    content = f"Question:\n{asked}\n\nProposed answer:\n{draft}\n\nKEEP, or the correct answer?"
    return replace(
        _without_logprobs(request),
        messages=[
            {"role": "system", "content": instructions},
            {"role": "user", "content": content},
        ],
        max_tokens=max_tokens,
        temperature=0.0,
    )


class ReviewVerifier:
    """A larger tier checks the small draft: KEEP, or its correction is the answer."""

    name = "review"

    def __init__(self, reviewer: str, max_tokens: int = 128) -> None:
        if not 1 <= max_tokens <= 4096:
            raise ConfigError(f"review_max_tokens must be in [1, 4096], not {max_tokens}")
        self.reviewer = reviewer
        self.max_tokens = max_tokens

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return request

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        if not first.text.strip():
            return Verdict(0.0, "review: the small tier's answer is empty")
        reply = await _helper(
            ask, review_request(request, first.text, self.max_tokens), self.reviewer
        )
        if isinstance(reply, str):
            return Verdict(0.0, f"review: {reply}")
        cost = f"{self.reviewer} {_tokens(reply)}"
        review = parse_review(reply.text)
        if review is None:
            return Verdict(0.0, f"review: {self.reviewer} sent an empty review ({cost})")
        if review.keep:
            return Verdict(1.0, f"review: {self.reviewer} keeps the draft ({cost})")
        if reply.finish_reason == "length":
            return Verdict(
                0.0, f"review: {self.reviewer}'s correction was cut at max_tokens ({cost})"
            )
        return Verdict(1.0, f"review: {self.reviewer} corrected the draft ({cost})", reply)


@dataclass(frozen=True)
class Candidate:
    result: ChatResult
    who: str  # "small", "sample 2", or the partner tier's name


@dataclass(frozen=True)
class Pick:
    index: int | None  # into the candidates; None: none could be chosen (the first stands)
    confidence: float  # in [0, 1]
    reason: str


class Scorer(Protocol):
    """How best-of-n chooses among its candidates."""

    name: str

    def prepare(self, request: ChatRequest) -> ChatRequest:
        """The request each candidate is asked with (e.g. asking for token logprobs)."""
        ...

    async def pick(self, request: ChatRequest, candidates: Sequence[Candidate], ask: Ask) -> Pick:
        """The best candidate for `request`; may ask a tier (a judge) through `ask`."""
        ...


class LogprobScorer:
    """The candidate with the best mean token logprob; confidence exp(that mean)."""

    name = "logprob"

    def __init__(self) -> None:
        self._logprob = LogprobVerifier("mean")

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return self._logprob.prepare(request)

    async def pick(self, request: ChatRequest, candidates: Sequence[Candidate], ask: Ask) -> Pick:
        scored = [_mean_logprob(c.result) for c in candidates]
        best = max(range(len(scored)), key=lambda i: scored[i])
        if scored[best] == -math.inf:
            return Pick(None, 0.0, f"none of {len(scored)} answers has token logprobs")
        who = candidates[best].who
        reason = f"{who} of {len(scored)}, mean token logprob {scored[best]:.2f}"
        return Pick(best, math.exp(scored[best]), reason)


JUDGE_SYSTEM = (
    "You are shown a question and numbered candidate answers. Decide which candidate is "
    "correct. Reply with the number of the correct candidate only."
)
# "Candidate 2", "#2", "answer 2", "option (2)": a number after a marker is preferred over
# any other number in the reply (which may be a candidate's own answer, e.g. "42").
_PICK_MARKED = re.compile(r"(?:candidate|answer|option|number|#)\s*[:#]?\s*\(?(\d+)\)?", re.I)
_PICK_ANY = re.compile(r"(?<![\w.])(\d+)(?![\w]|\.\d)")
_ORDINALS = ("first", "second", "third", "fourth", "fifth", "sixth", "seventh", "eighth")
_PICK_ORDINAL = re.compile(r"\b(" + "|".join(_ORDINALS) + r")\b", re.IGNORECASE)


def parse_pick(text: str, n: int) -> int | None:
    """The candidate a judge's reply names, 0-based, or None when it names none of 1..n:
    a number after "candidate"/"answer"/"option"/"#" first, then the first number in
    range, then "first", "second", ..."""
    for pattern in (_PICK_MARKED, _PICK_ANY):
        for match in pattern.finditer(text):
            k = int(match.group(1))
            if 1 <= k <= n:
                return k - 1
    ordinal = _PICK_ORDINAL.search(text)
    if ordinal is not None:
        k = _ORDINALS.index(ordinal.group(1).lower()) + 1
        if k <= n:
            return k - 1
    return None


def clip(text: str, limit: int) -> str:
    """`text` within `limit` characters: its start and its end (where a final answer
    sits) with " [...] " between them."""
    text = text.strip()
    if len(text) <= limit:
        return text
    gap = " [...] "
    head = max(0, (limit - len(gap)) // 2)
    tail = max(0, limit - len(gap) - head)
    return text[:head] + gap + (text[-tail:] if tail else "")


def judge_request(
    request: ChatRequest, answers: Sequence[str], max_tokens: int, max_chars: int
) -> ChatRequest:
    """The judge's request: the question (clipped to 2 * max_chars) and the numbered
    answers (each clipped to max_chars), so its length is bounded whatever the
    candidates say; greedy, with token logprobs for the confidence."""
    asked = "\n\n".join(
        str(m.get("content", "")) for m in request.messages if m.get("role") == "user"
    )
    parts = [f"Question:\n{clip(asked, 2 * max_chars)}"]
    parts += [f"Candidate {i}:\n{clip(a, max_chars)}" for i, a in enumerate(answers, 1)]
    # No "1 to n" here: a small judge echoes it ("1 to 2"), which reads as a pick.
    parts.append("Which candidate is correct? Reply with its number only.")
    extra = {k: v for k, v in request.extra.items() if k not in ("logprobs", "top_logprobs")}
    return replace(
        request,
        messages=[
            {"role": "system", "content": JUDGE_SYSTEM},
            {"role": "user", "content": "\n\n".join(parts)},
        ],
        max_tokens=max_tokens,
        temperature=0.0,
        extra={**extra, "logprobs": True, "top_logprobs": 1},
    )


class JudgeScorer:
    """A judge model (the smallest tier when `tier` is None) picks among the distinct
    candidates (compared by `answer_key`, with `probe` for code when given); confidence
    exp(the mean token logprob of its reply), 1 when the judge tier gives no logprobs.
    A reply that names no candidate, or a judge that fails, leaves the first answer
    with confidence 0 (escalate)."""

    name = "judge"

    def __init__(
        self,
        tier: str | None = None,
        max_tokens: int = 8,
        max_chars: int = 800,
        probe: CodeProbe | None = None,
    ) -> None:
        if not 1 <= max_tokens <= 64:
            raise ConfigError(f"judge_max_tokens must be in [1, 64], not {max_tokens}")
        if not 64 <= max_chars <= 8000:
            raise ConfigError(f"judge_max_chars must be in [64, 8000], not {max_chars}")
        self.tier = tier
        self.max_tokens = max_tokens
        self.max_chars = max_chars
        self.probe = probe

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return request

    async def pick(self, request: ChatRequest, candidates: Sequence[Candidate], ask: Ask) -> Pick:
        groups: dict[str, int] = {}  # answer key -> the first candidate saying it
        for i, c in enumerate(candidates):
            key = answer_key(c.result.text, self.probe)
            if key is not None:
                groups.setdefault(key, i)
        if not groups:
            return Pick(None, 0.0, f"all {len(candidates)} answers are empty")
        distinct = list(groups.values())
        if len(distinct) == 1:
            key = next(iter(groups))
            return Pick(distinct[0], 1.0, f"all {len(candidates)} answers agree on {_short(key)}")
        texts = [candidates[i].result.text for i in distinct]
        judge = self.tier or "the smallest tier"
        try:
            reply = await ask(
                judge_request(request, texts, self.max_tokens, self.max_chars), self.tier
            )
        except BackendError as exc:
            if not exc.retryable:
                raise
            return Pick(None, 0.0, f"judge {judge} failed ({exc})")
        cost = f"judge {_tokens(reply)}"
        k = parse_pick(reply.text, len(distinct))
        if k is None:
            said = _short(reply.text.strip() or None)
            return Pick(
                None, 0.0, f"the judge's reply {said} names none of {len(distinct)} ({cost})"
            )
        chosen = distinct[k]
        confidence = math.exp(_mean_logprob(reply)) if reply.token_logprobs else 1.0
        reason = (
            f"judge picks {candidates[chosen].who} of {len(distinct)} distinct "
            f"(of {len(candidates)}) ({cost})"
        )
        return Pick(chosen, confidence, reason)


class BestOfNVerifier:
    """n small answers (the first, samples, the partner's); `scorer` picks the one
    returned (LogprobScorer by default)."""

    name = "best_of_n"

    def __init__(
        self,
        samples: int = 3,
        temperature: float = 0.7,
        partner: str | None = None,
        scorer: Scorer | None = None,
    ) -> None:
        self._sampler = AgreementVerifier(samples, temperature)  # its checks and seeds
        self.samples = samples
        self.partner = partner
        self.scorer: Scorer = scorer if scorer is not None else LogprobScorer()

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return self.scorer.prepare(request)

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        candidates = [Candidate(first, "small")]
        for i in range(1, self.samples):
            sample = self.prepare(self._sampler.sample_request(request, i))
            candidates.append(Candidate(await ask(sample), f"sample {i}"))
        if self.partner is not None:
            other = await _helper(ask, self.prepare(request), self.partner)
            if not isinstance(other, str):  # a failed partner is one candidate fewer
                candidates.append(Candidate(other, self.partner))
        pick = await self.scorer.pick(request, candidates, ask)
        label = "best_of_n" if self.scorer.name == "logprob" else f"best_of_n ({self.scorer.name})"
        answer = candidates[pick.index].result if pick.index is not None else first
        confidence = min(1.0, max(0.0, pick.confidence))
        return Verdict(confidence, f"{label}: {pick.reason}", None if answer is first else answer)


def _mean_logprob(result: ChatResult) -> float:
    if not result.text.strip() or not result.token_logprobs:
        return -math.inf
    return logprob_statistic(result.token_logprobs, "mean")
