"""The ledger's command groups: `tierroute ledger migrate` and `tierroute keys`, and how
every command that reads the ledger finds it (`--ledger`, $TIERROUTE_LEDGER_URL, the
config's `ledger:`, else ledger.db in the data folder)."""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import Any

from tierroute.errors import InputError, LedgerError
from tierroute.ledger.backend import is_postgres_url
from tierroute.ledger.location import check_target, ledger_target
from tierroute.ledger.store import Ledger


def add_ledger_options(p: argparse.ArgumentParser, *, config: bool = True) -> None:
    p.add_argument(
        "--ledger",
        metavar="URL",
        help="postgresql://USER@HOST:PORT/DB, sqlite:PATH or a file (default: "
        "$TIERROUTE_LEDGER_URL, else the config's 'ledger:', else ledger.db in --data-dir)",
    )
    if config:
        p.add_argument("--config", metavar="FILE", help="gateway YAML naming the ledger")
    p.add_argument("--data-dir", metavar="DIR", help="where the default ledger file lives")


def target_of(args: argparse.Namespace) -> Path | str:
    """The ledger the command line names."""
    if getattr(args, "ledger", None):
        value: str = args.ledger
        if is_postgres_url(value) or value.startswith("sqlite:"):
            return check_target(value, "--ledger")
        return Path(value)
    configured = None
    if getattr(args, "config", None):
        from tierroute.gateway.settings import load_settings

        configured = load_settings(args.config).ledger
    return ledger_target(configured, Path(args.data_dir) if args.data_dir else None)


def open_ledger(target: Path | str, *, must_exist: bool = True) -> Ledger:
    """The ledger at `target`, or an error a user can act on: no such file, server down."""
    if must_exist and not is_postgres_url(target):
        path = Path(str(target).removeprefix("sqlite:"))
        if not path.is_file():
            raise InputError(
                f"no ledger at '{path}'; run `tierroute serve` first or pass --data-dir or --ledger"
            )
    ledger = Ledger(target)
    health = ledger.health()
    if not health.writable:  # a server that does not answer: say so now, not later
        ledger.close(raise_failures=False)
        raise LedgerError(
            f"cannot use the ledger at {ledger.location}: the server does not answer (the "
            "line above says why); check that PostgreSQL is up and the URL is right"
        )
    return ledger


def check_ledger(configured: str | None) -> list[str]:
    """For `config check`: a PostgreSQL ledger (the environment's, else the config's) is
    reached and its schema read, changing nothing; a file is left to `serve` to create."""
    target = ledger_target(configured)
    if not is_postgres_url(target):
        return []
    from tierroute.ledger.postgresql import SCHEMA_VERSION, PostgresBackend

    backend = PostgresBackend(str(target))
    try:
        conn = backend.open_reader()
        try:
            found = conn.execute("SELECT to_regclass('tierroute_schema') IS NOT NULL").fetchone()
            version = 0
            if found[0]:
                version = conn.execute("SELECT max(version) FROM tierroute_schema").fetchone()[0]
        finally:
            conn.close()
    except Exception as exc:
        if not backend.unavailable(exc):
            raise
        return [f"ledger {backend.location}: cannot connect ({str(exc).splitlines()[0]})"]
    if (version or 0) > SCHEMA_VERSION:
        return [f"ledger {backend.location}: schema {version} is newer than this tierroute's"]
    print(
        f"ledger {backend.location}: reached, schema {version or 0} of {SCHEMA_VERSION}"
        + (" (serve migrates it)" if (version or 0) < SCHEMA_VERSION else "")
    )
    return []


def key_names(ledger: Ledger) -> dict[str, str]:
    """Virtual keys' ids -> "name (tenant T)", for the report's key legend."""
    from tierroute.keys import KeyStore

    return {
        r.policy.key_id: r.policy.name
        + (f" (tenant {r.policy.tenant})" if r.policy.tenant else "")
        + ("" if r.active else " [revoked]")
        for r in KeyStore(ledger).list()
    }


def key_legend(names: dict[str, str], groups: list[str]) -> list[str]:
    """Which virtual key each key id of the report is (config keys have no name)."""
    shown = [g for g in groups if g in names]
    if not shown:
        return []
    return ["\nkeys", *(f"  {g:<14} {names[g]}" for g in shown)]


# ---------------------------------------------------------------- ledger migrate


