"""Grouped k-fold splits: no group is ever in both the training and the test part."""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence

import numpy as np
import numpy.typing as npt

from tierroute.errors import InputError


def grouped_folds(
    groups: Sequence[str], n_folds: int = 5, seed: int = 0
) -> list[npt.NDArray[np.int64]]:
    """Test indices of each fold. Groups are shuffled, then dealt largest-first to the
    currently smallest fold, so folds are balanced in rows as well as random."""
    sizes = Counter(groups)
    if len(sizes) < n_folds:
        raise InputError(
            f"{len(sizes)} groups cannot fill {n_folds} folds; use --folds {len(sizes)} or fewer"
        )
    rng = np.random.default_rng(seed)
    names = list(sizes)
    rng.shuffle(names)
    names.sort(key=lambda g: -sizes[g])  # stable: ties keep the shuffled order
    load = [0] * n_folds
    fold_of: dict[str, int] = {}
    for name in names:
        target = min(range(n_folds), key=lambda f: load[f])
        fold_of[name] = target
        load[target] += sizes[name]
    assignment = np.array([fold_of[g] for g in groups])
    return [np.flatnonzero(assignment == f) for f in range(n_folds)]
