"""Continuous learning from a real ledger: labels, training, promotion only if better."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierroute.errors import InputError
from tierroute.learning import cross_validate, ledger_labels, stratified_folds
from tierroute.ledger import Ledger, LedgerRow, default_path

from .conftest import run_cli

# This traffic's small model is fine at cooking and fails at tax questions: nothing a
# keyword rule knows, but a learned router picks it up from the ledger's labels.
EASY = [
    "How long should I boil an egg for a soft yolk?",
    "What can I cook with leftover rice?",
    "How do I make a simple tomato sauce?",
    "What spices go well with roasted carrots?",
    "How do I keep bread fresh for longer?",
    "Give me a quick pancake recipe.",
    "How do I cook pasta al dente?",
    "What is a good substitute for buttermilk?",
    "How long do I bake a potato?",
    "How can I make my soup thicker?",
]
HARD = [
    "How is capital gains tax calculated on shares held for two years?",
    "Can I deduct home office expenses as a freelancer?",
    "How does depreciation of rental property affect my taxes?",
    "What is the VAT treatment of digital services sold abroad?",
    "How are stock options taxed when exercised?",
    "Do I owe tax on a gift from a relative abroad?",
    "How do I report cryptocurrency losses on my tax return?",
    "What are the rules for carrying forward business losses?",
    "How is inheritance tax applied to a family home?",
    "Can a sole trader claim vehicle expenses against income?",
]

CONFIG = """
tiers:
  - {name: small, kind: local, model: smollm2-135m}
  - {name: large, kind: local, model: qwen2.5-coder-1.5b}
router: rules
"""


def fill_ledger(data_dir: Path, keep_prompts: bool = True) -> None:
    """Traffic in which the small tier fails the hard prompts: users and the shadow judge
    say so, and say the easy answers were fine."""
    with Ledger(default_path(data_dir), keep_prompts=keep_prompts) as ledger:
        t = 1_700_000_000.0
        for round_ in range(4):
            for group, prompts in (("easy", EASY), ("hard", HARD)):
                for i, prompt in enumerate(prompts):
                    t += 1
                    rid = f"{group}-{i}-{round_}"
                    ledger.record(
                        LedgerRow(
                            id=rid,
                            ts=t,
                            tier="small",
                            model="m",
                            prompt_text=f"{prompt} (take {round_})",
                        )
                    )
                    good = group == "easy"
                    if (i + round_) % 2:
                        ledger.add_feedback(rid, 1.0 if good else 0.0)
                    else:
                        ledger.record_judgement(rid, t, "small", "large", float(good), "")
        # the largest tier's answers carry no label about the small tier
        ledger.record(LedgerRow(id="big", ts=t + 1, tier="large", model="m", prompt_text="x"))
        ledger.add_feedback("big", 0.0)


def test_labels_from_feedback_and_judgements(tmp_path: Path) -> None:
    fill_ledger(tmp_path)
    with Ledger(default_path(tmp_path)) as ledger:
        data = ledger_labels(ledger, "large")
    assert len(data.ids) == 80 and "big" not in data.ids
    assert data.labels.sum() == 40  # the hard prompts
    assert all(data.labels[i] == data.ids[i].startswith("hard") for i in range(80))


def test_prompts_must_have_been_kept(tmp_path: Path) -> None:
    fill_ledger(tmp_path, keep_prompts=False)
    with Ledger(default_path(tmp_path)) as ledger, pytest.raises(InputError, match="keep_prompts"):
        ledger_labels(ledger, "large")


def test_train_from_ledger_promotes_only_a_better_router(tmp_path: Path) -> None:
    fill_ledger(tmp_path)
    config = tmp_path / "gw.yaml"
    config.write_text(CONFIG)
    out = tmp_path / "router"
    args = (
        "train",
        "--from-ledger",
        "--router",
        "logreg",
        "--data-dir",
        str(tmp_path),
        "--config",
        str(config),
        "--out",
        str(out),
    )
    first = run_cli(*args, check=True)
    assert "held-out ROC AUC: new logreg" in first.stdout and "current rules" in first.stdout
    assert "promoted" in first.stdout and (out / "router.json").is_file()
    meta = json.loads((out / "router.json").read_text())
    assert meta["trained_on"]["source"] == "ledger" and meta["trained_on"]["rows"] == 64

    # the same training against the router it just produced: no better, so not promoted
    before = (out / "router.json").read_text()
    second = run_cli(*args, "--current", str(out), check=True)
    assert "not promoted" in second.stdout
    assert (out / "router.json").read_text() == before


def test_too_little_ledger_data(tmp_path: Path) -> None:
    with Ledger(default_path(tmp_path), keep_prompts=True) as ledger:
        ledger.record(LedgerRow(id="a", ts=1.0, tier="small", model="m", prompt_text="hi"))
        ledger.add_feedback("a", 1.0)
    proc = run_cli(
        "train",
        "--from-ledger",
        "--router",
        "logreg",
        "--data-dir",
        str(tmp_path),
        "--out",
        str(tmp_path / "r"),
    )
    assert proc.returncode == 2 and "only 1 labelled requests" in proc.stderr


def test_stratified_folds_cover_every_label_once_with_both_kinds_in_each() -> None:
    labels = np.array([1] * 7 + [0] * 30)
    parts = stratified_folds(labels, 5, seed=3)
    assert sorted(i for p in parts for i in p) == list(range(37))
    assert len(parts) == 5 and all(set(labels[p]) == {0, 1} for p in parts)
    # as many folds as the rarer kind allows
    assert len(stratified_folds(np.array([1, 1, 1, 0, 0, 0, 0, 0]), 5)) == 3
    with pytest.raises(InputError, match="rarer kind"):
        stratified_folds(np.array([1] + [0] * 20), 5)


def test_cross_validation_scores_each_fold_with_a_model_that_never_saw_it() -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=200)
    labels = (x + 0.5 * rng.normal(size=200) > 0).astype(np.int64)
    parts = stratified_folds(labels, 4)
    seen: list[set[int]] = []

    def fit_score(train: list[int], test: list[int]) -> np.ndarray:
        seen.append(set(train) & set(test))
        # a "model" that learns the sign of x from its training rows only
        sign = np.sign(np.corrcoef(x[train], labels[train])[0, 1])
        return sign * x[test]

    new, reference, oof = cross_validate(fit_score, -x, labels, parts)
    assert all(not overlap for overlap in seen) and len(seen) == 4
    assert new > 0.8 and reference == pytest.approx(1 - new)  # the reference is reversed
    assert np.array_equal(oof, x)
