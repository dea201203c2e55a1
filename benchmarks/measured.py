"""Model calls measured once and charged to every strategy that makes them, shared by
cascade_bench.py and collab_live.py.

A `Memo` wraps one model: each distinct request runs once and later askers get its record
(answer, tokens, seconds). Greedy decoding and seeded samples make a repeated call return
the same answer, so charging each strategy the calls it makes equals running every
strategy on its own, in a fraction of the time. A `Meter` is one task under one strategy:
the seconds and tokens per tier of the calls it made. Cost is tokens x the tier's prices.
"""

from __future__ import annotations

import dataclasses
import json
import math
import sys
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tierroute.backends.base import ChatRequest, ChatResult
from tierroute.types import Tier


@dataclass(frozen=True)
class Call:
    result: ChatResult
    seconds: float


class Memo:
    """One model; each distinct request runs once, later askers get the record. With a
    `journal` file, calls are appended to it and a later run with the same file reuses
    them (a run interrupted on this slow shared machine resumes where it stopped)."""

    def __init__(self, tier: str, backend: Any, timeout: float, journal: Path | None = None):
        self.tier, self.backend, self.timeout = tier, backend, timeout
        self.calls: dict[str, Call] = {}
        self.journal = journal
        if journal is not None and journal.exists():
            for line in journal.read_text().splitlines():
                entry = json.loads(line)
                if entry["tier"] == tier:
                    result = entry["result"]
                    if result["token_logprobs"] is not None:
                        result["token_logprobs"] = tuple(result["token_logprobs"])
                    self.calls[entry["key"]] = Call(ChatResult(**result), entry["seconds"])

    @staticmethod
    def key(request: ChatRequest) -> str:
        return json.dumps(
            [request.messages, request.max_tokens, request.temperature, request.extra],
            sort_keys=True,
        )

    async def __call__(self, request: ChatRequest) -> Call:
        # Token logprobs cost a local model nothing and do not change its answer: every call
        # asks for them, so a strategy that wants them and one that does not share the call.
        plain = Memo.key(request)
        request = dataclasses.replace(
            request, extra={**request.extra, "logprobs": True, "top_logprobs": 1}
        )
        key = Memo.key(request)
        if key not in self.calls and plain in self.calls:
            key = plain  # journalled by an earlier run without them
        if key not in self.calls:
            start = time.perf_counter()
            result = await self.backend.complete(request, self.timeout)
            self.calls[key] = Call(result, time.perf_counter() - start)
            if self.journal is not None:
                entry = {
                    "tier": self.tier,
                    "key": key,
                    "seconds": self.calls[key].seconds,
                    "result": dataclasses.asdict(result),
                }
                with self.journal.open("a") as f:
                    f.write(json.dumps(entry) + "\n")
            print(
                f"  {self.tier:<5} {self.calls[key].seconds:5.1f}s "
                f"{result.completion_tokens:3d} tok",
                file=sys.stderr,
                flush=True,
            )
        return self.calls[key]

    @property
    def minutes(self) -> float:
        """Model time of every call held (journalled ones included)."""
        return sum(c.seconds for c in self.calls.values()) / 60


@dataclass
class Meter:
    """What one task cost its strategy: seconds (its calls one after another) and
    [prompt, completion] tokens per tier."""

    seconds: float = 0.0
    tokens: dict[str, list[int]] = field(default_factory=dict)

    def asker(self, memos: Mapping[str, Memo]) -> Any:
        """An `Ask` (tierroute.cascade) over the memos by tier name; None is "small"."""

        async def ask(request: ChatRequest, tier: str | None = None) -> ChatResult:
            memo = memos[tier or "small"]
            call = await memo(request)
            self.seconds += call.seconds
            spent = self.tokens.setdefault(memo.tier, [0, 0])
            spent[0] += call.result.prompt_tokens
            spent[1] += call.result.completion_tokens
            return call.result

        return ask

    def cost(self, tiers: Mapping[str, Tier]) -> float:
        """USD: each tier's tokens at that tier's prices per million."""
        return sum(tiers[t].cost(p, c) for t, (p, c) in self.tokens.items())

    def tokens_of(self, tier: str) -> int:
        return sum(self.tokens.get(tier, (0, 0)))


@dataclass
class Row:
    """One strategy over the tasks, in task order; `groups` labels each task (its kind
    or level) for the per-group tables."""

    name: str
    correct: list[bool] = field(default_factory=list)
    to_large: list[bool] = field(default_factory=list)
    meters: list[Meter] = field(default_factory=list)
    groups: list[Any] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def add(self, right: bool, large: bool, meter: Meter, group: Any, note: str) -> None:
        self.correct.append(right)
        self.to_large.append(large)
        self.meters.append(meter)
        self.groups.append(group)
        self.notes.append(note)


def wilson(k: int, n: int, z: float = 1.96) -> tuple[float, float]:
    """The 95% Wilson score interval of a proportion k/n (sound at small n and at 0 or n)."""
    if n == 0:
        return 0.0, 1.0
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, centre - half), min(1.0, centre + half)


def accuracy(k: int, n: int) -> str:
    """ "63.2% (12/19; 41-81%)": the share, the counts and the 95% Wilson interval."""
    lo, hi = wilson(k, n)
    return f"{k / n:.1%} ({k}/{n}; {lo:.0%}-{hi:.0%})"
