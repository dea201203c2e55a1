"""Who is calling: a key from the config (`api_keys_sha256`, TIERROUTE_API_KEYS: no limits)
or, with `gateway.virtual_keys: true`, a key made by `tierroute keys create` (its limits in a
KeyPolicy). With neither configured the gateway is open and every caller is anonymous.

Config keys are the operator's: they alone reach the admin surfaces (router rollback, the
dashboard's data, /metrics). Virtual keys are handed to tenants and reach their own
requests only. On an open gateway every caller is trusted alike."""

from __future__ import annotations

import logging
from dataclasses import dataclass

from tierroute.errors import LedgerError
from tierroute.gateway.schema import ApiError
from tierroute.gateway.settings import GatewaySettings
from tierroute.keys import Authoriser, KeyPolicy, hash_secret, key_id

log = logging.getLogger("tierroute.gateway")


@dataclass(frozen=True)
class Caller:
    """The authenticated caller: a key id (None when the gateway is open) and, for a
    virtual key, its policy (the limits the gateway enforces)."""

    key_id: str | None
    policy: KeyPolicy | None = None
    admin: bool = False  # a config key, or anyone on an open gateway

    @property
    def scope(self) -> str | None:
        """Whose tenants the caller's requests belong to: the key's tenant, else the key."""
        if self.policy is not None and self.policy.tenant is not None:
            return self.policy.tenant
        return self.key_id


def _bearer(authorization: str) -> str:
    if authorization[:7].lower() != "bearer ":
        return ""
    return authorization[7:].strip()


async def authenticate(
    settings: GatewaySettings, authoriser: Authoriser | None, authorization: str
) -> Caller:
    """The caller of a request with this Authorization header, or a 401 in OpenAI's format."""
    if not settings.api_key_hashes and authoriser is None:
        return Caller(None, admin=True)
    secret = _bearer(authorization)
    if secret and len(secret) <= 512:  # a longer one is no key of ours: do not hash it
        digest = hash_secret(secret)
        if digest in settings.api_key_hashes:
            return Caller(key_id(digest), admin=True)
        if authoriser is not None:
            try:
                policy = await authoriser.alookup(secret)
            except LedgerError as e:
                log.error("cannot check a virtual API key: %s", e)
                raise ApiError(
                    503,
                    "The gateway cannot check API keys right now (its database is "
                    "unreachable); retry shortly.",
                    type="api_error",
                    code="key_store_unavailable",
                ) from None
            if policy is not None:
                return Caller(policy.key_id, policy)
    raise ApiError(
        401,
        "Incorrect or missing API key: send 'Authorization: Bearer KEY'.",
        type="authentication_error",
        code="invalid_api_key",
    )


def require_admin(caller: Caller) -> None:
    """403 in OpenAI's format unless the caller holds one of the operator's keys."""
    if not caller.admin:
        raise ApiError(
            403,
            "This endpoint shows or changes the whole gateway: it needs one of the "
            "operator's keys (gateway.api_keys_sha256 or TIERROUTE_API_KEYS), not a "
            "virtual key.",
            type="permission_error",
            code="admin_key_required",
        )
