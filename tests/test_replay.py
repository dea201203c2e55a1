"""`tierroute replay`'s cross-fitting: every row evaluated once, never sent in its own fold."""

from __future__ import annotations

import numpy as np
import pytest

from tierroute.data import Outcomes
from tierroute.errors import DataError
from tierroute.replay import Point, ReplayResult, fold_splits, mean_result


def outcomes(n: int) -> Outcomes:
    return Outcomes(
        path="x.jsonl",
        data_hash="h",
        small_model="s",
        large_model="l",
        ids=[f"q{i}" for i in range(n)],
        prompts=[f"prompt {i}" for i in range(n)],
        small=np.zeros(n),
        large=np.ones(n),
        small_cost=None,
        large_cost=None,
        rows=[{} for _ in range(n)],
    )


def test_each_row_is_evaluated_once_and_never_sent_in_its_own_fold() -> None:
    o = outcomes(103)
    splits = fold_splits(o, seed=4, limit=None, folds=5)
    evaluated = [i for evaluation, _ in splits for i in evaluation.ids]
    assert sorted(evaluated) == sorted(o.ids)  # once each
    for evaluation, traffic in splits:
        assert not set(evaluation.ids) & set(traffic.ids)
    # traffic cut to the shortest, so the folds' curves meet at the same label counts
    assert {len(traffic) for _, traffic in splits} == {103 - 21}
    # --limit applies first, as without folds
    assert sum(len(e) for e, _ in fold_splits(o, 4, 50, 5)) == 50
    with pytest.raises(DataError, match="--folds"):
        fold_splits(o, 0, 3, 2)


def test_the_folds_curves_are_averaged_point_by_point() -> None:
    def fold(apgrs: list[float], labels: list[int]) -> ReplayResult:
        points = [Point(n, a, 0.5) for n, a in zip(labels, apgrs, strict=True)]
        return ReplayResult(eval_rows=10, traffic_rows=40, random_apgr=0.5, oracle_apgr=0.9,
                            points=points)  # fmt: skip

    result = mean_result([fold([0.5, 0.6, 0.7], [0, 100, 250]), fold([0.4, 0.6], [0, 100])])
    assert [(p.labels, p.apgr) for p in result.points] == [(0, 0.45), (100, 0.6)]
    assert result.eval_rows == 20 and result.as_dict()["folds"] == 2
