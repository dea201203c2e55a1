"""Fine-tune the top layers of the local MiniLM encoder into a router (torch; training only).

Only `FineTunedRouter.fit` imports this module (extra `train`); serving never does. The
forward pass mirrors `onnx_bert.build_model` op for op (post-LN layers, exact-erf GELU,
a -1e4 mask bias, mean pooling, L2 normalisation), so the trained tensors drop into that
graph as overrides and the router scores with onnxruntime.

The recipe, chosen for 2 CPU cores and ~10k noisy labels:
- Only the top `layers` layers train. The layers below are frozen, so their outputs are
  computed once per text and memoised in this process (`HIDDEN_CACHE`, float16), across
  epochs and across the folds of a cross-validation.
- Linear probe, then fine-tune (Kumar et al., 2022): the head starts as a logistic
  regression on the frozen embeddings, so fine-tuning starts from the frozen-embedding
  router instead of a random head that would first wreck the pretrained features.
- A class-weighted loss (the positive class is a minority, ~18% on MMLU).
- The state kept is the one with the best AUC on held-out topic clusters of the
  training data, checked a few times per epoch (the linear probe is check 0), so a run
  that only overfits falls back to the probe.
- Trained tensors are stored as float16 differences from the packaged weights (half
  the bytes); the torch model is rounded the same way, so torch and ONNX agree.
"""

from __future__ import annotations

import json
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from tierroute.errors import InputError
from tierroute.learning import roc_auc
from tierroute.onnx_bert import read_safetensors
from tierroute.progress import progress
from tierroute.routers.finetuned import base_id

Array = npt.NDArray[Any]

# Our submodule names -> the tensor names of the BERT checkpoint (and of the ONNX graph).
_TENSORS = {
    "q": "attention.self.query",
    "k": "attention.self.key",
    "v": "attention.self.value",
    "ao": "attention.output.dense",
    "ln1": "attention.output.LayerNorm",
    "inter": "intermediate.dense",
    "out": "output.dense",
    "ln2": "output.LayerNorm",
}


@dataclass(frozen=True)
class TrainConfig:
    layers: int = 1
    epochs: int = 1
    lr: float = 1e-5
    head_lr: float = 1e-4
    batch_size: int = 32
    max_tokens: int = 128
    seed: int = 0
    threads: int = 1
    val_fraction: float = 0.15
    # How often per epoch the validation slice is scored (and the best state kept).
    checks_per_epoch: int = 4
    probe_c: float = 0.05
    weight_decay: float = 0.01
    # bfloat16 autocast for the trained layers' matmuls (fast where the CPU has AMX or
    # AVX512-BF16); the frozen states, the export and scoring stay float32.
    amp: bool = True


# (packaged weights, what: "layer{n}" = input of layer n / "pooled", max tokens, text)
Key = tuple[str, str, int, str]


class HiddenCache:
    """Frozen layers' outputs per text (float16, unpadded) and the packaged model's
    embedding (for the linear probe), least recently used dropped beyond `max_bytes`.
    MMLU's 14k prompts at 128 tokens take ~0.9 GB."""

    def __init__(self, max_bytes: int = 3 << 30) -> None:
        self.max_bytes = max_bytes
        self._items: OrderedDict[Key, npt.NDArray[np.float16]] = OrderedDict()
        self._bytes = 0

    def get(self, key: Key) -> npt.NDArray[np.float16] | None:
        value = self._items.get(key)
        if value is not None:
            self._items.move_to_end(key)
        return value

    def put(self, key: Key, value: npt.NDArray[np.float16]) -> None:
        if key in self._items:
            return
        self._items[key] = value
        self._bytes += value.nbytes
        while self._bytes > self.max_bytes and len(self._items) > 1:
            _, dropped = self._items.popitem(last=False)
            self._bytes -= dropped.nbytes

    def clear(self) -> None:
        self._items.clear()
        self._bytes = 0


HIDDEN_CACHE = HiddenCache()


