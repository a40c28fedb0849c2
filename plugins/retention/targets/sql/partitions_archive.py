"""Whole partitions archived: in an archive run, a partition :mod:`.partitions` finds wholly
expired (nothing can keep a row of it) is streamed to the archive as a unit, in objects of
at most ``max_batch_rows`` rows each (memory holds one object at a time), and dropped only
once every object is written and verified.

The journal holds it as one batch: *pending* with the partition's name, its rows counted
and the keys of its objects (then the verified objects), *done* after the drop.

PostgreSQL: one transaction locks the partition against writers (``SHARE``: readers go
on), counts it again, streams ``COPY (SELECT ...) TO STDOUT`` into the objects, then
detaches (not ``CONCURRENTLY``, which no transaction can run) and drops it, and commits
only then. A crash anywhere before that commit leaves the partition attached with every
row, and settling removes its objects as debris; after it, the partition is gone and
settling records the objects the pending batch journaled.

MariaDB/MySQL: ``DROP PARTITION`` commits on its own, so the archive cannot share its
transaction. The rows are read in one consistent snapshot, with a digest of them (their
count, and the sum of a hash of each row); once the objects verified, the table is locked
for writing (``LOCK TABLES ... WRITE``, only for the digest taken again and the drop) and
the partition dropped only if its digest is unchanged; else its objects are removed and
it is walked in batches. A crash before the drop leaves it there, and settling removes
the objects; after it, settling records them.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
from collections.abc import Callable
from itertools import islice
from typing import TYPE_CHECKING, Any

from sqlalchemy import LargeBinary, cast, func, literal, select, text
from sqlalchemy.dialects import mysql
from sqlalchemy.schema import DropTable

from retention import failpoints
from retention.archive.codec import TableShape, encode_rows
from retention.archive.store import ArchivedObject, ArchiveExists, ArchiveFailed
from retention.errors import TargetError
from retention.targets.sql.archive import ArchiveRows, _dbapi_cursor, copy_as_json
from retention.targets.sql.descriptors import BatchDescriptor, BatchRange
from retention.targets.sql.partition_catalog import (
    Partition,
    _autocommit,
    _count,
    _partition_state,
    _partition_table,
    count_query,
)
from retention.targets.sql.partitions import _finish_drop

if TYPE_CHECKING:
    from sqlalchemy import Table
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.base import BatchLedger, PendingBatch
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)

Upload = Callable[[bytes, int], None]
"""Told (body, rows) of each object as it fills: uploads and verifies it."""


def archive_partition(table: SqlTable, partition: Partition, rows: int, ledger: BatchLedger,
                      holds: tuple[int, ...], unheld: ColumnElement[bool] | None) -> bool:
    """Archive every row of ``partition`` (``rows`` counted, all expired and unheld as
    ``unheld`` checks) to verified objects, then drop it; False when it is no longer what
    was counted (nothing dropped, no object left: the walk takes it)."""
    if table.engine.dialect.name == "postgresql":
        return _PostgresPartition(table, partition, rows, ledger, holds).archive(unheld)
    return _MysqlPartition(table, partition, rows, ledger, holds).archive(unheld)


def settle_archived_partition(table: SqlTable, expired: ColumnElement[bool], pending: PendingBatch,
                              descriptor: BatchDescriptor, ledger: BatchLedger) -> int:
    """Settle a whole-partition archive found pending; return the rows confirmed purged.

    Still there: it was never dropped, and its objects (if any were written) are debris.
    Gone: it was dropped after its objects verified, which the pending batch journaled.
    Detached but not dropped (never by this module: someone detached it by hand): dropped
    now only if it holds exactly the rows archived, all expired and unheld.
    """
    assert descriptor.partition is not None
    store = _store(table)
    state = _partition_state(table, descriptor.partition)
    if state == "attached":
        store.remove(descriptor.planned_keys())
        ledger.resolve(pending.batch_no, 0)
        return 0
    objects = descriptor.objects
    if objects is None:
        raise ArchiveFailed(f"partition {descriptor.partition} of {table.target.location} is {state} but its "
                            f"archive objects were never journaled as verified (batch {pending.batch_no}); "
                            "check the archive by hand before running again")
    rows = sum(int(obj["rows"]) for obj in objects)
    if state in ("detaching", "detached"):
        schema, _, name = descriptor.partition.rpartition(".")
        holds = table.holds.by_ids(list(descriptor.holds or ())) if table.holds else []
        with table.engine.connect() as conn:
            there, matched = _count(table, conn, Partition(schema or None, name, None), table.unheld(expired, holds))
        if not there == matched == rows:
            raise TargetError(f"{descriptor.partition}, detached from {table.target.location}, holds {there} rows "
                              f"({matched} expired and unheld), not the {rows} archived; it is left in place: "
                              "re-attach it or drop it by hand, then run again", "table")
        _finish_drop(table, _partition_table(table, schema or None, name), state)
    log.warning("%s: partition %s was archived and dropped by an interrupted run; counting its %d rows",
                table.target.name, descriptor.partition, rows)
    ledger.resolve(pending.batch_no, rows, tables={table.family.name: rows},
                   descriptor=dataclasses.replace(descriptor, tables={table.family.name: rows}).encode())
    return rows


def _store(table: SqlTable) -> Any:
    if not isinstance(table.action, ArchiveRows):
        raise TargetError(f"{table.target.location} has a partition archive pending from an earlier run, "
                          "but the rule no longer archives; restore action: archive to settle it", "action")
    return table.action.store


class _PartitionArchive:
    """One partition on its way to the archive: its journaled batch and the objects written."""

    def __init__(self, table: SqlTable, partition: Partition, rows: int, ledger: BatchLedger,
                 holds: tuple[int, ...]):
        self.table, self.partition, self.rows, self.ledger, self.holds = table, partition, rows, ledger, holds
        action = table.action
        assert isinstance(action, ArchiveRows)
        self.action, self.store = action, action.store
        self.name = table.family.name
        self.chunk = table.target.max_batch_rows
        self.columns = TableShape.of(table.table).columns
        self.batch_no = 0
        self.keys: list[str] = []
        self.written: list[str] = []
        self.archived: list[ArchivedObject] = []

    def journal_pending(self) -> None:
        """Journal the batch before the first object is written (a crash from here on is settled)."""
        self.batch_no = self.ledger.next_batch_no()
        parts = max(1, -(-self.rows // self.chunk))
        self.keys = [self.store.key_for(self.action.category, self.action.run_id, self.table.target.name,
                                        self.batch_no, self.name, part) for part in range(1, parts + 1)]
        self.ledger.pending(self.batch_no, self._descriptor(planned=self.keys).encode(), self.rows)

    def upload(self, body: bytes, rows: int) -> None:
        """Write and verify the next object (create-only: a taken key is never removed)."""
        if len(self.archived) >= len(self.keys):
            raise ArchiveFailed(f"partition {self.partition.qualified} holds more than the {self.rows} rows counted")
        key = self.keys[len(self.archived)]
        self.written.append(key)
        try:
            stored = self.store.put_verified(key, body, table=self.name, rows=rows, columns=self.columns)
        except ArchiveExists:
            self.written.pop()
            raise
        self.archived.append(stored)
        failpoints.hit("archive.after_object")

    def verified(self) -> bool:
        """Whether the objects hold every row counted; if so, journal them (still pending)."""
        if sum(o.rows for o in self.archived) != self.rows or len(self.archived) != len(self.keys):
            return False
        self.ledger.update_pending(self.batch_no, self.rows, self._descriptor(planned=self.keys, objects=True).encode())
        failpoints.hit("archive.partition_uploaded")
        return True

    def discard(self) -> None:
        """Nothing is dropped: remove what this attempt wrote, void the batch."""
        if not self.batch_no:
            return
        self.ledger.update_pending(self.batch_no, self.rows, self._descriptor(planned=self.written).encode())
        self.store.remove(self.written)
        self.ledger.resolve(self.batch_no, 0)

    def done(self) -> None:
        """The partition is dropped: the batch is done, with its verified objects."""
        failpoints.hit("sql.partition_dropped")
        self.ledger.done(self.batch_no, tables={self.name: self.rows},
                         descriptor=self._descriptor(planned=self.keys, objects=True).encode())
        log.info("%s: archived partition %s (%d rows, %d objects) and dropped it", self.table.target.name,
                 self.partition.qualified, self.rows, len(self.archived))

    def _descriptor(self, *, planned: list[str], objects: bool = False) -> BatchDescriptor:
        return BatchDescriptor(
            BatchRange(None, None), tables={self.name: self.rows}, planned=tuple(sorted((k, self.name) for k in planned)),
            objects=tuple(o.to_dict() for o in self.archived) if objects else None, holds=self.holds,
            partition=self.partition.qualified)

    def stream_rows(self, conn: Connection, source: Table, hint: str | None = None) -> None:
        """Rows read through a server-side cursor, encoded an object at a time (MariaDB, Parquet)."""
        query = select(source)
        if hint:
            query = query.with_hint(source, hint, "mysql")
        result = iter(conn.execute(query.execution_options(stream_results=True, yield_per=5000)))
        shape = TableShape(self.name, self.columns)
        while True:
            body, rows = encode_rows(shape, islice(result, self.chunk), self.store.spec.format)
            if rows == 0:
                return
            self.upload(body, rows)


class _PostgresPartition(_PartitionArchive):
    def archive(self, unheld: ColumnElement[bool] | None) -> bool:
        table, partition = self.table, self.partition
        source = _partition_table(table, partition.schema, partition.name)
        preparer = table.engine.dialect.identifier_preparer
        try:
            with table.engine.connect() as conn, conn.begin():
                conn.execute(text(f"SET LOCAL lock_timeout = '{int(table.lock_timeout * 1000)}ms'"))
                conn.execute(text(f"LOCK TABLE ONLY {preparer.format_table(source)} IN SHARE MODE"))
                rows, matched = _counted(conn.execute(count_query(table, partition, unheld)).one())
                if not rows == matched == self.rows:
                    return _changed(table, partition, self.rows, rows, matched)
                self.journal_pending()
                if self.store.spec.format == "jsonl.gz":
                    self._copy(conn, source)
                else:
                    self.stream_rows(conn, source)
                if not self.verified():
                    raise ArchiveFailed(f"partition {partition.qualified} gave other rows than the {self.rows} counted")
                conn.execute(text(f"ALTER TABLE {preparer.format_table(table.table)} "
                                  f"DETACH PARTITION {preparer.format_table(source)}"))
                failpoints.hit("sql.partition_detached")
                conn.execute(DropTable(source))
        except BaseException:
            self.discard()
            raise
        self.done()
        return True

    def _copy(self, conn: Connection, source: Table) -> None:
        """``COPY (SELECT ...)`` streamed into gzip JSON Lines objects as they fill."""
        cursor = _dbapi_cursor(conn)
        chunks = _Chunks(self.chunk, self.upload)
        # psycopg2 writes once per row: a C buffer in front hands the rows on in 1 MiB pieces.
        stream = io.BufferedWriter(chunks, buffer_size=1 << 20)
        try:
            cursor.copy_expert(copy_as_json(conn, source, select(source)), stream)
            stream.flush()
        except BaseException:
            chunks.abandoned = True  # what the buffer still holds, flushed when it is closed, uploads nothing
            raise
        finally:
            cursor.close()
        chunks.finish()


class _MysqlPartition(_PartitionArchive):
    def archive(self, unheld: ColumnElement[bool] | None) -> bool:
        table, partition = self.table, self.partition
        hint = f"PARTITION ({table.engine.dialect.identifier_preparer.quote(partition.name)})"
        digest_query = self._digest(count_query(table, partition, unheld))
        try:
            with table.engine.connect().execution_options(isolation_level="REPEATABLE READ") as conn:
                with conn.begin():  # one snapshot: the digest is of exactly the rows streamed
                    rows, matched, digest = conn.execute(digest_query).one()
                    rows, matched = int(rows), int(matched or 0)
                    if not rows == matched == self.rows:
                        return _changed(table, partition, self.rows, rows, matched)
                    self.journal_pending()
                    self.stream_rows(conn, table.table, hint)
                if not self.verified():
                    raise ArchiveFailed(f"partition {partition.qualified} gave other rows than the {self.rows} counted")
            with _autocommit(table) as conn:
                parent = table.engine.dialect.identifier_preparer.format_table(table.table)
                conn.execute(text(f"LOCK TABLES {parent} WRITE"))
                try:
                    now = tuple(conn.execute(digest_query).one())
                    if (int(now[0]), now[2]) != (rows, digest):
                        raise _Changed()
                    conn.execute(text(f"ALTER TABLE {parent} DROP PARTITION "
                                      f"{table.engine.dialect.identifier_preparer.quote(partition.name)}"))
                finally:
                    conn.execute(text("UNLOCK TABLES"))
        except _Changed:
            self.discard()
            log.info("%s: partition %s changed while it was archived; walking it in batches",
                     table.target.name, partition.qualified)
            return False
        except BaseException:
            self.discard()
            raise
        self.done()
        return True

    def _digest(self, counted: Any) -> Any:
        """The count query with a digest of the rows beside it: the sum of 60 bits of each
        row's MD5 (over every column, NULL told apart from any value)."""
        parts = [func.coalesce(func.hex(cast(column, LargeBinary)), literal("N")) for column in self.table.table.c]
        row_hash = func.conv(func.substring(func.md5(func.concat_ws(",", *parts)), 1, 15), 16, 10)
        if len(counted.selected_columns) == 1:
            counted = counted.add_columns(func.count())
        return counted.add_columns(func.sum(cast(row_hash, mysql.INTEGER(unsigned=True))))


