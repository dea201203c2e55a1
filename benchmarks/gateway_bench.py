"""Gateway figures: prints them, asserts nothing.

    python benchmarks/gateway_bench.py [--requests 2000] [--skip-local]
    python benchmarks/gateway_bench.py --state redis://127.0.0.1:6379/0   (state_bench.py)

1. Overhead: latency through tierroute minus latency straight to the same fast local
   upstream (benchmarks/fast_upstream.py), p50 and p99, at concurrency 1 and 64, measured
   side by side in one run. Routing is on (the default rules router with embeddings):
   "repeated prompt" requests hit the decision cache, "fresh prompts" pay the embedding.
2. Sustained requests/s through the gateway at concurrency 64.
3. Memory (RSS) of `tierroute serve` on its embedded default with both local tiers
   loaded, and tokens/s of each local tier (64-token answers, forced tier).
Targets (issue 3): added p50 <= 2 ms, p99 <= 10 ms; >= 1,000 req/s.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_up(url: str, proc: subprocess.Popen[bytes], seconds: float = 300) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            httpx.get(url, timeout=1)
            return
        except httpx.HTTPError:
            time.sleep(0.3)
    raise SystemExit(f"{url} did not come up")


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def measure(url: str, n: int, concurrency: int, fresh: bool) -> tuple[list[float], float]:
    """Latencies (ms) of n chat requests at the given concurrency, and requests/s."""
    latencies: list[float] = []
    sem = asyncio.Semaphore(concurrency)
    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    async with httpx.AsyncClient(timeout=60, limits=limits) as http:

        async def one(i: int) -> None:
            text = f"What is the capital of country number {i}?" if fresh else "Hello there!"
            body = {
                "model": "auto",
                "max_tokens": 1,
                "messages": [{"role": "user", "content": text}],
            }
            async with sem:
                start = time.perf_counter()
                r = await http.post(url, json=body)
                latencies.append((time.perf_counter() - start) * 1000)
                r.raise_for_status()

        await asyncio.gather(*(one(i) for i in range(min(50, n))))  # warm up
        latencies.clear()
        start = time.perf_counter()
        await asyncio.gather(*(one(i + 1000 * concurrency) for i in range(n)))
        elapsed = time.perf_counter() - start
    return latencies, n / elapsed


WRK_SCRIPT = """
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
counter = 0
request = function()
  counter = counter + 1
  local text = FRESH and ("What is the capital of country number " .. counter .. "?")
                      or "Hello there!"
  local body = '{"model":"auto","max_tokens":1,"messages":[{"role":"user","content":"'
               .. text .. '"}]}'
  return wrk.format(nil, nil, nil, body)
end
"""


def wrk(url: str, concurrency: int, fresh: bool, seconds: int = 10) -> tuple[float, float, float]:
    """(p50 ms, p99 ms, requests/s) from wrk, a C load generator on one core."""
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as f:
        f.write(f"FRESH = {'true' if fresh else 'false'}\n" + WRK_SCRIPT)
    out = subprocess.run(
        ["wrk", "-t1", f"-c{concurrency}", f"-d{seconds}s", "--latency", "-s", f.name, url],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    os.unlink(f.name)

    def ms(label: str) -> float:
        m = re.search(rf"^\s+{label}%\s+([\d.]+)(us|ms|s)", out, re.M)
        if not m:
            return float("nan")
        scale = {"us": 0.001, "ms": 1.0, "s": 1000.0}[m.group(2)]
        return float(m.group(1)) * scale

    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    errors = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if errors:
        print(f"  (wrk saw {errors.group(1)} non-2xx answers)")
    return ms("50"), ms("99"), float(rps.group(1)) if rps else float("nan")


def overhead(requests: int) -> None:
    up_port, gw_port = free_port(), free_port()
    upstream = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), str(up_port)])
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "gw.yaml"
        config.write_text(f"""
tiers:
  - {{name: small, kind: openai, base_url: "http://127.0.0.1:{up_port}/v1", model: fast,
     typical_latency_ms: 1}}
  - {{name: large, kind: openai, base_url: "http://127.0.0.1:{up_port}/v1", model: fast,
     typical_latency_ms: 1}}