class Layer(nn.Module):
    """One post-LN BERT layer, as onnx_bert builds it."""

    def __init__(self, hidden: int, heads: int, inter: int, eps: float, dropout: float) -> None:
        super().__init__()
        self.heads = heads
        self.dropout = dropout
        self.q = nn.Linear(hidden, hidden)
        self.k = nn.Linear(hidden, hidden)
        self.v = nn.Linear(hidden, hidden)
        self.ao = nn.Linear(hidden, hidden)
        self.ln1 = nn.LayerNorm(hidden, eps=eps)
        self.inter = nn.Linear(hidden, inter)
        self.out = nn.Linear(inter, hidden)
        self.ln2 = nn.LayerNorm(hidden, eps=eps)

    def _split(self, x: Tensor) -> Tensor:
        b, s, h = x.shape
        return x.view(b, s, self.heads, h // self.heads).transpose(1, 2)

    def forward(self, x: Tensor, bias: Tensor) -> Tensor:
        b, s, h = x.shape
        p = self.dropout if self.training else 0.0
        ctx = F.scaled_dot_product_attention(
            self._split(self.q(x)),
            self._split(self.k(x)),
            self._split(self.v(x)),
            attn_mask=bias,
            dropout_p=p,
        )
        attn = F.dropout(self.ao(ctx.transpose(1, 2).reshape(b, s, h)), p, self.training)
        x = self.ln1(x + attn)
        ff = F.dropout(self.out(F.gelu(self.inter(x))), p, self.training)
        out: Tensor = self.ln2(x + ff)
        return out


class Encoder(nn.Module):
    """MiniLM with a logistic head on the normalised mean-pooled embedding."""

    word: Tensor
    pos: Tensor
    type0: Tensor
    mean: Tensor
    scale: Tensor

    def __init__(self, model_dir: Path) -> None:
        super().__init__()
        config = json.loads((model_dir / "config.json").read_text())
        hidden, eps = int(config["hidden_size"]), float(config.get("layer_norm_eps", 1e-12))
        self.num_layers = int(config["num_hidden_layers"])
        weights = {
            k.removeprefix("bert."): v
            for k, v in read_safetensors(model_dir / "model.safetensors").items()
        }
        # Frozen embedding tables as buffers (never trained).
        self.register_buffer("word", _tensor(weights["embeddings.word_embeddings.weight"]))
        self.register_buffer("pos", _tensor(weights["embeddings.position_embeddings.weight"]))
        self.register_buffer(
            "type0", _tensor(weights["embeddings.token_type_embeddings.weight"][0])
        )
        self.emb_ln = nn.LayerNorm(hidden, eps=eps)
        self.emb_ln.weight.data = _tensor(weights["embeddings.LayerNorm.weight"])
        self.emb_ln.bias.data = _tensor(weights["embeddings.LayerNorm.bias"])
        self.layers = nn.ModuleList(
            Layer(
                hidden,
                int(config["num_attention_heads"]),
                int(config["intermediate_size"]),
                eps,
                float(config.get("hidden_dropout_prob", 0.1)),
            )
            for _ in range(self.num_layers)
        )
        for i, layer in enumerate(self.layers):
            for name, tensor in layer.state_dict().items():
                tensor.copy_(_tensor(weights[checkpoint_name(i, name)]))
        # Head: logit = ((embedding - mean) / scale) . coef + intercept
        self.register_buffer("mean", torch.zeros(hidden))
        self.register_buffer("scale", torch.ones(hidden))
        self.head = nn.Linear(hidden, 1)

    def embed_tokens(self, ids: Tensor) -> Tensor:
        positions = torch.arange(ids.shape[1])
        x: Tensor = self.emb_ln(self.word[ids] + self.pos[positions] + self.type0)
        return x

    def run_layers(self, x: Tensor, mask: Tensor, start: int, stop: int) -> Tensor:
        bias = ((1.0 - mask) * -1e4)[:, None, None, :]
        for layer in self.layers[start:stop]:
            x = layer(x, bias)
        return x

    def pool(self, x: Tensor, mask: Tensor) -> Tensor:
        m = mask[:, :, None]
        pooled: Tensor = (x * m).sum(1) / m.sum(1).clamp_min(1e-9)
        out: Tensor = pooled / pooled.norm(dim=-1, keepdim=True).clamp_min(1e-12)
        return out

    def logits(self, pooled: Tensor) -> Tensor:
        out: Tensor = self.head((pooled - self.mean) / self.scale)[:, 0]
        return out


def _tensor(value: Array) -> Tensor:
    return torch.from_numpy(np.array(value, dtype=np.float32))


def checkpoint_name(layer: int, name: str) -> str:
    """`ln1.weight` of layer 5 -> `encoder.layer.5.attention.output.LayerNorm.weight`."""
    module, kind = name.split(".")
    return f"encoder.layer.{layer}.{_TENSORS[module]}.{kind}"


def _pad(states: Sequence[npt.NDArray[np.float16]]) -> tuple[Tensor, Tensor]:
    longest = max(len(s) for s in states)
    x = np.zeros((len(states), longest, states[0].shape[1]), dtype=np.float32)
    mask = np.zeros((len(states), longest), dtype=np.float32)
    for row, s in enumerate(states):
        x[row, : len(s)] = s
        mask[row, : len(s)] = 1.0
    return torch.from_numpy(x), torch.from_numpy(mask)


@dataclass
class FineTuned:
    """A trained encoder + head (torch), its export and what training saw."""

    model: Encoder
    config: TrainConfig
    model_dir: Path
    # Validation AUC at each check (index 0: the linear probe) and the check kept.
    val_auc: list[float] = field(default_factory=list)
    best_check: int = 0
    # float16 differences from the packaged tensors, by checkpoint name (set by fine_tune).
    deltas: dict[str, Array] = field(default_factory=dict)

    @property
    def first_trained(self) -> int:
        return self.model.num_layers - self.config.layers

    def state(self) -> dict[str, Array]:
        """What changed from the packaged model: float16 tensor differences, the head."""
        out: dict[str, Array] = {"delta." + k: v for k, v in self.deltas.items()}
        out["head.mean"] = self.model.mean.numpy().astype(np.float32)
        out["head.scale"] = self.model.scale.numpy().astype(np.float32)
        out["head.coef"] = self.model.head.weight.detach().numpy()[0].astype(np.float32)
        out["head.intercept"] = self.model.head.bias.detach().numpy().astype(np.float32)
        out["base_id"] = np.frombuffer(base_id(self.model_dir).encode(), dtype=np.uint8)
        return out

    def scores(self, texts: Sequence[str], batch_size: int = 32) -> npt.NDArray[np.float64]:
        """P(large needed) from the torch model, end to end (for checking the export)."""
        tokenizer = _tokenizer(self.model_dir, self.config.max_tokens)
        self.model.eval()
        out = np.zeros(len(texts), dtype=np.float64)
        with torch.no_grad():
            for start in range(0, len(texts), batch_size):
                chunk = tokenizer.encode_batch(list(texts[start : start + batch_size]))
                longest = max(len(e.ids) for e in chunk)
                ids = torch.zeros((len(chunk), longest), dtype=torch.int64)
                mask = torch.zeros((len(chunk), longest))
                for row, e in enumerate(chunk):
                    ids[row, : len(e.ids)] = torch.tensor(e.ids)
                    mask[row, : len(e.ids)] = 1.0
                x = self.model.run_layers(
                    self.model.embed_tokens(ids), mask, 0, self.model.num_layers
                )
                logits = self.model.logits(self.model.pool(x, mask))
                out[start : start + len(chunk)] = torch.sigmoid(logits).double().numpy()
        return out


def _base_tensors(model_dir: Path, first: int, stop: int) -> dict[str, Array]:
    weights = read_safetensors(model_dir / "model.safetensors")
    wanted = {checkpoint_name(i, n) for i in range(first, stop) for n in _layer_names()}
    return {
        k.removeprefix("bert."): v for k, v in weights.items() if k.removeprefix("bert.") in wanted
    }


def _layer_names() -> list[str]:
    return [f"{m}.{kind}" for m in _TENSORS for kind in ("weight", "bias")]


def _tokenizer(model_dir: Path, max_tokens: int) -> Any:
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(model_dir / "tokenizer.json"))
    tokenizer.enable_truncation(max_length=max_tokens)
    tokenizer.no_padding()  # the packaged file pads to 128; we pad per batch
    return tokenizer


