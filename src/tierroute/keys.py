"""Virtual API keys: what the gateway knows about an authenticated caller.

A key is stored in the ledger database as the sha256 of its secret (never the secret); its
public id is the first 12 hex digits of that hash, the same id config keys
(``api_keys_sha256``) already get. A key from the config has no limits; a virtual key
(``tierroute keys create``) carries the policy below, which the gateway enforces.
"""

from __future__ import annotations

import hashlib
import math
import re
import secrets
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from tierroute.errors import InputError, LedgerError

if TYPE_CHECKING:
    from tierroute.ledger import Ledger

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


SECRET_PREFIX = "sk-tr-"
# How long a looked-up key (or its absence) is trusted: a revocation reaches every replica
# within this. Bounded, so a flood of made-up keys cannot grow the cache without end.
CACHE_TTL_S = 5.0
CACHE_MAX_ENTRIES = 10_000
# How long into a database outage a key the database confirmed is still accepted.
STALE_S = 300.0
_KEY_ID = re.compile(r"^[0-9a-f]{12}$")
_NAME = re.compile(r"^[\w.@:/+-][\w .@:/+-]{0,127}$")


@dataclass(frozen=True)
class KeyRecord:
    """A stored key as `tierroute keys list` shows it (the secret is not stored)."""

    policy: KeyPolicy
    created: float
    revoked: float | None

    @property
    def active(self) -> bool:
        return self.revoked is None


def _limit(value: float | None, what: str, *, integer: bool = False) -> Any:
    if value is None:
        return None
    if integer:
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 10**9:
            raise InputError(f"{what} must be a whole number from 1 to 1e9 (got {value!r})")
        return value
    if not isinstance(value, int | float) or not math.isfinite(value) or not 0 <= value <= 1e9:
        raise InputError(f"{what} must be a number of USD from 0 to 1e9 (got {value!r})")
    return float(value)


class KeyStore:
    """Virtual keys in the ledger database's `api_keys` table (either backend)."""

    _COLUMNS = (
        "key_id, name, tenant, budget_usd_day, budget_usd_month, requests_per_minute, "
        "tokens_per_minute, created, revoked"
    )

    def __init__(self, ledger: Ledger, clock: Callable[[], float] = time.time) -> None:
        self.ledger = ledger
        self.clock = clock

    def create(
        self,
        name: str,
        *,
        tenant: str | None = None,
        budget_usd_day: float | None = None,
        budget_usd_month: float | None = None,
        requests_per_minute: int | None = None,
        tokens_per_minute: int | None = None,
    ) -> tuple[str, KeyRecord]:
        """Store a new key; returns its secret (shown once, never stored) and its record."""
        for value, what in ((name, "the key's name"), (tenant, "the tenant")):
            if value is not None and not _NAME.match(value):
                raise InputError(
                    f"{what} must be 1 to 128 letters, digits, spaces or . @ : / + - _ "
                    f"(got {value!r})"
                )
        # A request's tenant is "<tenant or key id>/<user>": a tenant with a "/" (acme/x)
        # or shaped like a key id would share names with another key's tenants.
        if tenant is not None and ("/" in tenant or _KEY_ID.match(tenant)):
            raise InputError(
                f"the tenant {tenant!r} may not contain '/' nor be 12 hex digits "
                "(the shape of a key id): it prefixes its users' names"
            )
        policy_fields = dict(
            name=name,
            tenant=tenant,
            budget_usd_day=_limit(budget_usd_day, "the daily budget"),
            budget_usd_month=_limit(budget_usd_month, "the monthly budget"),
            requests_per_minute=_limit(requests_per_minute, "requests per minute", integer=True),
            tokens_per_minute=_limit(tokens_per_minute, "tokens per minute", integer=True),
        )
        if any(k.policy.name == name and k.active for k in self.list()):
            raise InputError(f"an active key is already named {name!r}; pick another name")
        secret = SECRET_PREFIX + secrets.token_urlsafe(32)
        digest = hash_secret(secret)
        created = float(self.clock())
        policy = KeyPolicy(key_id=key_id(digest), **policy_fields)
        self.ledger.write_now(
            f"INSERT INTO api_keys (key_hash, {self._COLUMNS}) VALUES (?,?,?,?,?,?,?,?,?,?)",
            (digest, *self._policy_params(policy), created, None),
        )
        return secret, KeyRecord(policy, created, None)

    @staticmethod
    def _policy_params(p: KeyPolicy) -> tuple[Any, ...]:
        return (
            p.key_id,
            p.name,
            p.tenant,
            p.budget_usd_day,
            p.budget_usd_month,
            p.requests_per_minute,
            p.tokens_per_minute,
        )

    @staticmethod
    def _record(r: Any) -> KeyRecord:
        return KeyRecord(KeyPolicy(*r[:7]), float(r[7]), None if r[8] is None else float(r[8]))

    def list(self) -> list[KeyRecord]:
        """Every key, revoked ones too, oldest first."""
        found = self.ledger.query(f"SELECT {self._COLUMNS} FROM api_keys ORDER BY created")
        return [self._record(r) for r in found]

    def revoke(self, key: str) -> KeyRecord:
        """Revoke the active key with this id or name; returns it as it now stands."""
        matches = [k for k in self.list() if k.active and key in (k.policy.key_id, k.policy.name)]
        if not matches:
            raise InputError(f"no active key with id or name {key!r}; see `tierroute keys list`")
        if len(matches) > 1:
            raise InputError(f"{key!r} names {len(matches)} keys; revoke one by its id")
        record = matches[0]
        revoked = float(self.clock())
        self.ledger.write_now(
            "UPDATE api_keys SET revoked = ? WHERE key_id = ? AND revoked IS NULL",
            (revoked, record.policy.key_id),
        )
        return KeyRecord(record.policy, record.created, revoked)

    def find(self, digest: str) -> KeyPolicy | None:
        """The active key whose secret hashes to `digest`, if any."""
        found = self.ledger.query(
            f"SELECT {self._COLUMNS} FROM api_keys WHERE key_hash = ? AND revoked IS NULL",
            (digest,),
        )
        return self._record(found[0]).policy if found else None


