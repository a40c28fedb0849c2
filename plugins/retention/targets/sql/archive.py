"""The archive action: never lets a row go before its archive object is written and
  verified. On PostgreSQL the batch's ``DELETE ... RETURNING`` *is* the archive: its
  output streams through ``COPY`` into gzip JSON Lines, the objects are uploaded and
  verified, and only then does the transaction commit (any failure rolls it back). On
  other databases rows are read and archived first, then deleted with ``RETURNING *``
  in one short transaction that checks exactly the archived rows went (else it rolls
  back and tries again). Either way, if an upload or its check fails, nothing of the
  batch is deleted.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import logging
import time
from collections import Counter
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, select, text

from retention import failpoints
from retention.archive.codec import TableShape, column_codec, encode_rows
from retention.archive.store import ArchivedObject, ArchiveExists, ArchiveFailed
from retention.errors import TargetError, TransientError
from retention.retry import attempts
from retention.targets.base import BatchResult
from retention.targets.sql.actions import SqlAction, postgres_bitmap
from retention.targets.sql.descriptors import BatchDescriptor, BatchRange
from retention.targets.sql.family import Member, family_members

if TYPE_CHECKING:
    from collections.abc import Iterable, Iterator

    from sqlalchemy import Table
    from sqlalchemy.engine import Connection, Row
    from sqlalchemy.sql.elements import ClauseElement, ColumnElement

    from retention.archive.store import ArchiveStore
    from retention.targets.base import BatchLedger, PendingBatch
    from retention.targets.sql.batch import Batch
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)


ARCHIVE_ATTEMPTS = 3
"""Tries at a two-phase batch whose rows keep changing between archive and delete."""

Planned = list[tuple[str, str]]
"""(object key, table) of the objects a batch may write, sorted by key."""


class ArchiveRows(SqlAction):
    """Write the batch's rows to verified archive objects, then delete exactly those rows."""

    def __init__(self, store: ArchiveStore, *, category: str, run_id: str):
        self.store = store
        self.category = category
        self.run_id = run_id
        # A one-pass batch holds its transaction through the upload: a little longer
        # batches pay for their fixed costs (bound query, request, journal) fewer times.
        self.batch_seconds = 0.25

    def check(self, table: SqlTable) -> None:
        if not table.engine.dialect.delete_returning:
            raise TargetError(
                f"{table.engine.dialect.name} {table.engine.dialect.server_version_info} cannot DELETE ... "
                "RETURNING, which archive needs to prove the deleted rows are the archived ones",
                "kind",
            )

    def notes(self, table: SqlTable) -> list[str]:
        return [f"archived to {self.store.spec.location} as {self.store.spec.format} "
                f"({self.store.spec.storage_class}) before deletion"]

    def apply(self, table: SqlTable, conn: Connection, batch: Batch) -> BatchResult:
        if table.engine.dialect.name == "postgresql" and self.store.spec.format == "jsonl.gz":
            return self._archive_in_one_pass(table, conn, batch)
        # Rows edited between being archived and being deleted: archive the batch again at
        # once, under a new number (the one it had is settled), through the one retry policy.
        retrying = attempts(lambda exc: isinstance(exc, _RowsChanged), delays=(0,) * (ARCHIVE_ATTEMPTS - 1),
                            what=f"{table.target.name}: archiving the batch again")
        try:
            for attempt in retrying:
                with attempt:
                    if attempt.retry_state.attempt_number > 1:
                        batch = dataclasses.replace(batch, number=batch.ledger.next_batch_no(), span=None)
                    return self._archive_batch(table, conn, batch)
        except _RowsChanged:
            pass
        raise TransientError(f"{table.target.name}: rows kept changing while being archived; try again later")

    def _archive_in_one_pass(self, table: SqlTable, conn: Connection, batch: Batch) -> BatchResult:
        """PostgreSQL: DELETE ... RETURNING streams (COPY) into the archive objects; the
        transaction commits only after every object verified. The archive is exactly what
        was deleted, with no second read and no comparison."""
        ledger, batch_no, holds = batch.ledger, batch.number, batch.holds
        started = time.perf_counter()
        depths = _depths(table.family)
        with conn.begin():
            span = batch.cut(table, conn)
            selection = and_(batch.expired, table.in_range(span))
            members = table.family_conditions(selection)  # children first
            keys = self._keys(table, batch_no, members)
            planned = _planned(keys)
            # Journaled before anything happens: a crash from here on leaves a batch that is
            # settled by counting its range (and its objects removed if it did not commit).
            ledger.pending(batch_no, BatchDescriptor(span, planned=tuple(planned), holds=holds).encode(), 0)
            postgres_bitmap(table, conn)
            conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = '120s'"))
            bodies: dict[str, bytes] = {}
            counts: dict[str, int] = {}
            cursor = _dbapi_cursor(conn)
            try:
                for member, condition in members:
                    buffer = io.BytesIO()
                    with gzip.GzipFile(fileobj=buffer, mode="wb", compresslevel=1, mtime=0) as compressed, \
                            io.BufferedWriter(compressed, buffer_size=1 << 20) as stream:  # compress in 1 MiB chunks
                        cursor.copy_expert(_copy_deleted_as_json(conn, member, condition), stream)
                    bodies[member.name], counts[member.name] = buffer.getvalue(), cursor.rowcount
            finally:
                cursor.close()
            rows = counts[table.family.name]
            if rows == 0:
                ledger.resolve(batch_no, 0)
                return BatchResult(span, 0, {}, time.perf_counter() - started)
            batch.check_cap(rows)  # rolls back; the walker settles the pending batch
            ledger.update_pending(batch_no, rows, BatchDescriptor(span, tables=counts, planned=tuple(planned),
                                                                  holds=holds).encode())
            written: list[str] = []
            try:
                archived = self._upload(members, bodies, counts, keys, depths, written)
            except Exception:
                # The transaction rolls back: nothing of the batch is deleted.
                self._discard(ledger, batch_no, rows, written,
                              BatchDescriptor(span, tables=counts, planned=_only(planned, written), holds=holds))
                raise
            failpoints.hit("archive.before_commit")
        return self._committed(table, batch, span, counts, archived, time.perf_counter() - started)

    def _keys(self, table: SqlTable, batch_no: int,
              members: list[tuple[Member, ColumnElement[bool]]]) -> dict[str, str]:
        """The archive object key of each table of the batch."""
        return {member.name: self.store.key_for(self.category, self.run_id, table.target.name, batch_no, member.name)
                for member, _ in members}

    def _upload(self, members: list[tuple[Member, ColumnElement[bool]]], bodies: dict[str, bytes],
                counts: dict[str, int], keys: dict[str, str], depths: dict[str, int],
                written: list[str]) -> list[ArchivedObject]:
        """Upload and verify one object per table that has rows in the batch; ``written``
        collects the keys this attempt may have written (a taken key is never among them)."""
        archived = []
        failpoints.hit("archive.before_upload")
        for member, _ in members:
            if counts[member.name]:
                written.append(keys[member.name])
                try:
                    stored = self.store.put_verified(keys[member.name], bodies[member.name], table=member.name,
                                                     rows=counts[member.name],
                                                     columns=TableShape.of(member.table).columns)
                except ArchiveExists:
                    written.pop()  # someone else's object: never removed, never replaced
                    raise
                archived.append(dataclasses.replace(stored, depth=depths[member.name]))
                failpoints.hit("archive.after_object")
        return archived

    def _discard(self, ledger: BatchLedger, batch_no: int, rows: int, written: list[str],
                 descriptor: BatchDescriptor) -> None:
        """A batch that will not commit: journal only the keys this attempt wrote (so a
        settlement never removes an object that was there before), remove them, resolve it."""
        ledger.update_pending(batch_no, rows, descriptor.encode())
        self.store.remove(written)
        ledger.resolve(batch_no, 0)

    def _committed(self, table: SqlTable, batch: Batch, span: BatchRange, counts: dict[str, int],
                   archived: list[ArchivedObject], seconds: float) -> BatchResult:
        """The batch committed: journal it done, with its verified objects."""
        failpoints.hit("archive.after_commit")
        descriptor = BatchDescriptor(span, tables=counts, objects=tuple(o.to_dict() for o in archived),
                                     holds=batch.holds)
        batch.ledger.done(batch.number, tables=counts, descriptor=descriptor.encode())
        return BatchResult(span, counts[table.family.name], counts, seconds)

    def _archive_batch(self, table: SqlTable, conn: Connection, batch: Batch) -> BatchResult:
        """MariaDB, SQLite (and Parquet): read and archive the batch's rows, then delete
        them in one short transaction that checks exactly the archived rows went."""
        ledger, batch_no, holds = batch.ledger, batch.number, batch.holds
        with conn.begin():
            span = batch.cut(table, conn)
        selection = and_(batch.expired, table.in_range(span))
        members = table.family_conditions(selection)
        shapes = {member.name: TableShape.of(member.table) for member, _ in members}
        depths = _depths(table.family)
        keys = self._keys(table, batch_no, members)
        # 1. Stream every table's rows from a server-side cursor into its compressed archive
        #    body, keeping only a 16-byte digest per row to compare with what the delete returns.
        bodies: dict[str, bytes] = {}
        counts: dict[str, int] = {}
        digests: dict[str, Counter[Any]] = {}
        with conn.begin():
            for member, condition in members:
                query = select(member.table).where(condition)
                if member is table.family:
                    query = query.order_by(*table.walk_columns())
                # Per statement: Connection.execution_options would stream every later statement too.
                result = conn.execute(query.execution_options(stream_results=True, yield_per=5000))
                shape = shapes[member.name]
                counter: Counter[Any] = Counter()

                def rows_counted(rows: Iterable[Row[Any]] = result,
                                 counter: Counter[Any] = counter) -> Iterator[Row[Any]]:
                    for row in rows:
                        counter[_fingerprint(row)] += 1
                        yield row

                bodies[member.name], counts[member.name] = encode_rows(shape, rows_counted(), self.store.spec.format)
                digests[member.name] = counter
        rows = counts[table.family.name]
        if rows == 0:
            return BatchResult(span, 0, {}, 0.0)
        batch.check_cap(rows)  # nothing journaled or uploaded yet
        planned = _planned(keys)
        ledger.pending(batch_no, BatchDescriptor(span, tables=counts, planned=tuple(planned), holds=holds).encode(),
                       rows)
        # 2. Upload and verify; on any failure remove what was uploaded and delete nothing.
        written: list[str] = []
        try:
            archived = self._upload(members, bodies, counts, keys, depths, written)
        except Exception:
            self._discard(ledger, batch_no, rows, written,
                          BatchDescriptor(span, tables=counts, planned=_only(planned, written), holds=holds))
            raise
        # 3. One short transaction: delete children first, then the target's rows, and
        #    check that exactly the archived rows went.
        started = time.perf_counter()
        try:
            with conn.begin():
                postgres_bitmap(table, conn)
                for member, condition in members:
                    returned = conn.execute(delete(member.table).where(condition).returning(*member.table.c))
                    went = Counter(_fingerprint(row) for row in returned)
                    if went != digests[member.name]:
                        raise _RowsChanged(f"{member.name} changed between archive and delete")
                failpoints.hit("archive.before_commit")
        except _RowsChanged:
            self.store.remove(keys.values())
            ledger.resolve(batch_no, 0)
            raise
        return self._committed(table, batch, span, counts, archived, time.perf_counter() - started)

    def settle(self, table: SqlTable, pending: PendingBatch, descriptor: BatchDescriptor, gone: int,
               ledger: BatchLedger) -> None:
        if gone == 0:
            # The delete never committed: any object uploaded for the batch is debris.
            self.store.remove(descriptor.planned_keys())
            ledger.resolve(pending.batch_no, 0)
            return
        tables = descriptor.tables
        if tables is None and descriptor.planned:
            raise ArchiveFailed(f"rows of batch {pending.batch_no} are gone but its journal entry does not say "
                                "how many of each table, so its archive objects cannot be checked")
        objects = []
        for key, name in descriptor.planned or ():
            rows = (tables or {}).get(name)
            if not rows:
                continue  # a table with no rows in this batch got no object
            found = self.store.describe(key, table=name, rows=rows,
                                        columns=TableShape.of(_member(table, name).table).columns)
            if found is None:
                raise ArchiveFailed(f"rows of batch {pending.batch_no} are gone but archive object {key} is not there")
            objects.append(dataclasses.replace(found, depth=_depths(table.family)[name]).to_dict())
        ledger.resolve(pending.batch_no, gone, tables=None if tables is None else dict(tables),
                       descriptor=dataclasses.replace(descriptor, objects=tuple(objects)).encode())


