"""The fine-tuned encoder router: training, the torch-free ONNX export, and its state."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tierroute.errors import RouterError
from tierroute.routers.finetuned import FineTunedRouter

from .conftest import (
    EASY,
    HARD,
    MMLU,
    MMLU_LARGE,
    MMLU_SMALL,
    needs_shared,
    run_without_heavy_imports,
)

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None, reason="training needs torch (extra `train`)"
)

UNSEEN = ["What's the capital of Italy?", "Prove that there are infinitely many prime numbers."]
# Small and quick: one trained layer, no validation slice (20 texts are too few), and a
# high learning rate so the trained layer moves visibly away from the packaged one.
PARAMS: dict[str, Any] = {"layers": 1, "epochs": 2, "lr": 1e-3, "val_fraction": 0.0, "seed": 0}


def labelled() -> tuple[list[str], np.ndarray]:
    return EASY + HARD, np.array([0] * len(EASY) + [1] * len(HARD))


@pytest.fixture(scope="module")
def tuned():  # type: ignore[no-untyped-def]
    from tierroute.embed import find_model_dir
    from tierroute.finetune import HiddenCache, TrainConfig, fine_tune

    texts, y = labelled()
    return fine_tune(texts, y, TrainConfig(**PARAMS), find_model_dir(), HiddenCache())


@pytest.fixture(scope="module")
def router(tuned) -> FineTunedRouter:  # type: ignore[no-untyped-def]
    router = FineTunedRouter(**PARAMS)
    router.set_state(tuned.state())
    return router


def test_onnx_export_matches_torch(tuned, router: FineTunedRouter) -> None:  # type: ignore[no-untyped-def]
    texts = [*EASY, *HARD, *UNSEEN, "x " * 300]  # the last one is truncated to max_tokens
    onnx_scores = router.score_texts(texts)
    torch_scores = tuned.scores(texts)
    assert np.max(np.abs(onnx_scores - torch_scores)) < 1e-4
    assert np.all((onnx_scores >= 0) & (onnx_scores <= 1))


def test_export_serves_the_trained_layer_not_the_packaged_one(router: FineTunedRouter) -> None:
    from tierroute.embed import Embedder

    tuned = router._load().embed(UNSEEN)
    packaged = Embedder(max_length=router.max_tokens, threads=1).embed(UNSEEN)
    assert np.max(np.abs(tuned - packaged)) > 1e-2


def test_fitted_router_separates_unseen_prompts(router: FineTunedRouter) -> None:
    easy, hard = router.score_texts(UNSEEN)
    assert easy < 0.5 < hard


def test_state_is_only_what_changed(router: FineTunedRouter) -> None:
    state = router.get_state()
    deltas = [k for k in state if k.startswith("delta.")]
    assert deltas and all(k.startswith("delta.encoder.layer.5.") for k in deltas)
    assert all(state[k].dtype == np.float16 for k in deltas)
    assert sum(v.nbytes for v in state.values()) < 5_000_000


def test_state_round_trip_through_npz(tmp_path: Path, router: FineTunedRouter) -> None:
    np.savez(tmp_path / "weights.npz", **router.get_state())
    with np.load(tmp_path / "weights.npz") as saved:
        state = {k: saved[k] for k in saved.files}
    again = FineTunedRouter(**router.get_params())
    again.set_state(state)
    assert again.get_params() == router.get_params()
    assert np.array_equal(again.score_texts(UNSEEN), router.score_texts(UNSEEN))


def test_scoring_a_saved_router_never_imports_torch(
    tmp_path: Path, router: FineTunedRouter
) -> None:
    np.savez(tmp_path / "weights.npz", **router.get_state())
    (tmp_path / "params.json").write_text(json.dumps(router.get_params()))
    run_without_heavy_imports(
        "import json\n"
        "import numpy as np\n"
        "from tierroute.routers.finetuned import FineTunedRouter\n"
        f"folder = {str(tmp_path)!r}\n"
        "r = FineTunedRouter(**json.load(open(folder + '/params.json')))\n"
        "with np.load(folder + '/weights.npz') as f:\n"
        "    r.set_state({k: f[k] for k in f.files})\n"
        "s = r.score_texts(['Prove that sqrt(2) is irrational.', 'hi'])\n"
        "assert s.shape == (2,) and 0 <= s.min() and s.max() <= 1\n"
    )


def test_unfitted_router_and_foreign_state_say_so() -> None:
    with pytest.raises(RouterError, match="has not been trained"):
        FineTunedRouter().score_texts(["hello"])
    with pytest.raises(RouterError, match="not a bert router's state"):
        FineTunedRouter().set_state({"coef": np.zeros(3)})


def test_frozen_states_are_computed_once(tuned) -> None:  # type: ignore[no-untyped-def]
    from tierroute.finetune import HiddenCache, TrainConfig, frozen_states

    cache = HiddenCache()
    config = TrainConfig(**PARAMS)
    first = frozen_states(tuned.model, UNSEEN, config, tuned.model_dir, cache)
    assert [len(s) for s in first] == [10, 11]  # unpadded: tokens with [CLS] and [SEP]

    def refuse(*args: object) -> None:
        raise AssertionError("a memoised text went through the frozen layers again")

    model = tuned.model
    model.run_layers, original = refuse, model.run_layers  # type: ignore[method-assign]
    try:
        again = frozen_states(model, UNSEEN[::-1], config, tuned.model_dir, cache)
    finally:
        model.run_layers = original  # type: ignore[method-assign]
    assert np.array_equal(again[1], first[0]) and np.array_equal(again[0], first[1])


@needs_shared
def test_fit_on_real_sample_keeps_best_validation_check() -> None:
    from tierroute.data import load_outcomes

    o = load_outcomes(MMLU, MMLU_SMALL, MMLU_LARGE)
    rng = np.random.default_rng(0)
    # 80 of each label: enough for a validation slice of whole topic clusters.
    pick = np.concatenate([rng.permutation(np.flatnonzero(o.labels == c))[:80] for c in (0, 1)])
    texts = [o.prompts[i] for i in pick]
    router = FineTunedRouter(layers=1, epochs=1, val_fraction=0.25).fit(texts, o.labels[pick])
    assert len(router.val_auc_) == 5  # the linear probe, then 4 checks in the epoch
    assert router.best_check_ == int(np.argmax(router.val_auc_))
    scores = router.score_texts(texts[:50])
    assert scores.shape == (50,) and np.all((scores >= 0) & (scores <= 1))