class Authoriser:
    """`lookup(secret)`: the KeyPolicy of an active virtual key, or None.

    Answers come from a cache trusted for `ttl_s` seconds, so a revocation recorded in the
    database is seen within that on every replica. Keys that exist and secrets that do not
    are cached apart, so a flood of made-up secrets cannot push real keys out.

    While the database cannot be read, a key it confirmed within the last `stale_s`
    seconds keeps working (an outage of a few minutes does not stop every tenant); an
    older one, or a secret never looked up, raises LedgerError (the caller cannot be told
    yes or no). The database is then asked again at most every `retry_s` seconds, not on
    every request. Key ids in `denied` (revocations published through the shared state,
    see gateway/sync.py) are refused whatever the cache or the database says."""

    def __init__(
        self,
        store: KeyStore,
        ttl_s: float = CACHE_TTL_S,
        max_entries: int = CACHE_MAX_ENTRIES,
        clock: Callable[[], float] = time.monotonic,
        stale_s: float = STALE_S,
        retry_s: float = 1.0,
    ) -> None:
        self.store = store
        self.ttl_s = ttl_s
        self.stale_s = stale_s
        self.retry_s = retry_s
        self.max_entries = max(1, max_entries)
        self.clock = clock
        # digest -> (policy, when the database last confirmed it)
        self._keys: OrderedDict[str, tuple[KeyPolicy, float]] = OrderedDict()
        self._unknown: OrderedDict[str, float] = OrderedDict()  # digest -> when looked up
        self._lock = threading.Lock()
        self._down_until = -math.inf  # no database lookup before this (it just failed)
        self._down_error: LedgerError | None = None
        self.denied: frozenset[str] = frozenset()

    def deny(self, key_ids: Iterable[str]) -> None:
        """Refuse these key ids from now on (revocation is for good: the set only grows)."""
        self.denied = self.denied | frozenset(key_ids)

    def _allowed(self, policy: KeyPolicy | None) -> KeyPolicy | None:
        return None if policy is None or policy.key_id in self.denied else policy

    def cached(self, secret: str) -> tuple[bool, KeyPolicy | None]:
        """(fresh, policy) from the cache: fresh is False when the database must be asked."""
        return self._cached(hash_secret(secret))

    def _cached(self, digest: str) -> tuple[bool, KeyPolicy | None]:
        now = self.clock()
        with self._lock:
            known = self._keys.get(digest)
            unknown = self._unknown.get(digest)
        if known is not None and now - known[1] < self.ttl_s:
            return True, self._allowed(known[0])
        if unknown is not None and now - unknown < self.ttl_s:
            return True, None
        return False, None

    def _stale(self, digest: str, error: LedgerError) -> KeyPolicy | None:
        """The answer while the database cannot be read: a key confirmed recently enough."""
        with self._lock:
            known = self._keys.get(digest)
        if known is not None and self.clock() - known[1] < self.stale_s:
            return self._allowed(known[0])
        raise error

    def lookup(self, secret: str) -> KeyPolicy | None:
        digest = hash_secret(secret)
        fresh, policy = self._cached(digest)
        if fresh:
            return policy
        if self.clock() < self._down_until and self._down_error is not None:
            return self._stale(digest, self._down_error)
        try:
            policy = self.store.find(digest)
        except LedgerError as e:
            self._down_until = self.clock() + self.retry_s
            self._down_error = e
            return self._stale(digest, e)
        self._down_until = -math.inf
        now = self.clock()
        with self._lock:
            if policy is None:
                self._keys.pop(digest, None)
                cache: OrderedDict[str, Any] = self._unknown
                cache[digest] = now
            else:
                cache = self._keys
                cache[digest] = (policy, now)
            cache.move_to_end(digest)
            while len(cache) > self.max_entries:
                cache.popitem(last=False)
        return self._allowed(policy)

    async def alookup(self, secret: str) -> KeyPolicy | None:
        """`lookup` that asks the database in a worker thread (only on a cache miss)."""
        fresh, policy = self.cached(secret)
        if fresh:
            return policy
        import asyncio

        return await asyncio.to_thread(self.lookup, secret)
