"""What a SQL batch does to its rows: delete them, archive then delete them, or anonymize them.

Every action journals the batch *pending* before its irreversible step and *done* after,
with the rows of each table, so :meth:`SqlTable.reconcile` can settle a crash.

- :class:`DeleteRows` deletes children, then the target's rows, in one transaction.
- :class:`ArchiveRows` never lets a row go before its archive object is written and
  verified. On PostgreSQL the batch's ``DELETE ... RETURNING`` *is* the archive: its
  output streams through ``COPY`` into gzip JSON Lines, the objects are uploaded and
  verified, and only then does the transaction commit (any failure rolls it back). On
  other databases rows are read and archived first, then deleted with ``RETURNING *``
  in one short transaction that checks exactly the archived rows went (else it rolls
  back and tries again). Either way, if an upload or its check fails, nothing of the
  batch is deleted.
- :class:`AnonymizeRows` rewrites the rule's columns and sets the marker column.
"""

from __future__ import annotations

import dataclasses
import gzip
import io
import json
import logging
import time
from collections import Counter
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Date, DateTime, String, and_, bindparam, delete, select, text, update
from sqlalchemy import types as sqltypes

from retention import failpoints
from retention.archive.store import (
    ArchivedObject,
    ArchiveExists,
    ArchiveFailed,
    TableShape,
    column_codec,
    encode_rows,
)
from retention.errors import TargetError, TransientError
from retention.targets.base import BatchResult
from retention.targets.sql.descriptors import encode_range
from retention.targets.sql.table import _members

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.archive.store import ArchiveStore
    from retention.targets.base import BatchLedger, PendingBatch
    from retention.targets.sql.anonymize import Anonymizer
    from retention.targets.sql.table import SqlTable
    from retention.targets.sql.walk import Batch

log = logging.getLogger(__name__)

ARCHIVE_ATTEMPTS = 3


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

    def settle(self, table: SqlTable, pending: PendingBatch, descriptor: dict[str, Any], gone: int,
               ledger: BatchLedger) -> None:
        """Settle a batch found pending: ``gone`` of its rows are no longer to be processed."""
        tables = descriptor.get("tables") if gone == pending.rows else None
        ledger.resolve(pending.batch_no, gone, tables=tables or ({table.family.name: gone} if gone else None))


def _postgres_bitmap(table: SqlTable, conn: Connection) -> None:
    if table.engine.dialect.name == "postgresql":
        # A range of many rows: visiting each heap page once (bitmap) beats one random
        # heap read per row (index scan).
        conn.execute(text("SET LOCAL enable_indexscan = off"))


class DeleteRows(SqlAction):
    """Delete the batch's rows, children first, in one transaction."""

    def apply(self, table, conn, batch):
        ledger, batch_no = batch.ledger, batch.number
        started = time.perf_counter()
        with conn.begin():
            span = batch.cut(table, conn)
            _postgres_bitmap(table, conn)
            selection = and_(batch.expired, table.in_range(span))
            counts = {member.name: conn.execute(delete(member.table).where(condition)).rowcount
                      for member, condition in table.family_conditions(selection)}
            rows = counts[table.family.name]
            batch.check_cap(rows)
            if rows:
                ledger.pending(batch_no, encode_range(span, tables=counts, holds=list(batch.holds)), rows)
                failpoints.hit("sql.before_commit")
        seconds = time.perf_counter() - started
        if rows:
            failpoints.hit("sql.after_commit")
            ledger.done(batch_no, tables=counts)
        return BatchResult(span, rows, counts, seconds)


