"""The ONNX embedder against the reference implementation, its cache, and no torch."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

from tierroute.embed import Embedder, EmbeddingCache

from .conftest import run_without_heavy_imports

TEXTS = [
    "Prove that sqrt(2) is irrational.",
    "hi",
    "A much longer request that goes on for a while, about databases, indexes and the query "
    "planner of PostgreSQL, with a question at the end: why is my query slow?",
]


def test_embeddings_are_unit_vectors_and_batch_invariant(encoder) -> None:  # type: ignore[no-untyped-def]
    embedder = encoder.embedder
    batch = embedder.embed(TEXTS)
    assert batch.shape == (3, 384) and batch.dtype == np.float32
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    one_by_one = np.stack([embedder.embed([t])[0] for t in TEXTS])
    assert np.allclose(batch, one_by_one, atol=1e-5)  # padding does not leak into the mean
    sims = batch @ batch.T
    assert sims[0, 1] < 0.5


@pytest.mark.skipif(
    importlib.util.find_spec("sentence_transformers") is None,
    reason="sentence-transformers (from the embed extra) is not installed",
)
def test_matches_sentence_transformers(encoder) -> None:  # type: ignore[no-untyped-def]
    from sentence_transformers import SentenceTransformer

    from tierroute.embed import find_model_dir

    reference = SentenceTransformer(str(find_model_dir()), device="cpu")
    expected = reference.encode(TEXTS, normalize_embeddings=True)
    got = encoder.embedder.embed(TEXTS)
    assert np.min(np.sum(expected * got, axis=1)) > 0.9999


def test_disk_cache_round_trip(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    cache = EmbeddingCache(tmp_path / "emb.sqlite")
    first = cache.embed(encoder.embedder, [*TEXTS, TEXTS[0]])

    class Refuses(Embedder):
        def embed(self, texts):  # type: ignore[no-untyped-def]
            raise AssertionError("a cached text was embedded again")

    again = cache.embed(Refuses(model_dir=encoder.embedder.model_dir), TEXTS)
    assert np.array_equal(first[:3], again)
    assert np.array_equal(first[0], first[3])


def test_scoring_never_imports_torch() -> None:
    run_without_heavy_imports(
        "from tierroute.routers import make_router\n"
        "r = make_router('rules')\n"
        "r.score('Write a function that reverses a string')\n"
    )


def test_batches_are_length_sorted_and_token_bounded() -> None:
    embedder = Embedder(batch_size=4, token_budget=100, max_length=64)
    texts = ["x" * 400, "hi", "y" * 40, "z" * 200, "ok", "w" * 12]
    batches = embedder._batches(texts)
    assert sorted(i for b in batches for i in b) == list(range(len(texts)))
    flat = [i for b in batches for i in b]
    assert [len(texts[i]) for i in flat] == sorted(len(t) for t in texts)
    for b in batches:
        longest = max(min(64, len(texts[i]) // 4 + 2) for i in b)
        assert len(b) <= 4 and (len(b) == 1 or len(b) * longest <= 100)


def test_interrupted_embedding_keeps_finished_chunks(tmp_path: Path, encoder) -> None:  # type: ignore[no-untyped-def]
    texts = [f"question number {i} about the weather" for i in range(10)]
    real = encoder.embedder
    calls: list[int] = []

    class StopsAfterOneChunk(Embedder):
        def embed(self, batch):  # type: ignore[no-untyped-def]
            calls.append(len(batch))
            if len(calls) > 1:
                raise KeyboardInterrupt  # Ctrl-C during the second chunk
            return real.embed(batch)

    cache = EmbeddingCache(tmp_path / "emb.sqlite", chunk=4)
    with pytest.raises(KeyboardInterrupt):
        cache.embed(StopsAfterOneChunk(model_dir=real.model_dir), texts)
    calls.clear()

    class Counts(Embedder):
        def embed(self, batch):  # type: ignore[no-untyped-def]
            calls.append(len(batch))
            return real.embed(batch)

    resumed = cache.embed(Counts(model_dir=real.model_dir), texts)
    assert sum(calls) == 6  # the first chunk of four was kept; only the rest is computed
    assert np.allclose(resumed, real.embed(texts), atol=1e-5)


def test_int8_vectors_are_close_to_fp32_and_independent_of_their_batch(encoder) -> None:  # type: ignore[no-untyped-def]
    # Activations are quantised per token (onnx_bert), not per batch: a prompt routed
    # alone and in a micro-batch of others gets the same vector, hence the same decision.
    fp32 = encoder.embedder.embed(TEXTS)
    int8 = Embedder(precision="int8")
    assert int8.model_id.endswith("/len256/int8-rows") and int8.model_id != encoder.model_id
    batch = int8.embed(TEXTS)
    one_by_one = np.stack([int8.embed([t])[0] for t in TEXTS])
    assert np.allclose(batch, one_by_one, atol=1e-5)
    assert np.allclose(np.linalg.norm(batch, axis=1), 1.0, atol=1e-5)
    cosine = np.sum(batch * fp32, axis=1)
    assert cosine.min() > 0.98, cosine  # "hi": 0.989; AlpacaEval prompts: mean 0.998


def test_default_router_is_served_at_the_precision_it_was_checked_at(
    monkeypatch: pytest.MonkeyPatch,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    from tierroute.artifact import default_router_dir, load_router, read_meta

    meta = read_meta(default_router_dir())
    monkeypatch.delenv("TIERROUTE_EMBED_PRECISION", raising=False)
    served = load_router(default_router_dir()).router
    assert served.encoder.model_id == meta["embed_served"]
    # The environment still chooses: fp32, the embeddings it was trained on, is accepted.
    monkeypatch.setenv("TIERROUTE_EMBED_PRECISION", "fp32")
    trained = load_router(default_router_dir()).router
    assert trained.encoder.model_id == meta["embed_model"]
    text = "Prove that sqrt(2) is irrational."
    assert abs(served.explain_text(text).score - trained.explain_text(text).score) < 0.05


def test_a_router_without_embed_served_reads_its_training_embeddings(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    encoder,  # type: ignore[no-untyped-def]
) -> None:
    import json
    import shutil

    from tierroute.artifact import default_router_dir, load_router
    from tierroute.errors import ArtifactError

    folder = tmp_path / "router"
    shutil.copytree(default_router_dir(), folder)
    meta = json.loads((folder / "router.json").read_text())
    del meta["embed_served"]
    (folder / "router.json").write_text(json.dumps(meta))
    monkeypatch.delenv("TIERROUTE_EMBED_PRECISION", raising=False)
    router = load_router(folder).router
    assert router.encoder.model_id == meta["embed_model"]  # fp32, not the served int8
    # Asked for int8 explicitly, it refuses: its quality was never checked there.
    monkeypatch.setenv("TIERROUTE_EMBED_PRECISION", "int8")
    with pytest.raises(ArtifactError, match="retrain"):
        load_router(folder)
