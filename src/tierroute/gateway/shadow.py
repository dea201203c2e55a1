"""Shadow sampling: live quality monitoring of the smaller tiers.

A configurable share of requests answered by a smaller tier is sent again, in the
background, to the largest tier; a judge then decides whether the small answer was good
enough: by default the largest tier itself with the fixed rubric below, or, when
configured, a cheaper comparison (cosine similarity of the two answers' embeddings).
Verdicts go to the ledger; each tier's estimated quality (the share of good-enough
answers, with a 95% Wilson interval) goes to /metrics, and an alert line is logged when
its upper bound falls below the target.

The client never waits for any of this: the work starts after its answer has been sent,
at most `max_concurrent` judgements run at once, and a sample that finds them all busy is
skipped (and counted). Shadow calls do compete with live traffic for the largest tier,
which is what `rate` is for.

What judging costs (the reference answer and the ruling, at the judge's prices) is booked
in the ledger against the key whose request was judged (`report --by key` shows it as
"judging"; /metrics as tierroute_key_judging_usd_total), but not charged to that key's
budget: the operator chose to sample, and a tenant's spend should not depend on a coin
the tenant cannot see.
"""

from __future__ import annotations

import asyncio
import logging
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from tierroute.backends.base import Backend, BackendError, ChatRequest, ChatResult
from tierroute.conversation import routing_text
from tierroute.errors import ConfigError
from tierroute.gateway.metrics import Metrics
from tierroute.ledger import Ledger
from tierroute.stats import wilson

log = logging.getLogger(__name__)

RUBRIC = """You are checking whether a smaller model's answer is good enough.

Request:
{request}

Answer A (to check):
{candidate}

Reference answer B (from a stronger model):
{reference}

Is answer A as correct and as useful as answer B? Reply with one word: YES or NO."""

_VERDICT = re.compile(r"\b(yes|no)\b", re.IGNORECASE)


@dataclass(frozen=True)
class ShadowConfig:
    rate: float = 0.05
    judge: str = "llm"  # or "similarity"
    similarity_threshold: float = 0.85
    quality_target: float = 0.8
    max_concurrent: int = 1
    min_samples_for_alert: int = 20

    def __post_init__(self) -> None:
        if not 0.0 <= self.rate <= 1.0:
            raise ConfigError("shadow.rate must be within [0, 1]")
        if self.judge not in ("llm", "similarity"):
            raise ConfigError("shadow.judge must be 'llm' or 'similarity'")
        if self.max_concurrent < 1:
            raise ConfigError("shadow.max_concurrent must be at least 1")


def parse_verdict(text: str) -> float | None:
    """1.0 for YES, 0.0 for NO, None when the judge said neither."""
    match = _VERDICT.search(text)
    if match is None:
        return None
    return 1.0 if match.group(1).lower() == "yes" else 0.0


