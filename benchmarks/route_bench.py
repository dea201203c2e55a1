"""Routing speed and memory: prints figures, asserts nothing.

    python benchmarks/route_bench.py [--data FILE] [--queries 300] [--precision fp32 int8]

knn and logreg are trained on 80% of the MMLU outcome file (synthetic prompts when
../shared is absent) and saved; each saved router is then loaded in a fresh process,
as a routing process would, which measures on held-out prompts:
- single-query decision latency (policy + router + embedding, default ONNX threads),
  p50 / p99, on MMLU prompts (~150 tokens) and on short chat prompts (~12 tokens)
- throughput of one batch of 1,000 prompts (score_texts), with 1 and 2 ONNX threads, and
  of 1,000 short chat prompts with 2
- resident memory of that process after the single-query phase (what a routing
  process holds) and its peak after the 1,000-prompt batches
Targets (issue 2): p50 <= 5 ms, p99 <= 15 ms, >= 300 decisions/s, <= 400 MB.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "mmlu_gpt4_mixtral.jsonl"
SMALL, LARGE = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
CHAT = [
    "What's the capital of Australia?",
    "Write a haiku about coffee.",
    "How do I reverse a list in Python?",
    "Prove that sqrt(2) is irrational.",
    "Translate 'thank you very much' into German.",
    "Summarize the plot of Hamlet in two sentences.",
    "What is 17 times 23?",
    "Explain how a hash map works.",
]


def prompts(data: str) -> tuple[list[str], list[int], list[str]]:
    """(training texts, labels, held-out texts)."""
    if Path(data).is_file():
        from tierroute.data import load_outcomes

        o = load_outcomes(data, SMALL, LARGE)
        cut = int(len(o) * 0.8)
        return o.prompts[:cut], [int(v) for v in o.labels[:cut]], o.prompts[cut:]
    topics = ["primes", "sorting", "photosynthesis", "contracts", "interest rates", "poetry"]
    verbs = ["Explain", "Prove a fact about", "Write code for", "Summarize", "Compare"]
    texts = [f"{verbs[i % 5]} {topics[i % 6]} in case {i}, briefly." for i in range(4000)]
    return texts[:3000], [i % 2 for i in range(3000)], texts[3000:]


def timed_routes(policy, router, texts: list[str]) -> list[float]:  # type: ignore[no-untyped-def]
    times = []
    for text in texts:
        start = time.perf_counter()
        policy.route(router, [{"role": "user", "content": text}])
        times.append((time.perf_counter() - start) * 1000)
    return times


def rss_mb() -> float:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def child(folder: str, prompts_file: str, queries: int) -> dict[str, float]:
    """A fresh routing process: load the saved router, then time it."""
    import numpy as np

    from tierroute.artifact import load_router
    from tierroute.config import load_policy
    from tierroute.embed import Embedder
    from tierroute.encoder import TextEncoder

    start = time.perf_counter()
    artifact = load_router(folder, lambda: TextEncoder(Embedder(), memo_size=0))
    router, policy = artifact.router, load_policy()
    policy.route(router, [{"role": "user", "content": "warm up"}])
    load_s = time.perf_counter() - start
    held_out = json.loads(Path(prompts_file).read_text())
    timed_routes(policy, router, held_out[:20])
    long_ms = timed_routes(policy, router, held_out[20 : 20 + queries])
    chat = [f"{CHAT[i % len(CHAT)]} ({i})" for i in range(queries)]
    short_ms = timed_routes(policy, router, chat)
    out = {
        "load_s": load_s,
        "p50_ms": float(np.percentile(long_ms, 50)),
        "p99_ms": float(np.percentile(long_ms, 99)),
        "chat_p50_ms": float(np.percentile(short_ms, 50)),
        "chat_p99_ms": float(np.percentile(short_ms, 99)),
        "rss_mb": rss_mb(),
    }
    batch = held_out[-1000:]
    del artifact, router  # one routing session at a time, as in a real process
    gc.collect()
    chat_batch = [f"{CHAT[i % len(CHAT)]} ({i})" for i in range(1000)]
    for threads in (1, 2):
        batch_router = load_router(
            folder, lambda t=threads: TextEncoder(Embedder(threads=t))
        ).router
        batch_router.score_texts(batch[:64])
        begin = time.perf_counter()
        batch_router.score_texts(batch)
        out[f"batch_per_s_{threads}t"] = len(batch) / (time.perf_counter() - begin)
        if threads == 2:
            begin = time.perf_counter()
            batch_router.score_texts(chat_batch)
            out["chat_batch_per_s_2t"] = len(chat_batch) / (time.perf_counter() - begin)
        del batch_router
        gc.collect()
    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data", default=str(DEFAULT_DATA))
    parser.add_argument("--queries", type=int, default=300)
    parser.add_argument("--precision", nargs="+", default=["fp32", "int8"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        print(json.dumps(child(args.child, args.data, args.queries)))
        return

    import os

    from tierroute.artifact import save_router
    from tierroute.embed import Embedder, EmbeddingCache
    from tierroute.encoder import TextEncoder
    from tierroute.routers import make_router

    texts, labels, held_out = prompts(args.data)
    source = args.data if Path(args.data).is_file() else "synthetic prompts (no shared data)"
    print(
        f"route_bench: routers trained on {len(texts):,} rows of {source}; "
        "timed in a fresh process on held-out prompts\n"
    )
    print(
        f"{'router':<14} {'p50 ms':>7} {'p99 ms':>7} {'chat p50':>9} {'chat p99':>9} "
        f"{'batch/s 1t':>11} {'batch/s 2t':>11} {'chat/s 2t':>10} {'RSS MB':>7} {'peak MB':>8} "
        f"{'load s':>7}"
    )
    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        prompts_file = Path(tmp) / "held_out.json"
        prompts_file.write_text(json.dumps(held_out))
        for precision in args.precision:
            os.environ["TIERROUTE_EMBED_PRECISION"] = precision
            encoder = TextEncoder(Embedder(precision=precision), EmbeddingCache())
            for kind in ("knn", "logreg"):
                folder = Path(tmp) / f"{kind}-{precision}"
                router = make_router(kind, lambda e=encoder: e).fit(texts, labels)
                save_router(router, folder, {"bench": True}, [])
                proc = subprocess.run(
                    [
                        sys.executable,
                        __file__,
                        "--child",
                        str(folder),
                        "--data",
                        str(prompts_file),
                        "--queries",
                        str(args.queries),
                    ],
                    capture_output=True,
                    text=True,
                    check=True,
                    env=dict(os.environ),
                )
                r = json.loads(proc.stdout.strip().splitlines()[-1])
                results[(kind, precision)] = r
                print(
                    f"{kind + ' ' + precision:<14} {r['p50_ms']:7.2f} {r['p99_ms']:7.2f} "
                    f"{r['chat_p50_ms']:9.2f} {r['chat_p99_ms']:9.2f} "
                    f"{r['batch_per_s_1t']:11.0f} {r['batch_per_s_2t']:11.0f} "
                    f"{r['chat_batch_per_s_2t']:10.0f} "
                    f"{r['rss_mb']:7.0f} {r['peak_rss_mb']:8.0f} {r['load_s']:7.2f}"
                )
    print("\ntargets: p50 <= 5 ms, p99 <= 15 ms, >= 300 decisions/s, <= 400 MB")
    if ("knn", "fp32") in results and ("knn", "int8") in results:
        ratio = results[("knn", "fp32")]["p50_ms"] / results[("knn", "int8")]["p50_ms"]
        print(f"fp32 / int8 p50 latency ratio for knn (same run): {ratio:.2f}")


if __name__ == "__main__":
    main()
