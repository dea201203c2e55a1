"""Progress bars for long steps (embedding, training, assembling models, replay, folds).

On stderr, and only where someone watches: off when stderr is not a terminal (logs, CI,
pipes) and after `set_quiet(True)` (the CLI's --quiet). tqdm is imported when a bar is made.
"""

from __future__ import annotations

import sys
from typing import Any

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Silence every bar of this process (the CLI's --quiet; a library never calls it)."""
    global _quiet
    _quiet = quiet


def enabled() -> bool:
    return not _quiet and sys.stderr.isatty()


def progress(total: float | None, what: str, unit: str = "it", min_total: float = 0) -> Any:
    """A tqdm bar (use it as a context manager, `.update(n)`); a silent one when bars are
    off or the work is smaller than `min_total` (a few texts in the gateway)."""
    from tqdm import tqdm

    off = not enabled() or (total is not None and total < min_total)
    scale = unit == "B"
    return tqdm(
        total=total,
        desc=what,
        unit=unit,
        unit_scale=scale,
        unit_divisor=1024 if scale else 1000,
        disable=off,
        leave=False,
        file=sys.stderr,
    )
