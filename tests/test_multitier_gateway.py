"""A tier of two models end to end: a real `tierroute serve` with the default router, two
loopback upstreams as the large tier's two models, the official openai SDK as the client.

The large tier lists a code model the router was never trained on (its prior for code
prompts comes from the config) and a general model mapped to the router's GPT-4 column.
Code prompts go to the code model, a proof to the general one; the headers and the
ledger say which; ratings of the code model's answers move code prompts to the general
model, and a restart keeps what it learned (rebuilt from the ledger)."""

from __future__ import annotations

import contextlib
import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tierroute.ledger import Ledger, default_path

from .conftest import fast_upstream
from .test_gateway import Server, start, write_yaml

openai = pytest.importorskip("openai")

CODE = "Write a Python function that reverses a string."
PROOF = "Prove that sqrt(2) is irrational, step by step."
EASY = "What is the capital of France?"


def config(root: Path, small: str, coder: str, general: str) -> Path:
    # The README's example of a tier of several models, with loopback upstreams.
    return write_yaml(
        root / "gw.yaml",
        f"""
tiers:
  - name: small
    kind: openai
    base_url: "{small}"
    model: tiny-chat
    input_price_per_m: 0.05
    output_price_per_m: 0.1
  - name: large
    models:
      - name: coder                       # never trained on: a prior for code prompts
        kind: openai
        base_url: "{coder}"
        model: coder-34b
        input_price_per_m: 0.8
        output_price_per_m: 0.8
        tasks: {{code: 0.95}}             # P(answers well) on prompts tagged code
        prior: 0.4                        # and on any other prompt
      - name: general                     # the router's GPT-4 column predicts it
        kind: openai
        base_url: "{general}"
        model: gpt-4-class
        input_price_per_m: 10
        output_price_per_m: 30
        router_model: gpt-4-1106-preview
router: default
gateway:
  choose: {{lambda_per_usd: 100, prior_strength: 5}}
""",
    )


@contextlib.contextmanager
def three_upstreams() -> Iterator[tuple[str, str, str]]:
    with fast_upstream() as a, fast_upstream() as b, fast_upstream() as c:
        yield a, b, c


def ask(server: Server, text: str, **extra: object):  # type: ignore[no-untyped-def]
    client = openai.OpenAI(base_url=server.url + "/v1", api_key="none", max_retries=0)
    return client.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": text}], max_tokens=64, **extra
    )


def test_two_models_in_one_tier_end_to_end(tmp_path: Path) -> None:
    with three_upstreams() as (small, coder, general):
        path = config(tmp_path, small, coder, general)
        data = tmp_path / "data"
        server = start(path, data)
        try:
            code = ask(server, CODE)
            assert code.headers["x-tierroute-tier"] == "large"
            assert code.headers["x-tierroute-model"] == "large/coder"
            reason = code.headers["x-tierroute-reason"]
            assert "model large/coder: P 0.95 (prior for task=code)" in reason
            assert "over large/general" in reason
            assert code.parse().model == "coder-34b"

            proof = ask(server, PROOF)
            assert proof.headers["x-tierroute-tier"] == "large"
            assert proof.headers["x-tierroute-model"] == "large/general"
            # the router's own P for its trained model (its value moves with the rules)
            assert re.search(
                r"model large/general: P 0\.\d\d \(router: gpt-4-1106-preview\)",
                proof.headers["x-tierroute-reason"],
            )
            assert proof.parse().model == "gpt-4-class"

            easy = ask(server, EASY)
            assert easy.headers["x-tierroute-tier"] == "small"
            assert "x-tierroute-model" not in easy.headers  # a tier of one model: as before

            # streams take the same choice
            stream = ask(server, CODE, stream=True)
            assert stream.headers["x-tierroute-model"] == "large/coder"
            chunks = list(stream.parse())
            assert chunks and all(c.model == "coder-34b" for c in chunks)

            # the code model's answers are rated bad: code prompts move to the general model
            client = openai.OpenAI(base_url=server.url + "/v1", api_key="none")
            ids = [code.parse().id]
            for _ in range(3):
                ids.append(ask(server, CODE).parse().id)
            for request_id in ids:
                client.post(
                    "/feedback",
                    body={"request_id": request_id, "rating": 0},
                    cast_to=object,
                )
            moved = ask(server, CODE)
            assert moved.headers["x-tierroute-model"] == "large/general"
            # 4 ratings of 0 against 5 pseudo-verdicts at 0.95: P = 4.75 / 9
            assert "over large/coder 0.522 (P 0.53)" in moved.headers["x-tierroute-reason"]
        finally:
            server.stop()

        # the ledger names the tier and the model of each answer
        with Ledger(default_path(data)) as ledger:
            rows = {row.id: row for row in ledger.rows()}
        assert (rows[proof.parse().id].tier, rows[proof.parse().id].model) == (
            "large",
            "gpt-4-class",
        )
        assert (rows[ids[0]].tier, rows[ids[0]].model) == ("large", "coder-34b")
        assert rows[ids[0]].fallback_chain[0] == "large/coder"

        # a restart rebuilds what the models learned from the ledger
        server = start(path, data)
        try:
            after = ask(server, CODE)
            assert after.headers["x-tierroute-model"] == "large/general"
            assert "over large/coder 0.522 (P 0.53)" in after.headers["x-tierroute-reason"]
        finally:
            server.stop()
