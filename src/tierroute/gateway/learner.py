"""Continuous learning in the gateway: retrain on the ledger's labels, promote only if better.

Opt-in (`gateway.learning`, see LearningConfig). Every `interval_s` a background thread,
never the event loop, reads the labelled requests (`tierroute.learning.ledger_labels`:
shadow verdicts and feedback) and, once `min_new_labels` arrived since its last run:
1. cross-validates a `ResidualRouter` over the configured (cold) router on all of them,
   for each L2 penalty of a small grid (`folds` stratified folds, ROC AUC per fold);
2. keeps the best penalty, and compares its AUC with the cold router's on the same folds
   (and, when a learned router serves, on the labels newer than it: `_check`);
   a serving learned router that ranks those newer labels worse than the router it
   replaced is demoted (`_worse_than_below`);
3. promotes it, trained on every label, only when it beats them (by more than
   `min_gain` over the cold router): it
   is saved under <data dir>/learned/rNNNN and swapped into the engine on the event loop,
   with the top threshold moved so that the largest tier keeps the share of recent
   traffic it had (a new router's scores have a scale of their own);
4. records the run, promotion or refusal, in the ledger's policy_changes table (the
   reason starts with "router:") and in /metrics (tierroute_learning_*).

Promoted routers form a stack (learned/active.json): a restart serves the top one again,
and a rollback (POST /v1/router/rollback, or `tierroute rollback` while the gateway is
stopped) pops it, restoring the previous router and the thresholds it had.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from tierroute.calibrate import threshold_for_share
from tierroute.errors import ConfigError, InputError
from tierroute.gateway.engine import Engine
from tierroute.learning import (
    LearningConfig,
    LedgerLabels,
    cross_validate,
    ledger_labels,
    require_rows,
    roc_auc,
    stratified_folds,
)
from tierroute.routers.base import BaseRouter
from tierroute.routers.residual import ResidualRouter

log = logging.getLogger(__name__)

STATE_FILE = "active.json"
# how much worse (ROC AUC on labels newer than it) a learned router must rank than the one
# it replaced before it is demoted: a margin, so 20 noisy labels do not flip-flop the two
DEMOTE_MARGIN = 0.02


@dataclass(frozen=True)
class LearningRun:
    """What one run (or a rollback) did, and why."""

    outcome: str  # promoted | refused | skipped | failed | rolled_back
    reason: str
    labels: int = 0
    new_auc: float | None = None
    current_auc: float | None = None
    router: str | None = None  # the folder of the router serving afterwards, if learned


@dataclass
class _Promotion:
    name: str  # folder under learned/
    before: list[float]  # the policy's thresholds before it was promoted
    after: list[float]  # and with it
    extra: dict[str, Any] = field(default_factory=dict)


class Learner:
    def __init__(
        self,
        engine: Engine,
        config: LearningConfig,
        folder: Path,
        base_spec: str,
        loop: asyncio.AbstractEventLoop | None = None,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.engine = engine
        self.config = config
        self.folder = folder
        # How a saved correction opens its base again: a folder by its absolute path.
        self.base_spec = str(Path(base_spec).resolve()) if Path(base_spec).is_dir() else base_spec
        self.base = engine.router  # the cold router every correction is trained over
        self.loop = loop
        self.clock = clock
        self.stack: list[_Promotion] = self._read_state()
        self.labels_seen = 0  # labelled requests at the last completed run
        self._lock = threading.Lock()  # one run or rollback at a time
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ state

    def _read_state(self) -> list[_Promotion]:
        path = self.folder / STATE_FILE
        if not path.is_file():
            return []
        try:
            return [_Promotion(**entry) for entry in json.loads(path.read_text())["stack"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(
                f"{path} is not a learner state file ({exc}); move it aside"
            ) from None

    def _write_state(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        tmp = self.folder / (STATE_FILE + ".tmp")
        tmp.write_text(json.dumps({"stack": [asdict(p) for p in self.stack]}, indent=2))
        tmp.replace(self.folder / STATE_FILE)

    def _load(self, name: str) -> ResidualRouter:
        """A saved correction over this gateway's own cold router (not a second copy)."""
        from tierroute.artifact import read_meta

        path = self.folder / name
        meta = read_meta(path)
        router = ResidualRouter(self.base, self.base_spec, self._encoder(), **_l2(meta))
        with np.load(path / "weights.npz", allow_pickle=False) as npz:
            router.set_state({k: npz[k] for k in npz.files})
        return router

    def _encoder(self) -> Any:
        encoder = getattr(self.base, "encoder", None)
        if encoder is None:
            from tierroute.encoder import TextEncoder

            encoder = TextEncoder()
        return encoder

    def restore(self) -> None:
        """Serve the last promoted router again (after a restart)."""
        if self.stack:
            from tierroute.artifact import read_meta

            top = self.stack[-1]
            base = (read_meta(self.folder / top.name).get("params") or {}).get("base")
            if base != self.base_spec:
                log.warning(
                    "learning: %s corrects router %s, not the configured %s: serving the "
                    "configured one (move %s aside to start afresh)",
                    top.name,
                    base,
                    self.base_spec,
                    self.folder,
                )
                self.engine.metrics.router_version.set(0)
                return
            self._swap(self._load(top.name), top.after)
            log.info("learning: serving %s again (promoted before the restart)", top.name)
        self.engine.metrics.router_version.set(len(self.stack))

    def _swap(self, router: BaseRouter, thresholds: list[float]) -> None:
        if self.loop is None:
            self.engine.swap_router(router, thresholds)
            return

        async def swap() -> None:
            self.engine.swap_router(router, thresholds)

        asyncio.run_coroutine_threadsafe(swap(), self.loop).result(timeout=60)

    # ------------------------------------------------------------------ learning

    def _record(self, run: LearningRun, old: float, new: float) -> LearningRun:
        self.engine.metrics.learning_runs.labels(run.outcome).inc()
        if run.outcome not in ("skipped", "failed"):
            self.engine.ledger.record_policy_change(self.clock(), old, new, f"router: {run.reason}")
        level = logging.DEBUG if run.outcome == "skipped" else logging.INFO
        log.log(level, "learning: %s: %s", run.outcome, run.reason)
        return run

    def run_once(self) -> LearningRun:
        """One learning run (what the schedule calls); returns what it did."""
        with self._lock:
            entry = self.engine.settings.policy.entry
            try:
                return self._run(entry)
            except InputError as exc:
                return self._record(
                    LearningRun("skipped", str(exc), self.labels_seen), entry, entry
                )
            except Exception as exc:  # the gateway keeps answering whatever happens here
                log.exception("learning run failed")
                return self._record(LearningRun("failed", repr(exc)), entry, entry)

    def _run(self, entry: float) -> LearningRun:
        c = self.config
        m = self.engine.metrics
        since = self.clock() - c.since_days * 86400 if c.since_days is not None else None
        largest = self.engine.settings.tiers[-1].name
        data = ledger_labels(self.engine.ledger, largest, since)
        n = len(data.ids)
        m.learning_labels.set(n)
        if n - self.labels_seen < c.min_new_labels:
            raise InputError(f"{n - self.labels_seen} new labels, waiting for {c.min_new_labels}")
        require_rows(data)
        new, new_auc, current_auc, facts = self._check(data)
        self.labels_seen = n
        m.learning_auc.labels("candidate").set(new_auc)
        m.learning_auc.labels("serving").set(current_auc)
        if new is None:
            worse = self._worse_than_below(data)
            if worse is not None:
                return self._pop("demoted", f"candidate not promoted: {facts}; {worse}")
            return self._record(
                LearningRun("refused", f"candidate not promoted: {facts}", n, new_auc, current_auc),
                entry,
                entry,
            )
        before = list(self.engine.settings.policy.thresholds or [])
        after, share = self._thresholds_for(new, self.engine.router, float(data.ts.max()))
        name = f"r{self._next_number():04d}"
        trained_on = {
            "source": "ledger",
            "data": self.engine.ledger.location,
            "data_hash": hashlib.sha256("\n".join(data.ids).encode()).hexdigest(),
            "rows": n,
            "cv_auc": new_auc,
            "auc_to_beat": current_auc,
        }
        from tierroute.artifact import save_router

        artifact = save_router(new, self.folder / name, trained_on, data.ids)
        artifact.meta["calibration"] = {
            "threshold": after[-1] - self.engine.settings.policy.abstain_band,
            "target": f"large share {share:.1%} (kept from the router it replaced)",
        }
        artifact.write_meta()
        self._swap(new, after)
        self.stack.append(_Promotion(name, before, after, {"trained_until": float(data.ts.max())}))
        self._write_state()
        m.router_version.set(len(self.stack))
        new_entry = self.engine.settings.policy.entry
        return self._record(
            LearningRun(
                "promoted",
                f"promoted {name}: {facts}; large share {share:.1%} kept",
                n,
                new_auc,
                current_auc,
                str(artifact.path),
            ),
            entry,
            new_entry,
        )

    def _check(self, data: LedgerLabels) -> tuple[ResidualRouter | None, float, float, str]:
        """(the candidate trained on every label, or None when it is not better; its
        cross-validated AUC; the AUC it had to beat; what was found).

        Each penalty of the grid is cross-validated over all labels (stratified folds);
        the best must beat the cold router's AUC on the same folds by more than
        `min_gain`. When a learned router serves, the candidate's out-of-fold scores must
        also beat it on the labels that arrived after it was trained (when there are 20
        with both kinds), since on its own training labels it would look better than it is.
        """
        c = self.config
        y = data.labels
        probe = ResidualRouter(self.base, self.base_spec, self._encoder(), l2=c.l2)
        z, x = probe.inputs(data.prompts)  # each text embedded once for every fit below
        parts = stratified_folds(y, c.folds)
        best: tuple[float, float, float, Any] | None = None
        for l2 in (c.l2 / 10, c.l2, c.l2 * 10):

            def fit_score(train: list[int], test: list[int], l2: float = l2) -> Any:
                r = ResidualRouter(self.base, self.base_spec, self._encoder(), l2=l2)
                return r.fit_inputs(z[train], x[train], y[train]).score_inputs(z[test], x[test])

            new_auc, cold_auc, oof = cross_validate(fit_score, z, y, parts)
            if best is None or new_auc > best[0]:
                best = (new_auc, cold_auc, l2, oof)
        assert best is not None
        new_auc, cold_auc, l2, oof = best
        facts = (
            f"l2 {l2:g}: {len(parts)}-fold cross-validated AUC {new_auc:.3f} on {len(y)} labels "
            f"vs {cold_auc:.3f} of the cold router"
        )
        if new_auc <= cold_auc + c.min_gain:
            return None, new_auc, cold_auc, facts
        fresh = self._unseen_by_serving(data)
        if len(fresh) >= 20 and len(set(y[fresh].tolist())) == 2:
            texts = [data.prompts[i] for i in fresh]
            serving = roc_auc(self.engine.router.score_texts(texts), y[fresh])
            mine = roc_auc(oof[fresh], y[fresh])
            facts += (
                f"; on the {len(fresh)} labels newer than the serving router "
                f"{mine:.3f} vs its {serving:.3f}"
            )
            if mine <= serving:
                return None, mine, serving, facts
        new = ResidualRouter(self.base, self.base_spec, self._encoder(), l2=l2)
        return new.fit_inputs(z, x, y), new_auc, cold_auc, facts

    def _unseen_by_serving(self, data: LedgerLabels) -> list[int]:
        """The labels newer than those the serving learned router was trained on ([] when
        the cold router serves)."""
        if not self.stack or self.engine.router is self.base:
            return []
        until = self.stack[-1].extra.get("trained_until")
        if until is None:
            return []
        return [i for i, t in enumerate(data.ts) if t > float(until)]

    def _worse_than_below(self, data: LedgerLabels) -> str | None:
        """Why the serving learned router should give way to the one below it (None when
        it should not): it ranks the labels newer than it worse, by DEMOTE_MARGIN, than the
        router it replaced, which has not seen them either. Without this an early
        promotion that luck carried through cross-validation would serve for good, since
        later candidates only have to beat the cold router."""
        fresh = self._unseen_by_serving(data)
        y = data.labels[fresh]
        if len(fresh) < 20 or len(set(y.tolist())) < 2:
            return None
        texts = [data.prompts[i] for i in fresh]
        below = self.base if len(self.stack) == 1 else self._load(self.stack[-2].name)
        serving = roc_auc(self.engine.router.score_texts(texts), y)
        under = roc_auc(below.score_texts(texts), y)
        if serving + DEMOTE_MARGIN > under:
            return None
        return (
            f"on the {len(fresh)} labels newer than it the serving router ranks at AUC "
            f"{serving:.3f}, the router below it at {under:.3f}"
        )

    def _thresholds_for(
        self, new: BaseRouter, current: BaseRouter, newest: float
    ) -> tuple[list[float], float]:
        """The policy's thresholds for `new` that send the largest tier the share of recent
        traffic that `current` sends it now, and that share."""
        policy = self.engine.settings.policy
        # the week of traffic up to the newest label: recent, and a bounded read
        rows = [r for r in self.engine.ledger.rows(since=newest - 7 * 86400) if r.prompt_text]
        texts = [r.prompt_text or "" for r in rows[-self.config.share_sample :]]
        share = float(np.mean(current.score_texts(texts) >= policy.entry))
        entry = threshold_for_share(list(new.score_texts(texts)), share)
        return list(policy.with_threshold(entry).thresholds or []), share

    def _next_number(self) -> int:
        taken = [int(p.name[1:]) for p in self.folder.glob("r[0-9]*") if p.name[1:].isdigit()]
        return max(taken, default=0) + 1

    def rollback(self) -> LearningRun:
        """Serve the router before the last promotion again, with its thresholds."""
        with self._lock:
            if not self.stack:
                raise InputError("nothing to roll back: the configured router is serving")
            return self._pop("rolled_back")

    def _pop(self, outcome: str, why: str = "") -> LearningRun:
        """Take the top promotion off the stack (the caller holds the lock)."""
        entry = self.engine.settings.policy.entry
        top = self.stack.pop()
        below = self.stack[-1].name if self.stack else None
        self._swap(self.base if below is None else self._load(below), top.before)
        self._write_state()
        self.engine.metrics.router_version.set(len(self.stack))
        serving = below or f"the configured router ({self.base_spec})"
        verb = outcome.replace("_", " ")
        run = LearningRun(
            outcome,
            f"{verb} {top.name}: serving {serving}" + (f"; {why}" if why else ""),
            router=str(self.folder / below) if below else None,
        )
        return self._record(run, entry, self.engine.settings.policy.entry)

    # ------------------------------------------------------------------ schedule

    def start(self) -> None:
        self._thread = threading.Thread(target=self._loop, name="tierroute-learner", daemon=True)
        self._thread.start()

    def _loop(self) -> None:
        while not self._stop.wait(self.config.interval_s):
            self.run_once()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=60)


def _l2(meta: dict[str, Any]) -> dict[str, float]:
    params = meta.get("params") or {}
    return {"l2": float(params["l2"])} if "l2" in params else {}


def rollback_stopped(folder: Path) -> str:
    """Pop the last promotion of a stopped gateway's learner (its next start serves the
    router before it); returns what is served then."""
    path = folder / STATE_FILE
    if not path.is_file():
        raise InputError(f"no learner state at {path}: nothing was promoted there")
    doc = json.loads(path.read_text())
    stack = doc.get("stack") or []
    if not stack:
        raise InputError("nothing to roll back: the configured router is serving")
    top = stack.pop()
    doc["stack"] = stack
    tmp = folder / (STATE_FILE + ".tmp")
    tmp.write_text(json.dumps(doc, indent=2))
    tmp.replace(path)
    serving = stack[-1]["name"] if stack else "the configured router"
    return f"rolled back {top['name']}: the gateway serves {serving} at its next start"