class ArchiveRows(SqlAction):
    """Write the batch's rows to verified archive objects, then delete exactly those rows."""

    def __init__(self, store: ArchiveStore, *, category: str, run_id: str):
        self.store = store
        self.category = category
        self.run_id = run_id
        # A one-pass batch holds its transaction through the upload: a little longer
        # batches pay for their fixed costs (bound query, request, journal) fewer times.
        self.batch_seconds = 0.25

    def check(self, table):
        if not table.engine.dialect.delete_returning:
            raise TargetError(
                f"{table.engine.dialect.name} {table.engine.dialect.server_version_info} cannot DELETE ... "
                "RETURNING, which archive needs to prove the deleted rows are the archived ones",
                "kind",
            )

    def notes(self, table):
        return [f"archived to {self.store.spec.location} as {self.store.spec.format} "
                f"({self.store.spec.storage_class}) before deletion"]

    def apply(self, table, conn, batch):
        if table.engine.dialect.name == "postgresql" and self.store.spec.format == "jsonl.gz":
            return self._archive_in_one_pass(table, conn, batch)
        for attempt in range(1, ARCHIVE_ATTEMPTS + 1):
            try:
                return self._archive_batch(table, conn, batch)
            except _RowsChanged as changed:
                log.info("%s: %s; archiving the batch again (attempt %d)", table.target.name, changed, attempt + 1)
                batch = dataclasses.replace(batch, number=batch.ledger.next_batch_no(), span=None)
        raise TransientError(f"{table.target.name}: rows kept changing while being archived; try again later")

    def _archive_in_one_pass(self, table, conn, batch: Batch) -> BatchResult:
        """PostgreSQL: DELETE ... RETURNING streams (COPY) into the archive objects; the
        transaction commits only after every object verified. The archive is exactly what
        was deleted, with no second read and no comparison."""
        ledger, batch_no, holds = batch.ledger, batch.number, list(batch.holds)
        started = time.perf_counter()
        depths = _depths(table.family)
        with conn.begin():
            span = batch.cut(table, conn)
            selection = and_(batch.expired, table.in_range(span))
            members = table.family_conditions(selection)  # children first
            keys = {member.name: self.store.key_for(self.category, self.run_id, table.target.name, batch_no,
                                                     member.name) for member, _ in members}
            planned = sorted([key, name] for name, key in keys.items())
            # Journaled before anything happens: a crash from here on leaves a batch that is
            # settled by counting its range (and its objects removed if it did not commit).
            ledger.pending(batch_no, encode_range(span, planned=planned, holds=holds), 0)
            _postgres_bitmap(table, conn)
            conn.execute(text("SET LOCAL idle_in_transaction_session_timeout = '120s'"))
            bodies, counts = {}, {}
            cursor = conn.connection.dbapi_connection.cursor()
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
            ledger.update_pending(batch_no, rows, encode_range(span, tables=counts, planned=planned,
                                                                holds=holds))
            written: list[str] = []
            try:
                archived = self._upload(members, bodies, counts, keys, depths, written)
            except Exception:
                # The transaction rolls back: nothing of the batch is deleted.
                self._discard(ledger, batch_no, rows, written,
                              encode_range(span, tables=counts, planned=_only(planned, written),
                                           holds=holds))
                raise
            failpoints.hit("archive.before_commit")
        return self._committed(table, batch, span, counts, archived, time.perf_counter() - started)

    def _upload(self, members, bodies: dict[str, bytes], counts: dict[str, int], keys: dict[str, str],
                depths: dict[str, int], written: list[str]) -> list[ArchivedObject]:
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

    def _discard(self, ledger, batch_no: int, rows: int, written: list[str], descriptor: str) -> None:
        """A batch that will not commit: journal only the keys this attempt wrote (so a
        settlement never removes an object that was there before), remove them, resolve it."""
        ledger.update_pending(batch_no, rows, descriptor)
        self.store.remove(written)
        ledger.resolve(batch_no, 0)

    def _committed(self, table, batch: Batch, span, counts, archived, seconds) -> BatchResult:
        """The batch committed: journal it done, with its verified objects."""
        failpoints.hit("archive.after_commit")
        batch.ledger.done(batch.number, tables=counts,
                          descriptor=encode_range(span, tables=counts, objects=[o.to_dict() for o in archived],
                                                  holds=list(batch.holds)))
        return BatchResult(span, counts[table.family.name], counts, seconds)

    def _archive_batch(self, table, conn, batch: Batch) -> BatchResult:
        ledger, batch_no, holds = batch.ledger, batch.number, list(batch.holds)
        with conn.begin():
            span = batch.cut(table, conn)
        selection = and_(batch.expired, table.in_range(span))
        members = table.family_conditions(selection)
        shapes = {member.name: TableShape.of(member.table) for member, _ in members}
        depths = _depths(table.family)
        keys = {member.name: self.store.key_for(self.category, self.run_id, table.target.name, batch_no,
                                                 member.name) for member, _ in members}
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

                def rows_counted(rows=result, counter=counter):
                    for row in rows:
                        counter[_fingerprint(row)] += 1
                        yield row

                bodies[member.name], counts[member.name] = encode_rows(shape, rows_counted(), self.store.spec.format)
                digests[member.name] = counter
        rows = counts[table.family.name]
        if rows == 0:
            return BatchResult(span, 0, {}, 0.0)
        batch.check_cap(rows)  # nothing journaled or uploaded yet
        planned = sorted([key, name] for name, key in keys.items())
        ledger.pending(batch_no, encode_range(span, tables=counts, planned=planned, holds=holds), rows)
        # 2. Upload and verify; on any failure remove what was uploaded and delete nothing.
        written: list[str] = []
        try:
            archived = self._upload(members, bodies, counts, keys, depths, written)
        except Exception:
            self._discard(ledger, batch_no, rows, written,
                          encode_range(span, tables=counts, planned=_only(planned, written), holds=holds))
            raise
        # 3. One short transaction: delete children first, then the target's rows, and
        #    check that exactly the archived rows went.
        started = time.perf_counter()
        try:
            with conn.begin():
                _postgres_bitmap(table, conn)
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

    def settle(self, table, pending, descriptor, gone, ledger):
        planned = descriptor.get("planned", [])
        if gone == 0:
            # The delete never committed: any object uploaded for the batch is debris.
            self.store.remove(key for key, _name in planned)
            ledger.resolve(pending.batch_no, 0)
            return
        objects = []
        for key, name in planned:
            if not descriptor["tables"].get(name):
                continue  # a table with no rows in this batch got no object
            found = self.store.describe(key, table=name, rows=descriptor["tables"][name],
                                        columns=TableShape.of(_member(table, name).table).columns)
            if found is None:
                raise ArchiveFailed(f"rows of batch {pending.batch_no} are gone but archive object {key} is not there")
            objects.append(dataclasses.replace(found, depth=_depths(table.family)[name]).to_dict())
        tables = descriptor.get("tables")
        ledger.resolve(pending.batch_no, gone, tables=tables,
                       descriptor=json.dumps({**descriptor, "objects": objects}, sort_keys=True))


