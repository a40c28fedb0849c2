"""Who is acting: the OS user and host, recorded with holds, approvals and certificates; and the
text a person types for the record (request and case ids, reasons), checked before it is kept."""

from __future__ import annotations

import getpass
import os
import socket
import unicodedata

from retention.errors import ConfigError

_UNSEEN = {"Cc", "Cf", "Zl", "Zp"}
"""Control, format (bidi overrides, zero-width) and line/paragraph separators: they rewrite a
terminal, forge log lines, or make two ids that look the same differ."""


def who() -> str:
    """Who is acting: the OS user and host (Airflow workers act as their service user)."""
    try:
        user = getpass.getuser()
    except Exception:  # no passwd entry in some containers
        user = os.environ.get("USER", "unknown")
    return f"{user}@{socket.gethostname()}"


def check_typed_text(field: str, value: str, *, an_id: bool = False) -> None:
    """ConfigError naming ``field`` when ``value`` holds a control or invisible character, or (an
    id) begins or ends with a space: such text is shown to people and must read as it is."""
    for char in value:
        if unicodedata.category(char) in _UNSEEN:
            raise ConfigError(f"{field} {ascii(value)} contains the control or invisible character U+{ord(char):04X}; "
                              "type it plainly")
    if an_id and value != value.strip():
        raise ConfigError(f"{field} {ascii(value)} begins or ends with a space; an id has none")
