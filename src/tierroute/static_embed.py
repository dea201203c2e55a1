"""A static embedding distilled from all-MiniLM-L6-v2: one vector per vocabulary token.

Routing a fresh prompt through MiniLM costs milliseconds of CPU; this table costs a
tokenisation and a gather. Built once from the packaged weights (`build_table`,
scripts/build_static_embedding.py), in the manner of model2vec: every WordPiece token is
run through MiniLM alone ([CLS] token [SEP], mean-pooled and normalised, as a sentence),
the 30,522 vectors are reduced by PCA, and each is weighted by how rare its token is
(SIF, a / (a + p) with p from the vocabulary's Zipf rank), so that "the" and "##s" weigh
little in a prompt's mean. A prompt's vector is the normalised mean of its tokens' rows.

The table ships in the package (resources/static_minilm.npz: int8 rows, a float32 scale
each) and is checked against TABLE_SHA256 when read: a router trained on one table must
never be served another's vectors (the model id names the table's digest too).
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierroute.errors import ConfigError

Vectors = npt.NDArray[np.float32]

TABLE_NAME = "static_minilm.npz"
# sha256 of the shipped resources/static_minilm.npz (scripts/build_static_embedding.py
# prints it). A different file is refused: it would give other vectors than the router's.
TABLE_SHA256 = "af4742c0e0d9f455555bfa57526a1814dd278c83e4ed1d10d1740df260276f97"
DIMS = 256  # PCA components kept
SIF_A = 1e-4  # model2vec's default SIF coefficient
# [PAD], [UNK], [CLS], [SEP], [MASK] of the bert-base-uncased vocabulary: no weight.
SPECIAL_IDS = (0, 100, 101, 102, 103)


def table_path() -> Path:
    from importlib.resources import files

    return Path(str(files("tierroute") / "resources" / TABLE_NAME))


def file_sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def token_vectors(embedder: Any, vocab_size: int, batch: int = 512) -> Vectors:
    """Each token id alone through the (fp32) MiniLM: [CLS] id [SEP] -> its sentence vector."""
    out = np.zeros((vocab_size, embedder.dim), dtype=np.float32)
    for start in range(0, vocab_size, batch):
        ids = [[101, t, 102] for t in range(start, min(vocab_size, start + batch))]
        out[start : start + len(ids)] = embedder.embed_ids(ids)
    return out


def distil(vectors: Vectors, dims: int = DIMS, sif_a: float = SIF_A) -> Vectors:
    """PCA to `dims` components, then SIF weights by Zipf rank (the bert vocabulary's
    words are roughly in frequency order), special tokens zeroed."""
    x = vectors.astype(np.float64)
    x -= x.mean(axis=0)
    # PCA by SVD of the centred matrix; signs fixed so that the result is reproducible.
    _, _, vt = np.linalg.svd(x, full_matrices=False)
    components = vt[:dims]
    signs = np.sign(components[np.arange(len(components)), np.abs(components).argmax(axis=1)])
    reduced = x @ (components * signs[:, None]).T
    rank = np.arange(1, len(x) + 1, dtype=np.float64)
    proba = (1.0 / rank) / np.sum(1.0 / rank)
    reduced *= (sif_a / (sif_a + proba))[:, None]
    reduced[list(SPECIAL_IDS)] = 0.0
    out: Vectors = reduced.astype(np.float32)
    return out


def quantise(table: Vectors) -> tuple[npt.NDArray[np.int8], npt.NDArray[np.float32]]:
    """int8 rows, symmetric, a scale per row (its largest magnitude / 127)."""
    scale = np.abs(table).max(axis=1) / 127.0
    scale = np.where(scale > 0, scale, 1.0).astype(np.float32)
    q = np.clip(np.rint(table / scale[:, None]), -127, 127).astype(np.int8)
    return q, scale


def build_table(model_dir: Path, out: Path, dims: int = DIMS) -> str:
    """Distil the MiniLM in `model_dir` into `out` (.npz); returns the file's sha256."""
    from tierroute.embed import Embedder

    embedder = Embedder(model_dir, precision="fp32", threads=0)
    return save_table(distil(token_vectors(embedder, embedder.vocab_size), dims), out)


def save_table(table: Vectors, out: Path) -> str:
    """`table` quantised into `out` (.npz); returns the file's sha256. The same table
    gives the same bytes: np.savez would stamp the zip entries with the current time."""
    import io
    import zipfile

    q, scale = quantise(table)
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w", zipfile.ZIP_DEFLATED) as zf:
        for name, array in (("q", q), ("scale", scale)):
            entry = io.BytesIO()
            np.lib.format.write_array(entry, array, allow_pickle=False)
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(2026, 1, 1, 0, 0, 0))
            info.compress_type = zipfile.ZIP_DEFLATED
            zf.writestr(info, entry.getvalue())
    out.write_bytes(buffer.getvalue())
    return file_sha256(out)


def load_table(path: Path | None = None, expected: str | None = None) -> Vectors:
    """The table as float32 rows (dequantised once: a gather from float32 is the fastest),
    after checking its digest."""
    path = path or table_path()
    if not path.is_file():
        raise ConfigError(
            f"the static embedding table {path} is missing; rebuild it with "
            "python scripts/build_static_embedding.py"
        )
    want = TABLE_SHA256 if expected is None else expected
    if want and file_sha256(path) != want:
        raise ConfigError(
            f"the static embedding table {path} is not the one this tierroute was built "
            "with (sha256 differs); reinstall tierroute or rebuild it with "
            "python scripts/build_static_embedding.py"
        )
    with np.load(path, allow_pickle=False) as npz:
        q, scale = npz["q"], npz["scale"]
    table: Vectors = q.astype(np.float32) * scale[:, None]
    return table


def pool(table: Vectors, ids: Sequence[Sequence[int]]) -> Vectors:
    """Normalised mean of each text's token rows (a text of no known tokens: zeros)."""
    out = np.zeros((len(ids), table.shape[1]), dtype=np.float32)
    lengths = np.array([len(r) for r in ids])
    nonempty = np.flatnonzero(lengths)
    if len(nonempty) == 0:
        return out
    flat = np.fromiter((t for i in nonempty.tolist() for t in ids[i]), dtype=np.int64)
    starts = np.concatenate([[0], np.cumsum(lengths[nonempty])[:-1]])
    sums = np.add.reduceat(table[flat], starts, axis=0)
    norms = np.linalg.norm(sums, axis=1, keepdims=True)
    out[nonempty] = sums / np.maximum(norms, 1e-12)
    return out
