"""The factor router (all models at once), model-name aliases and the single-model hull."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from tierroute.artifact import load_router, open_router, save_router
from tierroute.data import concat_outcomes, load_outcomes
from tierroute.errors import RouterError
from tierroute.eval.hull import multi_model_curve, share_above, single_model_hull
from tierroute.routers import make_router
from tierroute.routers.factor import FactorRouter

from .conftest import EASY, HARD


def three_model_file(path: Path) -> Path:
    """weak fails every hard prompt, mid fails the odd ones, strong solves all."""
    rows = []
    for r in range(3):
        for group, prompts in (("easy", EASY), ("hard", HARD)):
            for i, prompt in enumerate(prompts):
                hard = group == "hard"
                rows.append(
                    {
                        "id": f"{group}-{i}-{r}",
                        "prompt": prompt if r == 0 else f"{prompt} (variant {r})",
                        "models": {
                            "weak": {"score": 0.0 if hard else 1.0, "cost_usd": 0.001},
                            "mid": {"score": 0.0 if hard and i % 2 else 1.0, "cost_usd": 0.004},
                            "strong": {"score": 1.0, "cost_usd": 0.02},
                        },
                    }
                )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.parametrize("name", ["mf", "irt"])
def test_factor_router_learns_every_model_and_scores_unseen_prompts(
    tmp_path: Path,
    encoder,  # type: ignore[no-untyped-def]
    name: str,
) -> None:
    o = load_outcomes(three_model_file(tmp_path / "m.jsonl"), "weak", "strong")
    router = make_router(name, lambda: encoder).fit_outcomes(o)
    assert isinstance(router, FactorRouter)
    assert router.models_ == ["mid", "strong", "weak"]
    easy = router.score("What's the capital of Italy?")
    hard = router.score("Prove that there are infinitely many prime numbers.")
    assert 0.0 <= easy < hard <= 1.0
    probs = router.model_probabilities(["Prove that the square root of 5 is irrational."])[0]
    assert probs[2] < probs[1]  # weak is less likely than strong to answer a hard prompt
    assert "P(a small model answers well)" in router.explain_text("Prove it.").reasons[0]


def test_factor_router_pairs_models_it_never_saw_as_a_pair(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    o = load_outcomes(three_model_file(tmp_path / "m.jsonl"), "weak", "strong")
    router = FactorRouter(encoder, rank=4).fit_outcomes(o)
    art = save_router(router, tmp_path / "r", {}, o.ids)
    art.meta["params"]["small"] = "mid"  # re-pair: mid -> strong was never the label
    art.write_meta()
    loaded = load_router(tmp_path / "r", lambda: encoder).router
    assert isinstance(loaded, FactorRouter) and loaded.small == "mid"
    texts = o.prompts[:6]
    probs = router.model_probabilities(texts)
    assert np.allclose(loaded.model_probabilities(texts), probs, atol=1e-4)
    mid = router.models_.index("mid") if router.models_ else -1
    expected = probs[:, 1] * (1 - probs[:, mid])
    assert np.allclose(loaded.score_texts(texts), expected, atol=1e-4)


def test_factor_router_refuses_a_model_it_has_no_vector_for(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    o = load_outcomes(three_model_file(tmp_path / "m.jsonl"), "weak", "strong")
    save_router(FactorRouter(encoder, rank=2).fit_outcomes(o), tmp_path / "r", {}, o.ids)
    meta = json.loads((tmp_path / "r" / "router.json").read_text())
    meta["params"]["large"] = "gpt-9"
    (tmp_path / "r" / "router.json").write_text(json.dumps(meta))
    with pytest.raises(RouterError, match=r"no vector for model 'gpt-9'.*trained on: mid"):
        load_router(tmp_path / "r", lambda: encoder)


def test_factor_router_from_pair_labels_alone(encoder) -> None:  # type: ignore[no-untyped-def]
    router = FactorRouter(encoder, rank=2).fit(EASY + HARD, [0] * len(EASY) + [1] * len(HARD))
    assert router.score("Say hi in French.") < router.score("Prove Fermat's little theorem.")


def test_models_are_joined_across_files_by_alias(tmp_path: Path) -> None:
    def write(name: str, small: str, large: str) -> Path:
        row = {"id": name, "prompt": "p", "models": {small: {"score": 0}, large: {"score": 1}}}
        (tmp_path / name).write_text(json.dumps(row) + "\n")
        return tmp_path / name

    a = load_outcomes(
        write("a", "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"),
        "mistralai/mixtral-8x7b-chat",
        "gpt-4-1106-preview",
    )
    assert a.small_model == "mistralai/Mixtral-8x7B-Instruct-v0.1"  # the file's own name
    b = load_outcomes(
        write("b", "mistralai/mixtral-8x7b-chat", "gpt4_1106_preview"),
        "mistralai/Mixtral-8x7B-Instruct-v0.1",
        "gpt-4-1106-preview",
    )
    both = concat_outcomes([a, b])
    assert both.small_model == "mistralai/mixtral-8x7b-chat" and len(both) == 2
    table = both.model_scores()
    assert table.models == ["gpt-4-1106-preview", "mistralai/mixtral-8x7b-chat"]
    assert table.scores.tolist() == [[1.0, 0.0], [1.0, 0.0]]


def test_single_model_hull_and_routes_above_it() -> None:
    quality = np.array([0.5, 0.6, 0.9, 0.55])
    cost = np.array([1.0, 2.0, 10.0, 5.0])
    hull = single_model_hull(["a", "b", "c", "d"], quality, cost)
    assert hull.models == ["a", "b", "c"]  # d costs more than b and is worse
    assert share_above(hull, np.array([1.0, 10.0]), np.array([0.5, 0.9]))[0] == 0.0
    share, worst = share_above(hull, np.array([1.0, 3.0, 10.0]), np.array([0.5, 0.8, 0.9]))
    assert share > 0.9 and worst > -1e-9
    # Two rows, two models: a router that knows which model answers each row beats both.
    outcome = np.array([[1.0, 0.0], [0.0, 1.0]])
    spend = np.array([[1.0, 2.0], [1.0, 2.0]])
    xs, ys = multi_model_curve(outcome, outcome, spend, np.array([1.0, 2.0]))
    assert ys[0] == 1.0 and xs[0] == 1.5  # lambda 0: each row to the model that answers it
    assert xs[-1] == 1.0  # a large lambda sends everything to the cheapest


def test_default_router_ships_and_scores(encoder) -> None:  # type: ignore[no-untyped-def]
    router, artifact = open_router("default", lambda: encoder)
    assert artifact is not None and (artifact.path / "CARD.md").is_file()
    assert artifact.threshold is not None
    assert "alpaca" not in json.dumps(artifact.meta["trained_on"]).lower()
    easy = router.score("Thanks, that helps!")
    hard = router.score("Prove that every planar graph is 5-colourable.")
    assert 0.0 <= easy < hard <= 1.0


def test_per_file_abilities_and_difficulty_score_survive_a_save(
    tmp_path: Path,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    from tierroute.data import file_model_scores

    a = load_outcomes(three_model_file(tmp_path / "a.jsonl"), "weak", "strong")
    # A second file on a [-1, 1] verdict scale: mapped to [0, 1], its own columns.
    b_rows = [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()]
    for row in b_rows:
        row["models"] = {"judge-x": {"score": 2 * row["models"]["mid"]["score"] - 1}}
        row["id"] = "b-" + row["id"]
    (tmp_path / "b.jsonl").write_text("".join(json.dumps(r) + "\n" for r in b_rows))
    b = load_outcomes(tmp_path / "b.jsonl", "judge-x", "judge-x")
    table = file_model_scores([("A", a), ("B", b)])
    assert table.models == ["A:mid", "A:strong", "A:weak", "B:judge-x"]
    assert np.isnan(table.scores[: len(a), 3]).all() and np.isnan(table.scores[len(a) :, :3]).all()
    assert set(np.unique(table.scores[len(a) :, 3])) == {0.0, 1.0}

    router = FactorRouter(encoder, rank=0, score_by="difficulty", features="structure")
    router.fit_scores(a.prompts + b.prompts, table)
    easy, hard = router.score_texts(["What's the capital of Italy?", "Prove that e is irrational."])
    assert 0.0 <= easy < hard <= 1.0
    save_router(router, tmp_path / "r", {"data": ["a", "b"]}, a.ids + b.ids)
    loaded = load_router(tmp_path / "r", lambda: encoder).router
    np.testing.assert_allclose(loaded.score_texts(["Prove it."]), router.score_texts(["Prove it."]))
    with pytest.raises(RouterError, match="score_by"):
        FactorRouter(encoder, score_by="vibes")
