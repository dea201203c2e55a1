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


# Structure of a request that means the same in any format (issue 9): how much it asks
# for, not how a benchmark lays out its answer options.
_QUANTITY = re.compile(r"(?<![\w.])\d+(?:[.,]\d+)?%?")
_CONSTRAINT = re.compile(
    r"\b(must|should|without|at (?:least|most)|no more than|exactly|only|ensure|avoid|"
    r"cannot|do not|don't|never|within|under|require[sd]?|subject to|such that|given that)\b",
    re.IGNORECASE,
)
_STEP = re.compile(
    r"\b(then|first|second|third|next|finally|after|before|afterwards|each|every)\b",
    re.IGNORECASE,
)
_ASK = re.compile(
    r"\b(what|why|how|which|when|where|who|find|show|compute|determine|explain|write|"
    r"list|give|describe|implement|solve|estimate)\b",
    re.IGNORECASE,
)
_CODE_LINE = re.compile(
    r"^(?: {4}|\t)\S|[{};]\s*$|^\s*(?:def|class|import|from|return|for|while|if|#include|"
    r"public|private|fn|let|const|var|func|SELECT)\b",
    re.MULTILINE,
)
_SHORT_ANSWER = re.compile(
    r"\b(briefly|brief|short|one word|one sentence|in a word|yes or no|just the|only the)\b",
    re.IGNORECASE,
)
_LONG_ANSWER = re.compile(
    r"\b(detailed|in detail|comprehensive|thorough|essay|step by step|elaborate|full|"
    r"complete|every|all)\b|\b\d{3,} words\b",
    re.IGNORECASE,
)

STRUCTURE_NAMES = (
    "quantities",
    "constraints",
    "steps",
    "asks",
    "code_lines",
    "short_answer",
    "long_answer",
    "sentences",
)


def structure_features(texts: Sequence[str]) -> npt.NDArray[np.float32]:
    rows = []
    for text in texts:
        rows.append(
            [
                math.log1p(len(_QUANTITY.findall(text))),
                math.log1p(len(_CONSTRAINT.findall(text))),
                math.log1p(len(_STEP.findall(text))),
                math.log1p(len(_ASK.findall(text))),
                math.log1p(len(_CODE_LINE.findall(text))),
                float(bool(_SHORT_ANSWER.search(text))),
                math.log1p(len(_LONG_ANSWER.findall(text))),
                math.log1p(len(re.findall(r"[.!?](?:\s|$)", text))),
            ]
        )
    return np.asarray(rows, dtype=np.float32).reshape(len(texts), len(STRUCTURE_NAMES))


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


FEATURE_SETS = ("text", "structure", "structure-only")


def prompt_features(
    encoder: Encoder,
    texts: Sequence[str],
    tagger: Tagger | None = None,
    features: str = "text",
) -> npt.NDArray[np.float64]:
    """What learned routers read: the embedding (unless "structure-only"), tag similarities
    if a tagger is given, then the text features above ("text") and the structure
    features ("structure", "structure-only"), one row per text."""
    blocks: list[npt.NDArray[Any]] = []
    if features != "structure-only":
        vectors = encoder.encode(texts)
        blocks.append(vectors)
        if tagger is not None:
            blocks.append(tagger.similarities(vectors))
    blocks.append(text_features(texts))
    if features != "text":
        blocks.append(structure_features(texts))
    return np.hstack(blocks).astype(np.float64)
