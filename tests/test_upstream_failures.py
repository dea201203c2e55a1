"""Faulty upstreams end to end: the gateway (in-process, on a loopback port) with two remote
tiers whose OpenAI-compatible upstreams are real HTTP servers on loopback, told per test
how to misbehave. Checks that an oversized or malformed answer falls back and is booked,
that failed rows name the tier that failed, that a broken stream books what it delivered,
and that a 502 carries the tier headers."""

from __future__ import annotations

import importlib.util
import json
import socket
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest

pytestmark = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("aiohttp", "uvicorn", "fastapi", "httpx")),
    reason="aiohttp, uvicorn, fastapi and httpx (extra serve) are not installed",
)

HARD = "Prove that sqrt(2) is irrational, step by step."


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def chunk(content: str | None = None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


def completion(text: str) -> bytes:
    return json.dumps(
        {
            "choices": [{"message": {"content": text}, "finish_reason": "stop"}],
            "usage": {"prompt_tokens": 5, "completion_tokens": 2},
        }
    ).encode()


GOOD_STREAM = sse(chunk("fine"), chunk(finish="stop")) + b"data: [DONE]\n\n"


@dataclass
class Upstream:
    """An OpenAI-compatible upstream: `reply` is (status, body parts, content type); with
    `cut` it drops the connection after the parts instead of ending the answer."""

    reply: tuple[int, list[bytes], bytes] = (200, [completion("ok")], b"application/json")
    cut: bool = False
    calls: int = 0
    port: int = field(default_factory=free_port)

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                await send({"type": message["type"] + ".complete"})
                if message["type"] == "lifespan.shutdown":
                    return
        while (await receive()).get("more_body"):
            pass
        self.calls += 1
        status, parts, content_type = self.reply
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        for part in parts:
            await send({"type": "http.response.body", "body": part, "more_body": True})
        if self.cut:
            raise ConnectionResetError("upstream dies mid-answer")  # uvicorn drops the socket
        await send({"type": "http.response.body", "body": b""})


def serve(app: Any, port: int) -> Any:
    import uvicorn

    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="critical"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    assert server.started, "a loopback server did not start"
    return server, thread


@dataclass
class Gateway:
    url: str
    small: Upstream
    large: Upstream
    ledger: Any

    def chat(self, **body: Any) -> Any:
        import httpx

        body = {"model": "large", "messages": [{"role": "user", "content": HARD}], **body}
        return httpx.post(f"{self.url}/v1/chat/completions", json=body, timeout=30)

    def row(self, request_id: str) -> Any:
        self.ledger.flush(timeout=10)
        row = self.ledger.get(request_id)
        assert row is not None, f"no ledger row for {request_id}"
        return row

    def breaker(self, tier: str) -> str:
        import httpx

        return str(httpx.get(f"{self.url}/healthz", timeout=10).json()["tiers"][tier])


@pytest.fixture
def gateway(tmp_path: Path) -> Iterator[Gateway]:
    from tierroute.gateway.app import Parts, create_app
    from tierroute.gateway.build import make_backend
    from tierroute.gateway.settings import parse_settings
    from tierroute.ledger import Ledger
    from tierroute.routers import make_router

    small, large = Upstream(), Upstream()

    def tier(name: str, upstream: Upstream, price: float) -> dict[str, Any]:
        return {
            "name": name,
            "kind": "openai",
            "base_url": f"http://127.0.0.1:{upstream.port}/v1",
            "model": f"{name}-model",
            "input_price_per_m": price,
            "output_price_per_m": price,
            "timeout_s": 10,
            "max_response_bytes": 64 << 10,
        }

    settings = parse_settings(
        {
            "tiers": [tier("small", small, 1.0), tier("large", large, 10.0)],
            "policy": {"thresholds": [0.5]},
            "router": "rules",
            # the requests name the large tier and expect it to fall back: opt in to that
            "gateway": {
                "retries": 0,
                "breaker_failures": 1,
                "breaker_cooldown_s": 60,
                "forced_fallback": True,
            },
        },
        "test",
    )
    ledger = Ledger(tmp_path / "ledger.db")

    def build(s: Any) -> Parts:
        backends = {spec.name: make_backend(spec) for spec in s.tiers}
        return Parts(router=make_router("rules"), backends=backends, ledger=ledger)

    running = [serve(small, small.port), serve(large, large.port)]
    port = free_port()
    running.append(serve(create_app(settings, build), port))
    try:
        yield Gateway(f"http://127.0.0.1:{port}", small, large, ledger)
    finally:
        for server, thread in reversed(running):
            server.should_exit = True
            thread.join(timeout=10)


@pytest.mark.parametrize(
    ("stream", "reply"),
    [
        (False, (200, [completion("x" * 100_000)], b"application/json")),
        (True, (200, [b"data: " + b"x" * (1200 << 10) + b"\n\n"], b"text/event-stream")),
        (True, (200, [sse(*[chunk("y" * 1000)] * 100)], b"text/event-stream")),
        (False, (200, [b"[" * 100_000 + b"]" * 100_000], b"application/json")),
    ],
    ids=["body-over-limit", "sse-line-over-1MiB", "stream-over-limit", "deep-nesting"],
)
def test_an_oversized_or_malformed_answer_falls_back_and_is_booked(
    gateway: Gateway, stream: bool, reply: tuple[int, list[bytes], bytes]
) -> None:
    gateway.large.reply = reply
    gateway.small.reply = (
        (200, [GOOD_STREAM], b"text/event-stream")
        if stream
        else (200, [completion("fine")], b"application/json")
    )
    r = gateway.chat(stream=stream)
    assert r.status_code == 200, r.text
    assert "fine" in r.text
    assert r.headers["x-tierroute-tier"] == "small"
    assert r.headers["x-tierroute-fallback"] == "large,small"
    row = gateway.row(r.headers["x-tierroute-request-id"])
    assert (row.status, row.tier, row.fallback_chain) == (200, "small", ("large", "small"))
    assert gateway.breaker("large") == "open"  # the failure counted against the tier


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
def test_a_502_names_and_books_the_tier_that_failed(gateway: Gateway, stream: bool) -> None:
    body = json.dumps({"error": {"message": "overloaded"}}).encode()
    gateway.large.reply = gateway.small.reply = (503, [body], b"application/json")
    r = gateway.chat(stream=stream)
    assert r.status_code == 502, r.text
    assert r.json()["error"]["code"] == "upstream_error"
    assert (gateway.large.calls, gateway.small.calls) == (1, 1)
    # routed to large, failed over to small, which failed last: small is booked
    assert r.headers["x-tierroute-tier"] == "small"
    assert r.headers["x-tierroute-fallback"] == "large,small"
    assert r.headers["x-tierroute-reason"] == "tier large requested by the client"
    row = gateway.row(r.headers["x-tierroute-request-id"])
    assert (row.status, row.tier, row.model) == (502, "small", "small-model")
    assert row.fallback_chain == ("large", "small") and "overloaded" in (row.error or "")


def test_a_broken_stream_books_the_tokens_it_delivered(gateway: Gateway) -> None:
    delivered = "The proof goes by contradiction: suppose that sqrt(2) = p / q"
    gateway.large.reply = (200, [sse(chunk(delivered))], b"text/event-stream")
    gateway.large.cut = True
    r = gateway.chat(stream=True)
    assert r.status_code == 200  # the first chunk went out before the break
    assert delivered in r.text and "stream_broken" in r.text
    row = gateway.row(r.headers["x-tierroute-request-id"])
    assert (row.status, row.tier, row.stream) == (502, "large", True)
    # the delivered text (~4 characters a token) and the prompt were paid for
    assert row.completion_tokens == len(delivered) // 4 + 1
    assert row.prompt_tokens > 0 and row.cost_usd > 0
    assert gateway.breaker("large") == "open"
