"""Keyword / regex / length / tag rules with weights, read from a YAML file.

score = sigmoid(bias + the sum of the weights of the matching rules). Rules on `task`
or `domain` use the semantic tagger; rules on `ask` read what the instruction asks for
(`tierroute.asks`: proof, design, edit, lookup, ...) from its structure, with no model;
a rule's `min_tier` sets a floor for the policy.
The default rule set is resources/rules.yaml.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np

from tierroute.asks import ASK_KINDS, ask_kind
from tierroute.errors import ConfigError
from tierroute.routers.base import BaseRouter, Scores, sigmoid
from tierroute.tagger import Tagger
from tierroute.types import Explanation
from tierroute.yaml_files import read_yaml

_KNOWN_KEYS = {
    "name",
    "regex",
    "keywords",
    "min_chars",
    "max_chars",
    "task",
    "domain",
    "ask",
    "weight",
    "min_tier",
}


@dataclass(frozen=True)
class Rule:
    name: str
    weight: float
    regex: re.Pattern[str] | None = None
    min_chars: int | None = None
    max_chars: int | None = None
    tags: tuple[tuple[str, frozenset[str]], ...] = ()
    min_tier: str | None = None

    def matches(self, text: str, tags: Mapping[str, str]) -> bool:
        conditions = []
        if self.regex is not None:
            conditions.append(self.regex.search(text) is not None)
        if self.min_chars is not None:
            conditions.append(len(text) >= self.min_chars)
        if self.max_chars is not None:
            conditions.append(len(text) <= self.max_chars)
        for group, allowed in self.tags:
            conditions.append(tags.get(group) in allowed)
        return bool(conditions) and all(conditions)


@dataclass(frozen=True)
class RuleSet:
    bias: float
    rules: tuple[Rule, ...]
    source: str

    @property
    def uses_tags(self) -> bool:
        """Whether a rule needs the semantic tagger (task or domain; `ask` needs none)."""
        return any(group in _TAGGER_GROUPS for rule in self.rules for group, _ in rule.tags)

    @property
    def uses_asks(self) -> bool:
        return any(group == "ask" for rule in self.rules for group, _ in rule.tags)


_TAGGER_GROUPS = ("task", "domain")


def _as_set(value: Any) -> frozenset[str]:
    return frozenset(str(v) for v in (value if isinstance(value, list) else [value]))


def parse_rules(doc: Any, source: str) -> RuleSet:
    if not isinstance(doc, dict) or not isinstance(doc.get("rules"), list):
        raise ConfigError(f"{source} must have a 'rules' list (see the built-in rules.yaml)")
    rules = []
    for i, spec in enumerate(doc["rules"], start=1):
        if not isinstance(spec, dict) or "weight" not in spec:
            raise ConfigError(f"rule {i} in {source} needs at least a 'weight' and a condition")
        unknown = set(spec) - _KNOWN_KEYS
        if unknown:
            raise ConfigError(
                f"rule {i} in {source} has unknown keys: {', '.join(sorted(unknown))}"
            )
        name = str(spec.get("name", f"rule{i}"))
        patterns = []
        if "regex" in spec:
            patterns.append(str(spec["regex"]))
        if "keywords" in spec:
            words = [re.escape(str(w)) for w in spec["keywords"]]
            patterns.append(r"\b(?:" + "|".join(words) + r")\b")
        try:
            regex = (
                re.compile("|".join(f"(?:{p})" for p in patterns), re.I | re.M)
                if patterns
                else None
            )
        except re.error as exc:
            raise ConfigError(f"rule '{name}' in {source} has a bad regex: {exc}") from None
        tags = tuple((g, _as_set(spec[g])) for g in (*_TAGGER_GROUPS, "ask") if g in spec)
        unknown_asks = dict(tags).get("ask", frozenset()) - set(ASK_KINDS)
        if unknown_asks:
            raise ConfigError(
                f"rule '{name}' in {source} has unknown ask kinds "
                f"{', '.join(sorted(unknown_asks))}; known: {', '.join(ASK_KINDS)}"
            )
        rule = Rule(
            name=name,
            weight=float(spec["weight"]),
            regex=regex,
            min_chars=int(spec["min_chars"]) if "min_chars" in spec else None,
            max_chars=int(spec["max_chars"]) if "max_chars" in spec else None,
            tags=tags,
            min_tier=str(spec["min_tier"]) if "min_tier" in spec else None,
        )
        if regex is None and rule.min_chars is None and rule.max_chars is None and not tags:
            raise ConfigError(f"rule '{name}' in {source} has no condition")
        rules.append(rule)
    return RuleSet(bias=float(doc.get("bias", 0.0)), rules=tuple(rules), source=source)


def load_rules(path: str | Path | None = None) -> RuleSet:
    return parse_rules(*read_yaml(path, "rules.yaml", "rules file"))


class RulesRouter(BaseRouter):
    kind: ClassVar[str] = "rules"

    def __init__(self, rules: RuleSet | None = None, tagger: Tagger | None = None) -> None:
        self.rules = rules or load_rules()
        self.tagger = tagger
        if self.rules.uses_tags and tagger is None:
            raise ConfigError(
                f"{self.rules.source} has task/domain rules, which need the semantic tagger"
            )

    def _tags(self, texts: Sequence[str]) -> list[dict[str, str]]:
        if self.tagger is None or not self.rules.uses_tags:
            tags: list[dict[str, str]] = [{} for _ in texts]
        else:
            vectors = self.tagger.encoder.encode(texts)
            tags = self.tagger.tags_from_similarities(self.tagger.similarities(vectors))
        if self.rules.uses_asks:
            for text, found in zip(texts, tags, strict=True):
                found["ask"] = ask_kind(text)
        return tags

    def _evaluate(self, text: str, tags: Mapping[str, str]) -> tuple[float, list[Rule]]:
        hits = [rule for rule in self.rules.rules if rule.matches(text, tags)]
        return float(sigmoid(self.rules.bias + sum(r.weight for r in hits))), hits

    def score_texts(self, texts: Sequence[str]) -> Scores:
        tags = self._tags(texts)
        return np.array(
            [self._evaluate(t, g)[0] for t, g in zip(texts, tags, strict=True)], dtype=np.float64
        )

    def explain_text(self, text: str) -> Explanation:
        return self.explain_texts([text])[0]

    def explain_texts(self, texts: Sequence[str]) -> list[Explanation]:
        out = []
        for text, tags in zip(texts, self._tags(texts), strict=True):
            score, hits = self._evaluate(text, tags)
            floors = [rule.min_tier for rule in hits if rule.min_tier]
            reasons = tuple(f"rule {rule.name} ({rule.weight:+.1f})" for rule in hits)
            out.append(
                Explanation(
                    score=score,
                    reasons=reasons or ("no rule matched",),
                    min_tiers=tuple(floors),
                    tags=tags,
                )
            )
        return out

    def get_params(self) -> dict[str, Any]:
        return {"rules": self.rules.source}