def frozen_states(
    model: Encoder,
    texts: Sequence[str],
    config: TrainConfig,
    model_dir: Path,
    cache: HiddenCache,
) -> list[npt.NDArray[np.float16]]:
    """Output of the frozen layers for each text, from `cache` or computed and stored."""
    first = model.num_layers - config.layers
    ident = base_id(model_dir)
    keys = [(ident, f"layer{first}", config.max_tokens, t) for t in texts]
    found = {k: v for k in dict.fromkeys(keys) if (v := cache.get(k)) is not None}
    missing = list(dict.fromkeys(k for k in keys if k not in found))
    if missing:
        tokenizer = _tokenizer(model_dir, config.max_tokens)
        encodings = tokenizer.encode_batch([k[3] for k in missing])
        order = sorted(range(len(missing)), key=lambda i: len(encodings[i].ids))
        model.eval()
        with torch.no_grad():
            for start in range(0, len(order), 64):
                batch = order[start : start + 64]
                longest = max(len(encodings[i].ids) for i in batch)
                ids = torch.zeros((len(batch), longest), dtype=torch.int64)
                mask = torch.zeros((len(batch), longest))
                for row, i in enumerate(batch):
                    n = len(encodings[i].ids)
                    ids[row, :n] = torch.tensor(encodings[i].ids)
                    mask[row, :n] = 1.0
                x = model.run_layers(model.embed_tokens(ids), mask, 0, first)
                for row, i in enumerate(batch):
                    n = len(encodings[i].ids)
                    state = x[row, :n].numpy().astype(np.float16)
                    found[missing[i]] = state
                    cache.put(missing[i], state)
    return [found[k] for k in keys]


