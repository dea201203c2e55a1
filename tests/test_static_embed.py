"""The static embedding distilled from MiniLM (static_embed.py) and the router shipped on
it (`default-static`): the table is the checksummed one, vectors are the pooled rows of a
text's tokens whatever the batch, no ONNX session is opened, and the gateway routes on it
with the decisions of the router itself."""

from __future__ import annotations

import asyncio
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from tierroute.embed import Embedder, find_model_dir
from tierroute.errors import ArtifactError, ConfigError, MissingDependencyError
from tierroute.static_embed import (
    DIMS,
    TABLE_SHA256,
    file_sha256,
    load_table,
    pool,
    table_path,
)

TEXTS = [
    "Prove that sqrt(2) is irrational.",
    "hi",
    "Design a URL shortener at Google scale, with the storage and the cache layers.",
]


@pytest.fixture(scope="module")
def static() -> Embedder:
    try:
        find_model_dir()  # the tokenizer comes with the packaged model
    except MissingDependencyError as exc:
        pytest.skip(f"the embedding model is not installed: {exc}")
    return Embedder(precision="static")


def test_the_shipped_table_is_the_checksummed_small_one() -> None:
    path = table_path()
    assert file_sha256(path) == TABLE_SHA256
    assert path.stat().st_size <= 8 * 1024 * 1024
    table = load_table()
    assert table.shape == (30522, DIMS) and table.dtype == np.float32
    assert not table[[0, 101, 102]].any()  # [PAD], [CLS], [SEP] weigh nothing


def test_a_table_with_another_digest_is_refused(tmp_path: Path) -> None:
    other = tmp_path / "table.npz"
    other.write_bytes(table_path().read_bytes() + b"\0")
    with pytest.raises(ConfigError, match="sha256"):
        load_table(other)


def test_pool_is_the_normalised_mean_of_the_rows() -> None:
    table = np.array([[0, 0], [1, 0], [0, 2], [3, 4]], dtype=np.float32)
    out = pool(table, [[1, 2], [], [3], [0]])
    assert np.allclose(out[0], np.array([1, 2]) / np.sqrt(5))
    assert not out[1].any() and not out[3].any()  # no tokens / only a zero row: zeros
    assert np.allclose(out[2], [0.6, 0.8])


def test_static_vectors_are_unit_batch_invariant_and_distinct(static: Embedder) -> None:
    batch = static.embed(TEXTS)
    assert batch.shape == (3, DIMS) and static.dim == DIMS
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    alone = np.stack([static.embed([t])[0] for t in TEXTS])
    assert np.array_equal(batch, alone)  # a text's vector never depends on its batch
    assert (batch @ batch.T)[0, 1] < 0.9
    ids = static.token_ids(TEXTS)
    assert np.allclose(static.embed_ids(ids), batch, atol=1e-6)
    assert not static.embed([""]).any()  # [CLS] [SEP] only: no weight, no division by 0
    assert static.model_id.endswith("/len256/static")


def test_the_table_is_read_at_first_use_not_before() -> None:
    code = (
        "import sys\n"
        "from tierroute.embed import Embedder\n"
        "import tierroute.static_embed\n"
        "e = Embedder(precision='static')\n"
        "assert e._session is None and e.dim == 256\n"
        "assert 'onnxruntime' not in sys.modules and 'tokenizers' not in sys.modules\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_fine_tuned_layers_cannot_ride_on_a_static_table() -> None:
    with pytest.raises(ConfigError, match="static"):
        Embedder(precision="static", overrides={"x": np.zeros(1)})


def test_default_static_routes_without_onnxruntime(static: Embedder) -> None:
    code = (
        "import sys\n"
        "from tierroute.artifact import open_router\n"
        "router, artifact = open_router('default-static')\n"
        "assert router.encoder.model_id.endswith('/static'), router.encoder.model_id\n"
        "assert artifact.threshold is not None\n"
        "print(router.score_texts(['Prove that e is transcendental.', 'ok cool, bye']))\n"
        "bad = [m for m in ('onnxruntime', 'torch', 'transformers') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, timeout=300)


def test_each_shipped_router_refuses_the_other_ones_embeddings(
    static: Embedder, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierroute.artifact import open_router

    monkeypatch.setenv("TIERROUTE_EMBED_PRECISION", "static")
    with pytest.raises(ArtifactError, match="retrain"):
        open_router("default")
    monkeypatch.setenv("TIERROUTE_EMBED_PRECISION", "int8")
    with pytest.raises(ArtifactError, match="retrain"):
        open_router("default-static")


def test_the_gateway_routes_on_the_static_embedding_with_stable_scores(
    static: Embedder, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from tierroute.artifact import open_router
    from tierroute.conversation import routing_text
    from tierroute.gateway.engine import Engine, Hints
    from tierroute.gateway.settings import parse_settings
    from tierroute.ledger import Ledger

    monkeypatch.delenv("TIERROUTE_EMBED_PRECISION", raising=False)
    tiers = [
        {"name": n, "kind": "openai", "base_url": "http://127.0.0.1:9/v1", "model": n}
        for n in ("small", "large")
    ]
    doc = {"tiers": tiers, "router": "default-static", "gateway": {"route_batch_max": 16}}
    settings = parse_settings(doc, "test")
    assert settings.router == "default-static"
    router, _ = open_router(settings.router)
    reference, _ = open_router(settings.router)  # another load: the same scores
    texts = [f"{t} (request {i})" for i, t in enumerate(TEXTS * 6)]
    want = reference.score_texts([routing_text([{"role": "user", "content": t}]) for t in texts])

    async def burst(engine: Engine) -> list[float]:
        routed = await asyncio.gather(
            *(engine.route([{"role": "user", "content": t}], Hints(), 16) for t in texts)
        )
        return [r.decision.score for r in routed]

    engine = Engine(settings, router, {}, Ledger(tmp_path / "ledger.db"))
    try:
        got = asyncio.run(burst(engine))
        assert engine._batcher.items == len(texts) and engine._batcher.batches < len(texts)
    finally:
        engine.close()
    encoder = router.encoder  # type: ignore[attr-defined]
    assert encoder.model_id.endswith("/static")
    assert isinstance(encoder.embedder._session, np.ndarray)  # the table, no ONNX session
    assert np.allclose(got, want, atol=1e-9)
