"""Progress of a run, printed to stderr while it purges."""

from __future__ import annotations

import sys
import time

from retention.interfaces.render import rate


class Progress:
    """Prints a line per target at most every two seconds, and one when a target finishes."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.started: dict[str, float] = {}
        self.shown = 0.0

    def __call__(self, target: str, deleted: int, matched: int | None, rows: int, seconds: float) -> None:
        now = time.monotonic()
        self.started.setdefault(target, now - seconds)
        if now - self.shown < self.interval and (matched is None or deleted < matched):
            return
        self.shown = now
        share = f" ({deleted / matched:.0%})" if matched else ""
        elapsed = now - self.started[target]
        print(f"  {target}: {deleted:,}{' of ' + format(matched, ',') if matched else ''} purged{share}, "
              f"{rate(deleted, elapsed)}, last batch {rows:,} rows in {seconds * 1000:.0f} ms",
              file=sys.stderr)