""")
        gateway = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tierroute.cli",
                "serve",
                "--config",
                str(config),
                "--port",
                str(gw_port),
                "--data-dir",
                tmp,
                "--log-level",
                "warning",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_up(f"http://127.0.0.1:{up_port}/healthz", upstream)
            wait_up(f"http://127.0.0.1:{gw_port}/healthz", gateway)
            direct = f"http://127.0.0.1:{up_port}/v1/chat/completions"
            through = f"http://127.0.0.1:{gw_port}/v1/chat/completions"
            print(
                f"{'case':<34} {'direct p50':>10} {'via p50':>8} {'added p50':>9} "
                f"{'direct p99':>10} {'via p99':>8} {'added p99':>9} {'via req/s':>9}"
            )
            for concurrency in (1, 64):
                for fresh in (False, True):
                    label = f"c={concurrency}, {'fresh prompts' if fresh else 'repeated prompt'}"
                    if concurrency > 1 and shutil.which("wrk"):
                        dp50, dp99, _ = wrk(direct, concurrency, fresh)
                        vp50, vp99, rps = wrk(through, concurrency, fresh)
                        label += " (wrk)"
                    else:
                        n = requests if concurrency > 1 else max(300, requests // 4)
                        d, _ = asyncio.run(measure(direct, n, concurrency, fresh))
                        v, rps = asyncio.run(measure(through, n, concurrency, fresh))
                        dp50, dp99 = np.percentile(d, 50), np.percentile(d, 99)
                        vp50, vp99 = np.percentile(v, 50), np.percentile(v, 99)
                    print(
                        f"{label:<34} {dp50:10.2f} {vp50:8.2f} {vp50 - dp50:9.2f} "
                        f"{dp99:10.2f} {vp99:8.2f} {vp99 - dp99:9.2f} {rps:9.0f}"
                    )
            print(f"gateway RSS with remote tiers only: {rss_mb(gateway.pid):.0f} MB")
        finally:
            gateway.terminate()
            upstream.terminate()
            gateway.wait(30)
            upstream.wait(30)


def local_tiers() -> None:
    port = free_port()
    with tempfile.TemporaryDirectory() as tmp:
        start = time.perf_counter()
        serve = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tierroute.cli",
                "serve",
                "--port",
                str(port),
                "--data-dir",
                tmp,
                "--log-level",
                "warning",
            ],
            stderr=subprocess.DEVNULL,
        )
        try:
            wait_up(f"http://127.0.0.1:{port}/healthz", serve)
            print(
                f"\nembedded default (smollm2-135m + qwen2.5-coder-1.5b, in-process): "
                f"up in {time.perf_counter() - start:.1f}s, RSS {rss_mb(serve.pid):.0f} MB"
            )
            prompt = "Write a short paragraph about the history of the bicycle."
            for tier in ("small", "large"):
                body = {
                    "model": tier,
                    "max_tokens": 64,
                    "temperature": 0,
                    "messages": [{"role": "user", "content": prompt}],
                }
                t0 = time.perf_counter()
                r = httpx.post(
                    f"http://127.0.0.1:{port}/v1/chat/completions", json=body, timeout=600
                )
                elapsed = time.perf_counter() - t0
                usage = r.json()["usage"]
                print(
                    f"tier {tier:<6} {usage['completion_tokens']} tokens in {elapsed:.1f}s: "
                    f"{usage['completion_tokens'] / elapsed:.1f} tok/s end to end "
                    f"(prompt {usage['prompt_tokens']} tokens)"
                )
            print(f"RSS after answering: {rss_mb(serve.pid):.0f} MB")
        finally:
            serve.terminate()
            serve.wait(60)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--skip-local", action="store_true")
    parser.add_argument(
        "--state", metavar="REDIS_URL", help="only compare in-process and Redis state (state_bench)"
    )
    args = parser.parse_args()
    if args.state:
        from state_bench import compare

        compare(args.requests, args.state, rounds=3)
        return
    print(f"gateway_bench on {os.cpu_count()} cores\n")
    overhead(args.requests)
    if not args.skip_local:
        local_tiers()
    print("\ntargets: added p50 <= 2 ms, p99 <= 10 ms, >= 1,000 req/s")


if __name__ == "__main__":
    main()
