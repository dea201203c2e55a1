"""Reading the YAML files users edit (tiers, rules, prototypes, gateway) with one kind of error."""

from __future__ import annotations

from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from tierroute.errors import ConfigError


def read_yaml(path: str | Path | None, builtin: str, what: str) -> tuple[Any, str]:
    """(document, source name) of `path`, or of the packaged resource `builtin` when None."""
    doc, source, _ = read_yaml_lines(path, builtin, what)
    return doc, source


def read_yaml_lines(
    path: str | Path | None, builtin: str, what: str
) -> tuple[Any, str, dict[tuple[str | int, ...], int]]:
    """As read_yaml, with the line of every key, so errors can point at it."""
    from tierroute.strict import key_lines

    if path is None:
        text = resources.files("tierroute.resources").joinpath(builtin).read_text()
        source = f"built-in {builtin}"
    else:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise ConfigError(f"cannot read {what} '{path}': {exc.strerror}") from None
        except UnicodeDecodeError:
            raise ConfigError(f"{what} '{path}' is not UTF-8 text; pass a YAML file") from None
        source = str(path)
    try:
        return yaml.safe_load(text), source, key_lines(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{source} is not valid YAML: {exc}") from None
