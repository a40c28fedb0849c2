"""Whole partitions at O(1): a target whose table is range-partitioned on its age column
purges every partition whose whole range is before the cutoff as a unit, before the walk
takes the boundary partition (and whatever falls back) in batches.

A partition goes whole only when nothing can keep a row of it: the action deletes or
archives (an anonymize run walks it; archiving is :mod:`.partitions_archive`), the rule
has no ``where`` filter, no child table references it, every row in it is expired and no
hold protects any of them (counted), and the blast-radius budget grants all of its rows.
Anything else falls back to batches.

PostgreSQL detaches the partition (``CONCURRENTLY`` where it can: outside a transaction,
so on an autocommit connection) and drops it; MariaDB and MySQL count the partition again
under ``LOCK TABLES … WRITE`` and drop it in one statement under that lock (a writer that
added rows since the first count is counted; a held row, or rows past the limit, leave the
partition to the walk). A drop is journaled as a batch: *pending* with the partition's name and its
rows counted before, *done* after. On PostgreSQL the detached partition is counted again
in the transaction that drops it, under its ACCESS EXCLUSIVE lock, so a row written into
it after the first count (a late writer) is counted too (the pending batch corrected
before the drop commits, the limit reserved for it) and a row that may not go (not
expired, or held by the holds the drop was journaled with) stops the drop, leaving the
detached table in place. A crash between PostgreSQL's detach and its drop
leaves a detached table that no application reads any more; settling finishes the purge
(drops it) rather than re-attaching it: every row in it was expired and unheld when the
batch was journaled, and re-attaching would re-validate its range under a lock on the
parent while a newer partition may by now cover part of it.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import time
from collections.abc import Callable, Iterable
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, text, true
from sqlalchemy.exc import DBAPIError
from sqlalchemy.schema import DropTable

from retention import failpoints
from retention.errors import TargetError
from retention.retry import is_transient
from retention.targets.sql.delete import DeleteRows
from retention.targets.sql.descriptors import BatchDescriptor, BatchRange
from retention.targets.sql.partition_catalog import (
    Partition,
    _autocommit,
    _count,
    _cutoff_bound,
    _has_default_partition,
    _not_after,
    _partition_state,
    _partition_table,
    count_query,
    list_partitions,
)

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.holds import Hold
    from retention.targets.base import BatchLedger, PendingBatch, RecordBudget
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)

Tally = Callable[[int, float], None]
"""Told (rows, seconds) after each partition dropped."""


def drop_expired_partitions(table: SqlTable, cutoff: datetime, ledger: BatchLedger, budget: RecordBudget,
                            tally: Tally) -> int:
    """Drop every partition of ``table`` all of whose rows have expired at ``cutoff`` and
    may go; return the rows dropped. Partitions that cannot go whole are left to the walk."""
    if not _may_drop_whole(table):
        return 0
    bound = _cutoff_bound(table, cutoff)
    partitions = [p for p in list_partitions(table) if p.upper is not None and _not_after(p.upper, bound)]
    expired = table.expired(cutoff)
    dropped = 0
    # Read once: DETACH … CONCURRENTLY is refused beside a default partition.
    concurrently = bool(partitions) and table.engine.dialect.name == "postgresql" and not _has_default_partition(table)
    for partition in partitions:
        started = time.perf_counter()
        # Holds are read for every partition, as the walk reads them for every batch.
        holds = table.current_holds()
        held = table.held(holds)
        if held is not None and held.compare(true()):
            return dropped  # paused: the walk says so
        if table.throttle is not None and not table.throttle.wait(ledger):
            return dropped  # replica lag past its budget: the walk stops too, and says so
        unheld = table.unheld(expired, holds)
        # PostgreSQL keeps every row of a range partition inside its range (NULL ages go to the
        # default partition), so without holds each one has expired; MariaDB's first range
        # also takes NULL ages, so there the rows are always checked.
        check = None if held is None and table.engine.dialect.name == "postgresql" else unheld

        ceiling = _ceiling(table, partition) if check is None and type(table.action) is DeleteRows else None
        if ceiling is not None:
            # Nothing to check row by row, and the drop counts the table exactly under its lock:
            # the limit only needs to grant what the partition can hold at most (its pages full
            # of the smallest rows). Where it grants less, the partition is counted first.
            if ceiling == 0:
                continue  # nothing to purge: the schema is left as it is
            granted = budget.reserve(ceiling)
            if granted == ceiling:
                outcome = _purge_safely(table, partition, ceiling, ledger, holds, unheld, check, budget,
                                        concurrently, expired, granted, exact=False)
                if outcome is not None:
                    tally(outcome, time.perf_counter() - started)
                    dropped += outcome
                continue
            budget.settle(granted, 0)

        def count(conn: Connection, partition: Partition = partition,
                  check: ColumnElement[bool] | None = check) -> tuple[int, int]:
            return _count(table, conn, partition, check)

        rows, matched = table.with_retries(count)
        if rows == 0:
            continue  # nothing to purge: the schema is left as it is
        if rows != matched:
            log.info("%s: partition %s keeps %d of its %d rows (held or not expired); walking it in batches",
                     table.target.name, partition.qualified, rows - matched, rows)
            continue
        granted = budget.reserve(rows)
        if granted < rows:
            budget.settle(granted, 0)
            log.info("%s: partition %s (%d rows) is over what is left of the limit; walking it in batches",
                     table.target.name, partition.qualified, rows)
            continue
        purged = _purge_safely(table, partition, rows, ledger, holds, unheld, check, budget, concurrently, expired,
                               granted, exact=True)
        if purged is not None:
            tally(purged, time.perf_counter() - started)
            dropped += purged
    return dropped


def _purge_safely(table: SqlTable, partition: Partition, rows: int, ledger: BatchLedger, holds: list[Hold],
                  unheld: ColumnElement[bool], check: ColumnElement[bool] | None, budget: RecordBudget,
                  concurrently: bool, expired: ColumnElement[bool], granted: int, *, exact: bool) -> int | None:
    """:func:`_purge_whole`, its reservation settled whatever happens: the rows purged, or None
    (left to the walk). ``rows``: counted (``exact``) or the most the partition can hold."""
    try:
        purged = _purge_whole(table, partition, rows, ledger, holds, unheld, check, budget, concurrently, exact)
        if purged is None:
            budget.settle(granted, 0)
            return None  # it changed under the archive: walked in batches
    except DBAPIError as exc:
        budget.settle(granted, 0)
        _settle_after_error(table, expired, ledger)
        if not is_transient(exc):
            raise
        # Another transaction holds the table longer than the lock timeout: its rows are
        # walked in batches instead, which wait on rows, not on the whole table.
        log.warning("%s: could not drop partition %s now (%s); walking it in batches",
                    table.target.name, partition.qualified, str(exc.orig).strip().splitlines()[0][:200])
        return None
    except PartitionLeftDetached:
        budget.settle(granted, 0)
        raise  # not settled now: it says why it was left
    except BaseException:
        budget.settle(granted, 0)
        _settle_after_error(table, expired, ledger)
        raise
    budget.settle(granted, min(purged, rows))  # more than reserved: _drop reserved the rest
    return purged


def _ceiling(table: SqlTable, partition: Partition) -> int | None:
    """The most rows a PostgreSQL partition can hold now: its heap pages, each full of the
    smallest tuples it can store (a 24-byte header, a 4-byte line pointer and its NOT NULL
    fixed-width columns, alignment left out so it can only overstate; never more than
    MaxHeapTuplesPerPage); 0 when it holds none (None: no such table)."""
    preparer = table.engine.dialect.identifier_preparer
    name = preparer.format_table(_partition_table(table, partition.schema, partition.name))

    def read(conn: Connection) -> int | None:
        row = conn.execute(text(
            f"SELECT EXISTS (SELECT 1 FROM {name}), pg_relation_size(to_regclass(:name)) / b.size "
            "* ((b.size - 24) / (28 + coalesce((SELECT sum(a.attlen) FROM pg_attribute a WHERE a.attrelid = "
            "to_regclass(:name) AND a.attnum > 0 AND NOT a.attisdropped AND a.attnotnull AND a.attlen > 0), 0))) "
            "FROM (SELECT current_setting('block_size')::int AS size) b"),
            {"name": name}).one()
        conn.rollback()
        return None if row[1] is None else (int(row[1]) if row[0] else 0)

    return table.with_retries(read)


def settle_partition(table: SqlTable, expired: ColumnElement[bool], pending: PendingBatch,
                     descriptor: BatchDescriptor, ledger: BatchLedger) -> int:
    """Settle a partition drop found pending; return the rows confirmed purged.

    Still attached (PostgreSQL) or still there (MariaDB): the drop never happened, the batch
    is void and the next walk tries again. Gone: it happened. Detached (or half-detached)
    but not dropped: the drop is finished now, once every row in it is seen to be expired
    and unheld by the holds the drop was journaled with (a table that is not what was
    detached is never dropped).
    """
    assert descriptor.partition is not None
    if descriptor.planned is not None:  # archived whole: its verified objects decide
        from retention.targets.sql.partitions_archive import settle_archived_partition

        return settle_archived_partition(table, expired, pending, descriptor, ledger)
    state = _partition_state(table, descriptor.partition)
    if state == "attached":
        ledger.resolve(pending.batch_no, 0)
        return 0
    rows = pending.rows
    if state in ("detaching", "detached"):
        schema, _, name = descriptor.partition.rpartition(".")
        detached = _partition_table(table, schema or None, name)
        holds = table.holds.by_ids(list(descriptor.holds or ())) if table.holds else []
        with table.engine.connect() as conn:
            rows, matched = _count(table, conn, Partition(schema or None, name, None), table.unheld(expired, holds))
        if rows != matched:
            raise TargetError(
                f"{descriptor.partition}, detached from {table.target.location} by an interrupted run, holds "
                f"{rows - matched} rows that are not expired or are held; it is left in place: re-attach it "
                "or drop it by hand, then run again", "table")
        _finish_drop(table, detached, state)
    log.warning("%s: partition %s was dropped by an interrupted run; counting its %d rows as purged",
                table.target.name, descriptor.partition, rows)
    # The descriptor's rows too: the certificate reads a dropped partition's rows from it.
    ledger.resolve(pending.batch_no, rows, tables={table.family.name: rows},
                   descriptor=dataclasses.replace(descriptor, tables={table.family.name: rows}).encode())
    return rows


def dropped_partitions(descriptors: Iterable[str]) -> dict[str, int]:
    """Partitions dropped whole and their rows, from a target's done batch descriptors."""
    dropped: dict[str, int] = {}
    for raw in descriptors:
        if '"partition"' not in raw:
            continue  # a batch of rows (or an S3 batch): no need to read it
        data = json.loads(raw)
        name = data.get("partition") if isinstance(data, dict) else None
        if name is not None:
            dropped[name] = sum((data.get("tables") or {}).values())
    return dropped