def _depths(member: Member, depth: int = 0) -> dict[str, int]:
    found = {member.name: depth}
    for child in member.children:
        found |= _depths(child, depth + 1)
    return found


def _planned(keys: dict[str, str]) -> Planned:
    return sorted((key, name) for name, key in keys.items())


def _only(planned: Planned, written: list[str]) -> tuple[tuple[str, str], ...]:
    return tuple(entry for entry in planned if entry[0] in written)


def _member(table: SqlTable, name: str) -> Member:
    return next(member for member in family_members(table.family) if member.name == name)


class _RowsChanged(Exception):
    """Rows of a batch changed between being archived and being deleted."""


def _fingerprint(row: Row[Any]) -> Any:
    """A row's values, comparable between what was archived and what the delete returned."""
    values = tuple(row)
    try:
        hash(values)
        return values
    except TypeError:  # JSON columns hold dicts and lists
        return repr(values)


def _dbapi_cursor(conn: Connection) -> Any:
    """A cursor of the driver's own (psycopg2's, for COPY and mogrify)."""
    dbapi_connection = conn.connection.dbapi_connection
    assert dbapi_connection is not None  # a connection in use is never detached
    return dbapi_connection.cursor()


def _copy_deleted_as_json(conn: Connection, member: Member, condition: ColumnElement[bool]) -> str:
    """``COPY (DELETE ... RETURNING) TO STDOUT`` as JSON Lines, each value encoded the way
    :mod:`retention.archive.store` encodes it (so restore reads both paths alike).

    COPY takes no parameters, so psycopg2 itself renders them into the statement.
    """
    return copy_as_json(conn, member.table, delete(member.table).where(condition).returning(*member.table.c))


