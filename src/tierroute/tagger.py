"""Task and domain tags from labelled prototype utterances (resources/prototypes.yaml).

A request gets the class whose prototypes it is most similar to (mean of the top-3
cosine similarities), when that similarity reaches the group's `min_similarity` and
beats the runner-up class by `min_margin`; otherwise it gets the group's fallback.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from tierroute.encoder import Encoder
from tierroute.errors import ConfigError
from tierroute.yaml_files import read_yaml

TOP = 3


@dataclass(frozen=True)
class TagGroup:
    name: str
    classes: tuple[str, ...]
    min_similarity: float
    min_margin: float
    fallback: str
    utterances: tuple[tuple[str, str], ...]  # (class, utterance)


def load_prototypes(path: str | Path | None = None) -> list[TagGroup]:
    doc, source = read_yaml(path, "prototypes.yaml", "prototypes file")
    if not isinstance(doc, dict) or not doc:
        raise ConfigError(f"{source} must map group names (task, domain) to their classes")
    groups = []
    for name, spec in doc.items():
        classes = spec.get("classes") if isinstance(spec, dict) else None
        if not isinstance(classes, dict) or not classes:
            raise ConfigError(f"group '{name}' in {source} needs a 'classes' mapping")
        pairs: list[tuple[str, str]] = []
        for cls, examples in classes.items():
            if not isinstance(examples, list) or not all(isinstance(e, str) for e in examples):
                raise ConfigError(f"class '{cls}' in {source} needs a list of example utterances")
            pairs.extend((str(cls), e) for e in examples)
        groups.append(
            TagGroup(
                name=str(name),
                classes=tuple(str(c) for c in classes),
                min_similarity=float(spec.get("min_similarity", 0.2)),
                min_margin=float(spec.get("min_margin", 0.05)),
                fallback=str(spec.get("fallback", "general")),
                utterances=tuple(pairs),
            )
        )
    return groups


class Tagger:
    """Tags texts with one class per group; also exposes per-class similarities as features."""

    def __init__(self, encoder: Encoder, groups: Sequence[TagGroup] | None = None) -> None:
        self.encoder = encoder
        self.groups = list(groups) if groups is not None else load_prototypes()
        self._matrix: npt.NDArray[np.float32] | None = None
        self._columns: list[npt.NDArray[np.int64]] = []  # prototype rows of each class

    @property
    def feature_names(self) -> list[str]:
        return [f"{g.name}:{c}" for g in self.groups for c in g.classes]

    def _prototypes(self) -> npt.NDArray[np.float32]:
        if self._matrix is None:
            texts, owner = [], []
            for gi, group in enumerate(self.groups):
                for cls, utterance in group.utterances:
                    texts.append(utterance)
                    owner.append((gi, group.classes.index(cls)))
            self._columns = [
                np.array([r for r, o in enumerate(owner) if o == (gi, ci)], dtype=np.int64)
                for gi, group in enumerate(self.groups)
                for ci in range(len(group.classes))
            ]
            self._matrix = self.encoder.encode(texts)
        return self._matrix

    def similarities(self, vectors: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
        """[n, n_classes]: mean of the top-3 prototype similarities of each class."""
        sims = vectors @ self._prototypes().T
        columns = [np.sort(sims[:, rows], axis=1)[:, -TOP:].mean(axis=1) for rows in self._columns]
        return np.stack(columns, axis=1).astype(np.float32)

    def tags_from_similarities(self, sims: npt.NDArray[np.float32]) -> list[dict[str, str]]:
        out: list[dict[str, str]] = [{} for _ in range(len(sims))]
        start = 0
        for group in self.groups:
            block = sims[:, start : start + len(group.classes)]
            start += len(group.classes)
            ranked = np.sort(block, axis=1)
            best = block.argmax(axis=1)
            for i, j in enumerate(best):
                margin = ranked[i, -1] - ranked[i, -2] if block.shape[1] > 1 else 1.0
                ok = block[i, j] >= group.min_similarity and margin >= group.min_margin
                out[i][group.name] = group.classes[j] if ok else group.fallback
        return out

    def tag(self, text: str) -> Mapping[str, str]:
        vector = self.encoder.encode([text])
        return self.tags_from_similarities(self.similarities(vector))[0]

    def describe(self) -> dict[str, Any]:
        return {g.name: list(g.classes) for g in self.groups}
