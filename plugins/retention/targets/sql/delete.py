"""The delete action: children, then the target's rows, in one transaction."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete, func, select

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
            selection = and_(selection, *clustered_range(table, conn, selection))
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


def clustered_range(table: SqlTable, conn: Connection, selection: ColumnElement[bool]) -> list[ColumnElement[bool]]:
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
    # The age index holds the key: this reads the batch's keys, not its rows.
    low, high, rows = conn.execute(select(func.min(column), func.max(column), func.count()).where(selection)).one()
    if low is None:
        return []
    within = column.between(low, high)
    others = conn.execute(select(func.count()).select_from(table.table).where(within)).scalar_one()
    return [within] if others == rows else []
