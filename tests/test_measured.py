"""The benchmarks' shared measuring code (benchmarks/measured.py): the Wilson interval by
hand, and a memo that runs each distinct call once, journals it and resumes from it."""

from __future__ import annotations

import asyncio
import sys
from pathlib import Path

import pytest

from tierroute.backends.base import ChatRequest, ChatResult
from tierroute.types import Tier

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from measured import Memo, Meter, accuracy, wilson


def test_wilson_interval_by_hand() -> None:
    # 12/19: p = 0.6316, centre (p + z^2/2n) / (1 + z^2/n) = 0.6095, half-width 0.1991.
    lo, hi = wilson(12, 19)
    assert lo == pytest.approx(0.4104, abs=1e-3) and hi == pytest.approx(0.8086, abs=1e-3)
    assert wilson(0, 10)[0] == 0.0 and wilson(10, 10)[1] == 1.0
    assert 0.0 < wilson(0, 10)[1] < 0.35  # never the degenerate [0, 0]
    assert wilson(0, 0) == (0.0, 1.0)
    assert accuracy(12, 19) == "63.2% (12/19; 41%-81%)"


class Counting:
    """A model that echoes the prompt's length; counts its calls."""

    def __init__(self) -> None:
        self.calls = 0

    async def complete(self, request: ChatRequest, timeout: float) -> ChatResult:
        self.calls += 1
        text = str(len(str(request.messages)))
        logprobs = (-0.5,) if request.extra.get("logprobs") else None
        return ChatResult(text, "stop", 10, 1, "counting", token_logprobs=logprobs)


def test_memo_runs_each_call_once_journals_and_resumes(tmp_path: Path) -> None:
    journal = tmp_path / "calls.jsonl"
    backend = Counting()
    memo = Memo("small", backend, 5.0, journal)
    meter = Meter()
    ask = meter.asker({"small": memo, "large": Memo("large", backend, 5.0)})
    hi = ChatRequest(messages=[{"role": "user", "content": "hi"}], max_tokens=4)

    async def go() -> None:
        await ask(hi)
        # The same call with logprobs asked for is the same call (every call asks).
        await ask(
            ChatRequest(hi.messages, max_tokens=4, extra={"logprobs": True, "top_logprobs": 1})
        )
        await ask(hi, "large")

    asyncio.run(go())
    assert backend.calls == 2  # one per tier
    assert meter.tokens == {"small": [20, 2], "large": [10, 1]}
    prices = {"small": Tier("small", "s", 1.0, 2.0), "large": Tier("large", "l", 10.0, 20.0)}
    assert meter.cost(prices) == pytest.approx((20 * 1 + 2 * 2 + 10 * 10 + 1 * 20) / 1e6)
    assert meter.tokens_of("large") == 11 and meter.tokens_of("mate") == 0

    # A new memo on the same journal answers from it: no model call, the same result.
    again = Memo("small", Counting(), 5.0, journal)
    call = asyncio.run(again(hi))
    assert again.backend.calls == 0 and call.result.token_logprobs == (-0.5,)
    assert [call.result] == [c.result for c in memo.calls.values()]
