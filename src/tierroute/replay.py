"""`tierroute replay`: an outcome file's prompts as a deployment's traffic, to measure how
fast the gateway's continuous learner learns that traffic.

- Order: the file's rows for the model pair in a seeded random order (after `limit`).
- Evaluation set: the first `eval_size` rows of that order. They are never sent, so they
  are "not yet seen" at every point of the curve, and every point is measured on the
  same rows: the curve compares like with like.
- Traffic: the other rows, one request each, through the gateway's own `Engine` (route,
  then record, with the prompt kept), on a ledger of its own; no model is called, since
  the answer's content plays no part. For a `reveal` share of them the file's outcome is
  written to the ledger as a shadow verdict on the smallest tier's answer (good enough
  unless the large model scored strictly higher), as a shadow judge would have said it.
- Learning: at 0, 100, 250, 500, 1,000 revealed labels (and at the last label when the
  file runs out before the next checkpoint) the gateway's learner runs once
  (`Learner.run_once`, what the schedule calls: train, held-out check, promote or
  refuse); the point is the APGR and CPT(50%) (`tierroute.eval.metrics`) of the router
  then serving, on the evaluation set. Labels 0 is the cold router.
"""

from __future__ import annotations

import asyncio
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np

from tierroute.data import Outcomes, field_value
from tierroute.errors import DataError
from tierroute.eval.metrics import routing_curve, summary
from tierroute.gateway.engine import Engine, Hints, Outcome
from tierroute.gateway.learner import Learner, LearningRun
from tierroute.gateway.metrics import Metrics
from tierroute.gateway.settings import GatewaySettings
from tierroute.learning import LearningConfig
from tierroute.ledger import Ledger
from tierroute.progress import progress as progress_bar
from tierroute.routers.base import BaseRouter

CHECKPOINTS = (100, 250, 500, 1000)


@dataclass(frozen=True)
class Point:
    labels: int
    apgr: float
    cpt50: float
    run: LearningRun | None = None  # the learning run just before it (None at the cold start)


@dataclass
class ReplayResult:
    eval_rows: int
    traffic_rows: int
    random_apgr: float
    oracle_apgr: float
    points: list[Point] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        return {
            "curve": [{"labels": p.labels, "apgr": p.apgr, "cpt50": p.cpt50} for p in self.points],
            "random_apgr": self.random_apgr,
            "cold_apgr": self.points[0].apgr,
            "oracle_apgr": self.oracle_apgr,
            "eval_rows": self.eval_rows,
            "traffic_rows": self.traffic_rows,
            "runs": [
                {"labels": p.labels, "outcome": p.run.outcome, "reason": p.run.reason}
                for p in self.points
                if p.run is not None
            ],
        }


def skip_prefixed(o: Outcomes, skip: Sequence[str]) -> Outcomes:
    """The rows whose FIELD does not start with PREFIX, for every FIELD=PREFIX in `skip`."""
    clauses = []
    for clause in skip:
        name, sep, prefix = clause.partition("=")
        if not sep or not name:
            raise DataError(f"--skip '{clause}' must look like FIELD=PREFIX, e.g. meta.src=ori_")
        clauses.append((name, prefix))
    keep = [
        i
        for i, row in enumerate(o.rows)
        if not any(str(field_value(row, n)).startswith(p) for n, p in clauses)
    ]
    return o.subset(keep)


