"""What a SQL batch does to its rows: the small base every action builds on.

Every action journals the batch *pending* before its irreversible step and *done* after
(so :mod:`retention.targets.sql.settle` can tell what a crash in between left). An action
receives one :class:`~retention.targets.sql.batch.Batch` and the table's public surface:


- :class:`~retention.targets.sql.delete.DeleteRows` deletes children, then the target's rows, in one transaction.
- :class:`~retention.targets.sql.archive.ArchiveRows` never lets a row go before its archive object is written and verified.
- :class:`~retention.targets.sql.anonymize.AnonymizeRows` rewrites the rule's columns and sets the marker column.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from sqlalchemy import text

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.base import BatchLedger, BatchResult, PendingBatch
    from retention.targets.sql.batch import Batch
    from retention.targets.sql.descriptors import BatchDescriptor
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)


class SqlAction:
    """The default behaviour of an action; subclasses override what differs."""

    removes_rows = True
    """True when rows leave the table (so references into it must be declared)."""

    batch_seconds = 0.2
    """How long a batch's write transaction should take (batch sizes adapt to it)."""

    def check(self, table: SqlTable) -> None:
        """Raise TargetError when the table cannot take this action."""

    def condition(self, table: SqlTable) -> ColumnElement[bool] | None:
        """An extra condition on the rows the action still has to process."""
        return None

    def notes(self, table: SqlTable) -> list[str]:
        """What a plan reviewer should know about this action on this table."""
        return []

    def apply(self, table: SqlTable, conn: Connection, batch: Batch) -> BatchResult:
        """Process the next batch: about ``batch.size`` rows after ``batch.lower``, never past
        ``batch.ceiling`` nor more than ``batch.cap``, journaled with ``batch.holds``."""
        raise NotImplementedError

    def settle(self, table: SqlTable, pending: PendingBatch, descriptor: BatchDescriptor, gone: int,
               ledger: BatchLedger) -> None:
        """Settle a batch found pending: ``gone`` of its rows are no longer to be processed."""
        tables = dict(descriptor.tables) if descriptor.tables is not None and gone == pending.rows else None
        ledger.resolve(pending.batch_no, gone, tables=tables or ({table.family.name: gone} if gone else None))


def postgres_bitmap(table: SqlTable, conn: Connection) -> None:
    """On PostgreSQL, make this transaction read a batch's range by bitmap scans."""
    if table.engine.dialect.name == "postgresql":
        # A range of many rows: visiting each heap page once (bitmap) beats one random
        # heap read per row (index scan).
        conn.execute(text("SET LOCAL enable_indexscan = off"))
