"""What choosing among a tier's models adds to a routing decision: prints figures, asserts
nothing.

    python benchmarks/choose_bench.py [--queries 300]

The engine's `route` with the default router (embedding, tagger, factor router, policy),
on short chat prompts, for the same two-tier gateway three ways: one model per tier
("single"); the large tier of two models chosen by priors ("priors", no router call); and
of two models of which one reads the factor router's `model_probabilities` ("router": one
more hop to the routing thread and a small matrix product, the prompt's embedding being
memoised). Each form has its own router (and embedding memo), no decision cache, and the
three take turns on each prompt so a busy machine slows them alike. No upstream is called.
Prints p50 / p99 / mean ms per decision and the share of first choices.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import tempfile
import time
from collections import Counter
from pathlib import Path
from typing import Any

STEMS = [
    "Write a Python function that {}.",
    "Prove that {} step by step.",
    "What is {}?",
    "Explain how {} works.",
    "Translate '{}' into German.",
]
FILLS = [
    "reverses a linked list",
    "the sum of two odd numbers is even",
    "the capital of Australia",
    "a hash map",
    "good morning, how are you",
    "sorts a list of strings by length",
    "there are infinitely many primes",
    "photosynthesis",
    "compound interest",
    "a TCP handshake",
]


def large_tier(form: str) -> dict[str, Any]:
    url = "http://127.0.0.1:9/v1"  # never called: only routing is measured
    one = {"kind": "openai", "base_url": url, "input_price_per_m": 10, "output_price_per_m": 30}
    if form == "single":
        return {"name": "large", "model": "gpt-4-class", **one}
    cheap = {**one, "input_price_per_m": 0.8, "output_price_per_m": 0.8}
    coder = {"name": "coder", "model": "coder", "tasks": {"code": 0.95}, "prior": 0.4, **cheap}
    general = {"name": "general", "model": "gpt-4-class", **one}
    if form == "router":
        general["router_model"] = "gpt-4-1106-preview"
    else:
        general["prior"] = 0.8
    return {"name": "large", "models": [coder, general]}


FORMS = ("single", "priors", "router")


def engine_for(form: str, folder: Path) -> Any:
    from tierroute.artifact import open_router
    from tierroute.gateway.engine import Engine
    from tierroute.gateway.settings import apply_calibration, parse_settings
    from tierroute.ledger import Ledger

    doc = {
        "tiers": [
            {"name": "small", "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": "s"},
            large_tier(form),
        ],
        "gateway": {"cache_size": 0, "choose": {"lambda_per_usd": 20}},
    }
    settings = parse_settings(doc, form)
    # a router of its own: its encoder's memo must not hold another form's embeddings
    router, artifact = open_router("default")
    router.explain_text("warm up")
    assert artifact is not None and artifact.threshold is not None
    apply_calibration(settings, artifact.threshold)
    return Engine(settings, router, {}, Ledger(folder / f"{form}.db"))


def measure(prompts: list[str]) -> None:
    """The three forms take turns on each prompt, so a busy machine slows them alike."""
    from tierroute.gateway.engine import Hints

    with tempfile.TemporaryDirectory() as folder:
        engines = {form: engine_for(form, Path(folder)) for form in FORMS}
        times: dict[str, list[float]] = {form: [] for form in FORMS}
        chosen: dict[str, Counter[str]] = {form: Counter() for form in FORMS}

        async def run() -> None:
            for text in prompts:
                for form, engine in engines.items():
                    messages = [{"role": "user", "content": text}]
                    start = time.perf_counter()
                    routed = await engine.route(messages, Hints(), 256)
                    times[form].append((time.perf_counter() - start) * 1000)
                    chosen[form][routed.chain[0]] += 1

        try:
            asyncio.run(run())
        finally:
            for engine in engines.values():
                engine.close()
                engine.ledger.close()
    for form in FORMS:
        t = sorted(times[form])
        p99 = t[min(len(t) - 1, int(0.99 * len(t)))]
        shares = ", ".join(f"{k} {v / len(t):.0%}" for k, v in sorted(chosen[form].items()))
        print(
            f"{form:<8} p50 {statistics.median(t):6.2f} ms  p99 {p99:6.2f} ms  "
            f"mean {statistics.fmean(t):6.2f} ms   first choice: {shares}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--queries", type=int, default=300)
    args = parser.parse_args()
    base = [stem.format(fill) for stem in STEMS for fill in FILLS]
    prompts = [f"{p} (case {i})" for i in range(args.queries // len(base) + 1) for p in base]
    prompts = prompts[: args.queries]
    measure(prompts)


if __name__ == "__main__":
    main()
