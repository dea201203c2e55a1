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
                        set), each with token logprobs; the one with the best mean token
                        logprob is returned, confidence exp(that mean).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, replace

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

    - "code:" the behaviour `probe` reports for the last fenced code block, or without a
      probe (or when it cannot tell) the block with comments and whitespace removed;
    - "choice:" a letter after "answer"/"option"/"choice" ("Answer: (b)" -> "choice:B");
    - "number:" the final number (tierroute.cascade.final_answer, "1,234.0" -> "1234");
    - "text:" the last non-empty line, lowercased with punctuation collapsed.

    None for an empty reply.
    """
    code = code_block(text)
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


class BestOfNVerifier:
    """The small answer with the best mean token logprob among n candidates."""

    name = "best_of_n"

    def __init__(self, samples: int = 3, temperature: float = 0.7, partner: str | None = None):
        self._sampler = AgreementVerifier(samples, temperature)  # its checks and seeds
        self._logprob = LogprobVerifier("mean")
        self.samples = samples
        self.partner = partner

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return self._logprob.prepare(request)

    async def verify(
        self, request: ChatRequest, first: ChatResult, ask: Ask, threshold: float
    ) -> Verdict:
        candidates = [(first, "small")]
        for i in range(1, self.samples):
            sample = self.prepare(self._sampler.sample_request(request, i))
            candidates.append((await ask(sample), f"sample {i}"))
        if self.partner is not None:
            other = await _helper(ask, self.prepare(request), self.partner)
            if not isinstance(other, str):  # a failed partner is one candidate fewer
                candidates.append((other, self.partner))
        scored = [(_mean_logprob(c), c, who) for c, who in candidates]
        best, answer, who = max(scored, key=lambda s: s[0])
        if best == -math.inf:
            return Verdict(0.0, f"best_of_n: none of {len(scored)} answers has token logprobs")
        reason = f"best_of_n: {who} of {len(scored)}, mean token logprob {best:.2f}"
        return Verdict(math.exp(best), reason, None if answer is first else answer)


def _mean_logprob(result: ChatResult) -> float:
    if not result.text.strip() or not result.token_logprobs:
        return -math.inf
    return logprob_statistic(result.token_logprobs, "mean")