# -- which partitions ----------------------------------------------------------------


def _may_drop_whole(table: SqlTable) -> bool:
    """Whether nothing about the rule can keep a row of an expired partition."""
    from retention.targets.sql.archive import ArchiveRows

    return (
        table.engine.dialect.name in ("postgresql", "mysql")
        and type(table.action) in (DeleteRows, ArchiveRows)
        and not table.target.where
        and not table.family.children
    )


def _purge_whole(table: SqlTable, partition: Partition, rows: int, ledger: BatchLedger, holds: list[Hold],
                 unheld: ColumnElement[bool], check: ColumnElement[bool] | None, budget: RecordBudget,
                 concurrently: bool, exact: bool = True) -> int | None:
    """Drop the partition (delete), or archive then drop it: the rows purged; None: it changed,
    left to batches."""
    ids = tuple(h.id for h in holds)
    if type(table.action) is DeleteRows:
        return _drop(table, partition, rows, ledger, ids, unheld, budget, concurrently, exact)
    from retention.targets.sql.partitions_archive import archive_partition

    return rows if archive_partition(table, partition, rows, ledger, ids, check) else None


# -- dropping ------------------------------------------------------------------------


def _drop(table: SqlTable, partition: Partition, rows: int, ledger: BatchLedger, holds: tuple[int, ...],
          unheld: ColumnElement[bool], budget: RecordBudget, concurrently: bool, exact: bool = True) -> int | None:
    """Journal the drop pending, drop the partition, journal it done; return the rows dropped
    (None: on MariaDB/MySQL, the partition changed before its lock; nothing dropped, the walk
    takes it). ``rows``: counted (``exact``), or (PostgreSQL) the most the partition can hold,
    corrected by the exact count taken under its lock before the drop commits."""
    batch_no = ledger.next_batch_no()
    descriptor = BatchDescriptor(BatchRange(None, None), tables={table.family.name: rows}, holds=holds,
                                 partition=partition.qualified)
    ledger.pending(batch_no, descriptor.encode(), rows)
    failpoints.hit("sql.partition_pending")
    preparer = table.engine.dialect.identifier_preparer
    parent = preparer.format_table(table.table)
    if table.engine.dialect.name == "postgresql":
        detached = _partition_table(table, partition.schema, partition.name)
        mode = " CONCURRENTLY" if concurrently else ""  # not allowed beside a default partition
        with _autocommit(table) as conn:
            conn.execute(text(f"ALTER TABLE {parent} DETACH PARTITION {preparer.format_table(detached)}{mode}"))
            failpoints.hit("sql.partition_detached")
            rows = _drop_detached(table, conn, partition, detached, rows, ledger, batch_no, descriptor, unheld,
                                  budget, exact)
    else:
        with _autocommit(table) as conn:
            locked = _drop_locked(table, conn, partition, rows, ledger, batch_no, descriptor, unheld, budget)
        if locked is None:
            ledger.resolve(batch_no, 0)  # nothing was dropped: the walk takes the partition
            return None
        rows = locked
    failpoints.hit("sql.partition_dropped")
    ledger.done(batch_no, rows=rows, tables={table.family.name: rows})
    log.info("%s: dropped partition %s (%d rows)", table.target.name, partition.qualified, rows)
    return rows


