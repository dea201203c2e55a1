from __future__ import annotations

from pathlib import Path

import pytest

from tierroute.data import load_outcomes
from tierroute.errors import DataError


def test_load_and_labels(outcome_file: Path) -> None:
    o = load_outcomes(outcome_file, "small-m", "large-m")
    assert len(o) == 60
    assert o.labels.sum() == 30  # hard rows: large wins
    assert o.has_cost
    assert set(o.field("subset")) == {"easy", "hard"}
    assert len(load_outcomes(outcome_file, "small-m", "large-m", ["meta.split=test"])) == 20


def test_missing_file() -> None:
    with pytest.raises(DataError, match="not found"):
        load_outcomes("/nonexistent.jsonl", "a", "b")


def test_garbled_line_names_the_line(tmp_path: Path, outcome_file: Path) -> None:
    bad = tmp_path / "bad.jsonl"
    bad.write_text(outcome_file.read_text().splitlines()[0] + "\n{not json\n")
    with pytest.raises(DataError, match=r"line 2 .* not valid JSON"):
        load_outcomes(bad, "small-m", "large-m")


def test_unknown_model_lists_the_models(outcome_file: Path) -> None:
    with pytest.raises(DataError, match=r"model 'gpt-9' is not in .*large-m, small-m"):
        load_outcomes(outcome_file, "gpt-9", "large-m")


def test_bad_where(outcome_file: Path) -> None:
    with pytest.raises(DataError, match="FIELD=VALUE"):
        load_outcomes(outcome_file, "small-m", "large-m", ["meta.split"])
    with pytest.raises(DataError, match="no row"):
        load_outcomes(outcome_file, "small-m", "large-m", ["meta.split=nope"])
    with pytest.raises(DataError, match="no field"):
        load_outcomes(outcome_file, "small-m", "large-m", ["meta.nope=1"])
