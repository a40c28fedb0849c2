"""The delete action: children, then the target's rows, in one transaction."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy import and_, case, delete, func, select

from retention import failpoints
from retention.targets.base import BatchResult
from retention.targets.sql.actions import SqlAction, postgres_bitmap
from retention.targets.sql.descriptors import BatchDescriptor

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.sql.batch import Batch
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)


class DeleteRows(SqlAction):
    """Delete the batch's rows, children first, in one transaction."""

    def apply(self, table: SqlTable, conn: Connection, batch: Batch) -> BatchResult:
        ledger, batch_no = batch.ledger, batch.number
        started = time.perf_counter()
        with conn.begin():
            span = batch.cut(table, conn)
            postgres_bitmap(table, conn)
            selection = and_(batch.expired, table.in_range(span))
            selection = and_(selection, *clustered_range(table, conn, selection, batch))
            counts = {member.name: conn.execute(delete(member.table).where(condition)).rowcount
                      for member, condition in table.family_conditions(selection)}
            rows = counts[table.family.name]
            batch.check_cap(rows)
            if rows:
                ledger.pending(batch_no, BatchDescriptor(span, tables=counts, holds=batch.holds).encode(), rows)
                failpoints.hit("sql.before_commit")
        seconds = time.perf_counter() - started
        if rows:
            failpoints.hit("sql.after_commit")
            ledger.done(batch_no, tables=counts)
        return BatchResult(span, rows, counts, seconds)


def clustered_range(table: SqlTable, conn: Connection, selection: ColumnElement[bool],
                    batch: Batch | None = None) -> list[ColumnElement[bool]]:
    """On MariaDB/MySQL, the primary-key range that holds the batch's rows and nothing else (as a
    condition the rows meet anyway); elsewhere, or when other rows lie in that range, nothing.

    InnoDB keeps rows in primary-key order: deleting through the age index looks each row
    up by its key, about twice as slow as walking a key range. Where keys grow with age
    (most tables) the batch's keys form a range of their own, and the delete walks it. A
    range holding other rows too is not used: the delete would lock (and wait on) rows it
    does not take.
    """
    key = list(table.target.key)
    if table.engine.dialect.name != "mysql" or key != [c.name for c in table.table.primary_key]:
        return []
    if len(key) != 1:
        return []
    column = table.table.c[key[0]]
    within = _range_of_walk_ends(table, conn, selection, batch)
    if within is not None:
        return [within]
    # The age index holds the key: this reads the batch's keys, not its rows.
    low, high, rows = conn.execute(select(func.min(column), func.max(column), func.count()).where(selection)).one()
    if low is None:
        return []
    within = column.between(low, high)
    others = conn.execute(select(func.count()).select_from(table.table).where(within)).scalar_one()
    return [within] if others == rows else []


def _range_of_walk_ends(table: SqlTable, conn: Connection, selection: ColumnElement[bool],
                        batch: Batch | None) -> ColumnElement[bool] | None:
    """The key range from the batch's first to its last row in walk order, when one read of
    that range proves it holds exactly the batch's rows; None when it does not (or cannot).

    A batch whose upper bound is a row the walk found (not its ceiling) holds exactly
    ``batch.size`` rows, the last being that bound. Where keys grow with age the first
    and last rows in walk order carry the lowest and highest key (the first row's is past
    the key the previous batch ended on, which is the range's start). The range is used only
    if every row in it is a batch row and there are ``batch.size`` of them: then it is the
    batch, whatever the keys do. The read is a plain (non-locking) one of the key range,
    the rows the delete reads next.
    """
    span = batch.span if batch is not None else None
    if batch is None or span is None or span.upper is None or span.upper == batch.ceiling:
        return None  # the last batch of a range: how many rows it has is not known
    columns = table.walk_columns()
    if len(span.upper) != len(columns):
        return None  # an age-only bound (PostgreSQL's): the last row's key is not known
    column = columns[-1]
    if span.lower is not None and len(span.lower) == len(columns):
        # Keys past the last batch's: no read needed to start the range.
        within = and_(column > span.lower[-1], column <= span.upper[-1])
    else:
        low = conn.execute(select(column).where(selection).order_by(*columns).limit(1)).scalar()
        if low is None:
            return None
        within = column.between(low, span.upper[-1])
    rows, batch_rows = conn.execute(
        select(func.count(), func.coalesce(func.sum(case((selection, 1), else_=0)), 0)).where(within)
    ).one()
    return within if rows == batch_rows == batch.size else None