def _drop_locked(table: SqlTable, conn: Connection, partition: Partition, rows: int, ledger: BatchLedger,
                 batch_no: int, descriptor: BatchDescriptor, unheld: ColumnElement[bool],
                 budget: RecordBudget) -> int | None:
    """MariaDB/MySQL: drop the partition under ``LOCK TABLES … WRITE``, counted again under that
    lock (no writer can add to it any more), so the rows dropped are exactly the rows counted.

    Rows a writer added since the first count are counted (the pending batch corrected) when the
    limit grants them; a row that may not go (held) or rows more than the limit grants leave the
    partition in place (None: the walk takes it in batches)."""
    preparer = table.engine.dialect.identifier_preparer
    parent = preparer.format_table(table.table)
    conn.execute(text(f"LOCK TABLES {parent} WRITE"))
    try:
        dropped = _count_and_drop_locked(table, conn, partition, rows, ledger, batch_no, descriptor, unheld, budget)
    except BaseException:
        try:
            conn.execute(text("UNLOCK TABLES"))
        except DBAPIError:  # a broken connection: closing it releases its locks; the first error matters
            log.warning("%s: could not unlock %s after an error; its connection is closed", table.target.name,
                        table.target.location)
        raise
    conn.execute(text("UNLOCK TABLES"))
    return dropped


