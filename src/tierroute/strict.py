"""Strict checking of the YAML files users write.

Every config document goes through a pydantic model that refuses unknown keys, loose
types (`"false"` is not a bool, `"3"` is not a number) and values out of range. A
mistake becomes one ConfigError naming the file, the line, the key and what is wrong,
with the nearest known key when a name is misspelt (`breaker_failure` -> did you mean
`breaker_failures`?).
"""

from __future__ import annotations

import dataclasses
import difflib
import functools
import typing
from collections.abc import Mapping, Sequence
from typing import Any, TypeVar

import yaml
from pydantic import BaseModel, ConfigDict, ValidationError, create_model

from tierroute.errors import ConfigError

Path_ = tuple[str | int, ...]
Lines = Mapping[Path_, int]
M = TypeVar("M", bound=BaseModel)
D = TypeVar("D")


class StrictModel(BaseModel):
    """Unknown keys refused, no type coercion, no NaN or infinity."""

    model_config = ConfigDict(strict=True, extra="forbid", allow_inf_nan=False, frozen=True)


def key_lines(text: str) -> dict[Path_, int]:
    """The 1-based line of every key and list item of a YAML document, by its path."""
    try:
        root = yaml.compose(text)
    except yaml.YAMLError:
        return {}
    found: dict[Path_, int] = {}

    def walk(node: yaml.Node, path: Path_) -> None:
        if isinstance(node, yaml.MappingNode):
            for key, value in node.value:
                here = (*path, str(key.value))
                found[here] = key.start_mark.line + 1
                walk(value, here)
        elif isinstance(node, yaml.SequenceNode):
            for i, value in enumerate(node.value):
                found[(*path, i)] = value.start_mark.line + 1
                walk(value, (*path, i))

    if root is not None:
        walk(root, ())
    return found


def dotted(path: Sequence[str | int]) -> str:
    """`tiers[1].input_price_per_m` for ("tiers", 1, "input_price_per_m")."""
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def where(source: str, lines: Lines | None, path: Path_) -> str:
    """`source, line N` for the key at `path` (or its nearest enclosing key), else `source`."""
    found = lines or {}
    for n in range(len(path), 0, -1):
        if path[:n] in found:
            return f"{source}, line {found[path[:n]]}"
    return source


def _fields_at(model: type[BaseModel], path: Sequence[str | int]) -> list[str]:
    """The keys model `model` allows at `path` (for a misspelt key's suggestion)."""
    current: type[BaseModel] | None = model
    for part in path:
        if current is None:
            return []
        if isinstance(part, int):
            continue
        field = current.model_fields.get(part)
        current = _model_in(field.annotation) if field is not None else None
    return list(current.model_fields) if current is not None else []


def _model_in(annotation: Any) -> type[BaseModel] | None:
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return annotation
    for arg in typing.get_args(annotation):
        found = _model_in(arg)
        if found is not None:
            return found
    return None


def _describe(error: Mapping[str, Any], model: type[BaseModel], prefix: Path_) -> str:
    loc = tuple(error["loc"])
    if error["type"] == "extra_forbidden":
        known = _fields_at(model, loc[:-1])
        close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6)
        hint = f"; did you mean '{close[0]}'?" if close else f"; known keys: {', '.join(known)}"
        return f"unknown key '{dotted(prefix + loc)}'{hint}"
    if error["type"] == "missing":
        return f"'{dotted(prefix + loc)}' is required"
    value = error.get("input")
    shown = repr(value) if not isinstance(value, dict | list) else type(value).__name__
    message = str(error["msg"])
    if message.startswith("Value error, "):
        message = message.removeprefix("Value error, ")
    return f"'{dotted(prefix + loc)}' {message[0].lower()}{message[1:]} (got {shown[:80]})"


def check(
    model: type[M],
    data: Any,
    source: str,
    lines: Lines | None = None,
    prefix: Path_ = (),
) -> M:
    """`data` validated as `model`, or a ConfigError naming line, key and problem."""
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        errors = exc.errors()
        first = errors[0]
        at = where(source, lines, prefix + tuple(first["loc"]))
        more = f" (and {len(errors) - 1} more problem(s))" if len(errors) > 1 else ""
        raise ConfigError(f"{at}: {_describe(first, model, prefix)}{more}") from None


@functools.cache
def model_of(kind: type[Any]) -> type[StrictModel]:
    """A strict pydantic model with the fields of dataclass `kind` (one definition of the
    fields: the dataclass keeps its own range checks in __post_init__)."""
    hints = typing.get_type_hints(kind)
    spec: dict[str, Any] = {}
    for f in dataclasses.fields(kind):
        if f.default is not dataclasses.MISSING:
            spec[f.name] = (hints[f.name], f.default)
        elif f.default_factory is not dataclasses.MISSING:
            spec[f.name] = (hints[f.name], f.default_factory())
        else:
            spec[f.name] = (hints[f.name], ...)
    made: type[StrictModel] = create_model(kind.__name__, __base__=StrictModel, **spec)
    return made


def build_section(kind: type[D], data: Any, source: str, lines: Lines | None, prefix: Path_) -> D:
    """Dataclass `kind` from a checked mapping; its own range errors name the section."""
    checked = check(model_of(typing.cast(type, kind)), data, source, lines, prefix)
    try:
        return kind(**dict(checked))
    except ConfigError as exc:
        raise ConfigError(f"{where(source, lines, prefix)}: '{dotted(prefix)}': {exc}") from None
