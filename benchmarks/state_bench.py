"""What shared state costs a request: one gateway on in-process state vs the same on Redis.

    python benchmarks/state_bench.py [--requests 2000] [--redis redis://127.0.0.1:6379/0]
    (or python benchmarks/gateway_bench.py --state-only)

Both runs use one API key limited by `gateway.key_limits` (requests and tokens per minute
and a USD budget per day, all far above what the run uses), so every request pays the limit
check (one Lua call) and its settlement; repeated prompts hit the decision cache, fresh
ones miss it locally and read it from the state. Prints p50/p99 and req/s per case and the
difference Redis makes, and the gateway's CPU milliseconds per request (which other load
on the machine does not inflate, unlike latency). The issue's target for PostgreSQL +
Redis is <= 1 ms added p50 over SQLite; this measures the Redis part.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import gateway_bench  # noqa: E402
from gateway_bench import free_port, serve_command, wait_up  # noqa: E402

KEY = "sk-bench"


async def measure(url: str, n: int, concurrency: int, fresh: bool) -> tuple[list[float], float]:
    """gateway_bench's load, each request with the bench's API key (limits apply)."""
    auth = {"Authorization": f"Bearer {KEY}"}
    return await gateway_bench.measure([url], n, concurrency, fresh, headers=auth)


def start_gateway(
    state: str, up_port: int, tmp: str, prefix: str
) -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    config = Path(tmp) / f"gw-{port}.yaml"
    config.write_text(f"""
tiers:
  - {{name: small, kind: openai, base_url: "http://127.0.0.1:{up_port}/v1", model: fast,
     typical_latency_ms: 1, input_price_per_m: 0.1, output_price_per_m: 0.1}}
  - {{name: large, kind: openai, base_url: "http://127.0.0.1:{up_port}/v1", model: fast,
     typical_latency_ms: 1, input_price_per_m: 1, output_price_per_m: 1}}
state: "{state}"
gateway:
  state_prefix: "{prefix}"
  key_limits: {{requests_per_minute: 100000000, tokens_per_minute: 1000000000,
               budget_usd_day: 1000000}}
""")
    data = Path(tmp) / str(port)
    data.mkdir()
    gateway = subprocess.Popen(
        serve_command(config, port, data),
        stderr=subprocess.DEVNULL,
        env={**os.environ, "TIERROUTE_API_KEYS": KEY},
    )
    return gateway, f"http://127.0.0.1:{port}"


def cpu_s(pid: int) -> float:
    """CPU seconds (user + system) a process has used: unlike latency, not inflated by
    other load on the machine."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def compare(requests: int, redis_url: str, rounds: int) -> None:
    """Both gateways run at once; each case alternates between them `rounds` times and
    keeps the median of each figure, so load from elsewhere hits both alike."""
    up_port = free_port()
    prefix = f"tierroute-bench-{uuid.uuid4().hex[:8]}:"
    upstream = subprocess.Popen([sys.executable, str(HERE / "fast_upstream.py"), str(up_port)])
    with tempfile.TemporaryDirectory() as tmp:
        memory, m_url = start_gateway("memory", up_port, tmp, prefix)
        shared, r_url = start_gateway(redis_url, up_port, tmp, prefix)
        try:
            wait_up(f"http://127.0.0.1:{up_port}/healthz", upstream)
            wait_up(m_url + "/healthz", memory)
            wait_up(r_url + "/healthz", shared)
            print(f"load average before: {os.getloadavg()[0]:.1f} on {os.cpu_count()} cores")
            print(
                f"{'case (limited key)':<26} {'memory p50':>10} {'redis p50':>9} {'added':>6} "
                f"{'memory p99':>10} {'redis p99':>9} {'memory r/s':>10} {'redis r/s':>9} "
                f"{'mem CPU ms':>10} {'redis CPU':>9}"
            )
            for concurrency in (1, 64):
                for fresh in (False, True):
                    n = requests if concurrency > 1 else max(200, requests // 4)
                    figures: dict[str, list[tuple[float, float, float, float]]] = {
                        "m": [],
                        "r": [],
                    }
                    for _ in range(rounds):
                        for name, url, proc in (("m", m_url, memory), ("r", r_url, shared)):
                            cpu = cpu_s(proc.pid)
                            lat, rps = asyncio.run(
                                measure(url + "/v1/chat/completions", n, concurrency, fresh)
                            )
                            # gateway CPU per request, warm-up requests included
                            per = (cpu_s(proc.pid) - cpu) * 1000 / (n + 50)
                            figures[name].append(
                                (
                                    float(np.percentile(lat, 50)),
                                    float(np.percentile(lat, 99)),
                                    rps,
                                    per,
                                )
                            )
                    m = np.median(np.array(figures["m"]), axis=0)
                    r = np.median(np.array(figures["r"]), axis=0)
                    label = f"c={concurrency}, {'fresh prompts' if fresh else 'repeated prompt'}"
                    print(
                        f"{label:<26} {m[0]:10.2f} {r[0]:9.2f} {r[0] - m[0]:6.2f} "
                        f"{m[1]:10.2f} {r[1]:9.2f} {m[2]:10.0f} {r[2]:9.0f} "
                        f"{m[3]:10.2f} {r[3]:9.2f}"
                    )
            print(f"load average after: {os.getloadavg()[0]:.1f}")
        finally:
            for proc in (memory, shared, upstream):
                proc.terminate()
                proc.wait(30)
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def micro(redis_url: str, n: int = 2000) -> None:
    """The request path's state calls alone, in one process: the limit check (acquire) and
    a decision-cache read, p50 and p99 in microseconds, in-process vs Redis."""
    from tierroute.keys import KeyPolicy
    from tierroute.state import Ask, open_state

    policy = KeyPolicy("bench", "bench", None, 1e6, None, 10**9, 10**12)
    prefix = f"tierroute-bench-{uuid.uuid4().hex[:8]}:"

    async def timings(url: str | None) -> dict[str, tuple[float, float]]:
        state = open_state(url, prefix)
        await state.start()
        out = {}
        try:
            for name in ("acquire", "cache_get"):
                samples = []
                for i in range(n):
                    t0 = time.perf_counter()
                    if name == "acquire":
                        await state.acquire(policy, Ask(10, 1e-6), time.time())
                    else:
                        await state.cache_get(f"k{i % 100}")
                    samples.append((time.perf_counter() - t0) * 1e6)
                out[name] = (float(np.percentile(samples, 50)), float(np.percentile(samples, 99)))
        finally:
            await state.aclose()
        return out

    memory = asyncio.run(timings(None))
    shared = asyncio.run(timings(redis_url))
    print(f"{'state call':<12} {'memory p50 us':>13} {'redis p50 us':>12} {'redis p99 us':>12}")
    for name in memory:
        print(f"{name:<12} {memory[name][0]:13.1f} {shared[name][0]:12.1f} {shared[name][1]:12.1f}")
    import redis

    client = redis.Redis.from_url(redis_url)
    keys = list(client.scan_iter(match=prefix + "*", count=1000))
    if keys:
        client.delete(*keys)
    client.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=2000)
    parser.add_argument("--redis", default="redis://127.0.0.1:6379/0")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    micro(args.redis)
    compare(args.requests, args.redis, args.rounds)


if __name__ == "__main__":
    main()
