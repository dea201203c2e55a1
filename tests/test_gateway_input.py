"""The gateway against hostile and careless clients (issue 11, findings 3, 4, 6, 10).

A real `tierroute serve` whose two tiers are remote: both point at the fast local upstream
of benchmarks/fast_upstream.py, so every request is answered in milliseconds and nothing
needs a local model. Two API keys, the rules router, personalisation on.
"""

from __future__ import annotations

import http.client
import importlib.util
import json
import re
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.conftest import fast_upstream
from tests.test_gateway import Server, start, write_yaml

ROOT = Path(__file__).resolve().parents[1]
KEY_A, KEY_B = "sk-key-a", "sk-key-b"
TIMEOUT_S = 1.0  # the gateway's client_timeout_s here
HELLO = [{"role": "user", "content": "Hi there! What is the capital of France?"}]


@pytest.fixture(scope="module")
def gateway(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    root = tmp_path_factory.mktemp("gw-input")
    with fast_upstream() as base:
        config = write_yaml(
            root / "gateway.yaml",
            f"""
tiers:
  - {{name: small, kind: openai, base_url: "{base}", model: fast-small,
      input_price_per_m: 0.1, output_price_per_m: 0.2, typical_latency_ms: 50}}
  - {{name: large, kind: openai, base_url: "{base}", model: fast-large,
      input_price_per_m: 1.0, output_price_per_m: 2.0, typical_latency_ms: 100}}
router: rules
policy: {{thresholds: [0.5]}}
gateway:
  max_body_bytes: 300000  # room for 100,000-deep nesting
  client_timeout_s: {TIMEOUT_S}
  personalise: {{strength: 1.0, prior_n: 2, max_shift: 0.3}}
""",
        )
        server = start(config, root / "gateway", env={"TIERROUTE_API_KEYS": f"{KEY_A},{KEY_B}"})
        try:
            yield server
        finally:
            server.stop()


def post(
    server: Server, body: object, path: str = "/v1/chat/completions", key: str = KEY_A
) -> httpx.Response:
    return httpx.post(
        server.url + path, json=body, headers={"authorization": f"Bearer {key}"}, timeout=30
    )


def test_a_tenant_belongs_to_its_key(gateway: Server) -> None:
    """Finding 3: key B rating answers as "alice" moves key B's alice, never key A's."""
    ask = [{"role": "user", "content": "Analyze the causes of the French revolution."}]

    def route(key: str) -> dict[str, object]:
        r = post(gateway, {"messages": ask, "user": "alice"}, "/v1/route", key=key)
        assert r.status_code == 200, r.text
        return dict(r.json())

    assert route(KEY_A)["tier"] == "small"
    for i in range(20):
        reply = post(
            gateway,
            {"model": "small", "user": "alice", "messages": [{"role": "user", "content": f"Q{i}"}]},
            key=KEY_B,
        )
        assert reply.status_code == 200, reply.text
        rated = post(
            gateway, {"request_id": reply.json()["id"], "rating": 0}, "/v1/feedback", key=KEY_B
        )
        assert rated.status_code == 200, rated.text
    a, b = route(KEY_A), route(KEY_B)
    assert a["tier"] == "small" and "tenant" not in str(a["reason"]), a
    assert b["tier"] == "large" and re.search(r"tenant \w+/alice \+0\.30", str(b["reason"])), b


def test_a_tenant_name_with_control_characters_is_safe_in_headers(gateway: Server) -> None:
    """A personalised tenant's name reaches the X-Tierroute-Reason header: control
    characters in it made h11 refuse the response (no answer at all)."""
    user = "eve\x00\r\nX-Injected: 1\x7f"
    for i in range(3):
        reply = post(
            gateway,
            {"model": "small", "user": user, "messages": [{"role": "user", "content": f"E{i}"}]},
        )
        assert reply.status_code == 200, reply.text
        assert post(gateway, {"request_id": reply.json()["id"], "rating": 0}, "/v1/feedback")
    ask = [{"role": "user", "content": "Analyze the causes of the French revolution."}]
    routed = post(gateway, {"messages": ask, "user": user}, "/v1/route")
    assert routed.status_code == 200 and "x-injected" not in routed.headers
    assert "eve" in routed.headers["x-tierroute-reason"]


def test_bad_values_are_400_and_keep_the_connection(gateway: Server) -> None:
    """Finding 4: each was a 500 (closing the connection); now a 400 naming the field, on
    one keep-alive connection throughout."""
    hello = json.dumps(HELLO)
    cap = '"metadata": {"max_cost_usd": 0.01}'
    cases: list[tuple[bytes, dict[str, str], str | None]] = [
        (b"[" * 100_000 + b"]" * 100_000, {}, None),
        (b'{"messages": %s, "seed": %s}' % (hello.encode(), b"9" * 5000), {}, None),
        (b'{"messages": %s, "seed": %s}' % (hello.encode(), b"9" * 30), {}, "seed"),
        (b'{"messages": [{"role": "user", "content": "hi \\ud800"}]}', {}, "messages[0].content"),
        (f'{{"messages": {hello}, "max_tokens": {10**400}, {cap}}}'.encode(), {}, "max_tokens"),
        (
            f'{{"messages": {hello}, "max_tokens": {10**400}, "stream": true}}'.encode(),
            {},
            "max_tokens",
        ),
        (f'{{"messages": {hello}, "max_tokens": 10000000}}'.encode(), {}, "max_tokens"),
        (f'{{"messages": {hello}, "temperature": NaN}}'.encode(), {}, None),
        (
            f'{{"messages": {hello}, "metadata": {{"max_cost_usd": 1e400}}}}'.encode(),
            {},
            "max_cost_usd",
        ),
        (hello.join(['{"messages": ', "}"]).encode(), {"x-tierroute-max-cost-usd": "nan"}, None),
        (
            hello.join(['{"messages": ', "}"]).encode(),
            {"x-tierroute-latency-budget-ms": "inf"},
            None,
        ),
        (
            b'{"request_id": "chatcmpl-x", "rating": 0, "comment": "\\udfff"}',
            {"path": "/v1/feedback"},
            "comment",
        ),
    ]
    conn = http.client.HTTPConnection("127.0.0.1", gateway.port, timeout=30)
    try:
        for body, extra, param in cases:
            headers = {
                "authorization": f"Bearer {KEY_A}",
                "content-type": "application/json",
                **{k: v for k, v in extra.items() if k != "path"},
            }
            conn.request("POST", extra.get("path", "/v1/chat/completions"), body, headers)
            response = conn.getresponse()
            error = json.loads(response.read())["error"]
            assert response.status == 400, (body[:80], error)
            assert error["type"] == "invalid_request_error" and error["message"]
            if param:
                assert error["param"] in (param, "latency_budget_ms", "max_cost_usd"), error
            assert not response.will_close, body[:80]
        # a wrong key and a wrong media type are refused on the same connection too
        body = json.dumps({"messages": HELLO})
        for status, headers in (
            (401, {"authorization": "Bearer sk-wrong", "content-type": "application/json"}),
            (415, {"authorization": f"Bearer {KEY_A}", "content-type": "text/plain"}),
        ):
            conn.request("POST", "/v1/chat/completions", body, headers)
            response = conn.getresponse()
            assert response.status == status and json.loads(response.read())["error"]
            assert not response.will_close, status
        # the connection still answers
        conn.request(
            "POST",
            "/v1/chat/completions",
            json.dumps({"messages": HELLO}),
            {"authorization": f"Bearer {KEY_A}", "content-type": "application/json"},
        )
        assert conn.getresponse().status == 200
    finally:
        conn.close()
    assert "Traceback" not in gateway.log.read_text()


def test_openapi_describes_the_wire_format(gateway: Server) -> None:
    """Finding 10: bodies, errors and media types as they are; 405 with Allow; 415."""
    schema = httpx.get(gateway.url + "/openapi.json").json()
    components = schema["components"]["schemas"]
    chat = schema["paths"]["/v1/chat/completions"]["post"]
    body = chat["requestBody"]["content"]["application/json"]["schema"]["$ref"]
    request = components[body.rsplit("/", 1)[1]]
    assert request["required"] == ["messages"]
    assert request["properties"]["model"]["enum"] == ["auto", "small", "large"]
    assert request["properties"]["messages"]["items"]["$ref"].endswith("/Message")
    assert "user" in components["Message"]["properties"]["role"]["enum"]
    for path in ("/v1/chat/completions", "/v1/route", "/v1/feedback"):
        responses = schema["paths"][path]["post"]["responses"]
        assert {"400", "401", "413", "415"} <= set(responses), path
        error = responses["400"]["content"]["application/json"]["schema"]["$ref"]
        assert error.endswith("/ErrorBody")
    assert "text/event-stream" in chat["responses"]["200"]["content"]
    assert set(schema["paths"]["/metrics"]["get"]["responses"]["200"]["content"]) == {"text/plain"}
    assert set(schema["paths"]["/dashboard"]["get"]["responses"]["200"]["content"]) == {"text/html"}
    wrong = httpx.get(gateway.url + "/v1/chat/completions")
    assert wrong.status_code == 405 and wrong.headers["allow"] == "POST"
    assert wrong.json()["error"]["type"] == "invalid_request_error"
    auth = {"authorization": f"Bearer {KEY_A}"}
    for kind in ("text/plain", "application/x-www-form-urlencoded", None):
        headers = {**auth, **({"content-type": kind} if kind else {})}
        r = httpx.post(
            gateway.url + "/v1/chat/completions",
            content=json.dumps({"messages": HELLO}),
            headers=headers,
        )
        assert r.status_code == 415, (kind, r.text)
        assert r.json()["error"]["code"] == "unsupported_media_type"
    ok = httpx.post(
        gateway.url + "/v1/route",
        content=json.dumps({"messages": HELLO}),
        headers={**auth, "content-type": "application/json; charset=utf-8"},
    )
    assert ok.status_code == 200, ok.text


def _closed_within(sock: socket.socket, seconds: float) -> bytes | None:
    """What the server sent before closing `sock`, or None if it was still open."""
    sock.settimeout(seconds)
    received = b""
    try:
        while chunk := sock.recv(4096):
            received += chunk
    except TimeoutError:
        return None
    return received


def test_slow_clients_are_timed_out_and_hang_ups_are_quiet(gateway: Server) -> None:
    """Finding 6: slow headers and slow bodies are cut off; a hang-up logs no traceback."""
    headers = (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY_A}\r\n"
        "Content-Type: application/json\r\nContent-Length: 100\r\n"
    )
    with socket.create_connection(("127.0.0.1", gateway.port)) as slow_headers:
        slow_headers.sendall(headers.encode()[:40])  # and never the rest
        assert _closed_within(slow_headers, TIMEOUT_S + 4) == b""
    with socket.create_connection(("127.0.0.1", gateway.port)) as idle:
        assert _closed_within(idle, TIMEOUT_S + 4) == b""  # connected, sent nothing
    with socket.create_connection(("127.0.0.1", gateway.port)) as slow_body:
        slow_body.sendall((headers + "\r\n").encode() + b'{"messages": ')
        answer = _closed_within(slow_body, TIMEOUT_S + 4)
        assert answer is not None and answer.startswith(b"HTTP/1.1 408"), answer
    for _ in range(3):  # hang up mid-body
        with socket.create_connection(("127.0.0.1", gateway.port)) as quitter:
            quitter.sendall((headers + "\r\n").encode() + b'{"messages": ')
            time.sleep(0.1)
    time.sleep(0.5)
    assert httpx.get(gateway.url + "/healthz").status_code == 200
    assert "Traceback" not in gateway.log.read_text()


