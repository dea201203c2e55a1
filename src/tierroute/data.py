"""Outcome files: per-query quality scores of several models (JSON Lines).

One row per query: {"id", "dataset", "subset", "prompt", "models": {name: {"score",
"cost_usd"?}}, "meta": {...}}. `load_outcomes` reads a file and keeps the rows that
have a score for both the small and the large model.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierroute.errors import DataError

FloatArray = npt.NDArray[np.float64]

# One model under the names different outcome files give it, so routers trained on
# several files (and the model vectors of a factor router) see one model, not two.
MODEL_ALIASES = {
    "gpt4_1106_preview": "gpt-4-1106-preview",
    "mistralai/Mixtral-8x7B-Instruct-v0.1": "mistralai/mixtral-8x7b-chat",
    "Mixtral-8x7B-Instruct-v0.1": "mistralai/mixtral-8x7b-chat",
}


def canonical_model(name: str) -> str:
    return MODEL_ALIASES.get(name, name)


@dataclass(frozen=True)
class ModelScores:
    """Every model's score on every row (NaN where a model was not run), by canonical name.

    This is what routers that learn from all models at once (the factor router) train
    on; pair routers only need `Outcomes.labels`."""

    models: list[str]
    scores: FloatArray

    def column(self, model: str) -> FloatArray:
        name = canonical_model(model)
        if name not in self.models:
            raise DataError(f"model '{model}' has no scores here; models: {', '.join(self.models)}")
        column: FloatArray = self.scores[:, self.models.index(name)]
        return column


@dataclass(frozen=True)
class Outcomes:
    """Rows of one outcome file for one (small, large) model pair."""

    path: str
    data_hash: str
    small_model: str
    large_model: str
    ids: list[str]
    prompts: list[str]
    small: FloatArray
    large: FloatArray
    small_cost: FloatArray | None
    large_cost: FloatArray | None
    rows: list[dict[str, Any]]
    skipped: int = 0

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        """1 where the large model did strictly better: the small tier was not enough."""
        return (self.large > self.small).astype(np.int64)

    def model_scores(self, key: str = "score") -> ModelScores:
        """Every model's `score` (or `cost_usd`) on these rows, not only the pair's."""
        names = sorted({canonical_model(m) for row in self.rows for m in row["models"]})
        scores = np.full((len(self.rows), len(names)), np.nan)
        for i, row in enumerate(self.rows):
            for model, entry in row["models"].items():
                value = entry.get(key) if isinstance(entry, dict) else None
                if isinstance(value, int | float):
                    scores[i, names.index(canonical_model(model))] = float(value)
        return ModelScores(models=names, scores=scores)

    @property
    def has_cost(self) -> bool:
        return self.small_cost is not None and self.large_cost is not None

    def field(self, name: str) -> list[str]:
        """Values of a dotted field (e.g. `meta.domain`, `subset`) for every row."""
        return [str(field_value(row, name)) for row in self.rows]

    def subset(self, index: Sequence[int] | npt.NDArray[np.int64]) -> Outcomes:
        idx = np.asarray(index, dtype=np.int64)
        return Outcomes(
            path=self.path,
            data_hash=self.data_hash,
            small_model=self.small_model,
            large_model=self.large_model,
            ids=[self.ids[i] for i in idx],
            prompts=[self.prompts[i] for i in idx],
            small=self.small[idx],
            large=self.large[idx],
            small_cost=None if self.small_cost is None else self.small_cost[idx],
            large_cost=None if self.large_cost is None else self.large_cost[idx],
            rows=[self.rows[i] for i in idx],
            skipped=self.skipped,
        )


def concat_outcomes(parts: Sequence[Outcomes]) -> Outcomes:
    """Several files' rows for one model pair as one set (models joined by canonical name)."""
    if len(parts) == 1:
        return parts[0]
    with_cost = all(p.small_cost is not None and p.large_cost is not None for p in parts)

    def join(arrays: list[FloatArray | None]) -> FloatArray:
        return np.concatenate([a for a in arrays if a is not None])

    return Outcomes(
        path=" + ".join(p.path for p in parts),
        data_hash=hashlib.sha256("".join(p.data_hash for p in parts).encode()).hexdigest(),
        small_model=canonical_model(parts[0].small_model),
        large_model=canonical_model(parts[0].large_model),
        ids=[i for p in parts for i in p.ids],
        prompts=[t for p in parts for t in p.prompts],
        small=join([p.small for p in parts]),
        large=join([p.large for p in parts]),
        small_cost=join([p.small_cost for p in parts]) if with_cost else None,
        large_cost=join([p.large_cost for p in parts]) if with_cost else None,
        rows=[r for p in parts for r in p.rows],
        skipped=sum(p.skipped for p in parts),
    )


