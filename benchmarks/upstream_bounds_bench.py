"""Memory of a remote tier under oversized answers: prints figures, asserts nothing.

    python benchmarks/upstream_bounds_bench.py [--mb 50] [--concurrent 8]

An upstream (its own process, so its memory is not counted) answers every request with
`--mb` MB, chunked with no Content-Length: a whole JSON answer, or an SSE stream of one
endless line. `--concurrent` requests go through OpenAIHTTPBackend at once, in a fresh
process per case, with the default max_response_bytes (8 MiB) and with a limit above the
answer (as before the bound existed; a stream's one line still meets the 1 MiB SSE line
cap there). Printed per case: peak RSS growth over the
process's RSS before the requests, the longest event-loop stall (what /healthz would
wait) and what the requests ended with. Issue 11 measured 248 -> 895 MB RSS for eight
50 MB answers through the gateway before the bound. Measured here (2-core machine):

    whole, limit 8 MiB       growth  56 MB, longest stall   56 ms, too large in 0.6s
    whole, limit 60 MiB      growth 448 MB, longest stall 1042 ms, answered in 4.7s
    stream, limit 8 MiB      growth  17 MB, longest stall   40 ms, too large in 0.1s
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

UPSTREAM = r"""
import sys
from aiohttp import web

MB = int(sys.argv[2])
PIECE = b"x" * (1 << 20)


async def answer(request: web.Request) -> web.StreamResponse:
    body = await request.json()
    stream = bool(body.get("stream"))
    resp = web.StreamResponse(
        headers={"Content-Type": "text/event-stream" if stream else "application/json"}
    )
    resp.enable_chunked_encoding()
    await resp.prepare(request)
    try:
        await resp.write(b"data: " if stream else b'{"choices": [{"message": {"content": "')
        for _ in range(MB):
            await resp.write(PIECE)
        await resp.write(b"\n\n" if stream else b'"}}]}')
    except ConnectionError:
        pass  # the client stopped reading at its limit
    return resp


app = web.Application()
app.router.add_post("/v1/chat/completions", answer)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), print=None)
"""

CLIENT = r"""
import asyncio, json, resource, sys, time
import aiohttp  # imported here, so the backend's lazy import does not stall the timed loop
from tierroute.backends.base import BackendError, ChatRequest
from tierroute.backends.openai_http import OpenAIHTTPBackend

port, n, stream, limit = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3] == "1", int(sys.argv[4])


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


async def main() -> None:
    backend = OpenAIHTTPBackend("remote", f"http://127.0.0.1:{port}/v1", "m",
                                max_response_bytes=limit)
    request = ChatRequest(messages=[{"role": "user", "content": "hi"}])
    stall = 0.0
    done = False

    async def ticker() -> None:
        nonlocal stall
        while not done:
            t = time.perf_counter()
            await asyncio.sleep(0.005)
            stall = max(stall, time.perf_counter() - t - 0.005)

    async def one() -> str:
        try:
            if stream:
                async for _ in backend.stream(request, 120):
                    pass
            else:
                await backend.complete(request, 120)
            return "answered"
        except BackendError as exc:
            return "too large" if "too large" in str(exc) else f"error: {str(exc)[:60]}"

    await asyncio.sleep(0)  # the event loop and aiohttp are loaded before the baseline
    before = rss_mb()
    tick = asyncio.create_task(ticker())
    start = time.perf_counter()
    results = await asyncio.gather(*(one() for _ in range(n)))
    seconds = time.perf_counter() - start
    done = True
    await tick
    await backend.aclose()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"before": before, "peak": peak, "stall_ms": stall * 1000,
                      "seconds": seconds, "results": sorted(set(results))}))


asyncio.run(main())
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--mb", type=int, default=50)
    parser.add_argument("--concurrent", type=int, default=8)
    args = parser.parse_args()
    port = free_port()
    upstream = subprocess.Popen(
        [sys.executable, "-c", UPSTREAM, str(port), str(args.mb)], stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.1)
        from tierroute.backends.openai_http import DEFAULT_MAX_RESPONSE_BYTES

        unbounded = (args.mb + 10) << 20
        print(f"{args.concurrent} concurrent answers of {args.mb} MB each")
        print(f"{'case':<34} {'RSS before':>10} {'peak':>8} {'growth':>8} {'stall':>9}  ended")
        for stream in (False, True):
            for limit in (DEFAULT_MAX_RESPONSE_BYTES, unbounded):
                out = subprocess.run(
                    [
                        sys.executable,
                        "-c",
                        CLIENT,
                        str(port),
                        str(args.concurrent),
                        "1" if stream else "0",
                        str(limit),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                )
                r = json.loads(out.stdout)
                case = f"{'stream' if stream else 'whole'}, limit {limit >> 20} MiB"
                print(
                    f"{case:<34} {r['before']:>7.0f} MB {r['peak']:>5.0f} MB "
                    f"{r['peak'] - r['before']:>5.0f} MB {r['stall_ms']:>6.0f} ms  "
                    f"{', '.join(r['results'])} in {r['seconds']:.1f}s"
                )
    finally:
        upstream.terminate()
        upstream.wait(timeout=10)


if __name__ == "__main__":
    main()