class Shadow:
    def __init__(
        self,
        config: ShadowConfig,
        largest: str,
        backends: Mapping[str, Backend],
        ledger: Ledger,
        metrics: Metrics,
        timeout_s: float,
        embed: Callable[[list[str]], Any] | None = None,
        rng: random.Random | None = None,
        clock: Callable[[], float] = time.time,
        cost: Callable[[int, int], float] | None = None,
    ) -> None:
        if config.judge == "similarity" and embed is None:
            raise ConfigError("shadow.judge 'similarity' needs a router with an embedding model")
        self.config = config
        self.largest = largest
        self.backends = backends
        self.ledger = ledger
        self.metrics = metrics
        self.timeout_s = timeout_s
        self.embed = embed
        self.rng = rng or random.Random()
        self.clock = clock
        self.cost = cost  # USD of (prompt, completion) tokens on the judge; None: unpriced
        self.verdicts: dict[str, list[float]] = {}
        self._running = 0
        self._tasks: set[asyncio.Task[None]] = set()
        # Told (request id, verdict) of each readable judgement: a tier's models learn from it.
        self.on_verdict: Callable[[str, float], None] | None = None

    def maybe_sample(
        self,
        request_id: str,
        request: ChatRequest,
        tier: str,
        answer: str,
        api_key_id: str | None = None,
    ) -> None:
        """Called after a smaller tier answered; may start a background judgement, whose
        spend is booked to `api_key_id`."""
        if tier == self.largest or self.rng.random() >= self.config.rate:
            return
        if self._running >= self.config.max_concurrent:
            self.metrics.shadow.labels(tier, "skipped_busy").inc()
            return
        self._running += 1
        task = asyncio.create_task(self._judge(request_id, request, tier, answer, api_key_id))
        self._tasks.add(task)
        task.add_done_callback(self._done)

    def _done(self, task: asyncio.Task[None]) -> None:
        self._running -= 1
        self._tasks.discard(task)

    async def _judge(
        self,
        request_id: str,
        request: ChatRequest,
        tier: str,
        answer: str,
        api_key_id: str | None = None,
    ) -> None:
        backend = self.backends[self.largest]
        spent = [0, 0]  # prompt and completion tokens the judge's calls used

        def used(result: ChatResult) -> ChatResult:
            spent[0] += result.prompt_tokens
            spent[1] += result.completion_tokens
            return result

        try:
            reference = used(await backend.complete(request, self.timeout_s))
            if self.config.judge == "similarity":
                assert self.embed is not None
                vectors = await asyncio.to_thread(self.embed, [answer, reference.text])
                cosine = float(np.dot(vectors[0], vectors[1]))
                verdict: float | None = 1.0 if cosine >= self.config.similarity_threshold else 0.0
                raw, judge = f"cosine {cosine:.3f}", "similarity"
            else:
                prompt = RUBRIC.format(
                    request=routing_text(request.messages)[:4000],
                    candidate=answer[:4000],
                    reference=reference.text[:4000],
                )
                ruling = used(
                    await backend.complete(
                        ChatRequest(
                            messages=[{"role": "user", "content": prompt}],
                            max_tokens=4,
                            temperature=0.0,
                        ),
                        self.timeout_s,
                    )
                )
                verdict, raw, judge = parse_verdict(ruling.text), ruling.text, self.largest
        except BackendError as exc:
            self.metrics.shadow.labels(tier, "failed").inc()
            log.warning("shadow judgement of %s failed: %s", request_id, exc)
            if spent[0] or spent[1]:  # the reference was paid for: book it, without a verdict
                self._book(request_id, tier, "failed", None, f"failed: {exc}", api_key_id, spent)
            return
        self._book(request_id, tier, judge, verdict, raw, api_key_id, spent)
        self.metrics.shadow.labels(tier, "judged" if verdict is not None else "unreadable").inc()
        if verdict is not None:
            self._update(tier, verdict)
            if self.on_verdict is not None:
                self.on_verdict(request_id, verdict)

    def _book(
        self,
        request_id: str,
        tier: str,
        judge: str,
        verdict: float | None,
        raw: str,
        api_key_id: str | None,
        spent: list[int],
    ) -> None:
        cost = self.cost(spent[0], spent[1]) if self.cost is not None else 0.0
        self.ledger.record_judgement(
            request_id,
            self.clock(),
            tier,
            judge,
            verdict,
            raw,
            api_key_id=api_key_id,
            prompt_tokens=spent[0],
            completion_tokens=spent[1],
            cost_usd=cost,
        )
        if api_key_id is not None:
            self.metrics.key_judging.labels(api_key_id).inc(cost)

    def _update(self, tier: str, verdict: float) -> None:
        values = self.verdicts.setdefault(tier, [])
        values.append(verdict)
        n, good = len(values), sum(values)
        lo, hi = wilson(good, n)
        self.metrics.quality.labels(tier, "estimate").set(good / n)
        self.metrics.quality.labels(tier, "ci95_low").set(lo)
        self.metrics.quality.labels(tier, "ci95_high").set(hi)
        target = self.config.quality_target
        if n >= self.config.min_samples_for_alert and hi < target:
            log.warning(
                "ALERT: estimated quality of tier %s is %.2f (95%% CI %.2f-%.2f, %d judged), "
                "below the target %.2f",
                tier,
                good / n,
                lo,
                hi,
                n,
                target,
            )

    def lowest_estimate(self) -> float | None:
        """The lowest share of good-enough answers among tiers judged often enough."""
        judged = [
            sum(v) / len(v)
            for v in self.verdicts.values()
            if len(v) >= self.config.min_samples_for_alert
        ]
        return min(judged) if judged else None

    async def aclose(self) -> None:
        for task in list(self._tasks):
            task.cancel()
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
