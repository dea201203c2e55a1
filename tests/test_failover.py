"""Failures a client can see through: a named tier answers or the request fails, every
retry, fallback and breaker change is logged with its request id, /healthz says degraded
while a breaker is open, and the reason header says which tier was skipped and why.

A real gateway process with two remote tiers: `small` is a fast local upstream, `large`
a port where nothing listens."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from .conftest import fast_upstream
from .test_gateway import Server, free_port, start, write_yaml

ROOT = Path(__file__).resolve().parents[1]
HARD = [{"role": "user", "content": "Prove that there are infinitely many primes, step by step."}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("failover")
    dead = free_port()  # nothing listens here: every call to `large` fails to connect
    with fast_upstream() as base:
        config = write_yaml(
            root / "gw.yaml",
            f"""
tiers:
  - {{name: small, kind: openai, base_url: "{base}", model: fast}}
  - {{name: large, kind: openai, base_url: "http://127.0.0.1:{dead}/v1", model: big,
     timeout_s: 5}}
router: rules
policy: {{thresholds: [0.3]}}
gateway: {{retries: 1, breaker_failures: 2, breaker_cooldown_s: 600}}
""",
        )
        server = start(config, root / "data", extra=("--log-format", "json"))
        yield server
        server.stop()


def chat(gateway: Server, model: str) -> httpx.Response:
    body = {"model": model, "messages": HARD, "max_tokens": 8}
    return httpx.post(gateway.url + "/v1/chat/completions", json=body, timeout=60)


def log_events(gateway: Server) -> list[dict[str, object]]:
    events = []
    for line in gateway.log.read_text().splitlines():
        if line.startswith("{"):
            events.append(json.loads(line))
    return events


def test_failures_fall_back_log_and_open_the_breaker(gateway: Server) -> None:
    # A request that names its tier is answered by it or fails: no silent substitute.
    forced = chat(gateway, "large")
    assert forced.status_code == 502, forced.text
    assert forced.json()["error"]["type"] == "api_error"
    assert httpx.get(gateway.url + "/healthz").json()["status"] == "ok"  # one failure so far

    # An auto-routed hard prompt goes large, fails there, and falls back to small.
    auto = chat(gateway, "auto")
    assert auto.status_code == 200, auto.text
    assert auto.headers["x-tierroute-tier"] == "small"
    assert auto.headers["x-tierroute-fallback"] == "large,small"
    assert "large failed" in auto.headers["x-tierroute-reason"]

    # Two failures opened large's breaker: /healthz says so, and the next request says
    # in its reason that large was skipped.
    health = httpx.get(gateway.url + "/healthz").json()
    assert health["status"] == "degraded" and health["tiers"]["large"] == "open"
    assert health["problems"] == ["tier large: breaker open"]
    skipped = chat(gateway, "auto")
    assert skipped.headers["x-tierroute-tier"] == "small"
    assert "large skipped: breaker open" in skipped.headers["x-tierroute-reason"]

    # Every retry, fallback and breaker change is in the JSON log with its request id.
    rid = auto.headers["x-tierroute-request-id"]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        events = log_events(gateway)
        if any(e.get("event") == "skipped" for e in events):
            break
        time.sleep(0.2)
    mine = {e["event"] for e in events if e.get("request_id") == rid}
    assert {"retry", "tier_failed", "fallback"} <= mine, events
    assert any(e.get("event") == "breaker_open" and e.get("tier") == "large" for e in events)
    skipped_id = skipped.headers["x-tierroute-request-id"]
    assert any(e.get("event") == "skipped" and e.get("request_id") == skipped_id for e in events)
