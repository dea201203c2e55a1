"""Traffic for deploy/offline/run.sh: chat requests through the load balancer from a few
threads; halfway, runs --kill (SIGKILL one replica) and keeps sending. Prints and writes
{"answered": n2xx, "statuses": {...}} so the script can compare with the ledger."""

from __future__ import annotations

import argparse
import json
import shlex
import subprocess
import threading
import urllib.error
import urllib.request
from collections import Counter
from concurrent.futures import ThreadPoolExecutor


def ask(url: str, i: int) -> int:
    body = {"model": "auto", "messages": [{"role": "user", "content": f"What is {i} + {i}?"}]}
    request = urllib.request.Request(
        f"{url}/v1/chat/completions",
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return int(response.status)
    except urllib.error.HTTPError as error:
        return int(error.code)
    except OSError:
        return 0  # no answer at all


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--requests", type=int, default=600)
    parser.add_argument("--concurrency", type=int, default=16)
    parser.add_argument("--kill", default="", help="command run once, halfway")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    statuses: Counter[int] = Counter()
    lock = threading.Lock()

    def one(i: int) -> None:
        if args.kill and i == args.requests // 2:
            subprocess.run(shlex.split(args.kill), check=True, capture_output=True)
            print(f"   killed a replica after {i} requests were sent", flush=True)
        status = ask(args.url, i)
        with lock:
            statuses[status] += 1

    with ThreadPoolExecutor(args.concurrency) as pool:
        list(pool.map(one, range(args.requests)))
    answered = sum(n for s, n in statuses.items() if 200 <= s < 300)
    print(f"   statuses: {dict(sorted(statuses.items()))}", flush=True)
    with open(args.out, "w") as out:
        json.dump({"answered": answered, "statuses": dict(statuses)}, out)


if __name__ == "__main__":
    main()
