"""Named points where a test can make the engine crash, to prove crash safety.

``RETENTION_FAILPOINTS="sql.before_commit=3:kill"`` makes the third pass through
``sql.before_commit`` kill the process with SIGKILL (``raise`` raises
:class:`InjectedFault` instead). Unset, a failpoint costs one dict lookup.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

_hits: Counter[str] = Counter()


class InjectedFault(RuntimeError):
    """Raised by a failpoint whose action is ``raise``."""


def hit(name: str) -> None:
    """Count a pass through ``name`` and act if the environment asks for a fault here."""
    spec = os.environ.get("RETENTION_FAILPOINTS")
    if not spec:
        return
    _hits[name] += 1
    for item in spec.split(","):
        point, _, rest = item.strip().partition("=")
        if point != name:
            continue
        count, _, action = rest.partition(":")
        if _hits[name] != int(count or 1):
            continue
        if action == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise InjectedFault(f"failpoint {name} (pass {_hits[name]})")


def reset() -> None:
    """Forget the passes counted so far (tests call this between runs)."""
    _hits.clear()
