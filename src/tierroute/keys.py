"""Virtual API keys: what the gateway knows about an authenticated caller.

A key is stored in the ledger database as the sha256 of its secret (never the secret); its
public id is the first 12 hex digits of that hash, the same id config keys
(``api_keys_sha256``) already get. A key from the config has no limits; a virtual key
(``tierroute keys create``) carries the policy below, which the gateway enforces.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

KEY_ID_LENGTH = 12


@dataclass(frozen=True)
class KeyPolicy:
    key_id: str  # short public id, e.g. first 12 hex of the sha256
    name: str
    tenant: str | None
    budget_usd_day: float | None
    budget_usd_month: float | None
    requests_per_minute: int | None
    tokens_per_minute: int | None


def hash_secret(secret: str) -> str:
    """The sha256 hex digest a key is stored and looked up by."""
    return hashlib.sha256(secret.encode()).hexdigest()


def key_id(digest: str) -> str:
    """The public id of a key: the first 12 hex digits of its sha256."""
    return digest[:KEY_ID_LENGTH]
