"""`tierroute replay`: an outcome file's prompts as a deployment's traffic, to measure how
fast the gateway's continuous learner learns that traffic.

- Order: the file's rows for the model pair in a seeded random order (after `limit`).
- Evaluation set: the first `eval_size` rows of that order. They are never sent, so they
  are "not yet seen" at every point of the curve, and every point is measured on the
  same rows: the curve compares like with like. With `folds` > 1 (cross-fitting) each
  of `folds` parts of that order is the evaluation set of one replay, the other parts its
  traffic, and the curve is the folds' mean: every row is evaluated once, which on a
  small file is far less noisy than one held-back part.
- Traffic: the other rows, one request each, through the gateway's own `Engine` (route,
  then record, with the prompt kept), on a ledger of its own; no model is called, since
  the answer's content plays no part. For a `reveal` share of them the file's outcome is
  written to the ledger as a shadow verdict on the smallest tier's answer (good enough
  unless the large model scored strictly higher), as a shadow judge would have said it.
- Learning: at 0, 100, 250, 500, 1,000 revealed labels (and at the last label when the
  file runs out before the next checkpoint) the gateway's learner runs once
  (`Learner.run_once`, what the schedule calls: cross-validate, promote or
  refuse); the point is the APGR and CPT(50%) (`tierroute.eval.metrics`) of the router
  then serving, on the evaluation set. Labels 0 is the cold router.
"""

from __future__ import annotations

import asyncio
import copy
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
    # With cross-fitting, each fold's own result; the fields above are their means.
    folds: list[ReplayResult] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        parts = self.folds or [self]
        return {
            "curve": [{"labels": p.labels, "apgr": p.apgr, "cpt50": p.cpt50} for p in self.points],
            "random_apgr": self.random_apgr,
            "cold_apgr": self.points[0].apgr,
            "oracle_apgr": self.oracle_apgr,
            "eval_rows": self.eval_rows,
            "traffic_rows": self.traffic_rows,
            "folds": len(self.folds) or 1,
            "runs": [
                {"fold": i, "labels": p.labels, "outcome": p.run.outcome, "reason": p.run.reason}
                for i, part in enumerate(parts)
                for p in part.points
                if p.run is not None
            ],
        }


def mean_result(folds: list[ReplayResult]) -> ReplayResult:
    """The folds' curves averaged point by point (every row was evaluated once)."""
    n = min(len(f.points) for f in folds)
    points = [
        Point(
            min(f.points[i].labels for f in folds),
            float(np.mean([f.points[i].apgr for f in folds])),
            float(np.nanmean([f.points[i].cpt50 for f in folds])),
        )
        for i in range(n)
    ]
    return ReplayResult(
        eval_rows=sum(f.eval_rows for f in folds),
        traffic_rows=min(f.traffic_rows for f in folds),
        random_apgr=float(np.mean([f.random_apgr for f in folds])),
        oracle_apgr=float(np.mean([f.oracle_apgr for f in folds])),
        points=points,
        folds=folds,
    )


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
    order = _order(o, seed, limit)
    n_eval = eval_size if eval_size is not None else min(500, len(order) // 3)
    if not 0 < n_eval < len(order):
        raise DataError(f"an evaluation set of {n_eval} leaves no traffic of {len(order)} rows")
    return o.subset(order[:n_eval]), o.subset(order[n_eval:])


def fold_splits(o: Outcomes, seed: int, limit: int | None, folds: int) -> list[tuple[Any, Any]]:
    """Cross-fitting: the seeded order cut into `folds` parts, each the evaluation set once
    with the others (in sending order) as its traffic. Every traffic is cut to the
    shortest, so the folds' curves have the same label counts."""
    order = _order(o, seed, limit)
    if not 2 <= folds <= len(order) // 2:
        raise DataError(f"--folds must be within [2, {len(order) // 2}] for {len(order)} rows")
    parts = np.array_split(order, folds)
    shortest = len(order) - max(len(p) for p in parts)
    out = []
    for i, part in enumerate(parts):
        rest = np.concatenate([p for j, p in enumerate(parts) if j != i])
        out.append((o.subset(part), o.subset(rest[:shortest])))
    return out


def _order(o: Outcomes, seed: int, limit: int | None) -> Any:
    order = np.random.default_rng(seed).permutation(len(o))
    return order[:limit] if limit is not None else order


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
    folds: int = 1,
    reveal: float = 1.0,
    checkpoints: Sequence[int] = CHECKPOINTS,
    data_dir: Path | None = None,
    progress: Any = None,
) -> ReplayResult:
    """The learning curve of `router` (the cold start) on `o` replayed as traffic; with
    `folds` > 1, the mean curve of a replay per fold (`fold_splits`)."""
    if not 0 < reveal <= 1:
        raise DataError("--reveal must be within (0, 1]")
    if folds == 1:
        splits = [split(o, seed, limit, eval_size)]
    elif eval_size is not None:
        raise DataError("--eval-size and --folds exclude each other: a fold is the evaluation set")
    else:
        splits = fold_splits(o, seed, limit, folds)
    results = []
    for i, (evaluation, traffic) in enumerate(splits):
        folder = None if data_dir is None else data_dir / f"fold{i}" if folds > 1 else data_dir

        def report(point: Point, fold: int = i) -> None:
            if progress:
                progress(point, fold if folds > 1 else None)

        results.append(
            _replay_one(
                evaluation, traffic, settings, router, router_spec, learning,
                seed, reveal, checkpoints, folder, report,
            )
        )  # fmt: skip
    return results[0] if folds == 1 else mean_result(results)


def _replay_one(
    evaluation: Outcomes,
    traffic: Outcomes,
    settings: GatewaySettings,
    router: BaseRouter,
    router_spec: str,
    learning: LearningConfig,
    seed: int,
    reveal: float,
    checkpoints: Sequence[int],
    data_dir: Path | None,
    progress: Any,
) -> ReplayResult:
    from tierroute.routers.random_router import RandomRouter

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
    # Its own copy of the policy too: a promotion moves the thresholds in place.
    settings = replace(
        settings, shadow=None, cascade=None, keep_prompts=True, route_batch_max=1,
        policy=copy.deepcopy(settings.policy),
    )  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        folder = data_dir or Path(tmp)
        folder.mkdir(parents=True, exist_ok=True)
        result.points.append(Point(0, *measure(router, evaluation)))
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