def _depths(member, depth: int = 0) -> dict[str, int]:
    found = {member.name: depth}
    for child in member.children:
        found |= _depths(child, depth + 1)
    return found


def _only(planned: list[list[str]], written: list[str]) -> list[list[str]]:
    return [entry for entry in planned if entry[0] in written]


def _member(table: SqlTable, name: str):
    return next(member for member in _members(table.family) if member.name == name)


class _RowsChanged(Exception):
    """Rows of a batch changed between being archived and being deleted."""


def _fingerprint(row) -> Any:
    """A row's values, comparable between what was archived and what the delete returned."""
    values = tuple(row)
    try:
        hash(values)
        return values
    except TypeError:  # JSON columns hold dicts and lists
        return repr(values)


def _copy_deleted_as_json(conn, member, condition) -> str:
    """``COPY (DELETE ... RETURNING) TO STDOUT`` as JSON Lines, each value encoded the way
    :mod:`retention.archive.store` encodes it (so restore reads both paths alike).

    COPY takes no parameters, so psycopg2 itself renders them into the statement.
    """
    statement = delete(member.table).where(condition).returning(*member.table.c)
    compiled = statement.compile(dialect=conn.dialect, compile_kwargs={"render_postcompile": True})
    cursor = conn.connection.dbapi_connection.cursor()
    try:
        deleting = cursor.mogrify(compiled.string, compiled.params).decode()
    finally:
        cursor.close()
    preparer = conn.dialect.identifier_preparer
    pairs = []
    for column in member.table.columns:
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


