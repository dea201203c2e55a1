"""The gateway's continuous learner on a real ledger with the real embedding: it promotes a
better router, refuses a worse one, books both, and rolls back; and `tierroute replay`."""

from __future__ import annotations

import json
import signal
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import yaml

from tierroute.errors import InputError
from tierroute.gateway.engine import Engine
from tierroute.gateway.learner import Learner
from tierroute.gateway.settings import parse_settings
from tierroute.learning import LearningConfig, ledger_labels
from tierroute.ledger import Ledger, default_path
from tierroute.routers import make_router
from tierroute.routers.residual import ResidualRouter

from .conftest import SHARED, run_cli
from .test_learning import CONFIG, EASY, HARD, fill_ledger

ARENA = SHARED / "arenahard_v01_vs_gpt4_0314.jsonl"


@pytest.fixture
def engine(tmp_path: Path, encoder) -> Iterator[Engine]:  # type: ignore[no-untyped-def]
    """An engine over the rules router (blind to cooking vs tax) and a labelled ledger."""
    fill_ledger(tmp_path)
    settings = parse_settings(yaml.safe_load(CONFIG), "test")
    ledger = Ledger(default_path(tmp_path), keep_prompts=True)
    router = make_router("rules", lambda: encoder)
    engine = Engine(settings, router, {}, ledger)
    yield engine
    engine.close()
    ledger.close()


def test_promotes_a_better_router_refuses_a_worse_one_and_rolls_back(
    engine: Engine, tmp_path: Path
) -> None:
    cold = engine.router
    before = list(engine.settings.policy.thresholds or [])
    learner = Learner(engine, LearningConfig(min_new_labels=20), tmp_path / "learned", "rules")
    learner.restore()

    run = learner.run_once()
    assert run.outcome == "promoted", run.reason
    assert run.new_auc is not None and run.current_auc is not None
    assert run.new_auc > run.current_auc
    assert isinstance(engine.router, ResidualRouter)
    hard, easy = engine.router.score_texts([HARD[0], EASY[0]])
    assert hard > easy
    # the largest tier keeps its share: thresholds moved to the new router's scale
    assert engine.settings.policy.thresholds != before
    assert (tmp_path / "learned" / "r0001" / "router.json").is_file()

    # nothing new to learn from: the run waits
    assert learner.run_once().outcome == "skipped"

    # a candidate held back to the rules router's ranking by a huge penalty only ties the
    # cold router in cross-validation: refused, and the serving router stays
    promoted = engine.router
    learner.config = replace(learner.config, l2=1e30, min_new_labels=0)
    run = learner.run_once()
    assert run.outcome == "refused", run.reason
    assert run.new_auc is not None and run.current_auc is not None
    assert run.new_auc == pytest.approx(run.current_auc)
    assert "cross-validated AUC" in run.reason
    assert engine.router is promoted

    # a restart serves the promoted router again
    again = Learner(engine, LearningConfig(), tmp_path / "learned", "rules")
    again.base = cold
    engine.swap_router(cold, before)
    again.restore()
    assert isinstance(engine.router, ResidualRouter)
    assert engine.router.score_texts([HARD[0]])[0] == pytest.approx(hard)

    run = again.rollback()
    assert run.outcome == "rolled_back"
    assert engine.router is cold and engine.settings.policy.thresholds == before
    with pytest.raises(InputError, match="nothing to roll back"):
        again.rollback()

    engine.ledger.flush()
    reasons = [c.reason for c in engine.ledger.policy_changes()]
    assert [r.split(" ")[1] for r in reasons] == ["promoted", "candidate", "rolled"]
    text = engine.metrics.render().decode()
    for line in (
        'tierroute_learning_runs_total{outcome="promoted"} 1.0',
        'tierroute_learning_runs_total{outcome="refused"} 1.0',
        'tierroute_learning_runs_total{outcome="rolled_back"} 1.0',
        "tierroute_router_version 0.0",
    ):
        assert line in text