def copy_as_json(conn: Connection, table: Table, statement: ClauseElement) -> str:
    """``COPY (statement) TO STDOUT`` as JSON Lines of ``table``'s columns, one row a line
    (JSON escapes every newline), each value encoded as :mod:`retention.archive.codec` does."""
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    cursor = _dbapi_cursor(conn)
    try:
        deleting = cursor.mogrify(compiled.string, compiled.params).decode()
    finally:
        cursor.close()
    preparer = conn.dialect.identifier_preparer
    pairs = []
    for column in table.columns:
        name = preparer.quote(column.name)
        value = f"d.{name}"
        codec = column_codec(column)
        if codec == "decimal":
            value = f"{value}::text"
        elif codec == "bytes":
            value = f"translate(encode({value}, 'base64'), E'\\n', '')"
        elif codec == "interval":
            value = f"extract(epoch from {value})"
        pairs.append((name, column.name, value))
    if all(value == f"d.{name}" for name, _, value in pairs):  # nothing to convert: the compact, quick way
        select_json = "SELECT row_to_json(d)::text FROM d"
    else:
        columns = ", ".join(f"{value} AS {name}" for name, _, value in pairs)
        select_json = f"SELECT row_to_json(x)::text FROM (SELECT {columns} FROM d) x"
    return (f"COPY (WITH d AS ({deleting}) {select_json}) "
            "TO STDOUT WITH (FORMAT csv, QUOTE E'\\x01', DELIMITER E'\\x02')")
