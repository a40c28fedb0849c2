"""One batch of the keyset walk as an action receives it (:class:`Batch`), where its range
ends (:func:`upper_bound`), and how many rows the next one aims at (:class:`BatchSizer`)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from retention.targets.sql.descriptors import BatchRange, Bound

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.base import BatchLedger
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
        # The age-only bound of PostgreSQL may take up to twice ``size`` rows: under a cap,
        # aim at half the cap instead (an exact bound sorts the batch's rows read from the
        # heap). It may also reach past a ceiling that names a key: exact bounds there.
        size = self.size
        if self.cap is not None and table.engine.dialect.name == "postgresql":
            size = max(1, min(size, (self.cap + 1) // 2))
        exact = self.ceiling is not None and len(self.ceiling) > 1
        self.span = BatchRange(self.lower, upper_bound(table, conn, self.window, size, self.ceiling, exact=exact))
        return self.span

    def check_cap(self, rows: int) -> None:
        """Raise BatchOverCap (rolling the batch back) when it took more rows than it may."""
        if self.cap is not None and rows > self.cap:
            raise BatchOverCap(f"batch {self.number} took {rows} rows, more than the {self.cap} left of the limit")


class BatchOverCap(Exception):
    """A batch took more rows than its cap (rows arrived in its range); it is rolled back and cut smaller."""


def upper_bound(
    table: SqlTable, conn: Connection, window: ColumnElement[bool], size: int, ceiling: Bound | None = None,
    *, exact: bool = False,
) -> Bound | None:
    """The last row of the next batch of ``size`` rows of ``window`` in walk order; ``ceiling``
    (None: no end) if fewer remain.

    On PostgreSQL the age index does not hold the key, so ordering by (age, key)
    reads every row of the batch from the heap and sorts it; the age alone is found
    by the index, and when few rows share it the batch simply takes them all. The
    bound is then ``(age,)``: every row up to and including that age. ``exact``: never
    more than ``size`` rows.
    """
    columns = table.walk_columns()
    if table.engine.dialect.name == "postgresql" and not exact:
        row = conn.execute(
            select(columns[0]).where(window).order_by(columns[0]).offset(size - 1).limit(1)
        ).first()
        if row is None:
            return ceiling
        ties = conn.execute(
            select(func.count()).select_from(
                select(columns[0]).where(window, columns[0] == row[0]).limit(size + 1).subquery()
            )
        ).scalar_one()
        if ties <= size:
            return (row[0],)
    row = conn.execute(
        select(*columns).where(window).order_by(*columns).offset(size - 1).limit(1)
    ).first()
    return tuple(row) if row is not None else ceiling


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