def _count_and_drop_locked(table: SqlTable, conn: Connection, partition: Partition, rows: int,
                           ledger: BatchLedger, batch_no: int, descriptor: BatchDescriptor,
                           unheld: ColumnElement[bool], budget: RecordBudget) -> int | None:
    """:func:`_drop_locked`'s work, under the table's write lock: count, correct, drop."""
    preparer = table.engine.dialect.identifier_preparer
    there, matched = (int(n or 0) for n in conn.execute(count_query(table, partition, unheld)).one())
    if there != matched:
        log.info("%s: partition %s was given %d rows that are held since it was counted; walking it in batches",
                 table.target.name, partition.qualified, there - matched)
        return None
    extra = 0
    if there > rows:
        extra = budget.reserve(there - rows, wait=False)  # this drop holds a reservation
        if there > rows + extra:
            log.info("%s: partition %s was given %d rows since it was counted, more than is left of the "
                     "limit; walking it in batches", table.target.name, partition.qualified, there - rows)
            budget.settle(extra, 0)
            return None
        log.warning("%s: partition %s holds %d rows, not the %d counted before (a writer in between); "
                    "dropping and counting %d", table.target.name, partition.qualified, there, rows, there)
    try:
        if there != rows:
            ledger.update_pending(batch_no, there, dataclasses.replace(
                descriptor, tables={table.family.name: there}).encode())
        conn.execute(text(f"ALTER TABLE {preparer.format_table(table.table)} "
                          f"DROP PARTITION {preparer.quote(partition.name)}"))
    except BaseException:
        budget.settle(extra, 0)
        raise
    budget.settle(extra, extra)
    return there


