"""The remote-tier HTTP client alone: tierroute's aiohttp backend against the official
`openai` async SDK, side by side in one run, against benchmarks/fast_upstream.py.

    python benchmarks/client_bench.py [--requests 3000] [--concurrency 64]

Prints requests/s and CPU ms per request of each (the upstream runs in its own process,
so the CPU measured is the client's). Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import resource
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from tests.conftest import fast_upstream
from tierroute.backends.base import ChatRequest
from tierroute.backends.openai_http import OpenAIHTTPBackend

REQUEST = ChatRequest(messages=[{"role": "user", "content": "Hello there!"}], max_tokens=1)


def cpu_s() -> float:
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


async def run(call: Any, n: int, concurrency: int) -> tuple[float, float]:
    sem = asyncio.Semaphore(concurrency)

    async def one() -> None:
        async with sem:
            await call()

    await asyncio.gather(*(one() for _ in range(min(n, 200))))  # warm the pools
    cpu, start = cpu_s(), time.perf_counter()
    await asyncio.gather(*(one() for _ in range(n)))
    wall = time.perf_counter() - start
    return n / wall, (cpu_s() - cpu) / n * 1000


async def main(url: str, n: int, concurrency: int, stream: bool) -> None:
    from openai import AsyncOpenAI, DefaultAioHttpClient

    backend = OpenAIHTTPBackend("bench", url, "fast", max_connections=concurrency)

    async def ours() -> None:
        if stream:
            async for _ in backend.stream(REQUEST, 30):
                pass
        else:
            await backend.complete(REQUEST, 30)

    import httpx

    limits = httpx.Limits(max_connections=concurrency, max_keepalive_connections=concurrency)
    sdk = AsyncOpenAI(
        base_url=url,
        api_key="none",
        max_retries=0,
        http_client=httpx.AsyncClient(limits=limits, timeout=30),
    )
    sdk_aiohttp = AsyncOpenAI(
        base_url=url, api_key="none", max_retries=0, http_client=DefaultAioHttpClient()
    )

    def theirs(client: Any) -> Any:
        async def call() -> None:
            messages: Any = REQUEST.messages
            if stream:
                events = await client.chat.completions.create(
                    model="fast", messages=messages, max_tokens=1, stream=True
                )
                async for _ in events:
                    pass
            else:
                await client.chat.completions.create(model="fast", messages=messages, max_tokens=1)

        return call

    kind = "streamed" if stream else "whole"
    print(f"{n} {kind} requests at concurrency {concurrency}, one process, loopback upstream")
    print(f"{'client':38s} {'req/s':>8s} {'CPU ms/req':>11s}")
    for name, call in (
        ("tierroute aiohttp backend", ours),
        ("openai.AsyncOpenAI (httpx)", theirs(sdk)),
        ("openai.AsyncOpenAI (DefaultAioHttpClient)", theirs(sdk_aiohttp)),
        ("tierroute aiohttp backend (again)", ours),
    ):
        rate, cpu = await run(call, n, concurrency)
        print(f"{name:38s} {rate:8.0f} {cpu:11.2f}")
    await backend.aclose()
    await sdk.close()
    await sdk_aiohttp.close()


if __name__ == "__main__":
    ap = argparse.ArgumentParser()
    ap.add_argument("--requests", type=int, default=3000)
    ap.add_argument("--concurrency", type=int, default=64)
    ap.add_argument("--stream", action="store_true")
    args = ap.parse_args()
    os.environ.setdefault("OPENAI_LOG", "")
    with fast_upstream() as url:
        asyncio.run(main(url, args.requests, args.concurrency, args.stream))
