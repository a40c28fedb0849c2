"""Crash settlement of SQL batches: a batch journaled *pending* whose outcome is unknown
(the process died, or the batch failed, between journaling it and journaling it *done*) is
settled by counting what is still there of its range.

None left: its transaction committed. All left: it rolled back. Some left: another writer
touched the range; the difference is counted as purged (and logged). What else a batch
leaves behind (archive objects) its action settles.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import func, select

from retention.targets.sql.descriptors import BatchDescriptor
from retention.targets.sql.partitions import settle_partition

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.base import BatchLedger
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)


def settle_pending(table: SqlTable, expired: ColumnElement[bool], ledger: BatchLedger) -> int:
    """Settle every pending batch of ``table`` in ``ledger``; return the rows confirmed purged."""
    pending = ledger.unresolved()
    confirmed = 0
    if not pending:
        return confirmed
    with table.engine.connect() as conn:
        for batch in pending:
            descriptor = BatchDescriptor.decode(batch.descriptor)
            if descriptor.partition is not None:  # a whole partition, not a range of rows
                confirmed += settle_partition(table, expired, batch, descriptor, ledger)
                continue
            # Judge the batch by the holds it was cut with, not the ones in force now.
            holds = table.holds.by_ids(list(descriptor.holds or ())) if table.holds else []
            present = conn.execute(
                select(func.count()).select_from(table.table).where(
                    table.unheld(expired, holds), table.in_range(descriptor.span)
                )
            ).scalar_one()
            conn.rollback()
            gone = max(batch.rows - present, 0)
            if 0 < present < batch.rows:
                log.warning(
                    "%s: batch %d was interrupted and %d of its %d rows are gone; counting them as purged",
                    table.target.name, batch.batch_no, gone, batch.rows,
                )
            table.action.settle(table, batch, descriptor, gone, ledger)
            confirmed += gone
    return confirmed


def settle_after_error(table: SqlTable, expired: ColumnElement[bool], ledger: BatchLedger) -> None:
    """Settle the batch a failure interrupted, if it can be now; never hide the failure."""
    try:
        settle_pending(table, expired, ledger)
    except Exception:  # the original error matters more; the next attempt reconciles
        log.warning("%s: could not settle the interrupted batch now; the next attempt will",
                    table.target.name, exc_info=True)