class PartitionLeftDetached(TargetError):
    """A partition detached but not dropped, on purpose: left for a person (or the next run)."""


def _drop_detached(table: SqlTable, conn: Connection, partition: Partition, detached: Table, rows: int,
                   ledger: BatchLedger, batch_no: int, descriptor: BatchDescriptor, unheld: ColumnElement[bool],
                   budget: RecordBudget, exact: bool) -> int:
    """Drop a partition just detached, in one transaction that first locks it and counts it
    again (nothing can write into it any more): the rows dropped, exactly.

    A count other than the one journaled (a writer between the first count and the detach)
    corrects the pending batch before the drop commits, once the limit grants any rows
    more. A row that may not go, or rows more than the limit grants, stop the drop and
    leave the detached table in place."""
    preparer = table.engine.dialect.identifier_preparer
    where = f"{partition.qualified}, detached from {table.target.location},"
    extra = 0
    conn.exec_driver_sql("BEGIN")  # an autocommit connection: the transaction is ours to open
    try:
        conn.execute(text(f"LOCK TABLE {preparer.format_table(detached)} IN ACCESS EXCLUSIVE MODE"))
        counted: tuple[Any, ...] = tuple(conn.execute(
            count_query(table, Partition(partition.schema, partition.name, None), unheld)).one())
        there, matched = int(counted[0]), int(counted[1] or 0)
        if there != matched:
            raise PartitionLeftDetached(
                f"{where} was given {there - matched} rows that are not expired or are held after it was counted; "
                "it is left in place: re-attach it or drop it by hand, then run again", "table")
        if there > rows:
            extra = budget.reserve(there - rows, wait=False)  # this drop holds a reservation
            if there > rows + extra:
                raise PartitionLeftDetached(
                    f"{where} was given {there - rows} rows after it was counted, more than is left of the limit; "
                    "it is left in place (the next run drops it) or re-attach it by hand", "table")
        if there != rows and exact:
            log.warning("%s: partition %s holds %d rows, not the %d counted before it was detached (a writer in "
                        "between); dropping and counting %d", table.target.name, partition.qualified, there, rows,
                        there)
        if there != rows:
            ledger.update_pending(batch_no, there, dataclasses.replace(
                descriptor, tables={table.family.name: there}).encode())
        conn.execute(DropTable(detached))
        conn.exec_driver_sql("COMMIT")
    except BaseException:
        conn.exec_driver_sql("ROLLBACK")
        budget.settle(extra, 0)
        raise
    budget.settle(extra, extra)
    return there


def _finish_drop(table: SqlTable, detached: Table, state: str) -> None:
    """Drop a PostgreSQL partition already detached (or finish detaching it first)."""
    preparer = table.engine.dialect.identifier_preparer
    with _autocommit(table) as conn:
        if state == "detaching":
            conn.execute(text(f"ALTER TABLE {preparer.format_table(table.table)} "
                              f"DETACH PARTITION {preparer.format_table(detached)} FINALIZE"))
        conn.execute(DropTable(detached))


def _settle_after_error(table: SqlTable, expired: ColumnElement[bool], ledger: BatchLedger) -> None:
    """Settle a drop a failure interrupted, if it can be now; never hide the failure."""
    try:
        for pending in ledger.unresolved():
            descriptor = BatchDescriptor.decode(pending.descriptor)
            if descriptor.partition is not None:
                settle_partition(table, expired, pending, descriptor, ledger)
    except Exception:  # the original error matters more; the next attempt settles it
        log.warning("%s: could not settle the interrupted partition drop now; the next attempt will",
                    table.target.name, exc_info=True)

