"""Where tierroute keeps files: caches and data. Resolved when asked, never at import."""

from __future__ import annotations

import os
from pathlib import Path


def cache_dir() -> Path:
    """TIERROUTE_CACHE_DIR, else the user's cache folder (built models, embedding cache)."""
    env = os.environ.get("TIERROUTE_CACHE_DIR")
    if env:
        return Path(env)
    from platformdirs import user_cache_dir

    return Path(user_cache_dir("tierroute"))


def data_dir() -> Path:
    """TIERROUTE_DATA_DIR, else the user's data folder (ledger)."""
    env = os.environ.get("TIERROUTE_DATA_DIR")
    if env:
        return Path(env)
    from platformdirs import user_data_dir

    return Path(user_data_dir("tierroute"))