def _chat_200s(server: Server) -> float:
    metrics = httpx.get(server.url + "/metrics", headers={"authorization": f"Bearer {KEY_A}"}).text
    found = re.findall(r'^tierroute_requests_total\{[^}]*status="200"[^}]*\} (\S+)$', metrics, re.M)
    return sum(float(v) for v in found)


@pytest.mark.skipif(
    importlib.util.find_spec("schemathesis") is None, reason="needs schemathesis (the dev extra)"
)
def test_schemathesis_finds_no_5xx_and_no_schema_violation(gateway: Server) -> None:
    """Schema-driven fuzzing of every operation (up to 100 examples each, valid and
    invalid, within 75 s), checking statuses, media types and bodies against /openapi.json."""
    before = _chat_200s(gateway)
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "schemathesis.cli",
            "run",
            f"{gateway.url}/openapi.json",
            "--max-examples=100",
            "--seed=11",
            "--workers=2",
            "--max-time=75",
            # Not the coverage phase: in schemathesis 4.32 on CPython 3.11 it now and then
            # crashes inside Hypothesis ("AST constructor recursion depth mismatch"), a
            # fault of the tool that would make this test flaky.
            "--phases=examples,fuzzing",
            "--no-color",
            "--checks=not_a_server_error,status_code_conformance,"
            "content_type_conformance,response_schema_conformance",
            f"--header=Authorization: Bearer {KEY_A}",
        ],
        capture_output=True,
        text=True,
        timeout=150,
        cwd=gateway.data_dir,  # where schemathesis keeps its example database
    )
    (gateway.data_dir / "schemathesis.txt").write_text(proc.stdout + proc.stderr)
    assert proc.returncode == 0, proc.stdout[-6000:] + proc.stderr[-2000:]
    assert _chat_200s(gateway) - before >= 10, "the fuzzer never got an answer"
    assert "Traceback" not in gateway.log.read_text()
