"""Face validity of the shipped default router on prompts no benchmark holds.

Three sets of prompts written for this check, labelled "easy" (greetings, lookups,
one-step arithmetic, clerical edits of long text) or "hard" (proofs, system design, hard
code, expert analysis, multi-step problems; short and long), each balanced so that length
alone cannot separate them. No router is trained on them. How clean each is as a test:

- face_validity.jsonl: the first set. The rule prior's weight (0.5) was chosen with it in
  view, and so were the `ask` rules (tierroute.asks, issue 9).
- face_validity_holdout.jsonl: written before any tuning for issue 9's face target; the
  `ask` rules' expressions were then written with it in view too.
- face_validity_fresh.jsonl: written after the `ask` rules were first frozen, before any
  router scored it, in the ways users type. The default scored it 0.818 before the `ask`
  rules and 0.872 with them as frozen; one structural change made after reading its
  misses (material set off without "this"/"these", or before the question) took it to
  0.922. It is the least fitted of the three, and the one still short of 0.95.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierroute.learning import roc_auc

HERE = Path(__file__).parent
FACE = HERE / "face_validity.jsonl"
HOLDOUT = HERE / "face_validity_holdout.jsonl"
FRESH = HERE / "face_validity_fresh.jsonl"
SETS = (FACE, HOLDOUT, FRESH)


def face_set(path: Path = FACE) -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line]
    prompts = [row["prompt"] for row in rows]
    hard = np.array([row["label"] == "hard" for row in rows], dtype=np.int64)
    return prompts, hard


@pytest.mark.parametrize("path", SETS, ids=lambda p: p.stem)
def test_face_set_is_balanced_so_length_cannot_separate_it(path: Path) -> None:
    prompts, hard = face_set(path)
    assert len(prompts) >= (80 if path != FRESH else 70) and len(set(prompts)) == len(prompts)
    assert 0.4 <= hard.mean() <= 0.6
    # Length alone must be close to a coin, or the router's AUC would say nothing.
    length_auc = roc_auc([len(p) for p in prompts], hard)
    assert 0.4 <= length_auc <= 0.6, length_auc


def test_the_sets_share_no_prompt() -> None:
    seen = [set(face_set(path)[0]) for path in SETS]
    assert not (seen[0] & seen[1] or seen[0] & seen[2] or seen[1] & seen[2])


@pytest.fixture(scope="module")
def default_router():  # type: ignore[no-untyped-def]
    from tierroute.artifact import open_router
    from tierroute.embed import find_model_dir
    from tierroute.errors import MissingDependencyError

    try:
        find_model_dir()
    except MissingDependencyError as exc:
        pytest.skip(f"the embedding model is not installed: {exc}")
    router, _ = open_router("default")
    return router


def auc_of(router, path: Path) -> float:  # type: ignore[no-untyped-def]
    prompts, hard = face_set(path)
    return roc_auc(router.score_texts(prompts), hard)


@pytest.mark.parametrize("path", [FACE, HOLDOUT], ids=lambda p: p.stem)
def test_default_router_separates_easy_from_hard(default_router, path: Path) -> None:  # type: ignore[no-untyped-def]
    # Issue 9's target. 1.000 and 0.999 today (see the module docstring for how clean).
    assert auc_of(default_router, path) >= 0.95


def test_default_router_keeps_its_face_validity_on_the_fresh_set(default_router) -> None:  # type: ignore[no-untyped-def]
    # 0.922 today, below the 0.95 target: a regression guard, not the target.
    assert auc_of(default_router, FRESH) >= 0.90
