"""The request ledger (SQLite, one row per request) and the savings report drawn from it."""

from __future__ import annotations

from tierroute.errors import LedgerClosedError, LedgerError
from tierroute.ledger.report import (
    SavingsReport,
    TierStats,
    build_report,
    feedback_by_tier,
    format_report,
    parse_since,
    percentile,
    plot_report,
    report_csv,
    report_json,
)
from tierroute.ledger.store import (
    MIGRATIONS,
    SCHEMA_VERSION,
    Feedback,
    Ledger,
    LedgerHealth,
    LedgerRow,
    PolicyChange,
    default_path,
    migrate,
)

__all__ = [
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Feedback",
    "Ledger",
    "LedgerClosedError",
    "LedgerError",
    "LedgerHealth",
    "LedgerRow",
    "PolicyChange",
    "SavingsReport",
    "TierStats",
    "build_report",
    "default_path",
    "feedback_by_tier",
    "format_report",
    "migrate",
    "parse_since",
    "percentile",
    "plot_report",
    "report_csv",
    "report_json",
]
