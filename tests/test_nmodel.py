"""N-model routing offline: hull arithmetic by hand, the evaluation on a toy table and on
a slice of RouterBench, and `tierroute eval --models all` end to end."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierroute.errors import DataError
from tierroute.eval.hull import cost_at_quality, frontier, gap, single_model_hull
from tierroute.eval.nmodel import (
    ModelTable,
    blend,
    cost_model_named,
    evaluate_nmodel,
    factor_fitter,
    knn_fitter,
    length_cost,
    load_tables,
    near_duplicate_key,
    neighbour_cost,
)
from tierroute.eval.nmodel_check import (
    auc,
    bootstrap,
    closest_columns,
    mix_at_quality,
    mixed,
    oracle,
    segments,
)
from tierroute.eval.prices import price_of, size_of

from .conftest import EASY, HARD, SHARED, run_cli

RB = SHARED / "routerbench_arc_winogrande_mbpp.jsonl"
ARENA = SHARED / "arenahard_v01_vs_gpt4_0314.jsonl"
needs_routerbench = pytest.mark.skipif(
    not RB.is_file(), reason=f"needs the outcome data in {SHARED} (absent on this machine)"
)
needs_arena = pytest.mark.skipif(
    not ARENA.is_file(), reason=f"needs the outcome data in {SHARED} (absent on this machine)"
)


def a(*values: float) -> np.ndarray:
    return np.array(values, dtype=np.float64)


def test_hull_of_given_points() -> None:
    # b is under the segment a -> c; d is dearer and worse than c; e ties a's cost, worse
    hull = single_model_hull(
        ["a", "b", "c", "d", "e"], a(0.5, 0.55, 0.9, 0.8, 0.4), a(1.0, 2.0, 3.0, 4.0, 1.0)
    )
    assert hull.models == ["a", "c"]
    assert hull.at(a(2.0)).tolist() == pytest.approx([0.7])


def test_area_share_and_worst_point_above_a_hull() -> None:
    hull = single_model_hull(["cheap", "dear"], a(0.5, 0.7), a(1.0, 3.0))
    # a tent over the hull's segment: margin 0, 0.1, 0 -> triangle of area 0.1
    g = gap(hull, a(1.0, 2.0, 3.0), a(0.5, 0.7, 0.7))
    assert g.share == pytest.approx(1.0)
    assert g.area == pytest.approx(0.1)
    assert g.mean_margin == pytest.approx(0.05)
    assert g.worst == pytest.approx(0.0) and g.worst_cost == 1.0
    # a line crossing the hull at cost 2: below on the first half, above on the second
    g = gap(hull, a(1.0, 3.0), a(0.4, 0.8))
    assert g.share == pytest.approx(0.5)
    assert g.area == pytest.approx(0.0)
    assert g.worst == pytest.approx(-0.1) and g.worst_cost == 1.0
    # on the hull everywhere: never above it
    assert gap(hull, a(1.0, 3.0), a(0.5, 0.7)).share == 0.0


def test_frontier_and_cost_at_quality() -> None:
    xs, ys = frontier(a(3.0, 1.0, 3.0, 2.0, 5.0), a(0.7, 0.5, 0.6, 0.4, 0.9))
    assert xs.tolist() == [1.0, 2.0, 3.0, 5.0]
    assert ys.tolist() == [0.5, 0.5, 0.7, 0.9]  # cost 2 keeps cost 1's better quality
    curve = (a(1.0, 3.0, 5.0), a(0.5, 0.7, 0.9))
    assert cost_at_quality(*curve, 0.8) == pytest.approx(4.0)
    assert cost_at_quality(*curve, 0.4) == 1.0
    assert np.isnan(cost_at_quality(*curve, 0.95))


def toy_table() -> ModelTable:
    """cheap answers the easy rows, dear answers all; 20 groups of 3 rows each."""
    prompts = [p for p in EASY + HARD]
    n = len(prompts)
    hard = np.array([p in HARD for p in prompts])
    quality = np.column_stack([np.where(hard, 0.0, 1.0), np.ones(n)])
    cost = np.column_stack([np.full(n, 1.0), np.full(n, 10.0)])
    return ModelTable(
        label="toy",
        path="toy.jsonl",
        dataset="toy",
        ids=[str(i) for i in range(n)],
        prompts=prompts,
        groups=[str(i % 4) for i in range(n)],
        split=None,
        models=["cheap", "dear"],
        quality=quality,
        cost=cost,
        cost_basis="given",
        low=0.0,
    )


def test_oracle_probabilities_reach_the_best_quality_at_the_cost_of_the_hard_share() -> None:
    table = toy_table()
    truth = dict(zip(table.prompts, table.quality, strict=True))

    def oracle(prompts, target, models):  # type: ignore[no-untyped-def]
        return lambda texts: np.array([truth[t] for t in texts])

    r = evaluate_nmodel(table, oracle, n_folds=4)
    hard_share = float(np.mean(table.quality[:, 0] == 0.0))
    assert r.curve_quality.max() == 1.0
    # knowing each row, the router pays dear only on the hard rows
    expected = ((1.0 - hard_share) * 1.0 + hard_share * 10.0) / 10.0
    assert r.cost_at_best_quality_share == pytest.approx(expected)
    assert r.vs_hull.share == pytest.approx(1.0)
    assert r.hull_models == ["cheap", "dear"] and r.best_pair == ("cheap", "dear")


def test_probabilities_that_know_nothing_never_beat_the_hull() -> None:
    table = toy_table()

    def flat(prompts, target, models):  # type: ignore[no-untyped-def]
        return lambda texts: np.tile(target.mean(axis=0), (len(texts), 1))

    r = evaluate_nmodel(table, flat, n_folds=4)
    assert r.vs_hull.share == 0.0  # it can only take whole models: the hull's corners


def test_hull_candidates_leave_out_a_model_under_the_training_hull() -> None:
    base = toy_table()
    n = len(base)
    # "mid" costs 5, answers the easy rows only: under the cheap -> dear segment
    table = ModelTable(
        **{
            **base.__dict__,
            "models": ["cheap", "mid", "dear"],
            "quality": np.column_stack([base.quality[:, 0], base.quality[:, 0], np.ones(n)]),
            "cost": np.column_stack([np.full(n, 1.0), np.full(n, 5.0), np.full(n, 10.0)]),
        }
    )

    def likes_mid(prompts, target, models):  # type: ignore[no-untyped-def]
        return lambda texts: np.tile([0.1, 0.99, 0.1], (len(texts), 1))

    everyone = evaluate_nmodel(table, likes_mid, n_folds=4)
    assert np.any(everyone.choices == 1)  # the router's favourite, when all may be chosen
    hull_only = evaluate_nmodel(table, likes_mid, n_folds=4, candidates="hull")
    assert not np.any(hull_only.choices == 1)
    with pytest.raises(DataError, match="candidates must be one of"):
        evaluate_nmodel(table, likes_mid, n_folds=4, candidates="best")


def test_auc_by_hand() -> None:
    positive = np.array([False, True, False, True])
    assert auc(a(0.1, 0.4, 0.35, 0.8), positive) == 1.0  # every positive above every negative
    assert auc(a(0.1, 0.3, 0.35, 0.8), positive) == 0.75  # 0.3 is under 0.35: 3 of 4 pairs
    assert auc(a(1.0, 1.0), np.array([True, False])) == 0.5  # a tie counts half
    assert np.isnan(auc(a(1.0, 2.0), np.array([True, True])))


def test_diagnosis_of_a_router_that_knows_nothing() -> None:
    table = toy_table()

    def flat(prompts, target, models):  # type: ignore[no-untyped-def]
        return lambda texts: np.tile(target.mean(axis=0), (len(texts), 1))

    r = evaluate_nmodel(table, flat, n_folds=4)
    o = oracle(r)
    hard_share = float(np.mean(table.quality[:, 0] == 0.0))
    # the oracle pays dear only on the hard rows; the flat router never leaves the hull
    assert o.cost_at_best_quality_share == pytest.approx((1 - hard_share) * 0.1 + hard_share)
    assert o.share == pytest.approx(1.0) and o.best_quality == 1.0
    (seg,) = segments(r)
    assert (seg.cheaper, seg.dearer) == ("cheap", "dear")
    assert seg.range_share == pytest.approx(1.0) and seg.above == 0.0
    assert seg.differ == pytest.approx(hard_share)
    assert np.isnan(seg.auc)  # dear wins wherever they differ: nothing to rank against
    assert closest_columns(r) == ("cheap", "dear", pytest.approx(hard_share))
    boot = bootstrap(r, n=30)
    # folds that switch models at different lambdas mix rows, which a resample can favour
    assert boot["above_hull_share"].low == 0.0 == r.vs_hull.share
    # a flat router reaches the best quality only by sending every row to the dear model
    assert boot["cost_at_best_quality_share"].low == pytest.approx(1.0)
    assert "cost_at_reference_share" not in boot


def test_bootstrap_interval_holds_the_point_figure_of_a_router_that_knows() -> None:
    table = toy_table()
    truth = dict(zip(table.prompts, table.quality, strict=True))

    def knows(prompts, target, models):  # type: ignore[no-untyped-def]
        return lambda texts: np.array([truth[t] for t in texts])

    r = evaluate_nmodel(table, knows, n_folds=4)
    boot = bootstrap(r, n=50, seed=1)["cost_at_best_quality_share"]
    assert boot.low <= r.cost_at_best_quality_share <= boot.high and boot.never == 0.0
    assert boot.low < boot.high  # the hard rows' share moves with the resample


def test_knn_rates_follow_the_neighbours_and_blend_averages_logits(encoder) -> None:  # type: ignore[no-untyped-def]
    table = toy_table()
    target = table.target()
    knn = knn_fitter(encoder, k=5, temperature=0.05, prior=1.0)
    predict = knn(table.prompts, target, table.models)(EASY[:3] + HARD[:3])
    # near an easy prompt the cheap model's rate is high, near a hard one low;
    # the dear model answers everything
    assert predict[:3, 0].min() > 0.5 > predict[3:, 0].max()
    assert predict[:, 1].min() > 0.95
    half = blend(knn, knn, 0.5)(table.prompts, target, table.models)(EASY[:3] + HARD[:3])
    assert half == pytest.approx(predict, abs=1e-9)


def test_near_duplicates_share_a_group() -> None:
    assert near_duplicate_key("What is 2 + 3?") == near_duplicate_key("what is 7 + 9 ?")
    assert near_duplicate_key("What is 2 + 3?") != near_duplicate_key("Who wrote Hamlet?")


@needs_arena
def test_arena_hard_is_one_table_per_judge_and_unpriced_columns_are_named() -> None:
    tables = load_tables(str(ARENA))
    assert [t.label.split("(judge ")[1] for t in tables] == ["gpt-4-1106-preview)", "gpt-4o)"]
    assert sum(len(t.models) + len(t.left_out) for t in tables) == 40
    old = tables[0]
    assert (
        "no published price or size"
        in old.left_out["Tower-3.1-sugarloaf-250119 (judge gpt-4-1106-preview)"]
    )
    assert old.low == -1.0 and old.target().min() >= 0.0
    price = price_of("gpt-4o (judge gpt-4o)")
    assert price is not None and price.per_query(1000, 100) == pytest.approx(0.0065)


@needs_routerbench
def test_routerbench_slice_against_its_single_models(encoder) -> None:  # type: ignore[no-untyped-def]
    (table,) = load_tables(str(RB))
    assert len(table.models) == 11 and table.cost_basis == "cost_usd from the file"
    split = np.array(table.split)
    keep = np.concatenate(
        [np.flatnonzero(split == "train")[:120], np.flatnonzero(split == "test")[:40]]
    )
    small = ModelTable(
        **{
            **table.__dict__,
            "ids": [table.ids[i] for i in keep],
            "prompts": [table.prompts[i] for i in keep],
            "groups": [table.groups[i] for i in keep],
            "split": [table.split[i] for i in keep] if table.split else None,
            "quality": table.quality[keep],
            "cost": table.cost[keep],
        }
    )
    r = evaluate_nmodel(small, factor_fitter(encoder, max_iter=60))
    assert r.test_rows == 40
    test = np.flatnonzero(np.array(small.split) == "test")
    assert r.single_quality == pytest.approx(small.quality[test].mean(axis=0))
    # a huge lambda sends every row to the model cheapest on the training rows
    train = np.flatnonzero(np.array(small.split) == "train")
    cheapest = int(np.argmin(small.cost[train].mean(axis=0)))
    assert r.curve_cost[-1] == pytest.approx(r.single_cost[cheapest])
    assert r.curve_quality[-1] == pytest.approx(r.single_quality[cheapest])
    assert 0.0 <= r.vs_hull.share <= 1.0 and r.vs_hull.worst <= r.vs_hull.mean_margin
    assert r.reference == "gpt-4-1106-preview" and r.cost_at_reference_share is not None


def test_cli_models_all_writes_the_table_json_and_plot(tmp_path: Path) -> None:
    rows = []
    for i, prompt in enumerate(EASY + HARD):
        hard = prompt in HARD
        rows.append(
            {
                "id": str(i),
                "dataset": "toy",
                "prompt": prompt,
                "models": {
                    "weak": {"score": 0.0 if hard else 1.0, "cost_usd": 0.001},
                    "mid": {"score": 0.0 if hard and i % 2 else 1.0, "cost_usd": 0.004},
                    "strong": {"score": 1.0, "cost_usd": 0.02},
                },
            }
        )
    data = tmp_path / "toy.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    out, plot = tmp_path / "n.json", tmp_path / "n.png"
    proc = run_cli(
        "eval",
        "--models",
        "all",
        "--data",
        str(data),
        "--folds",
        "3",
        "--json",
        str(out),
        "--plot",
        str(plot),
        check=True,
    )
    assert "N-model router" in proc.stdout and "best pair" in proc.stdout
    (doc,) = json.loads(out.read_text())["tables"]
    assert 0.0 <= doc["above_hull_share"] <= 1.0
    assert doc["cost_at_best_quality_share"] is None or doc["cost_at_best_quality_share"] > 0
    assert doc["best_single"]["model"] == "strong" and plot.stat().st_size > 10_000
    bad = run_cli("eval", "--models", "all", "--data", str(data), "--small", "weak")
    assert bad.returncode == 2 and "drop --small" in bad.stderr


def test_platt_recovers_a_known_calibration() -> None:
    from tierroute.eval.nmodel import platt
    from tierroute.routers.base import sigmoid

    s = np.linspace(-3, 3, 601)[:, None].repeat(2, axis=1)
    target = np.column_stack([sigmoid(2.0 * s[:, 0] + 1.0), sigmoid(s[:, 1])])
    a_, c_ = platt(s, target, l2=0.0)
    assert a_ == pytest.approx([2.0, 1.0], abs=1e-4) and c_ == pytest.approx([1.0, 0.0], abs=1e-4)


def test_pareto_front_drops_models_beaten_at_no_more_cost() -> None:
    from tierroute.eval.nmodel import pareto_front

    # b: dearer than a and worse; c: same cost as a, worse; d: dearest and best
    front = pareto_front(a(0.6, 0.5, 0.55, 0.9), a(1.0, 2.0, 1.0, 5.0))
    assert front.tolist() == [True, False, False, True]


def test_a_file_that_cannot_be_evaluated_is_a_clear_error(tmp_path: Path) -> None:
    one = tmp_path / "one.jsonl"
    one.write_text(json.dumps({"id": "1", "prompt": "hi", "models": {"m": {"score": 1}}}) + "\n")
    proc = run_cli("eval", "--models", "all", "--data", str(one))
    assert proc.returncode == 2 and "fewer than two models" in proc.stderr
    row = {"id": "1", "prompt": "hi", "models": {"a": {"score": 1, "cost_usd": 1}}}
    gaps = [row, {**row, "id": "2", "models": {"b": {"score": 0, "cost_usd": 2}}}] * 2
    gaps_file = tmp_path / "gaps.jsonl"
    gaps_file.write_text("".join(json.dumps(r) + "\n" for r in gaps))
    proc = run_cli("eval", "--models", "all", "--data", str(gaps_file))
    assert proc.returncode == 2 and "Traceback" not in proc.stderr, proc.stderr


def test_neighbour_cost_learns_what_the_prompt_length_cannot(encoder) -> None:  # type: ignore[no-untyped-def]
    # the dear model's answers to hard prompts are long: their cost follows the kind of
    # prompt, not its length, which the line alone cannot see
    prompts = EASY + HARD
    hard = np.array([p in HARD for p in prompts])
    cost = np.column_stack([np.full(len(prompts), 1.0), np.where(hard, 30.0, 10.0)])
    line = length_cost(prompts, cost)(EASY[:3] + HARD[:3])
    near = neighbour_cost(encoder, k=5)(prompts, cost)(EASY[:3] + HARD[:3])
    assert near[:, 0] == pytest.approx(1.0)
    assert np.abs(near[:3, 1] - 10.0).max() < np.abs(line[:3, 1] - 10.0).max()
    assert np.abs(near[3:, 1] - 30.0).max() < np.abs(line[3:, 1] - 30.0).max()
    assert near[3:, 1].min() > 20.0 > near[:3, 1].max()
    # where cost is a line in the length (the priced files), it is the line exactly
    linear = np.array([[2.0 + 0.01 * len(p), 5.0 + 0.1 * len(p)] for p in prompts])
    same = neighbour_cost(encoder, k=5)(prompts, linear)(HARD[:4])
    assert same == pytest.approx(length_cost(prompts, linear)(HARD[:4]), rel=1e-9)
    with pytest.raises(DataError, match="cost model must be one of"):
        cost_model_named("guess", encoder)


def test_mixing_two_lambdas_reaches_the_hull_of_the_routers_own_points() -> None:
    import dataclasses

    table = toy_table()

    def flat(prompts, target, models):  # type: ignore[no-untyped-def]
        return lambda texts: np.tile(target.mean(axis=0), (len(texts), 1))

    r = evaluate_nmodel(table, flat, n_folds=4)
    # a curve with a dent: (1, 0.5), (2, 0.55), (4, 0.9), (10, 1.0). Mixing the points at
    # 1 and 4 reaches 0.8 at cost 3, above the dent; the plain curve needs 3.43
    bent = dataclasses.replace(
        r, curve_cost=a(1.0, 2.0, 4.0, 10.0), curve_quality=a(0.5, 0.55, 0.9, 1.0)
    )
    assert cost_at_quality(bent.curve_cost, bent.curve_quality, 0.8) == pytest.approx(24 / 7)
    m = mixed(bent)
    best = table.models.index(r.best_single)
    assert m.cost_at_best_quality_share == pytest.approx(10.0 / r.single_cost[best])
    assert m.cost_at_reference_share is None
    envelope_at_08 = 1.0 + (0.8 - 0.5) / (0.9 - 0.5) * 3.0
    assert envelope_at_08 == pytest.approx(3.25)
    assert envelope_at_08 < cost_at_quality(bent.curve_cost, bent.curve_quality, 0.8)


def test_mix_at_quality_names_the_models_each_source_gets() -> None:
    import dataclasses

    base = toy_table()
    truth = dict(zip(base.prompts, base.quality, strict=True))
    sources = ["hard" if p in HARD else "easy" for p in base.prompts]
    table = dataclasses.replace(base, sources=sources)

    def knows(prompts, target, models):  # type: ignore[no-untyped-def]
        return lambda texts: np.array([truth[t] for t in texts])

    r = evaluate_nmodel(table, knows, n_folds=4)
    router, best = mix_at_quality(r, 1.0)
    assert router is not None and best is not None
    # knowing every row, both send the easy rows to cheap and the hard ones to dear
    assert router.by_source == best.by_source == {"easy": {"cheap": 1.0}, "hard": {"dear": 1.0}}
    assert router.quality == 1.0 and router.cost == pytest.approx(best.cost)
    nobody, _ = mix_at_quality(r, 1.5)
    assert nobody is None


@needs_arena
def test_arena_hard_by_model_size_keeps_only_models_that_publish_one() -> None:
    tables = load_tables(str(ARENA), axis="size")
    new = tables[1]
    assert new.label.endswith("(judge gpt-4o, by model size)") and new.axis == "size"
    assert "gpt-4o (judge gpt-4o)" in new.left_out  # closed: no published size
    assert new.left_out["gpt-4o (judge gpt-4o)"] == "no published parameter count"
    k = new.models.index("llama-3.1-405b-instruct (judge gpt-4o)")
    assert (new.cost[:, k] == 405.0).all() and size_of("gpt-4o-mini (judge gpt-4o)") is None
    assert all(size_of(m) is not None for t in tables for m in t.models)
    with pytest.raises(DataError, match="axis must be one of"):
        load_tables(str(ARENA), axis="tokens")
