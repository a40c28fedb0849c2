"""``retention report``: the period's purge report an auditor files (placeholder, filled below)."""

from __future__ import annotations


def register(commands) -> None:
    """Add ``retention report`` to the CLI's subparsers."""