def file_model_scores(parts: Sequence[tuple[str, Outcomes]]) -> ModelScores:
    """Every model's scores in several files, one column per (file tag, model): "tag:model".

    A model's ability is then learned per file, so files of different difficulty, answer
    formats and scoring scales do not pull one model's ability apart, and only what is
    hard within each file teaches the shared difficulty. Scores in [-1, 1] (pairwise
    verdicts, as Arena-Hard's) are mapped to [0, 1]; rows are stacked in order."""
    tables = [(tag, o.model_scores()) for tag, o in parts]
    names = [f"{tag}:{m}" for tag, t in tables for m in t.models]
    out = np.full((sum(len(t.scores) for _, t in tables), len(names)), np.nan)
    row, col = 0, 0
    for _, t in tables:
        block = t.scores
        if np.nanmin(block) < 0:
            block = (block + 1.0) / 2.0
        out[row : row + len(block), col : col + block.shape[1]] = block
        row, col = row + len(block), col + block.shape[1]
    return ModelScores(models=names, scores=out)


def field_value(row: dict[str, Any], name: str) -> Any:
    value: Any = row
    for part in name.split("."):
        if not isinstance(value, dict) or part not in value:
            raise DataError(
                f"rows have no field '{name}'; name a field such as meta.domain or subset"
            )
        value = value[part]
    return value


def file_hash(path: str | Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def read_rows(path: str | Path) -> list[dict[str, Any]]:
    """Every row of a JSON Lines outcome file, with a clear error for a bad one."""
    p = Path(path)
    if not p.is_file():
        raise DataError(f"data file '{p}' not found; pass the path of a JSON Lines outcome file")
    rows: list[dict[str, Any]] = []
    with p.open("rb") as handle:
        for number, raw in enumerate(handle, start=1):
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                raise DataError(
                    f"line {number} of '{p}' is not UTF-8 text; pass a JSON Lines outcome file"
                ) from None
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(
                    f"line {number} of '{p}' is not valid JSON ({exc.msg}); fix or remove that line"
                ) from None
            except RecursionError:
                raise DataError(f"line {number} of '{p}' is nested too deeply") from None
            if not isinstance(row, dict) or not isinstance(row.get("models"), dict):
                raise DataError(
                    f"line {number} of '{p}' has no 'models' object; each row needs "
                    '{"id", "prompt", "models": {name: {"score": ...}}}'
                )
            if not isinstance(row.get("prompt"), str) or "id" not in row:
                raise DataError(f"line {number} of '{p}' needs a string 'prompt' and an 'id'")
            rows.append(row)
    if not rows:
        raise DataError(f"data file '{p}' holds no rows")
    return rows


def parse_where(where: Sequence[str]) -> list[tuple[str, str]]:
    pairs = []
    for clause in where:
        if "=" not in clause:
            raise DataError(f"--where '{clause}' must look like FIELD=VALUE, e.g. meta.split=test")
        name, value = clause.split("=", 1)
        pairs.append((name.strip(), value.strip()))
    return pairs


def _present_name(model: str, present: set[str]) -> str:
    if model in present:
        return model
    matches = [p for p in present if canonical_model(p) == canonical_model(model)]
    return matches[0] if len(matches) == 1 else model


def load_outcomes(
    path: str | Path,
    small_model: str,
    large_model: str,
    where: Sequence[str] = (),
) -> Outcomes:
    """Rows of `path` scored for both models (and matching every FIELD=VALUE in `where`)."""
    rows = read_rows(path)
    present: set[str] = set()
    for row in rows:
        present.update(row["models"])
    # A model may be named as another file names it (see MODEL_ALIASES).
    small_model, large_model = (_present_name(m, present) for m in (small_model, large_model))
    for model in (small_model, large_model):
        if model not in present:
            names = ", ".join(sorted(present)[:12])
            raise DataError(f"model '{model}' is not in '{path}'; models there include: {names}")
    for name, value in parse_where(where):
        rows = [row for row in rows if str(field_value(row, name)) == value]
        if not rows:
            raise DataError(f"no row of '{path}' has {name}={value}")

    kept: list[dict[str, Any]] = []
    for row in rows:
        models = row["models"]
        if all(
            isinstance(models.get(m), dict) and isinstance(models[m].get("score"), int | float)
            for m in (small_model, large_model)
        ):
            kept.append(row)
    if not kept:
        raise DataError(
            f"no row of '{path}' has scores for both '{small_model}' and '{large_model}'"
        )

    def scores(model: str, key: str) -> FloatArray:
        return np.array([float(r["models"][model][key]) for r in kept], dtype=np.float64)

    has_cost = all("cost_usd" in r["models"][m] for r in kept for m in (small_model, large_model))
    return Outcomes(
        path=str(path),
        data_hash=file_hash(path),
        small_model=small_model,
        large_model=large_model,
        ids=[str(r["id"]) for r in kept],
        prompts=[r["prompt"] for r in kept],
        small=scores(small_model, "score"),
        large=scores(large_model, "score"),
        small_cost=scores(small_model, "cost_usd") if has_cost else None,
        large_cost=scores(large_model, "cost_usd") if has_cost else None,
        rows=kept,
        skipped=len(rows) - len(kept),
    )