def _batches(
    lengths: Sequence[int], index: npt.NDArray[np.int64], size: int, rng: np.random.Generator
) -> Iterator[npt.NDArray[np.int64]]:
    """Shuffled batches of similar length: shuffle, sort within pools of 50 batches, cut,
    shuffle the batches. Little padding, yet different neighbours every epoch."""
    shuffled = rng.permutation(index)
    batches = []
    for start in range(0, len(shuffled), size * 50):
        pool = shuffled[start : start + size * 50]
        pool = pool[np.argsort([lengths[i] for i in pool], kind="stable")]
        batches += [pool[j : j + size] for j in range(0, len(pool), size)]
    for b in rng.permutation(len(batches)):
        yield batches[b]


def _predict(
    model: Encoder,
    states: Sequence[npt.NDArray[np.float16]],
    index: npt.NDArray[np.int64],
    first: int,
) -> npt.NDArray[np.float64]:
    """Logits of the rows `index` (top layers from their frozen states), in order."""
    model.eval()
    out = np.zeros(len(index), dtype=np.float64)
    order = np.argsort([len(states[i]) for i in index], kind="stable")
    with torch.no_grad():
        for start in range(0, len(order), 64):
            rows = order[start : start + 64]
            x, mask = _pad([states[index[r]] for r in rows])
            x = model.run_layers(x, mask, first, model.num_layers)
            out[rows] = model.logits(model.pool(x, mask)).double().numpy()
    return out


