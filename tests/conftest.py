"""Shared fixtures. Tests that need ../shared/data skip with a reason where it is absent."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SHARED = Path(os.environ.get("TIERROUTE_SHARED", ROOT.parent / "shared")) / "data"
MMLU = SHARED / "mmlu_gpt4_mixtral.jsonl"
MMLU_SMALL = "mistralai/Mixtral-8x7B-Instruct-v0.1"
MMLU_LARGE = "gpt-4-1106-preview"

needs_shared = pytest.mark.skipif(
    not MMLU.is_file(), reason=f"needs the outcome data in {SHARED} (absent on this machine)"
)

# Real prompts of clearly different difficulty; "hard" rows are the ones where the
# large model wins. Enough rows for 5 folds of a learned router.
EASY = [
    "What is the capital of France?",
    "Hi there, how are you today?",
    "Translate 'good morning' into Spanish.",
    "How many days are in a week?",
    "Thanks, that was helpful!",
    "What colour is the sky on a clear day?",
    "Who wrote Romeo and Juliet?",
    "Tell me a fun fact about cats.",
    "What is 2 + 2?",
    "Say hello in German.",
]
HARD = [
    "Prove that there are infinitely many primes of the form 4k+3.",
    "Derive the closed form of the sum of k^2 for k from 1 to n and prove it by induction.",
    "Implement a lock-free concurrent queue in C++ and explain its memory ordering.",
    "Analyze the time complexity of Dijkstra's algorithm with a Fibonacci heap, step by step.",
    "Design a distributed rate limiter for a multi-region API and compare the trade-offs.",
    "Prove that the square root of 3 is irrational.",
    "Write a Python function that solves the N-queens problem with backtracking and prove it "
    "terminates.",
    "Compute the eigenvalues of the matrix [[2,1],[1,3]] and derive the eigenvectors.",
    "Explain step by step why the halting problem is undecidable.",
    "Optimize this SQL query that joins five tables and explain the query plan.",
]


def write_outcomes(path: Path, repeat: int = 3) -> Path:
    """A small outcome file: easy prompts tie, hard prompts only the large model solves."""
    rows = []
    for r in range(repeat):
        for group, prompts, small in (("easy", EASY, 1.0), ("hard", HARD, 0.0)):
            for i, prompt in enumerate(prompts):
                text = prompt if r == 0 else f"{prompt} (variant {r})"
                rows.append(
                    {
                        "id": f"{group}-{i}-{r}",
                        "dataset": "toy",
                        "subset": group,
                        "prompt": text,
                        "models": {
                            "small-m": {"score": small, "cost_usd": 0.001},
                            "large-m": {"score": 1.0, "cost_usd": 0.02},
                        },
                        "meta": {"topic": f"t{i % 5}", "split": "train" if r < 2 else "test"},
                    }
                )
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.fixture
def outcome_file(tmp_path: Path) -> Path:
    return write_outcomes(tmp_path / "toy.jsonl")


# What scoring must never load: torch and the libraries that come with it, or training code.
HEAVY_MODULES = ("torch", "transformers", "sentence_transformers", "tierroute.finetune")


def run_without_heavy_imports(code: str) -> None:
    """Run `code` in a fresh interpreter, then check that onnxruntime did the work and that
    none of HEAVY_MODULES was imported."""
    check = (
        "\nimport sys\n"
        "assert 'onnxruntime' in sys.modules\n"
        f"bad = [m for m in {HEAVY_MODULES!r} if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code + check], check=True, timeout=300)


def run_cli(*args: str, check: bool = False) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [sys.executable, "-m", "tierroute.cli", *args],
        capture_output=True,
        text=True,
        cwd=ROOT,
        timeout=1800,
    )
    if check and proc.returncode != 0:
        raise AssertionError(f"tierroute {' '.join(args)} failed:\n{proc.stdout}\n{proc.stderr}")
    return proc


@pytest.fixture(scope="session")
def encoder():  # type: ignore[no-untyped-def]
    from tierroute.embed import Embedder
    from tierroute.encoder import TextEncoder

    return TextEncoder(Embedder())


@contextlib.contextmanager
def fast_upstream(mimic: bool = False) -> Iterator[str]:
    """benchmarks/fast_upstream.py on a free port (an OpenAI-compatible server answering
    "ok" at once; with `mimic`, answering each request as OpenAI's API would), ready to
    answer; yields its base URL (…/v1)."""
    import socket

    import httpx

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    script = ROOT / "benchmarks" / "fast_upstream.py"
    proc = subprocess.Popen(
        [sys.executable, str(script), str(port), *(["--mimic"] if mimic else [])],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            try:
                httpx.get(url + "/healthz", timeout=1)
                break
            except httpx.HTTPError:
                if proc.poll() is not None or time.monotonic() > deadline:
                    raise AssertionError("the fast upstream did not start") from None
                time.sleep(0.1)
        yield url + "/v1"
    finally:
        proc.kill()
        proc.wait(30)


def wait_for(check: Callable[[], bool], seconds: float = 15) -> None:
    """Poll `check` until it holds; fail the test after `seconds` (a background writer or
    another replica catching up, never a timing target)."""
    deadline = time.monotonic() + seconds
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.02)
