"""Shared state of gateway replicas behind one protocol (see base.py)."""

from __future__ import annotations

from tierroute.errors import ConfigError
from tierroute.state.base import Ask, BreakerView, SharedState, Snapshot, Verdict
from tierroute.state.memory import MemoryState

__all__ = ["Ask", "BreakerView", "MemoryState", "SharedState", "Snapshot", "Verdict", "open_state"]


def open_state(
    url: str | None, prefix: str = "tierroute:", cache_size: int = 10_000
) -> SharedState:
    """The state a URL names: None or "memory" for this process, redis:// (rediss://,
    unix://) for Redis. Nothing connects until `start()`."""
    if url is None or url == "memory":
        return MemoryState(cache_size)
    if url.startswith(("redis://", "rediss://", "unix://")):
        from tierroute.state.redis import RedisState

        return RedisState(url, prefix, cache_size=cache_size)
    raise ConfigError(f"state '{url}': use 'memory' or a redis://host:port/db URL")
