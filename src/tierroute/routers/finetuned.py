"""The fine-tuned small-encoder router ("bert"): MiniLM's top layers trained on outcomes.

`fit` trains with torch (`tierroute.finetune`, extra `train`). Scoring never imports
torch: the trained layers override the packaged ones in the ONNX graph that
`tierroute.embed` runs, and the head is a numpy dot product over its embedding. The
state is only what changed (float16 differences of the top layers, the head): ~3.5 MB
per trained layer.
"""

from __future__ import annotations

import hashlib
import importlib.util
from collections.abc import Sequence
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import numpy.typing as npt

from tierroute.embed import Embedder, find_model_dir
from tierroute.errors import MissingDependencyError, RouterError
from tierroute.routers.base import BaseRouter, Scores, sigmoid

State = dict[str, npt.NDArray[Any]]


class FineTunedRouter(BaseRouter):
    kind: ClassVar[str] = "bert"
    learned: ClassVar[bool] = True

    def __init__(
        self,
        layers: int = 1,
        epochs: int = 1,
        lr: float = 1e-5,
        head_lr: float = 1e-4,
        batch_size: int = 32,
        max_tokens: int = 128,
        seed: int = 0,
        threads: int = 1,
        val_fraction: float = 0.15,
        checks_per_epoch: int = 4,
        amp: bool = True,
    ) -> None:
        self.layers = layers
        self.epochs = epochs
        self.lr = lr
        self.head_lr = head_lr
        self.batch_size = batch_size
        self.max_tokens = max_tokens
        self.seed = seed
        # torch threads when training, onnxruntime intra-op threads when scoring.
        self.threads = threads
        self.val_fraction = val_fraction
        self.checks_per_epoch = checks_per_epoch
        # bfloat16 autocast in training: ~1.7x faster with AMX/AVX512-BF16, slower without.
        self.amp = amp
        self.state_: State | None = None
        # Validation AUC at each check (0 = the linear probe) and the check kept; fit only.
        self.val_auc_: list[float] = []
        self.best_check_: int | None = None
        self._embedder: Embedder | None = None

    def get_params(self) -> dict[str, Any]:
        return {
            "layers": self.layers,
            "epochs": self.epochs,
            "lr": self.lr,
            "head_lr": self.head_lr,
            "batch_size": self.batch_size,
            "max_tokens": self.max_tokens,
            "seed": self.seed,
            "threads": self.threads,
            "val_fraction": self.val_fraction,
            "checks_per_epoch": self.checks_per_epoch,
            "amp": self.amp,
        }

    def fit(self, texts: Sequence[str], labels: npt.ArrayLike) -> FineTunedRouter:
        if importlib.util.find_spec("torch") is None:
            raise MissingDependencyError(
                "training the bert router needs torch; run: pip install 'tierroute[train]'"
            )
        from tierroute.finetune import TrainConfig, fine_tune

        params = self.get_params()
        tuned = fine_tune(texts, labels, TrainConfig(**params), find_model_dir())
        self.val_auc_, self.best_check_ = tuned.val_auc, tuned.best_check
        self.set_state(tuned.state())
        return self

    def get_state(self) -> State:
        self._check_fitted("state_")
        assert self.state_ is not None
        return dict(self.state_)

    def set_state(self, state: State) -> None:
        missing = {"head.mean", "head.scale", "head.coef", "head.intercept"} - set(state)
        if missing or not any(k.startswith("delta.") for k in state):
            raise RouterError(f"this is not a bert router's state (missing {sorted(missing)})")
        self.state_ = {k: np.asarray(v) for k, v in state.items()}
        self._embedder = None  # rebuilt from the new state on the next score

    def _load(self) -> Embedder:
        if self._embedder is None:
            self._check_fitted("state_")
            assert self.state_ is not None
            folder = find_model_dir()
            self._check_base(folder)
            self._embedder = Embedder(
                model_dir=folder,
                max_length=self.max_tokens,
                threads=self.threads,
                precision="fp32",
                overrides=overrides_from_state(self.state_, folder),
            )
        return self._embedder

    def _check_base(self, folder: Path) -> None:
        assert self.state_ is not None
        if "base_id" not in self.state_:
            return
        stored = self.state_["base_id"].tobytes().decode()
        if stored != base_id(folder):
            raise RouterError(
                "this bert router was trained on other MiniLM weights than the installed ones; "
                "retrain it or install the model package it was trained with"
            )

    def score_texts(self, texts: Sequence[str]) -> Scores:
        embedder = self._load()
        assert self.state_ is not None
        vectors = embedder.embed(texts).astype(np.float64)
        s = self.state_
        logits = ((vectors - s["head.mean"]) / s["head.scale"]) @ s["head.coef"]
        logits += float(s["head.intercept"][0])
        return sigmoid(logits)


def base_id(folder: Path) -> str:
    """Names the packaged weights that stored differences apply to."""
    digest = hashlib.sha256((folder / "config.json").read_bytes())
    digest.update(str((folder / "model.safetensors").stat().st_size).encode())
    return digest.hexdigest()[:16]


def overrides_from_state(state: State, folder: Path) -> State:
    """Full float32 tensors (packaged + stored float16 difference) for the ONNX graph."""
    from tierroute.onnx_bert import read_safetensors

    weights = {
        k.removeprefix("bert."): v
        for k, v in read_safetensors(folder / "model.safetensors").items()
    }
    names = [k.removeprefix("delta.") for k in state if k.startswith("delta.")]
    return {n: weights[n] + state["delta." + n].astype(np.float32) for n in names}