def cmd_ledger_migrate(args: argparse.Namespace) -> int:
    from tierroute.ledger.transfer import copy_ledger

    source_arg: str = args.source
    if not (source_arg.startswith("sqlite:") or is_postgres_url(source_arg)):
        raise InputError("--from must be sqlite:PATH or a postgresql:// URL")
    target_arg: str = check_target(args.target, "--to")
    with open_ledger(source_arg) as source, open_ledger(target_arg, must_exist=False) as target:
        started = time.monotonic()
        results = copy_ledger(source, target, progress=print)
    copied = sum(r.inserted for r in results)
    print(
        f"copied {copied} rows from {source.location} to {target.location} in "
        f"{time.monotonic() - started:.1f}s; running it again copies nothing twice"
    )
    short = [r.table for r in results if r.target < r.source]
    if short:
        raise LedgerError(f"the target holds fewer rows than the source in {', '.join(short)}")
    return 0


# ---------------------------------------------------------------- keys


def _money(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number of USD: {text!r}") from None
    if not math.isfinite(value) or not 0 <= value <= 1e9:
        raise argparse.ArgumentTypeError(f"a USD budget is from 0 to 1e9 (got {text})")
    return value


def _per_minute(text: str) -> int:
    if not text.isdigit() or not 1 <= int(text) <= 10**9:
        raise argparse.ArgumentTypeError(f"a limit per minute is a whole number >= 1 ({text!r})")
    return int(text)


def _store(args: argparse.Namespace) -> tuple[Ledger, Any]:
    from tierroute.keys import KeyStore

    ledger = open_ledger(target_of(args), must_exist=False)
    return ledger, KeyStore(ledger)


def _describe(record: Any) -> dict[str, Any]:
    p = record.policy
    return {
        "key_id": p.key_id,
        "name": p.name,
        "tenant": p.tenant,
        "budget_usd_day": p.budget_usd_day,
        "budget_usd_month": p.budget_usd_month,
        "requests_per_minute": p.requests_per_minute,
        "tokens_per_minute": p.tokens_per_minute,
        "created": record.created,
        "revoked": record.revoked,
    }


def cmd_keys_create(args: argparse.Namespace) -> int:
    ledger, store = _store(args)
    with ledger:
        secret, record = store.create(
            args.name,
            tenant=args.tenant,
            budget_usd_day=args.budget_day,
            budget_usd_month=args.budget_month,
            requests_per_minute=args.rpm,
            tokens_per_minute=args.tpm,
        )
    if args.json:
        print(json.dumps({**_describe(record), "secret": secret}))
    else:
        print(f"created key {record.policy.key_id} ({record.policy.name}) in {ledger.location}")
        print(f"secret (shown once, stored only as its sha256): {secret}")
    return 0


def cmd_keys_list(args: argparse.Namespace) -> int:
    ledger, store = _store(args)
    with ledger:
        records = store.list()
    if args.json:
        print(json.dumps([_describe(r) for r in records], indent=2))
        return 0
    if not records:
        print(f"no keys in {ledger.location}; create one with `tierroute keys create NAME`")
        return 0

    def show(v: Any) -> str:
        return "-" if v is None else f"{v:g}" if isinstance(v, float) else str(v)

    print(
        f"{'key id':<13} {'name':<20} {'tenant':<12} {'$/day':>8} {'$/month':>8} "
        f"{'rpm':>6} {'tpm':>8}  state"
    )
    for r in records:
        p = r.policy
        state = (
            "active"
            if r.active
            else time.strftime("revoked %Y-%m-%d %H:%M UTC", time.gmtime(r.revoked))
        )
        print(
            f"{p.key_id:<13} {p.name[:20]:<20} {show(p.tenant)[:12]:<12} "
            f"{show(p.budget_usd_day):>8} {show(p.budget_usd_month):>8} "
            f"{show(p.requests_per_minute):>6} {show(p.tokens_per_minute):>8}  {state}"
        )
    return 0


def _state_of(args: argparse.Namespace) -> tuple[str | None, str]:
    """The Redis the gateways share (--state, $TIERROUTE_STATE_URL, the config's `state:`)
    and its key prefix (--state-prefix, the config's `gateway.state_prefix`)."""
    import os

    url = args.state or os.environ.get("TIERROUTE_STATE_URL")
    prefix = args.state_prefix
    if getattr(args, "config", None):
        from tierroute.gateway.settings import load_settings

        settings = load_settings(args.config)
        url = url or settings.state_url
        prefix = prefix or settings.state_prefix
    if url == "memory":
        url = None
    return url, prefix or "tierroute:"


def _publish(url: str, prefix: str, key: str) -> str | None:
    """Publish a revocation to the gateways' Redis; None, or why it could not be."""
    from tierroute.state.redis import publish_revocation, redact

    try:
        publish_revocation(url, prefix, key)
    except Exception as exc:  # redis.RedisError, OSError: the database holds it anyway
        return f"Redis at {redact(url)} did not take it ({type(exc).__name__}: {exc})"
    return None


def cmd_keys_revoke(args: argparse.Namespace) -> int:
    """Revoke in the database (the record), then publish the key id to the gateways'
    Redis, which every replica reads each beat: it is refused within about a beat, even by
    a replica that cannot reach the database. With the database down, a key id alone can
    still be published: refused at once, to be recorded when the database answers."""
    from tierroute.keys import KEY_ID_LENGTH

    url, prefix = _state_of(args)
    try:
        ledger, store = _store(args)
        with ledger:
            try:
                record = store.revoke(args.key)
            except InputError:
                # Revoked already (a run whose publication failed): publish it again.
                gone = [r for r in store.list() if args.key in (r.policy.key_id, r.policy.name)]
                if url is None or len(gone) != 1 or gone[0].active:
                    raise
                record = gone[0]
    except LedgerError as exc:
        is_id = len(args.key) == KEY_ID_LENGTH and all(c in "0123456789abcdef" for c in args.key)
        if url is None or not is_id:
            raise
        problem = _publish(url, prefix, args.key)
        if problem is not None:
            raise LedgerError(f"{exc}; and {problem}") from None
        print(
            f"the database did not record the revocation ({exc}); key {args.key} is "
            "published to the gateways' Redis, so every replica refuses it within a beat. "
            "Run this command again once the database answers, to record it there.",
            file=sys.stderr,
        )
        return 1
    key = record.policy.key_id
    if url is None:
        print(
            f"revoked key {key} ({record.policy.name}); every gateway refuses it within "
            "gateway.key_cache_ttl_s (5 s by default) while it can read the database"
        )
        return 0
    problem = _publish(url, prefix, key)
    if problem is not None:
        print(
            f"revoked key {key} ({record.policy.name}) in the database, but {problem}: "
            "gateways refuse it within gateway.key_cache_ttl_s while they can read the "
            "database; run this command again to publish it",
            file=sys.stderr,
        )
        return 1
    print(
        f"revoked key {key} ({record.policy.name}) and published it to the gateways' "
        "Redis: every replica refuses it within a beat (gateway.state_sync_s)"
    )
    return 0


def add_commands(sub: Any) -> None:
    """Register `ledger` and `keys` on the CLI's subparsers."""
    p = sub.add_parser("ledger", help="the request ledger's database")
    ledger_sub = p.add_subparsers(dest="ledger_command", required=True)
    m = ledger_sub.add_parser(
        "migrate", help="copy a ledger (all tables) into another; safe to run again"
    )
    m.add_argument("--from", dest="source", required=True, metavar="sqlite:PATH")
    m.add_argument("--to", dest="target", required=True, metavar="postgresql://...")
    m.set_defaults(func=cmd_ledger_migrate)

    p = sub.add_parser("keys", help="virtual API keys with budgets and rate limits")
    keys_sub = p.add_subparsers(dest="keys_command", required=True)
    c = keys_sub.add_parser("create", help="make a key; its secret is printed once")
    c.add_argument("name")
    c.add_argument("--tenant", help="the tenant its requests belong to")
    c.add_argument("--budget-day", type=_money, metavar="USD", help="spend per UTC day")
    c.add_argument("--budget-month", type=_money, metavar="USD", help="spend per UTC month")
    c.add_argument("--rpm", type=_per_minute, help="requests per minute")
    c.add_argument("--tpm", type=_per_minute, help="tokens per minute")
    c.add_argument("--json", action="store_true", help="print the key as JSON")
    add_ledger_options(c)
    c.set_defaults(func=cmd_keys_create)
    ls = keys_sub.add_parser("list", help="every key, revoked ones too (never secrets)")
    ls.add_argument("--json", action="store_true")
    add_ledger_options(ls)
    ls.set_defaults(func=cmd_keys_list)
    r = keys_sub.add_parser("revoke", help="revoke a key by its id or name")
    r.add_argument("key", metavar="KEY_ID_OR_NAME")
    r.add_argument(
        "--state",
        metavar="URL",
        help="the gateways' redis:// state, to publish the revocation to (default: "
        "$TIERROUTE_STATE_URL, else the config's 'state:')",
    )
    r.add_argument(
        "--state-prefix",
        metavar="PREFIX",
        help="its key prefix (default: the config's, or tierroute:)",
    )
    add_ledger_options(r)
    r.set_defaults(func=cmd_keys_revoke)