class _Changed(Exception):
    """The partition's rows changed between the archive and the drop."""


class _Chunks(io.RawIOBase):
    """What COPY writes (one JSON row a line), cut into gzip bodies of at most ``limit``
    rows, each handed to ``upload`` as soon as it fills."""

    def __init__(self, limit: int, upload: Upload):
        super().__init__()
        self.limit, self.upload = limit, upload
        self.abandoned = False
        self._start()

    def writable(self) -> bool:
        return True

    def _start(self) -> None:
        self.buffer = io.BytesIO()
        self.gzip = gzip.GzipFile(fileobj=self.buffer, mode="wb", compresslevel=1, mtime=0)
        self.pending: list[bytes] = []
        self.size = 0
        self.rows = 0

    def write(self, data: Any) -> int:
        """Take COPY's next rows (whole lines, or a buffer's pieces of them)."""
        data = bytes(data)
        taken, rows = len(data), data.count(b"\n")
        if self.abandoned:
            return taken
        while self.rows + rows > self.limit:  # the object takes what it has room for
            room = self.limit - self.rows
            cut = _after_line(data, room)
            self._add(data[:cut], room)
            self._finish()
            data, rows = data[cut:], rows - room
        self._add(data, rows)
        if self.rows == self.limit:
            self._finish()
        return taken

    def finish(self) -> None:
        """Hand over the last, partly filled object."""
        if self.rows or self.pending:
            self._finish()

    def _add(self, data: bytes, rows: int) -> None:
        self.pending.append(data)
        self.size += len(data)
        self.rows += rows
        if self.size >= 1 << 20:  # compress in 1 MiB pieces, not row by row
            self.gzip.write(b"".join(self.pending))
            self.pending, self.size = [], 0

    def _finish(self) -> None:
        self.gzip.write(b"".join(self.pending))
        self.gzip.close()
        body, rows = self.buffer.getvalue(), self.rows
        self._start()
        self.upload(body, rows)


def _after_line(data: bytes, lines: int) -> int:
    """The offset just after the ``lines``-th newline of ``data``."""
    at = -1
    for _ in range(lines):
        at = data.index(b"\n", at + 1)
    return at + 1


def _counted(row: Any) -> tuple[int, int]:
    values = tuple(row)
    return int(values[0]), int(values[1] or 0) if len(values) > 1 else int(values[0])


def _changed(table: SqlTable, partition: Partition, expected: int, rows: int, matched: int) -> bool:
    log.info("%s: partition %s now holds %d rows (%d expired and unheld), not the %d counted; walking it in batches",
             table.target.name, partition.qualified, rows, matched, expected)
    return False