def record_newer_labels(engine: Engine, prefix: str, easy_is_fine: bool) -> None:
    """40 judged requests, each prompt twice, newer than every label the fixture holds:
    the small tier's answer was fine on the easy prompts (or, turned, on the hard ones)."""
    from tierroute.ledger import LedgerRow

    t = 1_800_000_000.0
    for i, (group, prompt) in enumerate([("easy", p) for p in EASY] + [("hard", p) for p in HARD]):
        for take in range(2):
            rid = f"{prefix}-{group}-{i}-{take}"
            engine.ledger.record(
                LedgerRow(id=rid, ts=t + i + take / 2, tier="small", model="m",
                          prompt_text=f"{prompt} (again {take})")
            )  # fmt: skip
            fine = (group == "easy") == easy_is_fine
            engine.ledger.record_judgement(rid, t, "small", "large", float(fine), "")
    engine.ledger.flush()


def test_a_serving_learned_router_is_judged_on_the_labels_newer_than_it(
    engine: Engine, tmp_path: Path
) -> None:
    learner = Learner(engine, LearningConfig(min_new_labels=20), tmp_path / "learned", "rules")
    assert learner.run_once().outcome == "promoted"
    promoted = engine.router
    record_newer_labels(engine, "new", easy_is_fine=True)  # after every label it trained on
    run = learner.run_once()
    # the 40 new labels are the serving router's test: its own training labels are not
    assert "on the 40 labels newer than the serving router" in run.reason, run.reason
    assert run.outcome in ("promoted", "refused")
    if run.outcome == "refused":
        assert engine.router is promoted


def test_a_learned_router_that_ranks_newer_labels_worse_is_demoted(
    engine: Engine, tmp_path: Path
) -> None:
    cold = engine.router
    learner = Learner(engine, LearningConfig(min_new_labels=20), tmp_path / "learned", "rules")
    assert learner.run_once().outcome == "promoted"
    # the traffic turns: what was easy now fails on the small tier and the reverse, so the
    # promoted router ranks the newer labels backwards while the blind rules router does not
    record_newer_labels(engine, "turned", easy_is_fine=False)
    # a candidate held to the cold router's ranking cannot replace it, so the question is
    # only whether the serving router stays
    learner.config = replace(learner.config, l2=1e30, min_new_labels=0)
    run = learner.run_once()
    assert run.outcome == "demoted", run.reason
    assert "labels newer than it the serving router ranks at AUC" in run.reason
    assert engine.router is cold
    assert json.loads((tmp_path / "learned" / "active.json").read_text()) == {"stack": []}
    metrics = engine.metrics.render().decode()
    assert 'tierroute_learning_runs_total{outcome="demoted"} 1.0' in metrics
    engine.ledger.flush()
    assert engine.ledger.policy_changes()[-1].reason.startswith("router: demoted r0001")


def test_rollback_of_a_stopped_gateway(engine: Engine, tmp_path: Path) -> None:
    learner = Learner(engine, LearningConfig(), tmp_path / "learned", "rules")
    assert learner.run_once().outcome == "promoted"
    first = run_cli("rollback", "--data-dir", str(tmp_path), check=True)
    assert "rolled back r0001" in first.stdout
    assert json.loads((tmp_path / "learned" / "active.json").read_text()) == {"stack": []}
    second = run_cli("rollback", "--data-dir", str(tmp_path))
    assert second.returncode == 2 and "nothing to roll back" in second.stderr


def test_learning_needs_kept_prompts() -> None:
    from tierroute.errors import ConfigError

    doc = yaml.safe_load(CONFIG)
    doc["gateway"] = {"learning": {"interval_s": 60}}
    with pytest.raises(ConfigError, match="keep_prompts: true"):
        parse_settings(doc, "gw.yaml")
    doc["gateway"]["keep_prompts"] = True
    assert parse_settings(doc, "gw.yaml").learning == LearningConfig(interval_s=60)