class AnonymizeRows(SqlAction):
    """Rewrite the rule's columns in place and set the marker; the row stays."""

    removes_rows = False

    def __init__(self, anonymizer: Anonymizer, *, as_of: datetime):
        self.anonymizer = anonymizer
        self.as_of = as_of

    @staticmethod
    def _spec(table: SqlTable):
        return table.target.anonymize

    def condition(self, table):
        return table.table.c[self._spec(table).marker].is_(None)

    def check(self, table):
        spec = self._spec(table)
        columns = table.table.c
        sqlite = table.engine.dialect.name == "sqlite"
        marker = columns.get(spec.marker)
        if marker is None:
            raise TargetError(f"marker column {spec.marker!r} does not exist in {table.target.location}",
                              "anonymize.marker")
        if not marker.nullable or not (isinstance(marker.type, (DateTime, Date)) or sqlite):
            raise TargetError(f"marker column {spec.marker!r} must be a nullable date or timestamp",
                              "anonymize.marker")
        for name, strategy in spec.columns.items():
            field = f"anonymize.columns.{name}"
            column = columns.get(name)
            if column is None:
                raise TargetError(f"column {name!r} does not exist in {table.target.location}", field)
            if name in table.target.key:
                raise TargetError(f"{name!r} is part of the key; anonymize other columns", field)
            if strategy.kind == "null" and not column.nullable:
                raise TargetError(f"column {name!r} is NOT NULL and cannot be set to null", field)
            if strategy.needs_text:
                if not isinstance(column.type, String):
                    raise TargetError(f"{strategy.describe()} writes text, but {name!r} is {column.type}", field)
                length = column.type.length
                if strategy.kind == "hash" and length is not None and length < 64:
                    raise TargetError(f"hash writes 64 hex characters, but {name!r} holds {length}", field)
            if strategy.needs_date and not (isinstance(column.type, (DateTime, Date)) or sqlite):
                raise TargetError(f"{strategy.describe()} needs a date or timestamp, but {name!r} is {column.type}",
                                  field)

    def notes(self, table):
        spec = self._spec(table)
        described = ", ".join(f"{c} → {s.describe()}" for c, s in spec.columns.items())
        return [f"anonymized in place ({described}); {spec.marker} marks rows done"]

    def apply(self, table, conn, batch):
        ledger, batch_no = batch.ledger, batch.number
        spec = self._spec(table)
        t = table.table
        key = [t.c[k] for k in table.target.key]
        columns = list(spec.columns)
        started = time.perf_counter()
        with conn.begin():
            span = batch.cut(table, conn)
            query = select(*key, *[t.c[c] for c in columns]).where(batch.expired, table.in_range(span))
            if table.engine.dialect.name != "sqlite":
                query = query.with_for_update()
            rows = conn.execute(query).all()
            batch.check_cap(len(rows))
            if rows:
                marker = _as_column_value(t.c[spec.marker], self.as_of)
                params = []
                for row in rows:
                    values = {f"k_{i}": row[i] for i in range(len(key))}
                    for j, name in enumerate(columns):
                        values[f"v_{name}"] = self.anonymizer.apply(spec.columns[name], row[len(key) + j])
                    values["v_marker"] = marker
                    params.append(values)
                statement = (
                    update(t)
                    .where(*[col == bindparam(f"k_{i}") for i, col in enumerate(key)])
                    .values({**{name: bindparam(f"v_{name}") for name in columns},
                             spec.marker: bindparam("v_marker")})
                )
                conn.execute(statement, params)
                ledger.pending(batch_no, encode_range(span, tables={table.family.name: len(rows)},
                                                      holds=list(batch.holds)), len(rows))
                failpoints.hit("sql.before_commit")
        seconds = time.perf_counter() - started
        if rows:
            failpoints.hit("sql.after_commit")
            ledger.done(batch_no, tables={table.family.name: len(rows)})
        return BatchResult(span, len(rows), {table.family.name: len(rows)}, seconds)


def _as_column_value(column, moment: datetime) -> Any:
    """``moment`` as the column stores it: a date, or a timestamp with or without zone."""
    moment = moment.astimezone(timezone.utc)
    if isinstance(column.type, sqltypes.Date) and not isinstance(column.type, sqltypes.DateTime):
        return moment.date()
    if getattr(column.type, "timezone", False):
        return moment
    return moment.replace(tzinfo=None)
