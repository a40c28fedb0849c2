"""What every command group shares: exit codes, common options, argument types, error output."""

from __future__ import annotations

import argparse
import os
import sys
from datetime import date, datetime, timezone

DEFAULT_RULES_DIR = "retention_rules"

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2


def rules_options(cmd: argparse.ArgumentParser) -> None:
    """--rules, --category and --as-of, as every rules command takes them."""
    cmd.add_argument(
        "--rules", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR), metavar="DIR",
        help="rules directory (default: $RETENTION_RULES_DIR or ./retention_rules)",
    )
    cmd.add_argument("--category", help="only this category (all rules must still be valid)")
    cmd.add_argument("--as-of", type=instant_argument, metavar="T",
                     help="the instant retention is measured from (ISO 8601; default: now)")


def audit_option(cmd: argparse.ArgumentParser) -> None:
    """--audit, the audit database's connection id."""
    cmd.add_argument(
        "--audit", default=os.environ.get("RETENTION_AUDIT_CONN", "retention_audit"), metavar="CONN_ID",
        help="connection id of the audit database (default: $RETENTION_AUDIT_CONN or retention_audit)",
    )


def instant_argument(text: str) -> datetime:
    """A date (midnight UTC) or a timestamp with a zone, as a command-line argument."""
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or timestamp") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or an offset such as +02:00")
    try:
        return value.astimezone(timezone.utc)
    except OverflowError:  # 9999-12-31T23:59-01:00 is in year 10000 in UTC
        raise argparse.ArgumentTypeError(f"{text!r} is outside the years 1 to 9999 in UTC") from None


def count_argument(text: str, *, least: int = 0) -> int:
    """A whole number from ``least`` that a database's 64-bit integer holds, as a command-line argument."""
    if not (text.isascii() and text.isdigit()) or not least <= int(text) < 2**63:
        raise argparse.ArgumentTypeError(f"{text[:30]!r} is not a whole number from {least} to 2^63-1")
    return int(text)


def id_argument(text: str) -> int:
    """A seq or hold id: a whole number from 1 (SQLite raises OverflowError past 64 bits)."""
    return count_argument(text, least=1)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; write YYYY-MM-DD, e.g. 2027-01-31") from None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _err(message: str) -> None:
    from retention.connections import redact
    from retention.interfaces.render import shown

    # What the operator typed comes back in messages: its control characters are shown, not obeyed.
    print("\n".join(shown(line) for line in redact(message).split("\n")), file=sys.stderr)
