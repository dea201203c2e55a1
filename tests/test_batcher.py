"""The routing micro-batcher: concurrent items share a call, each caller gets its own
result or error, and the gateway's engine routes a burst of fresh prompts through it with
the same decisions as one by one."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import pytest

from tierroute.errors import ConfigError
from tierroute.gateway.batcher import MicroBatcher, explain_batch
from tierroute.gateway.engine import Engine, Hints
from tierroute.gateway.settings import parse_settings
from tierroute.ledger import Ledger
from tierroute.routers import make_router

T = TypeVar("T")


def double(items: list[int]) -> list[int | BaseException]:
    return [ValueError(f"odd {i}") if i % 2 else i * 2 for i in items]


async def gather(batcher: MicroBatcher[int, int], items: list[int]) -> list[object]:
    return await asyncio.gather(*(batcher.submit(i) for i in items), return_exceptions=True)


def test_concurrent_items_share_calls_and_get_their_own_results() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        return double(items)

    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(run, pool, max_batch=8, max_wait_s=0.05)
        results = asyncio.run(gather(batcher, list(range(20))))
    for i, result in enumerate(results):
        if i % 2:
            assert isinstance(result, ValueError) and str(result) == f"odd {i}"
        else:
            assert result == i * 2
    assert sorted(i for call in calls for i in call) == list(range(20))
    assert all(len(call) <= 8 for call in calls)
    assert len(calls) == 3  # 8 + 8 + 4: full batches go at once, the rest after the wait
    assert (batcher.batches, batcher.items) == (3, 20)


def test_a_failing_run_fails_every_caller_of_its_batch_and_the_next_batch_runs() -> None:
    state = {"fail": True}

    def run(items: list[int]) -> list[int | BaseException]:
        if state["fail"]:
            state["fail"] = False
            raise RuntimeError("embedding model crashed")
        return double(items)

    async def main() -> tuple[list[object], object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch=4, max_wait_s=0.01)
            first = await gather(batcher, [0, 2, 4])
            return first, await batcher.submit(6)

    first, after = asyncio.run(main())
    assert all(isinstance(r, RuntimeError) and "crashed" in str(r) for r in first)
    assert after == 12


def test_a_wrong_number_of_results_is_an_error_not_a_mismatch() -> None:
    with ThreadPoolExecutor(1) as pool:
        batcher = MicroBatcher(lambda items: [1], pool, max_batch=4, max_wait_s=0.01)
        results = asyncio.run(gather(batcher, [0, 2]))
    assert all(isinstance(r, RuntimeError) and "2 items" in str(r) for r in results)


def test_batch_of_one_runs_items_one_by_one_in_arrival_order() -> None:
    calls: list[list[int]] = []
    threads: set[str] = set()

    def run(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        threads.add(threading.current_thread().name)
        return double(items)

    with ThreadPoolExecutor(1, thread_name_prefix="route") as pool:
        batcher = MicroBatcher(run, pool, max_batch=1, max_wait_s=0.5)
        results = asyncio.run(gather(batcher, [0, 2, 4, 6]))
    assert results == [0, 4, 8, 12]
    assert calls == [[0], [2], [4], [6]]
    assert threads and all(t.startswith("route") for t in threads)  # off the event loop


def test_items_arriving_during_a_batch_go_together_when_it_ends() -> None:
    release = threading.Event()
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        release.wait(5)
        return double(items)

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch=16, max_wait_s=0)
            first = asyncio.ensure_future(batcher.submit(0))
            while not calls:
                await asyncio.sleep(0.001)
            rest = [asyncio.ensure_future(batcher.submit(i)) for i in (2, 4, 6)]
            await asyncio.sleep(0.02)
            release.set()
            return await asyncio.gather(first, *rest)

    assert asyncio.run(main()) == [0, 4, 8, 12]
    assert calls == [[0], [2, 4, 6]]


def test_a_caller_that_gave_up_is_left_out_of_the_next_batch() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        return double(items)

    async def main() -> object:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch=8, max_wait_s=0.02)
            gone = asyncio.ensure_future(batcher.submit(0))
            await asyncio.sleep(0)
            gone.cancel()
            return await batcher.submit(2)

    assert asyncio.run(main()) == 4
    assert calls == [[2]]


def frozen_clock_run(main: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run `main` on a loop whose clock never moves: a timer (call_later) never fires, so
    whatever completes did so without waiting for one."""
    loop = asyncio.new_event_loop()
    loop.time = lambda: 1000.0  # type: ignore[method-assign]
    try:
        return loop.run_until_complete(main())
    finally:
        loop.close()


async def until_done(future: asyncio.Future[Any], seconds: float = 10) -> None:
    """Turn the loop until `future` is done (real time bounds it: the loop's is frozen)."""
    deadline = time.monotonic() + seconds
    while not future.done() and time.monotonic() < deadline:
        await asyncio.sleep(0)


def test_a_lone_item_on_an_idle_worker_goes_at_once_not_after_a_window() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        return double(items)

    async def main() -> tuple[bool, object]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run, pool)  # the defaults
            lone = asyncio.ensure_future(batcher.submit(4))
            await until_done(lone)
            return lone.done(), lone.result() if lone.done() else None

    assert frozen_clock_run(main) == (True, 8)
    assert calls == [[4]]


def test_an_idle_worker_waits_for_company_only_when_a_window_is_set() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        return double(items)

    async def main() -> bool:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch=2, max_wait_s=0.5)
            first = asyncio.ensure_future(batcher.submit(0))
            for _ in range(50):
                await asyncio.sleep(0)
            waited = not calls  # the window's timer cannot fire on a frozen clock
            second = asyncio.ensure_future(batcher.submit(2))  # fills the batch: it goes
            await until_done(second)
            return waited and first.done()

    assert frozen_clock_run(main)
    assert calls == [[0, 2]]


