"""Every benchmark script parses its own command line: `--help` exits 0. Two flags of the
same name (merged from two branches) once broke gateway_bench before it measured anything,
and no other test runs these scripts' argument parsers."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from .conftest import ROOT


def _is_script(path: Path) -> bool:
    text = path.read_text(encoding="utf-8")
    return "argparse" in text and 'if __name__ == "__main__"' in text


SCRIPTS = sorted(p for p in (ROOT / "benchmarks").glob("*.py") if _is_script(p))


@pytest.mark.parametrize("script", SCRIPTS, ids=[p.stem for p in SCRIPTS])
def test_help(script: Path) -> None:
    done = subprocess.run(
        [sys.executable, str(script), "--help"], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert "usage:" in done.stdout
