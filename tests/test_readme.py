"""README's command examples still run (scripts/readme_examples.py): the cheap ones for
real, in README's order; the slow and manual ones are listed as skipped, with the reason
their README marker gives."""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType
from typing import Any

import pytest

from .conftest import ROOT, SHARED


def load_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location(
        "readme_examples", ROOT / "scripts" / "readme_examples.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["readme_examples"] = module
    spec.loader.exec_module(module)
    return module


script = load_script()
EXAMPLES = script.parse((ROOT / "README.md").read_text())


def test_readme_marks_the_examples_it_documents() -> None:
    ids = [e.id for e in EXAMPLES]
    assert {"route", "train-calibrate", "eval-mmlu"} <= set(ids)
    for example in EXAMPLES:
        assert example.kind in ("", "slow", "manual")
        assert all(c.text.strip() for c in example.commands)


def test_rewrite_replaces_only_the_outputs() -> None:
    text = (
        "intro\n<!-- example: a -->\n    $ echo one \\\n        two\n    stale\n"
        "<!-- /example -->\nmiddle\n<!-- example: b -->\n    $ true\n    old\n<!-- /example -->\n"
    )
    (a, b) = script.parse(text)
    assert b.commands[0].output == ["old"]
    assert a.commands[0].text == "echo one \\\n    two" and a.commands[0].output == ["stale"]
    ran_a = [script.Ran("a", a.commands[0].text, 0, "one two\n", 0.0)]
    out = script.rewrite(text, {"a": ran_a})
    assert "    one two\n<!-- /example -->\nmiddle" in out and "stale" not in out
    assert "    $ true\n    old\n" in out  # b was not run: kept as it was
    assert script.rewrite(out, {"a": ran_a}) == out  # idempotent


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """Every cheap example run once, in README's order (later ones use earlier files)."""
    runner = script.Runner(tmp_path_factory.mktemp("readme"), timeout_s=600)
    out = {}
    for example in EXAMPLES:
        if example.kind or (uses_shared(example) and not SHARED.is_dir()):
            continue
        out[example.id] = runner.run(example)
    return out


def uses_shared(example: Any) -> bool:
    return any("../shared" in c.text for c in example.commands)


@pytest.mark.parametrize("example", EXAMPLES, ids=[e.id for e in EXAMPLES])
def test_documented_command_runs(example: Any, runs: dict[str, list[Any]]) -> None:
    if example.kind:
        pytest.skip(f"{example.kind}: {example.why}")
    if uses_shared(example) and not SHARED.is_dir():
        pytest.skip(f"needs the outcome data in {SHARED}")
    for ran in runs[example.id]:
        assert ran.code == 0, f"$ {ran.command}\n{ran.output}"
        assert ran.output.strip(), f"$ {ran.command} printed nothing"
