"""Learned routers on real embeddings, saved artifacts and their checks."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierroute.artifact import load_router, save_router
from tierroute.data import load_outcomes
from tierroute.errors import ArtifactError, RouterError
from tierroute.routers import make_router
from tierroute.routers.knn import KnnRouter
from tierroute.routers.logreg import LogRegRouter
from tierroute.routers.random_router import RandomRouter
from tierroute.tagger import Tagger

from .conftest import EASY, HARD


def labelled() -> tuple[list[str], np.ndarray]:
    return EASY + HARD, np.array([0] * len(EASY) + [1] * len(HARD))


@pytest.mark.parametrize("kind", ["knn", "logreg"])
def test_learned_router_separates_unseen_prompts(encoder, kind: str) -> None:  # type: ignore[no-untyped-def]
    texts, y = labelled()
    router = (
        KnnRouter(encoder, k=5) if kind == "knn" else LogRegRouter(encoder, Tagger(encoder), C=1.0)
    )
    router.fit(texts, y)
    easy = router.score("What's the capital of Italy?")
    hard = router.score("Prove that there are infinitely many prime numbers.")
    assert 0.0 <= easy < hard <= 1.0
    explanation = router.explain([{"role": "user", "content": "Prove that 5 is prime."}])
    assert explanation.reasons


def test_unfitted_router_says_so(encoder) -> None:  # type: ignore[no-untyped-def]
    with pytest.raises(RouterError, match="has not been trained"):
        KnnRouter(encoder).score("hello")


def test_unknown_router_name() -> None:
    with pytest.raises(RouterError, match="unknown router 'nope'"):
        make_router("nope")


def test_random_router_is_seeded_and_uniform() -> None:
    texts = [f"prompt {i}" for i in range(5000)]
    a, b = RandomRouter(1).score_texts(texts), RandomRouter(1).score_texts(texts)
    assert np.array_equal(a, b)
    assert not np.array_equal(a, RandomRouter(2).score_texts(texts))
    assert abs(a.mean() - 0.5) < 0.02 and a.min() >= 0 and a.max() < 1


@pytest.mark.parametrize("kind", ["knn", "logreg"])
def test_artifact_round_trip(tmp_path: Path, encoder, outcome_file: Path, kind: str) -> None:  # type: ignore[no-untyped-def]
    o = load_outcomes(outcome_file, "small-m", "large-m")
    router = make_router(kind, lambda: encoder).fit(o.prompts, o.labels)
    art = save_router(router, tmp_path / "r", {"data_hash": o.data_hash}, o.ids)
    loaded = load_router(tmp_path / "r", lambda: encoder)
    assert np.allclose(
        loaded.router.score_texts(o.prompts[:5]), router.score_texts(o.prompts[:5]), atol=1e-3
    )
    assert set(loaded.overlap(o.ids)) == set(o.ids)
    assert art.meta["format_version"] == 1


def test_logreg_feature_sets(tmp_path: Path, encoder, outcome_file: Path) -> None:  # type: ignore[no-untyped-def]
    texts, y = labelled()
    raw = LogRegRouter(encoder, Tagger(encoder), C=1.0).fit(texts, y)
    full = LogRegRouter(encoder, Tagger(encoder), C=1.0, features="all").fit(texts, y)
    # "embedding" keeps MiniLM's geometry: nothing is centred or rescaled
    assert raw.mean_ is not None and raw.scale_ is not None and raw.coef_ is not None
    assert not raw.mean_.any() and (raw.scale_ == 1).all() and len(raw.coef_) == encoder.dim
    assert full.coef_ is not None and len(full.coef_) > encoder.dim
    proof = [{"role": "user", "content": "Prove that 5 is prime."}]
    # both still name the tags the tagger sees; only "all" names single features
    assert raw.explain(proof).tags == full.explain(proof).tags
    assert raw.explain(proof).reasons[1:] == () and len(full.explain(proof).reasons) > 1
    with pytest.raises(RouterError, match="features must be one of embedding, all"):
        LogRegRouter(encoder, features="tfidf")
    # a router saved before the choice existed was trained on "all" and loads as such
    o = load_outcomes(outcome_file, "small-m", "large-m")
    old = LogRegRouter(encoder, Tagger(encoder), features="all").fit(o.prompts, o.labels)
    save_router(old, tmp_path / "r", {}, o.ids)
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    del meta["params"]["features"]
    (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
    loaded = load_router(tmp_path / "r", lambda: encoder).router
    assert isinstance(loaded, LogRegRouter) and loaded.features == "all"
    assert np.allclose(loaded.score_texts(o.prompts[:5]), old.score_texts(o.prompts[:5]))


def test_artifact_of_another_format_version(tmp_path: Path, encoder, outcome_file: Path) -> None:  # type: ignore[no-untyped-def]
    o = load_outcomes(outcome_file, "small-m", "large-m")
    save_router(
        make_router("knn", lambda: encoder).fit(o.prompts, o.labels), tmp_path / "r", {}, o.ids
    )
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    meta["format_version"] = 99
    (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
    with pytest.raises(ArtifactError, match=r"format version 99.*retrain"):
        load_router(tmp_path / "r", lambda: encoder)
    with pytest.raises(ArtifactError, match="not a saved router"):
        load_router(tmp_path, lambda: encoder)
