"""Face validity of the shipped default router on prompts no benchmark holds.

tests/face_validity.jsonl: prompts written for this check, labelled "easy" (greetings,
lookups, one-step arithmetic, clerical edits of long text) or "hard" (proofs, system
design, hard code, expert analysis, multi-step problems; short and long). The router is
never tuned on them: this is a held-out sanity check of what it learned from benchmarks.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierroute.learning import roc_auc

FACE = Path(__file__).with_name("face_validity.jsonl")


def face_set() -> tuple[list[str], np.ndarray]:
    rows = [json.loads(line) for line in FACE.read_text(encoding="utf-8").splitlines() if line]
    prompts = [row["prompt"] for row in rows]
    hard = np.array([row["label"] == "hard" for row in rows], dtype=np.int64)
    return prompts, hard


def test_face_set_is_balanced_so_length_cannot_separate_it() -> None:
    prompts, hard = face_set()
    assert len(prompts) >= 80 and len(set(prompts)) == len(prompts)
    assert 0.4 <= hard.mean() <= 0.6
    # Length alone must be close to a coin, or the router's AUC would say nothing.
    length_auc = roc_auc([len(p) for p in prompts], hard)
    assert 0.4 <= length_auc <= 0.6, length_auc


def default_auc() -> float:
    from tierroute.artifact import open_router
    from tierroute.embed import find_model_dir
    from tierroute.errors import MissingDependencyError

    try:
        find_model_dir()
    except MissingDependencyError as exc:
        pytest.skip(f"the embedding model is not installed: {exc}")
    router, _ = open_router("default")
    prompts, hard = face_set()
    return roc_auc(router.score_texts(prompts), hard)


def test_default_router_keeps_its_face_validity() -> None:
    # The shipped default scores 0.923 (rule prior 0.5; 0.878 at 0.25): a regression
    # guard below the target.
    assert default_auc() >= 0.90


@pytest.mark.xfail(
    strict=True,
    reason="issue 9 target not met yet: the shipped default scores 0.923 (see its CARD.md); "
    "strict, so reaching it fails this marker and asks for its removal",
)
def test_default_router_separates_easy_from_hard() -> None:
    assert default_auc() >= 0.95
