"""The errors tierroute raises, all under one root so callers can catch them together.

    TierrouteError                  anything tierroute reports to a user
    ├── DataError                   an outcome file is missing, garbled or lacks a model
    ├── ConfigError                 a YAML file (tiers, rules, prototypes) is invalid
    ├── ArtifactError               a saved router is missing, of another format, or misused
    ├── RouterError                 an unknown router name or a router used before `fit`
    ├── InputError                  a request that cannot be routed (e.g. an empty prompt)
    ├── MissingDependencyError      an optional extra is not installed
    ├── ModelIntegrityError         a local model file's size or sha256 is wrong
    ├── LedgerError                 the ledger cannot be opened or written
    │   └── LedgerClosedError       a ledger used after close()
    └── BackendError                a tier failed to answer (tierroute.backends.base)

Every message is one sentence that says what went wrong and what to do about it.
"""

from __future__ import annotations


class TierrouteError(Exception):
    """Root of every error tierroute raises on purpose."""


class DataError(TierrouteError):
    pass


class ConfigError(TierrouteError):
    pass


class ArtifactError(TierrouteError):
    pass


class RouterError(TierrouteError):
    pass


class InputError(TierrouteError):
    pass


class MissingDependencyError(TierrouteError):
    pass


class ModelIntegrityError(TierrouteError):
    """A model file's size or sha256 differs from the registry (corrupt or tampered)."""


class LedgerError(TierrouteError):
    """The ledger file cannot be opened or written, or a report was asked something invalid."""


class LedgerClosedError(LedgerError):
    """A ledger was used after `close()`."""
