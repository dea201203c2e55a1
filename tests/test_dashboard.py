"""The dashboard in a real headless browser, fed by a real gateway's ledger.

Also the self-calibrating controller live: a gateway with a small controller window moves
its threshold under real traffic and logs each change (ledger, /metrics, dashboard).
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from .test_gateway import KEY, Server, needs_llama, post, start, write_yaml

AUTH = {"Authorization": f"Bearer {KEY}"}

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [
    needs_llama,
    pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)"),
]

PROMPTS = [
    "Hi! How are you?",
    "Prove that the square root of 2 is irrational.",
    "What is the capital of Spain?",
    "Write a Python function that merges two sorted lists.",
    "Thanks, that helped.",
    "Derive the formula for the sum of a geometric series.",
]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Server:
    root = tmp_path_factory.mktemp("dash")
    config = write_yaml(
        root / "gw.yaml",
        """
tiers:
  - {name: small, kind: local, model: smollm2-135m, n_threads: 1,
     input_price_per_m: 0.01, output_price_per_m: 0.02}
  - {name: large, kind: local, model: smollm2-135m, n_threads: 1,
     input_price_per_m: 1.0, output_price_per_m: 2.0}
policy: {thresholds: [0.5]}
gateway:
  controller: {target_large_share: 0.2, window: 20, every: 5, max_step: 0.1}
  shadow: {rate: 1.0, judge: llm, max_concurrent: 1, min_samples_for_alert: 1,
           quality_target: 0.99}
""",
    )
    server = start(config, root / "data", env={"TIERROUTE_API_KEYS": KEY})
    ids = []
    for i in range(36):
        body = {
            "messages": [{"role": "user", "content": f"{PROMPTS[i % len(PROMPTS)]} ({i})"}],
            "max_tokens": 2,
        }
        r = post(server, body)
        assert r.status_code == 200, r.text
        ids.append(r.json()["id"])
    for i, request_id in enumerate(ids[:8]):
        assert (
            post(
                server, {"request_id": request_id, "rating": i % 3 != 0}, "/v1/feedback"
            ).status_code
            == 200
        )
    yield server
    server.stop()


def test_dashboard_data_needs_a_key_when_keys_are_set(gateway: Server) -> None:
    anonymous = httpx.get(gateway.url + "/v1/dashboard/data")
    assert anonymous.status_code == 401
    assert anonymous.json()["error"]["code"] == "invalid_api_key"
    wrong = httpx.get(gateway.url + "/v1/dashboard/data", headers={"Authorization": "Bearer x"})
    assert wrong.status_code == 401


def test_controller_moves_the_threshold_and_logs_why(gateway: Server) -> None:
    data = httpx.get(gateway.url + "/v1/dashboard/data", headers=AUTH).json()
    changes = data["threshold_changes"]
    assert changes, "36 requests with a 20% target should have moved the 0.5 threshold"
    assert all(abs(c["new"] - c["old"]) <= 0.1 + 1e-9 for c in changes)
    assert "vs target 20.0%" in changes[0]["reason"]
    metrics = httpx.get(gateway.url + "/metrics", headers=AUTH).text
    assert f"tierroute_threshold {changes[-1]['new']}" in metrics
    assert data["summary"]["requests"] == 36
    assert sum(data["quality"][t]["n"] for t in data["tiers"]) == 8


def test_shadow_judgements_are_recorded_and_exported(gateway: Server) -> None:
    from tierroute.ledger import Ledger, default_path

    deadline = time.monotonic() + 60
    while True:
        with Ledger(default_path(gateway.data_dir)) as ledger:
            judged = ledger.judgements()
        if judged or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert judged and {tier for _, tier, _ in judged} == {"small"}
    assert all(v in (0.0, 1.0, None) for _, _, v in judged)
    metrics = httpx.get(gateway.url + "/metrics", headers=AUTH).text
    assert "tierroute_shadow_judgements_total{outcome=" in metrics
    if any(v is not None for _, _, v in judged):
        assert 'tierroute_estimated_quality{stat="ci95_high",tier="small"}' in metrics
    report = subprocess.run(
        [sys.executable, "-m", "tierroute.cli", "report", "--data-dir", str(gateway.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    ).stdout
    assert "feedback" in report and "8 ratings" not in report  # split per tier
    if any(v is not None for _, _, v in judged):
        assert "estimated quality (shadow judgements" in report and "judged)" in report


def test_dashboard_renders_in_chromium(gateway: Server, tmp_path: Path) -> None:
    flags = [
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-quic",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        f"--user-data-dir={tmp_path / 'profile'}",
        "--virtual-time-budget=10000",
    ]
    locked = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", gateway.url + "/dashboard"],
        capture_output=True,
        text=True,
        timeout=120,
    ).stdout
    assert "this gateway needs an API key" in locked and 'class="chart"' not in locked
    url = gateway.url + f"/dashboard#key={KEY}"
    dom = subprocess.run(
        [CHROMIUM, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120
    ).stdout
    assert 'data-rendered="yes"' in dom, dom[-2000:]
    assert dom.count('class="chart"') >= 4  # requests, cost, latency, quality, threshold
    assert dom.count('class="bar"') >= 3 and dom.count('class="line"') >= 3
    # every chart had data to draw (the only "empty" div is the template in the script)
    assert not re.search(r'<div class="empty">(?!\$\{)', dom)
    shot = tmp_path / "dashboard.png"
    subprocess.run(
        [CHROMIUM, *flags, "--window-size=1280,1100", f"--screenshot={shot}", url],
        capture_output=True,
        timeout=120,
        check=True,
    )
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 30_000
    keep = Path(__file__).resolve().parents[1] / "out"
    keep.mkdir(exist_ok=True)
    shutil.copy(shot, keep / "dashboard.png")  # for a person to look at after the run
