"""Who is acting: the OS user and host, recorded with holds, approvals and certificates."""

from __future__ import annotations

import getpass
import os
import socket


def who() -> str:
    """Who is acting: the OS user and host (Airflow workers act as their service user)."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"
