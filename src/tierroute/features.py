"""Cheap, format-agnostic text features for learned routers.

Nothing here keys on a benchmark's answer format: only length, shape and notation
that mark hard requests in any kind of traffic.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

if TYPE_CHECKING:
    from tierroute.encoder import Encoder
    from tierroute.tagger import Tagger

_MATH = re.compile(r"[=<>^∑∫√±≤≥≠∞π]|\\frac|\\sum|\d\s*[*/^]\s*\d")
_CODE = re.compile(r"```|\bdef |\bclass |#include|\breturn\b|[{};]\s*$", re.MULTILINE)
_DIGIT = re.compile(r"\d")
_QUESTION = re.compile(r"\?")
_HARD_WORDS = re.compile(
    r"\b(prove|proof|derive|why|explain|analy[sz]e|compare|design|optimi[sz]e|calculate|"
    r"evaluate|implement|step)\b",
    re.IGNORECASE,
)

FEATURE_NAMES = (
    "log_chars",
    "log_words",
    "log_lines",
    "mean_word_len",
    "digit_frac",
    "math_marks",
    "code_marks",
    "questions",
    "hard_words",
    "upper_frac",
)


def text_features(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    rows = []
    for text in texts:
        chars = len(text)
        words = text.split()
        n_words = max(len(words), 1)
        rows.append(
            [
                math.log1p(chars),
                math.log1p(len(words)),
                math.log1p(text.count("\n")),
                sum(len(w) for w in words) / n_words,
                len(_DIGIT.findall(text)) / max(chars, 1),
                math.log1p(len(_MATH.findall(text))),
                math.log1p(len(_CODE.findall(text))),
                math.log1p(len(_QUESTION.findall(text))),
                math.log1p(len(_HARD_WORDS.findall(text))),
                sum(c.isupper() for c in text) / max(chars, 1),
            ]
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(FEATURE_NAMES))


def prompt_features(
    encoder: Encoder, texts: Sequence[str], tagger: Tagger | None = None
) -> npt.NDArray[np.float64]:
    """What learned routers read: the embedding, tag similarities if a tagger is given,
    then the text features above, one row per text."""
    vectors = encoder.encode(texts)
    blocks: list[npt.NDArray[Any]] = [vectors]
    if tagger is not None:
        blocks.append(tagger.similarities(vectors))
    blocks.append(text_features(texts))
    return np.hstack(blocks).astype(np.float64)
