"""The keyset walk's values: one batch as an action receives it, batch sizing, the
lock-wait budget of the walkers of one purge, and how a lock timeout is recognised."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy.exc import DBAPIError

from retention.targets.base import BatchLedger, Progress
from retention.targets.sql.descriptors import BatchRange, Bound

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.sql.table import SqlTable


@dataclass
class Batch:
    """One batch as an action receives it: where it starts and may end, the rows it aims
    at and may never exceed, the holds it is judged by, and where it is journaled.

    Every field is fixed when the walker makes the batch, except ``span``: the range
    the action cuts, kept so the walker knows what a batch that failed covered.
    """

    number: int
    window: ColumnElement[bool]
    """Unheld expired rows after ``lower`` up to ``ceiling``: where the batch's end is found."""
    expired: ColumnElement[bool]
    """Unheld expired rows (the batch's range is added to it)."""
    lower: Bound | None
    ceiling: Bound | None
    size: int
    cap: int | None
    """The most rows the batch may take (what is left of the blast-radius limit); None: no cap."""
    holds: tuple[int, ...]
    """Ids of the holds in force when the batch was made; journaled with it."""
    ledger: BatchLedger
    span: BatchRange | None = None

    def cut(self, table: SqlTable, conn: Connection) -> BatchRange:
        """Find the batch's range (in the action's transaction) and remember it."""
        # The age-only bound of PostgreSQL may take up to twice ``size`` rows, and may
        # reach past a ceiling that names a key: exact bounds where that would matter.
        exact = (self.cap is not None and self.cap < 2 * self.size - 1) or (
            self.ceiling is not None and len(self.ceiling) > 1)
        self.span = BatchRange(self.lower, table.upper_bound(conn, self.window, self.size, self.ceiling,
                                                              exact=exact))
        return self.span

    def check_cap(self, rows: int) -> None:
        """Raise BatchOverCap (rolling the batch back) when it took more rows than it may."""
        if self.cap is not None and rows > self.cap:
            raise BatchOverCap(f"batch {self.number} took {rows} rows, more than the {self.cap} left of the limit")


class BatchOverCap(Exception):
    """A batch took more rows than its cap (rows arrived in its range); it is rolled back and cut smaller."""


class _LockWait:
    """How long the walkers of one purge have been coming back to rows other transactions lock."""

    def __init__(self, budget: float):
        self.budget = budget
        self.gave_up = False
        self._since: float | None = None
        self._lock = threading.Lock()

    def hit(self) -> None:
        """A batch found its rows locked (the budget runs from the first time)."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()

    def left(self) -> float:
        """Seconds of the budget left."""
        if self._since is None:
            return self.budget
        return max(0.0, self.budget - (time.monotonic() - self._since))



class _Tally:
    """Rows purged so far by every walker of a purge, reported as each batch lands."""

    def __init__(self, progress: Progress | None):
        self.rows = 0
        self._progress = progress
        self._lock = threading.Lock()

    def add(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.rows += rows
            if self._progress is not None:
                self._progress(self.rows, rows, seconds)


class BatchSizer:
    """Adapts rows per batch so each transaction takes about ``target_seconds``.

    Starts small and scales by the measured rate, at most 4x up or 2x down per batch,
    never beyond ``maximum`` rows.
    """

    def __init__(self, maximum: int, *, start: int = 1000, target_seconds: float = 0.2):
        self.maximum = maximum
        self.size = min(start, maximum)
        self.target_seconds = target_seconds

    def observe(self, rows: int, seconds: float) -> None:
        """Record that a batch of ``rows`` took ``seconds``; pick the next size."""
        if rows < self.size:  # the last, short batch says nothing about the rate
            return
        if seconds <= 0:
            wanted = self.size * 4
        else:
            wanted = int(rows * self.target_seconds / seconds)
        wanted = max(self.size // 2, min(wanted, self.size * 4))
        self.size = max(1, min(wanted, self.maximum))


_LOCK_TIMEOUT_PG = {"55P03"}
_LOCK_TIMEOUT_MYSQL = {1205}


def is_lock_timeout(exc: DBAPIError) -> bool:
    """Whether a statement gave up waiting for a row lock another transaction holds."""
    orig = exc.orig
    code = getattr(orig, "pgcode", None)
    if code is not None:
        return code in _LOCK_TIMEOUT_PG
    args = tuple(getattr(orig, "args", ()))
    return bool(args) and isinstance(args[0], int) and args[0] in _LOCK_TIMEOUT_MYSQL


def _short(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0][:200]


