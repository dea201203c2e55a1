"""Progress bars: on stderr where a terminal watches, off through a pipe and with --quiet.
The commands run for real with stderr on a pseudo-terminal."""

from __future__ import annotations

import fcntl
import os
import pty
import struct
import subprocess
import sys
import termios
from pathlib import Path

import pytest

from tierroute import progress

from .conftest import ROOT


def run_on_terminal(*args: str) -> tuple[int, str]:
    """Run `tierroute ARGS` with stderr on a pseudo-terminal; (exit code, what it showed)."""
    main, child = pty.openpty()
    # 24 rows x 120 columns, as a terminal has (a fresh pty has 0 columns: no room for a bar)
    fcntl.ioctl(child, termios.TIOCSWINSZ, struct.pack("HHHH", 24, 120, 0, 0))
    proc = subprocess.Popen(
        [sys.executable, "-m", "tierroute.cli", *args],
        stdout=subprocess.DEVNULL,
        stderr=child,
        cwd=ROOT,
    )
    os.close(child)
    shown = b""
    while True:
        try:
            chunk = os.read(main, 65536)
        except OSError:  # the child closed its end
            break
        if not chunk:
            break
        shown += chunk
    os.close(main)
    return proc.wait(300), shown.decode(errors="replace")


TOY = ["--small", "small-m", "--large", "large-m"]


def test_cross_validation_and_irt_fitting_show_bars_on_a_terminal(outcome_file: Path) -> None:
    args = ["eval", "--data", str(outcome_file), *TOY, "--router", "irt"]
    code, shown = run_on_terminal(*args, "--cv-group", "meta.topic")
    assert code == 0, shown
    # tqdm redraws at most every 0.1 s and clears the bar at the end (leave=False), so on a
    # fast run only the first state may ever be drawn: the bar and its total are what count.
    assert "cross-validation folds" in shown and "/5 " in shown
    assert "fitting irt" in shown
    code, quiet = run_on_terminal(*args, "--cv-group", "meta.topic", "--quiet")
    assert code == 0, quiet
    assert "cross-validation folds" not in quiet and "fitting irt" not in quiet


def test_no_bars_through_a_pipe(outcome_file: Path) -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "tierroute.cli", "eval", "--data", str(outcome_file), *TOY,
         "--router", "irt", "--cv-group", "meta.topic"],
        capture_output=True, text=True, cwd=ROOT, timeout=300, check=True,
    )  # fmt: skip
    assert "folds" not in proc.stderr and "\r" not in proc.stderr


def test_quiet_and_min_total_silence_a_bar(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys.stderr, "isatty", lambda: True)
    assert progress.enabled()
    assert progress.progress(10, "x", min_total=5).disable is False
    assert progress.progress(3, "x", min_total=5).disable  # a few texts: the gateway's case
    progress.set_quiet(True)
    try:
        assert not progress.enabled() and progress.progress(10, "x").disable
    finally:
        progress.set_quiet(False)