def _probe_features(
    model: Encoder,
    texts: Sequence[str],
    states: Sequence[npt.NDArray[np.float16]],
    config: TrainConfig,
    ident: str,
    cache: HiddenCache,
) -> npt.NDArray[np.float32]:
    """The packaged model's embeddings (the top layers not yet trained), memoised too."""
    keys = [(ident, "pooled", config.max_tokens, t) for t in texts]
    out = np.zeros((len(texts), model.head.in_features), dtype=np.float32)
    todo = []
    for row, key in enumerate(keys):
        hit = cache.get(key)
        if hit is None:
            todo.append(row)
        else:
            out[row] = hit
    first = model.num_layers - config.layers
    model.eval()
    todo.sort(key=lambda r: len(states[r]))
    with torch.no_grad():
        for start in range(0, len(todo), 64):
            rows = todo[start : start + 64]
            x, mask = _pad([states[r] for r in rows])
            pooled = model.pool(model.run_layers(x, mask, first, model.num_layers), mask).numpy()
            for r, vector in zip(rows, pooled.astype(np.float16), strict=True):
                out[r] = vector  # rounded as a memoised one would be: same fit either way
                cache.put(keys[r], vector)
    return out


def _holdout(
    labels: npt.NDArray[np.int64],
    features: npt.NDArray[np.float32],
    fraction: float,
    seed: int,
) -> tuple[npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """(train, validation) indices, validation being whole topic clusters (k-means on the
    frozen embeddings). A router meets unseen topics, and a random slice rewarded
    fitting the training topics: fine-tuning kept improving on it while getting worse on
    held-out MMLU subjects. No validation when a class would get fewer than 10 rows."""
    from sklearn.cluster import KMeans

    everything = np.arange(len(labels))
    if fraction <= 0 or min(fraction * (labels == c).sum() for c in (0, 1)) < 10:
        return everything, everything[:0]
    k = int(np.clip(len(labels) // 300, 10, 50))
    clusters = KMeans(n_clusters=k, n_init=1, random_state=seed).fit_predict(features)
    val: list[int] = []
    for c in np.random.default_rng(seed).permutation(k):
        if len(val) >= fraction * len(labels):
            break
        val += np.flatnonzero(clusters == c).tolist()
    held = np.sort(np.array(val, dtype=np.int64))
    if min(int((labels[held] == c).sum()) for c in (0, 1)) < 5:
        return everything, everything[:0]
    return np.setdiff1d(everything, held), held


def fine_tune(
    texts: Sequence[str],
    labels: npt.ArrayLike,
    config: TrainConfig,
    model_dir: Path,
    cache: HiddenCache = HIDDEN_CACHE,
) -> FineTuned:
    """Train the top `config.layers` layers and the head; see the module docstring."""
    from sklearn.linear_model import LogisticRegression

    y = np.asarray(labels, dtype=np.int64)
    if len(texts) != len(y) or len(set(y.tolist())) != 2:
        raise InputError("fine-tuning needs one 0/1 label per text and both labels present")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(config.threads)
    try:
        torch.manual_seed(config.seed)
        rng = np.random.default_rng(config.seed)
        model = Encoder(model_dir)
        if not 1 <= config.layers <= model.num_layers:
            raise InputError(f"layers must be between 1 and {model.num_layers}")
        first = model.num_layers - config.layers
        states = frozen_states(model, texts, config, model_dir, cache)
        features = _probe_features(model, texts, states, config, base_id(model_dir), cache)
        train, val = _holdout(y, features, config.val_fraction, config.seed)

        # Linear probe on the frozen embeddings: the head's starting point.
        pooled = features[train]
        mean, scale = pooled.mean(0), np.maximum(pooled.std(0), 1e-6)
        probe = LogisticRegression(C=config.probe_c, class_weight="balanced", max_iter=3000)
        probe.fit((pooled - mean) / scale, y[train])
        with torch.no_grad():
            model.mean.copy_(torch.from_numpy(mean))
            model.scale.copy_(torch.from_numpy(scale))
            model.head.weight.copy_(torch.from_numpy(probe.coef_.astype(np.float32)))
            model.head.bias.copy_(torch.from_numpy(probe.intercept_.astype(np.float32)))

        for p in model.parameters():
            p.requires_grad_(False)
        top = [p for layer in model.layers[first:] for p in layer.parameters()]
        head = list(model.head.parameters())
        for p in top + head:
            p.requires_grad_(True)
        optimiser = torch.optim.AdamW(
            [{"params": top, "lr": config.lr}, {"params": head, "lr": config.head_lr}],
            weight_decay=config.weight_decay,
        )
        steps = config.epochs * math.ceil(len(train) / config.batch_size)
        warmup = max(1, steps // 10)
        schedule = torch.optim.lr_scheduler.LambdaLR(
            optimiser,
            lambda s: min((s + 1) / warmup, max(0.0, (steps - s) / max(1, steps - warmup))),
        )
        positives = max(1, int(y[train].sum()))
        pos_weight = torch.tensor((len(train) - positives) / positives)
        lengths = [len(s) for s in states]

        result = FineTuned(model, config, model_dir)
        best = _snapshot(model, first)
        best_auc = -1.0
        if len(val):
            best_auc = roc_auc(_predict(model, states, val, first), y[val])
            result.val_auc.append(best_auc)
        bar = progress(steps, "fine-tuning", unit="batch")
        for _ in range(config.epochs):
            batches = list(_batches(lengths, train, config.batch_size, rng))
            checks = {
                round(len(batches) * (j + 1) / config.checks_per_epoch) - 1
                for j in range(config.checks_per_epoch)
            }
            model.train()
            for step, batch in enumerate(batches):
                x, mask = _pad([states[i] for i in batch])
                with torch.autocast("cpu", dtype=torch.bfloat16, enabled=config.amp):
                    top_out = model.run_layers(x, mask, first, model.num_layers)
                logits = model.logits(model.pool(top_out.float(), mask))
                target = torch.from_numpy(y[batch].astype(np.float32))
                loss = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight)
                optimiser.zero_grad()
                loss.backward()  # type: ignore[no-untyped-call]
                nn.utils.clip_grad_norm_(top + head, 1.0)
                optimiser.step()
                schedule.step()
                bar.update(1)
                if step not in checks:
                    continue
                if not len(val):  # nothing to choose with: keep the last
                    best = _snapshot(model, first)
                    continue
                auc = roc_auc(_predict(model, states, val, first), y[val])
                result.val_auc.append(auc)
                if auc > best_auc:
                    best_auc, best = auc, _snapshot(model, first)
                    result.best_check = len(result.val_auc) - 1
                model.train()
        bar.close()
        model.load_state_dict(best, strict=False)
        result.deltas = _round_to_export(model, first, model_dir)
        model.eval()
        for p in model.parameters():
            p.requires_grad_(False)
        return result
    finally:
        torch.set_num_threads(previous_threads)


def _snapshot(model: Encoder, first: int) -> dict[str, Tensor]:
    """Copies of the trainable tensors (top layers and head)."""
    return {
        k: v.detach().clone()
        for k, v in model.state_dict().items()
        if k.startswith("head.")
        or k in {"mean", "scale"}
        or (k.startswith("layers.") and int(k.split(".")[1]) >= first)
    }


def _round_to_export(model: Encoder, first: int, model_dir: Path) -> dict[str, Array]:
    """The trained tensors' float16 differences from the packaged ones; the torch tensors
    become exactly what the export restores (packaged + difference), so torch and ONNX
    scores agree to float32 rounding."""
    base = _base_tensors(model_dir, first, model.num_layers)
    deltas: dict[str, Array] = {}
    with torch.no_grad():
        for i in range(first, model.num_layers):
            for name, tensor in model.layers[i].state_dict().items():
                key = checkpoint_name(i, name)
                deltas[key] = (tensor.numpy() - base[key]).astype(np.float16)
                tensor.copy_(torch.from_numpy(base[key] + deltas[key].astype(np.float32)))
    return deltas
