"""The delete action: children, then the target's rows, in one transaction."""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING

from sqlalchemy import and_, delete

from retention import failpoints
from retention.targets.base import BatchResult
from retention.targets.sql.actions import SqlAction, postgres_bitmap
from retention.targets.sql.descriptors import BatchDescriptor

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

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