def split(o: Outcomes, seed: int, limit: int | None, eval_size: int | None) -> tuple[Any, Any]:
    """(evaluation rows, traffic rows in sending order), as the module docstring says."""
    order = np.random.default_rng(seed).permutation(len(o))
    if limit is not None:
        order = order[:limit]
    n_eval = eval_size if eval_size is not None else min(500, len(order) // 3)
    if not 0 < n_eval < len(order):
        raise DataError(f"an evaluation set of {n_eval} leaves no traffic of {len(order)} rows")
    return o.subset(order[:n_eval]), o.subset(order[n_eval:])


def measure(router: BaseRouter, o: Outcomes) -> tuple[float, float]:
    s = summary(routing_curve(router.score_texts(o.prompts), o.small, o.large))
    return s["apgr"], s["cpt50"]


def replay(
    o: Outcomes,
    settings: GatewaySettings,
    router: BaseRouter,
    router_spec: str,
    learning: LearningConfig,
    *,
    seed: int = 0,
    limit: int | None = None,
    eval_size: int | None = None,
    reveal: float = 1.0,
    checkpoints: Sequence[int] = CHECKPOINTS,
    data_dir: Path | None = None,
    progress: Any = None,
) -> ReplayResult:
    """The learning curve of `router` (the cold start) on `o` replayed as traffic."""
    from tierroute.routers.random_router import RandomRouter

    if not 0 < reveal <= 1:
        raise DataError("--reveal must be within (0, 1]")
    evaluation, traffic = split(o, seed, limit, eval_size)
    gain = evaluation.large - evaluation.small  # the oracle knows each row's gain
    oracle = summary(routing_curve(gain, evaluation.small, evaluation.large))
    result = ReplayResult(
        eval_rows=len(evaluation),
        traffic_rows=len(traffic),
        random_apgr=measure(RandomRouter(seed), evaluation)[0],
        oracle_apgr=oracle["apgr"],
    )
    # A gateway of its own: no shadow calls, no cascade (nothing is answered here).
    # Rows go one at a time: a micro-batch wait would only slow each one down.
    settings = replace(settings, shadow=None, cascade=None, keep_prompts=True, route_batch_max=1)
    with tempfile.TemporaryDirectory() as tmp:
        folder = data_dir or Path(tmp)
        result.points.append(Point(0, *measure(router, evaluation)))
        if progress:
            progress(result.points[-1])
        asyncio.run(
            _send(
                traffic, evaluation, settings, router, router_spec, learning,
                folder, seed, reveal, checkpoints, result, progress,
            )
        )  # fmt: skip
    return result


async def _send(
    traffic: Outcomes,
    evaluation: Outcomes,
    settings: GatewaySettings,
    router: BaseRouter,
    router_spec: str,
    learning: LearningConfig,
    folder: Path,
    seed: int,
    reveal: float,
    checkpoints: Sequence[int],
    result: ReplayResult,
    progress: Any,
) -> None:
    clock = _Clock()
    ledger = Ledger(folder / "ledger.sqlite", keep_prompts=True, clock=clock)
    engine = Engine(settings, router, {}, ledger, Metrics(), clock=clock)
    learner = Learner(engine, learning, folder / "learned", router_spec, clock=clock)
    rng = np.random.default_rng(seed + 1)
    smallest = settings.tiers[0].name
    labels = traffic.labels
    revealed = 0
    todo = sorted(c for c in checkpoints if c > 0)

    async def checkpoint() -> None:
        await ledger.aflush()
        run = learner.run_once()
        result.points.append(Point(revealed, *measure(engine.router, evaluation), run))
        if progress:
            progress(result.points[-1])

    bar = progress_bar(todo[-1] if todo else 0, "replay: labels revealed", unit="label")
    try:
        for i, prompt in enumerate(traffic.prompts):
            if not todo:
                break
            clock.tick()
            routed = await engine.route([{"role": "user", "content": prompt}], Hints(), 256)
            tier = routed.chain[0]
            request_id = f"replay-{i}"
            outcome = Outcome(request_id=request_id, routed=routed, tier=tier, tried=[tier])
            engine.record(
                outcome, status=200, hints=Hints(), api_key_id=None, latency_ms=0.0,
                prompt_text=prompt,
            )  # fmt: skip
            if rng.random() >= reveal:
                continue
            verdict = 0.0 if labels[i] else 1.0  # the small answer was good enough
            ledger.record_judgement(request_id, clock(), smallest, "replay", verdict, "file")
            revealed += 1
            bar.update(1)
            if revealed == todo[0]:
                todo.pop(0)
                await checkpoint()
        if todo and revealed > result.points[-1].labels:
            await checkpoint()  # the file ran out before the next checkpoint
    finally:
        bar.close()
        engine.close()
        await ledger.aclose()


class _Clock:
    """Replayed time: one second a request, so the learner's time split follows the order."""

    def __init__(self) -> None:
        self.now = 1_700_000_000.0

    def tick(self) -> None:
        self.now += 1.0

    def __call__(self) -> float:
        return self.now
