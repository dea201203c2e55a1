"""Collaboration strategies against single tiers and the two-tier cascade, with the real
local models (issue 13, live measurement). Run through `collab_bench.py --live`.

Tasks are generated (seeded) with checkable answers: arithmetic word problems with computed
integer answers (cascade_bench's generator, levels 1-4) and small Python functions whose
answers are run against generated unit tests in a subprocess (`python3 -I`, a timeout).

Models: the only chat models this machine has are SmolLM2-135M (small) and
Qwen2.5-Coder-1.5B (large). Gemma 3 270M ships as a base model without a chat template
(it answers a chat prompt with nothing) and no remote endpoint is reachable, so there is no
second small model: cross-model agreement is measured with the large model as the partner,
the only other model here, which shows what it costs when the partner is not cheap.

Strategies, each over every task, all through `tierroute.cascade.Cascade` and the verifiers
of `tierroute.collab` (the gateway's code):
    always small / always large        one tier answers
    cascade, logprob mean >= T         the two-tier cascade (escalates to large)
    cross (partner large)              keep small when the large model's final answer
                                       agrees, else escalate (its answer is reused)
    review (reviewer large)            the large model checks the draft: KEEP or a
                                       correction, max_tokens = the task's
    best-of-3 by logprob, accept all   3 small answers (greedy + 2 sampled at 0.7),
                                       the best mean token logprob returned
    best-of-3 by logprob >= T          the same, escalating below T
    best-of-3 by SmolLM2 judge         the same 3 answers; SmolLM2 picks one (JudgeScorer),
                                       accept all, and escalating below T
    best-of-3, oracle pick             a right answer among the 3 when there is one: the
                                       bound of any scorer (not a method)

Thresholds (T) are set with --thresholds; --sweep prints every threshold's accuracy and
cost, to tune on one --seed and report on another.

How it is measured (benchmarks/measured.py, shared with cascade_bench): each distinct
model call runs once (a memo), and each strategy is charged the measured time and tokens
of the calls it makes; accuracy comes with its 95% Wilson interval. A task's
latency is the sum of its strategy's calls, made one after another. Cost uses per-token
prices per model, documented in the output: by default the embedded gateway.yaml's notional
prices (USD per M tokens, small 0.01 in / 0.02 out, large 0.10 / 0.20), and a second column
with the large model's output priced at 4x its input (0.10 / 0.40), closer to how hosted
models are priced, because draft-and-review trades input tokens for output tokens.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

from cascade_bench import SYSTEM as ARITH_SYSTEM
from cascade_bench import make_problems
from measured import Memo, Meter, Row, accuracy

from tierroute.backends.base import ChatRequest, ChatResult
from tierroute.cascade import AllOf, AnyOf, Cascade, LogprobVerifier, Verifier, final_answer
from tierroute.collab import (
    BestOfNVerifier,
    Candidate,
    CrossModelVerifier,
    JudgeScorer,
    Pick,
    ReviewVerifier,
    code_block,
)
from tierroute.types import Tier

CODE_SYSTEM = (
    "You write small Python functions. Reply with only the function in one ```python "
    "block, no explanation, no examples."
)
# Default thresholds; --thresholds sets them, tuned with --sweep on another seed.
THRESHOLDS = {"logprob": 0.7, "best": 0.75, "judge": 0.9}
SWEEP = tuple(round(0.05 * i, 2) for i in range(21))  # 0.0, 0.05, ..., 1.0
SMALL, LARGE, MATE = "smollm2-135m", "qwen2.5-coder-1.5b", "gemma3-270m"
PRICES = {  # USD per M tokens (input, output) of each tier, three price sets. Gemma (the
    # "mate", 270M parameters) at twice SmolLM2's (135M) prices, by size like the other two;
    # the third set prices it as SmolLM2, since 170M of its 270M are embeddings and its
    # per-token compute is about SmolLM2's.
    name: {
        "small": Tier("small", SMALL, *small),
        "mate": Tier("mate", MATE, *(mate * p for p in small)),
        "large": Tier("large", LARGE, *large),
    }
    for name, small, large, mate in (
        ("gateway.yaml", (0.01, 0.02), (0.10, 0.20), 2),
        ("output 4x input", (0.01, 0.04), (0.10, 0.40), 2),
        ("Gemma at SmolLM2's price", (0.01, 0.02), (0.10, 0.20), 1),
    )
}


# ---------------------------------------------------------------- tasks


@dataclass(frozen=True)
class Task:
    id: str
    kind: str  # "arith" | "code"
    system: str
    prompt: str
    answer: str  # arith: the number; code: the test source
    inputs: tuple[str, ...] = ()  # code: call expressions, for the cross probe
    max_tokens: int = 64

    def request(self) -> ChatRequest:
        return ChatRequest(
            messages=[
                {"role": "system", "content": self.system},
                {"role": "user", "content": self.prompt},
            ],
            max_tokens=self.max_tokens,
            temperature=0.0,
            extra={"logprobs": True, "top_logprobs": 1},
        )


def _code_specs(rng: random.Random) -> list[tuple[str, str, Callable[..., Any], list[Any]]]:
    """(signature, description, reference, argument tuples) of the code templates."""
    k, m = rng.sample(range(2, 10), 2)
    lists = [[rng.randint(-20, 40) for _ in range(rng.randint(3, 7))] for _ in range(4)]
    words = ["banana", "education", "sky", "queueing", "python"]
    return [
        (
            "count_above(xs)",
            f"returns how many numbers in the list xs are greater than {k}",
            lambda xs: sum(x > k for x in xs),
            [(xs,) for xs in lists],
        ),
        (
            "sum_squares(xs)",
            "returns the sum of the squares of the numbers in the list xs",
            lambda xs: sum(x * x for x in xs),
            [(xs,) for xs in lists],
        ),
        (
            "count_vowels(s)",
            "returns how many characters of the lowercase string s are vowels (a, e, i, o, u)",
            lambda s: sum(c in "aeiou" for c in s),
            [(w,) for w in words],
        ),
        (
            "digit_product(n)",
            "returns the product of the decimal digits of the positive integer n",
            lambda n: __import__("math").prod(int(d) for d in str(n)),
            [(rng.randint(10, 99999),) for _ in range(4)],
        ),
        (
            "repeat_join(s)",
            f"returns the string s repeated {k} times with '-' between the copies",
            lambda s: "-".join([s] * k),
            [(w,) for w in words[:3]],
        ),
        (
            "divisible(n)",
            f"returns True if the integer n is divisible by {k} or by {m}, else False",
            lambda n: n % k == 0 or n % m == 0,
            [(rng.randint(1, 200),) for _ in range(6)],
        ),
        (
            "scale_evens(xs)",
            f"returns a list of the numbers of the list xs multiplied by {k}, keeping only "
            "the results that are even, in order",
            lambda xs: [x * k for x in xs if (x * k) % 2 == 0],
            [(xs,) for xs in lists],
        ),
        (
            "span(xs)",
            "returns the largest number in the non-empty list xs minus the smallest",
            lambda xs: max(xs) - min(xs),
            [(xs,) for xs in lists],
        ),
    ]


def make_tasks(n_arith: int, n_code: int, seed: int) -> list[Task]:
    rng = random.Random(seed + 1)
    tasks = [
        Task(p.id, "arith", ARITH_SYSTEM, p.text, str(p.answer), max_tokens=64)
        for p in make_problems(n_arith, seed)
    ]
    for i in range(n_code):
        specs = _code_specs(rng)  # each template in turn, with fresh constants and inputs
        sig, desc, ref, args = specs[i % len(specs)]
        name = sig.split("(")[0]
        calls = tuple(f"{name}({', '.join(repr(a) for a in arg)})" for arg in args)
        tests = "\n".join(
            f"assert {c} == {ref(*arg)!r}, {c!r}" for c, arg in zip(calls, args, strict=True)
        )
        prompt = f"Write a Python function {sig} that {desc}."
        tasks.append(Task(f"c{i:03d}-{name}", "code", CODE_SYSTEM, prompt, tests, calls, 128))
    return tasks


def run_python(source: str, timeout: float = 5.0) -> tuple[bool, str]:
    """Run `source` in a fresh isolated interpreter: (exit 0, its stdout)."""
    with tempfile.TemporaryDirectory() as tmp:
        try:
            done = subprocess.run(
                [sys.executable, "-I", "-c", source],
                cwd=tmp,
                capture_output=True,
                text=True,
                timeout=timeout,
            )
        except subprocess.TimeoutExpired:
            return False, ""
    return done.returncode == 0, done.stdout


def program(text: str) -> str:
    """The code of an answer: its last fenced block, else the whole reply (a few-shot
    model's one-line def, without the space it starts with after "A:")."""
    block = code_block(text)
    return block if block is not None else text.strip()


def is_right(task: Task, text: str) -> bool:
    if task.kind == "arith":
        return final_answer(text) == task.answer
    ok, _ = run_python(program(text) + "\n" + task.answer)
    return ok


def probe_for(task: Task) -> Callable[[str], str | None]:
    """What a code answer does on the task's inputs (no expected values): for cross."""

    def probe(code: str) -> str | None:
        lines = [
            f"try:\n    print(repr({c}))\nexcept Exception as e:\n    print('error')"
            for c in task.inputs
        ]
        ok, out = run_python(code + "\n" + "\n".join(lines))
        return out.strip() if ok else None

    return probe


Strategy = Callable[[Task, Meter], Awaitable[tuple[ChatResult, bool, str]]]


def single(tier: str, memos: dict[str, Memo]) -> Strategy:
    async def run(task: Task, meter: Meter) -> Any:
        return await meter.asker(memos)(task.request(), tier), tier == "large", ""

    return run


def through_cascade(
    make: Callable[[Task], Verifier], threshold: float, memos: dict[str, Memo]
) -> Strategy:
    async def run(task: Task, meter: Meter) -> Any:
        ask = meter.asker(memos)

        async def large(request: ChatRequest) -> ChatResult:
            result: ChatResult = await ask(request, "large")
            return result

        out = await Cascade(make(task), threshold).run(ask, large, task.request())
        # A draft the reviewer corrected (or any answer from the large model) counts as
        # large's answer for the "to large" share.
        answered_by_large = out.escalated or out.draft.tiers[out.draft.chosen] == "large"
        return out.answer, answered_by_large, out.draft.note

    return run


def judged(task: Task) -> BestOfNVerifier:
    """Best-of-3 with SmolLM2 (the smallest tier) as the judge; code compared by behaviour."""
    probe = probe_for(task) if task.kind == "code" else None
    return BestOfNVerifier(3, 0.7, scorer=JudgeScorer(None, 8, 800, probe))


class OracleScorer:
    """Picks a right candidate when there is one: what any scorer of these n small answers
    could reach at best (an upper bound, not a method)."""

    name = "oracle"

    def __init__(self, task: Task) -> None:
        self.task = task

    def prepare(self, request: ChatRequest) -> ChatRequest:
        return request

    async def pick(self, request: ChatRequest, candidates: Sequence[Candidate], ask: Any) -> Pick:
        for i, c in enumerate(candidates):
            if is_right(self.task, c.result.text):
                return Pick(i, 1.0, f"{c.who} is right")
        return Pick(None, 0.0, f"none of {len(candidates)} is right")


TUNABLE = {  # --thresholds key: the strategy's name
    "logprob": "two-tier cascade, logprob mean",
    "best": "best-of-3 by logprob",
    "judge": "best-of-3 by SmolLM2 judge",
}


def verifier_for(key: str) -> Callable[[Task], Verifier]:
    if key == "logprob":
        return lambda t: LogprobVerifier("mean")
    if key == "best":
        return lambda t: BestOfNVerifier(3, 0.7)
    return judged


def tunable(memos: dict[str, Memo], key: str, threshold: float) -> tuple[str, Strategy]:
    """The strategies whose threshold is a free choice, by their --thresholds key."""
    name = f"{TUNABLE[key]} >= {threshold:g}"
    return name, through_cascade(verifier_for(key), threshold, memos)


def cross_with(partner: str) -> Callable[[Task], CrossModelVerifier]:
    return lambda t: CrossModelVerifier(partner, probe_for(t) if t.kind == "code" else None)


CROSS_MATE = "cross, SmolLM2 + Gemma agree, else large"
JUDGE_ORACLE = "best-of-3, oracle pick (upper bound), accept all"
MATE_STRATEGIES = ("mate", "cross-mate", "either", "both")


def combined(how: str, threshold: float, memos: dict[str, Memo]) -> tuple[str, Strategy]:
    """SmolLM2's logprob and Gemma's agreement together: "either" keeps the small answer
    when its logprob mean >= T or (asked only then) Gemma agrees; "both" needs both."""

    def make(t: Task) -> Verifier:
        members = [LogprobVerifier("mean"), cross_with("mate")(t)]
        return AnyOf(members) if how == "either" else AllOf(members)

    name = (
        f"logprob >= {threshold:g} or Gemma agrees, else large"
        if how == "either"
        else f"logprob >= {threshold:g} and Gemma agrees, else large"
    )
    return name, through_cascade(make, threshold, memos)


def strategy(
    key: str, memos: dict[str, Memo], thresholds: dict[str, float]
) -> tuple[str, Strategy]:
    """One strategy by its --strategies key; "cascade", "best" and "judge" take the
    threshold of --thresholds, or their own after "@" ("cascade@0.65")."""
    base, _, at = key.partition("@")
    if base in ("cascade", "best", "judge"):
        t = thresholds["logprob" if base == "cascade" else base] if not at else float(at)
        return tunable(memos, "logprob" if base == "cascade" else base, t)
    if at and base not in ("either", "both"):
        raise ValueError(f"strategy {base!r} takes no threshold")
    if base == "small":
        return "always small (SmolLM2-135M)", single("small", memos)
    if base == "large":
        return "always large (Qwen2.5-Coder-1.5B)", single("large", memos)
    if base == "mate":
        return "always Gemma 3 270M (base, few-shot)", single("mate", memos)
    if base == "cross-mate":
        return CROSS_MATE, through_cascade(cross_with("mate"), 0.5, memos)
    if base in ("either", "both"):
        t = thresholds["logprob"] if not at else float(at)
        return combined(base, t, memos)
    if base == "cross-large":
        return "cross, partner = large", through_cascade(cross_with("large"), 0.5, memos)
    if base == "review":
        return "review by large", through_cascade(
            lambda t: ReviewVerifier("large", t.max_tokens), 0.5, memos
        )
    if base == "best-all":
        return "best-of-3 by logprob, accept all", through_cascade(
            lambda t: BestOfNVerifier(3, 0.7), 0.0, memos
        )
    if base == "judge-all":
        return "best-of-3 by SmolLM2 judge, accept all", through_cascade(judged, 0.0, memos)
    if base == "oracle":
        return JUDGE_ORACLE, through_cascade(
            lambda t: BestOfNVerifier(3, 0.7, scorer=OracleScorer(t)), 0.0, memos
        )
    raise ValueError(f"unknown strategy {key!r}; known: {', '.join(STRATEGIES)}")


# The keys --strategies knows; "@T" after cascade, best or judge sets its threshold.
STRATEGIES = (
    "small",
    "large",
    "mate",
    "cascade",
    "cross-mate",
    "either",
    "both",
    "cross-large",
    "review",
    "best-all",
    "best",
    "judge-all",
    "judge",
    "oracle",
)
# The seed-0 run's set, in its order (README).
DEFAULT_STRATEGIES = (
    "small",
    "large",
    "cascade",
    "cross-large",
    "review",
    "best-all",
    "best",
    "judge-all",
    "judge",
    "oracle",
)


def strategies(
    memos: dict[str, Memo], thresholds: dict[str, float], keys: Sequence[str] = DEFAULT_STRATEGIES
) -> list[tuple[str, Strategy]]:
    return [strategy(key, memos, thresholds) for key in keys]


# ---------------------------------------------------------------- report


def table(rows: list[Row], kinds: set[str]) -> str:
    head = (
        "| strategy | accuracy | answered by large | "
        + " | ".join(f"cost vs always-large ({name})" for name in PRICES)
        + " | small / Gemma / large tokens per task | latency p50 / mean s |"
    )
    lines = [head, "|---|---|---|" + "---|" * len(PRICES) + "---|---|"]
    base = next(r for r in rows if r.name.startswith("always large"))
    for r in rows:
        idx = [i for i, k in enumerate(r.groups) if k in kinds]
        n = len(idx)
        if not n:
            continue
        right = sum(r.correct[i] for i in idx)
        costs = []
        for prices in PRICES.values():
            mine = sum(r.meters[i].cost(prices) for i in idx)
            ref = sum(base.meters[i].cost(prices) for i in idx)
            costs.append(f"{mine / ref:.0%}")
        small, mate, large = (
            sum(r.meters[i].tokens_of(tier) for i in idx) / n for tier in ("small", "mate", "large")
        )
        secs = [r.meters[i].seconds for i in idx]
        up = sum(r.to_large[i] for i in idx) / n
        lines.append(
            f"| {r.name} | {accuracy(right, n)} | {up:.0%} "
            f"| {' | '.join(costs)} | {small:.0f} / {mate:.0f} / {large:.0f} "
            f"| {statistics.median(secs):.1f} / {statistics.fmean(secs):.1f} |"
        )
    return "\n".join(lines)


def interleaved(tasks: list[Task]) -> list[Task]:
    """Task by task, the kinds interleaved: a run stopped early has every strategy on the
    same mix of tasks, and a rerun with smaller counts reuses the journal's calls."""
    arith = [t for t in tasks if t.kind == "arith"]
    code = [t for t in tasks if t.kind == "code"]
    ratio = max(1, round(len(arith) / max(1, len(code))))
    order: list[Task] = []
    while arith or code:
        order += arith[:ratio] + code[:1]
        arith, code = arith[ratio:], code[1:]
    return order


def make_memos(args: argparse.Namespace, journal: Path, keys: Sequence[str]) -> dict[str, Memo]:
    """A memo per model the strategies use; Gemma (the "mate" tier) only when asked for."""
    from tierroute.backends.few_shot import FewShot
    from tierroute.backends.llamacpp import LlamaCppBackend
    from tierroute.backends.models import MODELS, resolve_model

    models = {"small": (SMALL, 600.0), "large": (LARGE, 900.0)}
    if any(key.split("@")[0] in MATE_STRATEGIES for key in keys):
        models["mate"] = (MATE, 600.0)
    return {
        tier: Memo(
            tier,
            LlamaCppBackend(
                tier,
                resolve_model(model),
                n_ctx=1024,
                n_threads=args.threads,
                few_shot=None if MODELS[model].chat else FewShot(),
            ),
            timeout,
            journal,
        )
        for tier, (model, timeout) in models.items()
    }


def report(
    args: argparse.Namespace, rows: list[Row], done: int, total: int, minutes: float, wall: float
) -> str:
    kinds = [("All tasks", {"arith", "code"}), ("Arithmetic", {"arith"}), ("Code", {"code"})]
    names = {r.name for r in rows}
    parts = [
        f"Live run: {args.arith} arithmetic + {args.code} code tasks, seed {args.seed}, "
        + ("" if args.tasks is None else f"the first {total} in the run's order, ")
        + f"{done} of {total} done, llama.cpp {args.threads} thread(s), {minutes:.1f} min of "
        f"model calls ({wall:.1f} min this run). Prices (USD per M tokens, in / out): "
        + "; ".join(
            f"{name}: "
            + ", ".join(
                f"{t} {p.input_price_per_m:g}/{p.output_price_per_m:g}" for t, p in prices.items()
            )
            for name, prices in PRICES.items()
        ),
        *(f"{title}\n\n{table(rows, kind)}" for title, kind in kinds),
    ]
    if {"best-of-3 by SmolLM2 judge, accept all", JUDGE_ORACLE} <= names:
        parts.append(judge_summary(rows))
    if any(r.name.startswith(CROSS_MATE) for r in rows):
        parts.append(pair_summary(rows))
    return "\n\n".join(parts)


async def live_async(args: argparse.Namespace) -> str:
    keys = args.strategies
    if "large" not in keys:
        raise SystemExit("--strategies must include large: costs are shares of it")
    tasks = make_tasks(args.arith, args.code, args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    memos = make_memos(args, out / f"collab_calls_seed{args.seed}.jsonl", keys)
    start = time.perf_counter()
    answers = []
    plan = strategies(memos, args.thresholds, keys)
    rows = [Row(name) for name, _ in plan]
    order = interleaved(tasks)[: args.tasks]

    def write(done: int) -> str:
        minutes = sum(m.minutes for m in memos.values())
        text = report(args, rows, done, len(order), minutes, (time.perf_counter() - start) / 60)
        (out / "collab_live.md").write_text(text + "\n")
        with (out / "collab_live.jsonl").open("w") as f:
            for a in answers:
                f.write(json.dumps(a) + "\n")
        return text

    for n, task in enumerate(order, 1):
        print(f"task {n}/{len(order)} {task.id}", file=sys.stderr, flush=True)
        for row, (name, run) in zip(rows, plan, strict=True):
            meter = Meter()
            answer, large, note = await run(task, meter)
            row.add(is_right(task, answer.text), large, meter, task.kind, note)
            answers.append(
                {
                    "strategy": name,
                    "task": task.id,
                    "right": row.correct[-1],
                    "note": note,
                    "answer": answer.text,
                    "seconds": meter.seconds,
                    "tokens": meter.tokens,
                }
            )
        write(n)  # partial results as the run goes
    text = write(len(order))
    if args.sweep:
        large_row = rows[keys.index("large")]
        if {"cascade", "best", "judge"} <= {k.split("@")[0] for k in keys}:
            text += "\n\n" + await sweep_thresholds(order, memos, large_row)
        if "mate" in memos:
            text += "\n\n" + await sweep_either(order, memos, large_row)
        (out / "collab_live.md").write_text(text + "\n")
    for memo in memos.values():
        await memo.backend.aclose()
    return text


def pair_summary(rows: list[Row]) -> str:
    """SmolLM2 and Gemma as a pair: each one's accuracy, how often their final answers
    agree, and how often the shared answer is right when they do (the precision of
    agreement), from the cross row's notes and the two single rows."""
    cross = next(r for r in rows if r.name == CROSS_MATE)
    agree = [i for i, note in enumerate(cross.notes) if note.startswith("accepted")]
    n = len(cross.notes)
    right = sum(cross.correct[i] for i in agree)
    parts = [
        f"SmolLM2 + Gemma: their final answers agree on {len(agree)} of {n} tasks "
        f"({len(agree) / max(1, n):.0%}); when they agree the answer is right on "
        + (accuracy(right, len(agree)) if agree else "- (no agreement)")
    ]
    for label, kind in (("arithmetic", "arith"), ("code", "code")):
        idx = [i for i in agree if cross.groups[i] == kind]
        total = sum(g == kind for g in cross.groups)
        if total:
            parts.append(
                f"{label}: agree on {len(idx)} of {total}, right on "
                f"{sum(cross.correct[i] for i in idx)} of them"
            )
    singles = [r for r in rows if r.name.startswith(("always small", "always Gemma"))]
    if len(singles) == 2:
        a, b = singles
        only = sum(x and not y for x, y in zip(a.correct, b.correct, strict=True))
        other = sum(y and not x for x, y in zip(a.correct, b.correct, strict=True))
        together = sum(x and y for x, y in zip(a.correct, b.correct, strict=True))
        parts.append(f"right: both {together}, SmolLM2 only {only}, Gemma only {other} (of {n})")
    return "; ".join(parts) + "."


_PICKED = re.compile(r"judge picks (.+?) of (\d+) distinct")


def judge_summary(rows: list[Row]) -> str:
    """What the SmolLM2 judge did: how often it was asked (the three answers differed),
    how often it named the first one shown (the greedy answer), and how often it found a
    right answer when one of the three was right (the oracle row)."""
    judge = next(r for r in rows if r.name.startswith("best-of-3 by SmolLM2 judge, accept"))
    oracle = next(r for r in rows if r.name.startswith("best-of-3, oracle"))
    asked = [i for i, note in enumerate(judge.notes) if "judge" in note.split("best_of_n")[-1]]
    picks = [_PICKED.search(judge.notes[i]) for i in asked]
    first = sum(1 for m in picks if m is not None and m.group(1) == "small")
    unread = sum(1 for m in picks if m is None)
    findable = [i for i in asked if oracle.correct[i]]
    found = sum(judge.correct[i] for i in findable)
    agreed = sum("answers agree" in note for note in judge.notes)
    return (
        f"Judge: the three small answers agreed on {agreed} of {len(judge.notes)} tasks (no "
        f"judge call); it was asked on {len(asked)}, named the first answer shown (the "
        f"greedy one) {first} times and no candidate {unread} times; on the {len(findable)} "
        f"asked tasks where one of the three answers was right it returned a right one "
        f"{found} times."
    )


async def sweep_thresholds(tasks: list[Task], memos: dict[str, Memo], large: Row) -> str:
    """Accuracy and cost share (gateway.yaml prices) of each tunable strategy at every
    threshold of SWEEP, and the threshold each would get: the most accurate at <= 60% of
    always-large's cost, the cheaper on a tie. A cascade at threshold T answers with its
    draft when the draft's confidence >= T, else with the large model's answer to the
    same request (always-large's call), so one draft per task gives every T. Picked on
    the tasks it is reported on, a threshold overstates what it would do on new tasks:
    tune on one seed and report on another."""
    prices = PRICES["gateway.yaml"]
    base = sum(m.cost(prices) for m in large.meters)
    cells: dict[str, list[str]] = {}
    chosen: dict[str, str] = {}
    for key in THRESHOLDS:
        make = verifier_for(key)
        drafts = []
        for task in tasks:
            meter = Meter()
            draft = await Cascade(make(task), 0.0).draft(meter.asker(memos), task.request())
            kept = is_right(task, draft.result.text)
            drafts.append((draft.verdict.confidence, kept, meter.cost(prices)))
        best: tuple[float, float, float] | None = None  # (accuracy, -cost, T)
        for t in SWEEP:
            right = cost = 0.0
            for (conf, ok, spent), big_ok, big in zip(
                drafts, large.correct, large.meters, strict=True
            ):
                up = conf < t
                right += big_ok if up else ok
                cost += spent + (big.cost(prices) if up else 0.0)
            acc, share = right / len(tasks), cost / base
            cells.setdefault(key, []).append(f"{acc:.0%} / {share:.0%}")
            if share <= 0.6 and (best is None or (acc, -share) > best[:2]):
                best = (acc, -share, t)
        if best is not None:
            chosen[key] = f"{key}={best[2]:g} ({best[0]:.1%} at {-best[1]:.0%})"
    lines = [
        f"Threshold sweep on these {len(tasks)} tasks: accuracy / cost vs always-large "
        "(gateway.yaml prices)",
        "",
        "| T | " + " | ".join(TUNABLE[k] for k in THRESHOLDS) + " |",
        "|---|" + "---|" * len(THRESHOLDS),
    ]
    for n, t in enumerate(SWEEP):
        lines.append(f"| {t:g} | " + " | ".join(cells[k][n] for k in THRESHOLDS) + " |")
    lines += [
        "",
        "Most accurate at <= 60% of always-large (a tuning result on this seed, not a "
        f"figure to report for it): {', '.join(chosen.values()) or 'none'}",
    ]
    return "\n".join(lines)


async def sweep_either(tasks: list[Task], memos: dict[str, Memo], large: Row) -> str:
    """The "logprob >= T or Gemma agrees" cascade at every T of SWEEP, beside the plain
    logprob cascade, from the same calls: per task SmolLM2's answer and confidence, and
    Gemma's agreement (asked, and paid, only below T)."""
    prices = PRICES["gateway.yaml"]
    base = sum(m.cost(prices) for m in large.meters)
    per_task = []
    for task in tasks:
        small, mate = Meter(), Meter()
        draft = await Cascade(LogprobVerifier("mean"), 0.0).draft(
            small.asker(memos), task.request()
        )
        cross = await Cascade(cross_with("mate")(task), 0.5).draft(
            mate.asker(memos), task.request()
        )
        mate_cost = mate.cost(prices) - small.cost(prices)  # the same small call, then Gemma's
        ok = is_right(task, draft.result.text)
        per_task.append(
            (draft.verdict.confidence, ok, small.cost(prices), cross.accepted, mate_cost)
        )
    lines = [
        f"Sweep of the logprob threshold on these {len(tasks)} tasks: accuracy / cost vs "
        "always-large (gateway.yaml prices)",
        "",
        "| T | two-tier cascade, logprob mean | logprob or Gemma agrees, else large |",
        "|---|---|---|",
    ]
    for t in SWEEP:
        cells = []
        for rescue in (False, True):
            right = cost = 0.0
            for (conf, ok, spent, agree, mate), big_ok, big in zip(
                per_task, large.correct, large.meters, strict=True
            ):
                cost += spent
                keep = conf >= t
                if not keep and rescue:
                    cost += mate
                    keep = agree
                right += ok if keep else big_ok
                cost += 0.0 if keep else big.cost(prices)
            cells.append(f"{right / len(tasks):.0%} / {cost / base:.0%}")
        lines.append(f"| {t:g} | {cells[0]} | {cells[1]} |")
    return "\n".join(lines)


def parse_thresholds(text: str) -> dict[str, float]:
    """ "logprob=0.7,best=0.75,judge=0.9" over the defaults; each in [0, 1]."""
    out = dict(THRESHOLDS)
    for part in filter(None, text.split(",")):
        key, _, value = part.partition("=")
        if key not in THRESHOLDS:
            raise argparse.ArgumentTypeError(
                f"threshold keys are {', '.join(THRESHOLDS)}, not {key!r}"
            )
        try:
            out[key] = float(value)
        except ValueError:
            raise argparse.ArgumentTypeError(f"{key}={value!r} is not a number") from None
        if not 0.0 <= out[key] <= 1.0:
            raise argparse.ArgumentTypeError(f"{key} must be within [0, 1], not {out[key]}")
    return out


def parse_strategies(text: str) -> tuple[str, ...]:
    """ "small,large,cascade@0.65" -> the keys, each checked (a threshold within [0, 1])."""
    keys = tuple(k.strip() for k in text.split(",") if k.strip())
    if not keys or len(keys) > 32:
        raise argparse.ArgumentTypeError("name 1 to 32 strategies")
    for key in keys:
        base, at, value = key.partition("@")
        if base not in STRATEGIES:
            raise argparse.ArgumentTypeError(
                f"unknown strategy {base!r}; known: {', '.join(STRATEGIES)}"
            )
        if at:
            if base not in ("cascade", "best", "judge", "either", "both"):
                raise argparse.ArgumentTypeError(f"strategy {base!r} takes no @threshold")
            try:
                t = float(value)
            except ValueError:
                raise argparse.ArgumentTypeError(f"{key!r}: {value!r} is not a number") from None
            if not 0.0 <= t <= 1.0:
                raise argparse.ArgumentTypeError(f"{key!r}: the threshold must be within [0, 1]")
    if len(set(keys)) != len(keys):
        raise argparse.ArgumentTypeError("a strategy is named twice")
    return keys


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--arith", type=int, default=32, help="live: arithmetic tasks")
    parser.add_argument("--code", type=int, default=16, help="live: code tasks")
    parser.add_argument("--threads", type=int, default=1, help="live: llama.cpp threads")
    parser.add_argument(
        "--thresholds",
        type=parse_thresholds,
        default=dict(THRESHOLDS),
        help="live: logprob=T,best=T,judge=T (defaults "
        + ",".join(f"{k}={v:g}" for k, v in THRESHOLDS.items())
        + "); tune them with --sweep on another --seed",
    )
    parser.add_argument(
        "--sweep", action="store_true", help="live: every threshold of the tunable strategies"
    )
    parser.add_argument(
        "--tasks",
        type=int,
        default=None,
        help="live: only the first N tasks of the run's order (kinds interleaved), e.g. to "
        "report a run stopped early from its journal",
    )
    parser.add_argument(
        "--strategies",
        type=parse_strategies,
        default=DEFAULT_STRATEGIES,
        help="live: comma-separated, of " + ", ".join(STRATEGIES) + " (cascade, best, judge, "
        "either and both take @T, e.g. cascade@0.65); default: the seed-0 set, "
        + ",".join(DEFAULT_STRATEGIES),
    )


def live(args: argparse.Namespace) -> None:
    for key in ("arith", "code"):
        if not 0 <= getattr(args, key) <= 400:
            raise SystemExit(f"--{key} must be within [0, 400]")
    if args.tasks is not None and not 1 <= args.tasks <= 800:
        raise SystemExit("--tasks must be within [1, 800]")
    print(asyncio.run(live_async(args)))