def test_judged_small_answers_of_large_tier_requests_are_labels(tmp_path: Path) -> None:
    from tierroute.ledger import LedgerRow

    with Ledger(default_path(tmp_path), keep_prompts=True) as ledger:
        for i, tier in enumerate(("large", "large", "small")):
            ledger.record(LedgerRow(id=f"r{i}", ts=i, tier=tier, model="m", prompt_text="p"))
        ledger.record_judgement("r0", 5.0, "small", "replay", 0.0, "")  # small's answer judged
        ledger.add_feedback("r1", 0.0)  # a rating of the large answer: no label
        ledger.record_judgement("r2", 5.0, "small", "large", 1.0, "")
        ledger.flush()
        data = ledger_labels(ledger, "large")
    assert data.ids == ["r0", "r2"] and list(data.labels) == [1, 0]


def test_gateway_learns_in_the_background_and_rolls_back(tmp_path: Path) -> None:
    from .test_gateway import needs_llama, start, write_yaml

    if needs_llama.args[0]:
        pytest.skip(needs_llama.kwargs["reason"])
    fill_ledger(tmp_path / "data")
    config = write_yaml(
        tmp_path / "gw.yaml",
        """
tiers:
  - {name: small, kind: local, model: smollm2-135m, n_threads: 1}
  - {name: large, kind: local, model: smollm2-135m, n_threads: 1}
router: rules
gateway:
  keep_prompts: true
  learning: {interval_s: 0.3, min_new_labels: 20}
""",
    )
    server = start(config, tmp_path / "data")
    try:
        deadline = time.monotonic() + 120
        promoted = 'tierroute_learning_runs_total{outcome="promoted"} 1.0'
        while promoted not in httpx.get(f"{server.url}/metrics").text:
            assert time.monotonic() < deadline, "no promotion within 2 minutes"
            # the gateway keeps answering while the learner works
            assert httpx.get(f"{server.url}/healthz").status_code == 200
            time.sleep(0.2)
        routed = httpx.post(
            f"{server.url}/v1/route", json={"messages": [{"role": "user", "content": HARD[1]}]}
        )
        assert "learned correction" in json.dumps(routed.json())
        back = httpx.post(f"{server.url}/v1/router/rollback")
        assert back.status_code == 200 and back.json()["status"] == "rolled_back"
        routed = httpx.post(
            f"{server.url}/v1/route", json={"messages": [{"role": "user", "content": HARD[1]}]}
        )
        assert "learned correction" not in json.dumps(routed.json())
        again = httpx.post(f"{server.url}/v1/router/rollback")
        assert again.status_code == 409 and again.json()["error"]["code"] == "nothing_to_roll_back"
        assert "tierroute_router_version 0.0" in httpx.get(f"{server.url}/metrics").text
    finally:
        assert server.stop() in (0, -signal.SIGTERM)
    with Ledger(default_path(tmp_path / "data")) as ledger:
        reasons = [c.reason for c in ledger.policy_changes()]
    assert reasons[0].startswith("router: promoted r0001") and "rolled back r0001" in reasons[-1]


@pytest.mark.skipif(not ARENA.is_file(), reason=f"needs {ARENA} (absent on this machine)")
def test_replay_runs_end_to_end_and_writes_the_curve(tmp_path: Path) -> None:
    out = tmp_path / "curve.json"
    proc = run_cli(
        "replay",
        "--data",
        str(ARENA),
        "--small",
        "llama3_1_8b (judge gpt-4o)",
        "--large",
        "gpt-4o (judge gpt-4o)",
        "--router",
        "rules",
        "--limit",
        "100",
        "--eval-size",
        "30",
        "--json",
        str(out),
        check=True,
    )
    # 70 rows of traffic: the file runs out before 100 labels, so the curve ends at 70
    assert "labels     0" in proc.stdout and "labels    70" in proc.stdout
    doc = json.loads(out.read_text())
    assert [p["labels"] for p in doc["curve"]] == [0, 70]
    assert all(set(p) == {"labels", "apgr", "cpt50"} for p in doc["curve"])
    assert 0 <= doc["random_apgr"] <= 1 and doc["eval_rows"] == 30
    assert doc["runs"][0]["outcome"] in ("promoted", "refused")
