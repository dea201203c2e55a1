"""Where the ledger lives: `$TIERROUTE_LEDGER_URL`, else the gateway config's `ledger:`, else
`ledger.db` in the data folder. The environment wins so that one config file serves every
replica while each deployment names its own database (and keeps its password out of YAML)."""

from __future__ import annotations

import os
import re
from pathlib import Path
from typing import Final

from tierroute.errors import ConfigError

LEDGER_URL_ENV: Final = "TIERROUTE_LEDGER_URL"
# postgresql://[user[:password]@]host[:port]/database[?options] (libpq's URL), or sqlite:PATH
LEDGER_PATTERN: Final = r"^(postgresql://|postgres://|sqlite:)\S+$"
MAX_LENGTH: Final = 4096


def check_target(value: str, source: str) -> str:
    """`value` if it names a ledger, else a ConfigError saying the accepted forms."""
    if len(value) > MAX_LENGTH or not re.match(LEDGER_PATTERN, value):
        raise ConfigError(
            f"{source}: the ledger must be postgresql://USER@HOST:PORT/DATABASE or "
            "sqlite:PATH (no spaces)"
        )
    return value


def ledger_target(configured: str | None = None, data_dir: Path | None = None) -> Path | str:
    """The ledger to open: the environment's URL, the configured one, or the default file."""
    from tierroute.ledger.store import default_path

    env = os.environ.get(LEDGER_URL_ENV, "").strip()
    if env:
        return check_target(env, f"${LEDGER_URL_ENV}")
    if configured:
        return configured
    return default_path(data_dir)