def test_items_submitted_together_to_an_idle_worker_share_its_first_batch() -> None:
    calls: list[list[int]] = []

    def run(items: list[int]) -> list[int | BaseException]:
        calls.append(items)
        return double(items)

    async def main() -> list[object]:
        with ThreadPoolExecutor(1) as pool:
            batcher: MicroBatcher[int, int] = MicroBatcher(run, pool, max_batch=8)
            burst = asyncio.gather(*(batcher.submit(i) for i in (0, 2, 4, 6, 8)))
            await until_done(burst)
            return list(burst.result())

    assert frozen_clock_run(main) == [0, 4, 8, 12, 16]
    assert calls == [[0, 2, 4, 6, 8]]


def test_the_gateway_routes_a_lone_fresh_prompt_without_a_window(tmp_path: Path) -> None:
    engine = engine_for(tmp_path, {})  # the default settings
    try:

        async def main() -> object:
            routed = asyncio.ensure_future(
                engine.route([{"role": "user", "content": "a lone fresh prompt"}], Hints(), 16)
            )
            await until_done(routed, 120)
            return routed.result() if routed.done() else None

        assert engine._batcher.max_wait_s == 0
        assert frozen_clock_run(main) is not None
        assert (engine._batcher.batches, engine._batcher.items) == (1, 1)
    finally:
        engine.close()


def test_bad_parameters_are_refused() -> None:
    with pytest.raises(ValueError, match="max_batch"):
        MicroBatcher(double, None, max_batch=0)
    with pytest.raises(ValueError, match="max_wait_s"):
        MicroBatcher(double, None, max_wait_s=-1)


PROMPTS = [
    "Prove that sqrt(2) is irrational, step by step.",
    "hi",
    "Translate 'good morning' into Spanish.",
    "Implement a lock-free queue in C++ and explain its memory ordering.",
    "What is the capital of France?",
    "hi",  # a duplicate in the same batch
]


def test_explain_batch_embeds_once_and_matches_one_by_one(encoder) -> None:  # type: ignore[no-untyped-def]
    from tierroute.encoder import TextEncoder

    fresh = TextEncoder(encoder.embedder)
    batched_router = make_router("rules", lambda: fresh)  # rules + tagger share `fresh`
    batched_router.explain_text("warm up")  # embeds the tag prototypes, as serve does
    calls: list[int] = []
    embed = fresh.embedder.embed

    def counting(texts):  # type: ignore[no-untyped-def]
        calls.append(len(texts))
        return embed(texts)

    fresh.embedder.embed = counting  # type: ignore[method-assign]
    try:
        batched = explain_batch([(batched_router, p) for p in PROMPTS])
    finally:
        del fresh.embedder.embed
    assert calls == [len(set(PROMPTS))]  # one call for the distinct texts; then the memo
    by_rules = [batched_router.explain_text(p) for p in PROMPTS]
    for got, want in zip(batched, by_rules, strict=True):
        assert not isinstance(got, BaseException)
        assert got.score == pytest.approx(want.score, abs=1e-5) and got.reasons == want.reasons


def test_one_text_failing_is_its_own_error() -> None:
    class Picky:
        encoder = None

        def explain_text(self, text: str) -> object:
            if text == "bad":
                raise ValueError("cannot route this")
            return text.upper()

    out = explain_batch([(Picky(), "a"), (Picky(), "bad"), (Picky(), "b")])  # type: ignore[list-item]
    assert out[0] == "A" and out[2] == "B"
    assert isinstance(out[1], ValueError)


def engine_for(tmp_path: Path, gateway: dict[str, object]) -> Engine:
    tiers = [
        {"name": n, "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": n}
        for n in ("small", "large")
    ]
    settings = parse_settings({"tiers": tiers, "gateway": gateway}, "test")
    return Engine(settings, make_router("rules"), {}, Ledger(tmp_path / "ledger.db"))


def test_engine_routes_a_burst_in_batches_with_the_decisions_of_one_by_one(
    tmp_path: Path,
) -> None:
    texts = [f"{p} (request {i})" for i, p in enumerate(PROMPTS * 8)]

    async def burst(engine: Engine) -> list[tuple[str, float]]:
        routed = await asyncio.gather(
            *(engine.route([{"role": "user", "content": t}], Hints(), 16) for t in texts)
        )
        return [(r.decision.tier.name, r.decision.score) for r in routed]

    batched = engine_for(tmp_path / "a", {"route_batch_max": 16, "route_batch_wait_ms": 5})
    single = engine_for(tmp_path / "b", {"route_batch_max": 1})
    try:
        got, want = asyncio.run(burst(batched)), asyncio.run(burst(single))
        assert [t for t, _ in got] == [t for t, _ in want]
        assert np.allclose([s for _, s in got], [s for _, s in want], atol=1e-5)
        assert batched._batcher.items == len(texts)
        assert batched._batcher.batches <= len(texts) // 16 + 2
        assert single._batcher.batches == len(texts)
        exported = batched.metrics.render().decode()
        assert f"tierroute_routing_batch_size_count {batched._batcher.batches}.0" in exported
        assert f"tierroute_routing_batch_size_sum {len(texts)}.0" in exported
    finally:
        batched.close()
        single.close()


@pytest.mark.parametrize(
    ("key", "value"),
    [("route_batch_max", 0), ("route_batch_max", 257), ("route_batch_wait_ms", -1)],
)
def test_config_bounds_the_batch(key: str, value: int) -> None:
    tiers = [
        {"name": n, "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": n}
        for n in ("small", "large")
    ]
    with pytest.raises(ConfigError, match=key):
        parse_settings({"tiers": tiers, "gateway": {key: value}}, "test")
