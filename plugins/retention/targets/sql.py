"""SQL targets: find expired rows and delete them in short, journaled batches.

Batches walk the expired rows in ``(age_column, key...)`` order. Each batch is a closed
key range: its upper bound is found by an index walk (``OFFSET n-1 LIMIT 1``), then
``DELETE ... WHERE expired AND range`` runs in one short transaction. Before that
transaction commits, the batch (range and row count) is recorded as *pending* in the
audit journal; after it commits, as *done*. A crash in between leaves a pending batch
whose range tells, by counting what is still there, whether the delete committed. So a
rerun neither loses nor double-counts a batch, whatever moment the crash hit.

Time is an input: the cutoff is computed once per run and passed in.
"""

from __future__ import annotations

import base64
import json
import logging
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    MetaData,
    String,
    Table,
    and_,
    delete,
    func,
    inspect,
    or_,
    select,
    text,
    true,
    type_coerce,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import NoSuchTableError

from retention import failpoints
from retention.errors import TargetError
from retention.targets.base import BatchLedger, Progress, PurgeOutcome, Survey

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.sql.elements import ColumnElement

    from retention.rules import SqlTarget

log = logging.getLogger(__name__)

Bound = tuple[Any, ...]


@dataclass(frozen=True)
class BatchRange:
    """Rows after ``lower`` (exclusive) up to ``upper`` (inclusive) in walk order; None is open."""

    lower: Bound | None
    upper: Bound | None


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


class SqlTable:
    """A rule's SQL target bound to a live database."""

    def __init__(self, target: SqlTarget, engine: Engine, *, passes: int = 3):
        self.target = target
        self.engine = engine
        self.passes = passes
        self._table: Table | None = None

    # -- shape ---------------------------------------------------------------------

    @property
    def table(self) -> Table:
        """The reflected table, checked against the rule on first use."""
        if self._table is None:
            self._table = self._reflect()
        return self._table

    def _reflect(self) -> Table:
        schema, _, name = self.target.table.rpartition(".")
        try:
            table = Table(name, MetaData(), schema=schema or None, autoload_with=self.engine)
        except NoSuchTableError:
            raise TargetError(f"table {self.target.location} does not exist", "table") from None
        columns = {c.name: c for c in table.columns}
        for field, name_ in [("age_column", self.target.age_column)] + [
            ("key", k) for k in self.target.key
        ] + [(f"where.{c}", c) for c in self.target.where]:
            if name_ not in columns:
                raise TargetError(
                    f"column {name_!r} does not exist in {self.target.location} "
                    f"(columns: {', '.join(columns)})",
                    field,
                )
        self._check_key(table)
        self._check_age_type(columns[self.target.age_column])
        return table

    def _check_key(self, table: Table) -> None:
        key = list(self.target.key)
        pk = [c.name for c in table.primary_key.columns]
        if key == pk or sorted(key) == sorted(pk):
            return
        insp = inspect(self.engine)
        uniques = [u["column_names"] for u in insp.get_unique_constraints(table.name, table.schema)]
        uniques += [i["column_names"] for i in insp.get_indexes(table.name, table.schema) if i.get("unique")]
        if any(sorted(u) == sorted(key) for u in uniques):
            return
        raise TargetError(
            f"key {key} is not the primary key or a unique index of {self.target.location} "
            f"(primary key: {pk or 'none'}); batches walk the key, so it must identify one row",
            "key",
        )

    def _check_age_type(self, column: Column) -> None:
        if isinstance(column.type, (sqltypes.DateTime, sqltypes.Date)):
            return
        if self.engine.dialect.name == "sqlite" and isinstance(column.type, sqltypes.String):
            return  # SQLite keeps ISO 8601 text; julianday() reads it
        raise TargetError(
            f"age column {column.name!r} of {self.target.location} has type {column.type}; "
            "expected a date or timestamp",
            "age_column",
        )

    def check(self) -> None:
        """Raise TargetError unless the table matches the rule (reflects it once)."""
        self.table  # noqa: B018 - reflecting is the check

    def survey(self, cutoff: datetime) -> Survey:
        """Rows that would go, of how many, and what the rule reviewer should know."""
        notes = []
        if self.age_index() is None:
            notes.append(
                f"no index leads with {self.target.age_column}: every batch scans the table; "
                "add one before purging a large table"
            )
        return Survey(matched=self.count_expired(cutoff), total=self.count_rows(), notes=notes)

    def age_index(self) -> str | None:
        """The name of an index that leads with the age column, or None."""
        insp = inspect(self.engine)
        for index in insp.get_indexes(self.table.name, self.table.schema):
            if index["column_names"][:1] == [self.target.age_column]:
                return index["name"]
        return None

    # -- predicates ----------------------------------------------------------------

    def expired(self, cutoff: datetime) -> ColumnElement[bool]:
        """Rows whose age is strictly before ``cutoff`` and that pass the rule's filters."""
        column = self.table.c[self.target.age_column]
        conditions = [self._older_than(column, cutoff)]
        for name, condition in self.target.where.items():
            col = self.table.c[name]
            if isinstance(condition, dict):
                conditions.append(col.in_(condition["in"]))
            elif condition is None:
                conditions.append(col.is_(None))
            else:
                conditions.append(col == condition)
        return and_(*conditions)

    def _older_than(self, column: Column, cutoff: datetime) -> ColumnElement[bool]:
        cutoff = cutoff.astimezone(timezone.utc)
        is_date = isinstance(column.type, sqltypes.Date) and not isinstance(column.type, sqltypes.DateTime)
        if self.engine.dialect.name == "sqlite":
            # Text timestamps in any ISO form ('T' or ' ', with or without fractions or
            # offsets) compare correctly only as julian days.
            bound = cutoff.date().isoformat() if is_date else cutoff.strftime("%Y-%m-%d %H:%M:%S.%f")
            return func.julianday(column) < func.julianday(bound)
        if is_date:
            # A date is the whole day: it expires only once all of it is before the cutoff.
            return column < cutoff.date()
        if getattr(column.type, "timezone", False):
            return column < cutoff
        return column < cutoff.replace(tzinfo=None)  # naive columns hold UTC (documented)

    def _walk_columns(self) -> list[ColumnElement[Any]]:
        age = self.table.c[self.target.age_column]
        if self.engine.dialect.name == "sqlite":
            # Walk the stored text itself, so bounds round-trip byte for byte.
            age = type_coerce(age, String)
        return [age] + [self.table.c[k] for k in self.target.key]

    def _in_range(self, batch: BatchRange) -> ColumnElement[bool]:
        columns = self._walk_columns()
        parts = []
        if batch.lower is not None:
            parts.append(_lexicographic(columns, batch.lower, ">"))
        if batch.upper is not None:
            parts.append(_lexicographic(columns, batch.upper, "<="))
        return and_(true(), *parts)

    # -- reads ---------------------------------------------------------------------

    def count_expired(self, cutoff: datetime) -> int:
        """How many rows have expired at ``cutoff``."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(self.table).where(self.expired(cutoff))
            ).scalar_one()

    def count_rows(self) -> int:
        """How many rows the table holds."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(self.table)).scalar_one()

    def expired_keys(self, cutoff: datetime) -> list[tuple[Any, ...]]:
        """Keys of the expired rows in walk order (for tests and small tables)."""
        key = [self.table.c[k] for k in self.target.key]
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*key).where(self.expired(cutoff)).order_by(*self._walk_columns())
            )
            return [tuple(r) for r in rows]

    # -- writes --------------------------------------------------------------------

    def purge(
        self, cutoff: datetime, ledger: BatchLedger, *, progress: Progress | None = None
    ) -> PurgeOutcome:
        """Delete every expired row in committed batches, resuming whatever a crash left.

        Returns the rows deleted by this call (batches of earlier attempts are already
        in the ledger) and the expired rows still present when it stopped.
        """
        self.reconcile(cutoff, ledger)
        expired = self.expired(cutoff)
        sizer = BatchSizer(self.target.max_batch_rows)
        deleted = 0
        with self.engine.connect() as conn:
            for _ in range(self.passes):
                deleted += self._walk(conn, expired, ledger, sizer, deleted, progress)
                remaining = self._count(conn, expired)
                if remaining == 0:
                    break
                # Rows that became expired behind the walk (inserted with an old age while
                # it ran): walk again rather than leave them.
                log.info("%s: %d expired rows appeared behind the walk; walking again", self.target.name, remaining)
        return PurgeOutcome(deleted, remaining)

    def _walk(
        self,
        conn: Connection,
        expired: ColumnElement[bool],
        ledger: BatchLedger,
        sizer: BatchSizer,
        deleted_before: int,
        progress: Progress | None,
    ) -> int:
        columns = self._walk_columns()
        lower: Bound | None = None
        deleted = 0
        while True:
            window = expired if lower is None else and_(expired, _lexicographic(columns, lower, ">"))
            started = time.perf_counter()
            batch_no = ledger.next_batch_no()
            try:
                with conn.begin():
                    upper = self._upper_bound(conn, window, sizer.size)
                    batch = BatchRange(lower, upper)
                    if self._postgres:
                        # A range of many rows: visiting each heap page once (bitmap)
                        # beats one random heap read per row (index scan).
                        conn.execute(text("SET LOCAL enable_indexscan = off"))
                    rows = conn.execute(delete(self.table).where(expired, self._in_range(batch))).rowcount
                    if rows:
                        ledger.pending(batch_no, encode_range(batch), rows)
                        failpoints.hit("sql.before_commit")
                if rows:
                    failpoints.hit("sql.after_commit")
                    ledger.done(batch_no)
            except BaseException:
                self._settle_after_error(expired, ledger)
                raise
            seconds = time.perf_counter() - started
            deleted += rows
            if rows:
                log.debug("%s: batch %d deleted %d rows in %.3fs", self.target.name, batch_no, rows, seconds)
                if progress is not None:
                    progress(deleted_before + deleted, rows, seconds)
            sizer.observe(rows, seconds)
            if batch.upper is None:
                return deleted
            lower = batch.upper

    def _upper_bound(self, conn: Connection, window: ColumnElement[bool], size: int) -> Bound | None:
        """The last row of the next batch of ``size`` rows in walk order; None if fewer remain.

        On PostgreSQL the age index does not hold the key, so ordering by (age, key)
        reads every row of the batch from the heap and sorts it; the age alone is found
        by the index, and when few rows share it the batch simply takes them all. The
        bound is then ``(age,)``: every row up to and including that age.
        """
        columns = self._walk_columns()
        if self._postgres:
            row = conn.execute(
                select(columns[0]).where(window).order_by(columns[0]).offset(size - 1).limit(1)
            ).first()
            if row is None:
                return None
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
        return tuple(row) if row is not None else None

    @property
    def _postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def reconcile(self, cutoff: datetime, ledger: BatchLedger) -> int:
        """Settle pending batches by counting what is left of their ranges.

        None left: the delete committed. All left: it rolled back. Some left: another
        writer touched the range; the difference is counted as deleted (and logged).
        Returns the rows confirmed deleted.
        """
        return self._reconcile(self.expired(cutoff), ledger)

    def _count(self, conn: Connection, condition: ColumnElement[bool]) -> int:
        with conn.begin():
            if self._postgres:
                # After a walk the age index still points at every row just deleted;
                # a bitmap scan checks each heap page once instead of each entry.
                conn.execute(text("SET LOCAL enable_indexscan = off"))
                conn.execute(text("SET LOCAL enable_indexonlyscan = off"))
            return conn.execute(select(func.count()).select_from(self.table).where(condition)).scalar_one()

    def _reconcile(self, expired: ColumnElement[bool], ledger: BatchLedger) -> int:
        pending = ledger.unresolved()
        confirmed = 0
        if not pending:
            return confirmed
        with self.engine.connect() as conn:
            for batch in pending:
                present = conn.execute(
                    select(func.count()).select_from(self.table).where(
                        expired, self._in_range(decode_range(batch.descriptor))
                    )
                ).scalar_one()
                gone = max(batch.rows - present, 0)
                if 0 < present < batch.rows:
                    log.warning(
                        "%s: batch %d was interrupted and %d of its %d rows are gone; counting them as purged",
                        self.target.name, batch.batch_no, gone, batch.rows,
                    )
                ledger.resolve(batch.batch_no, gone)
                confirmed += gone
        return confirmed

    def _settle_after_error(self, expired: ColumnElement[bool], ledger: BatchLedger) -> None:
        try:
            self._reconcile(expired, ledger)
        except Exception:  # the original error matters more; the next attempt reconciles
            log.warning("%s: could not settle the interrupted batch now; the next attempt will",
                        self.target.name, exc_info=True)


def _lexicographic(columns: Sequence[ColumnElement[Any]], values: Bound, op: str) -> ColumnElement[bool]:
    """``(c0, c1, ...) op (v0, v1, ...)`` spelled so that every engine uses the index on c0.

    Row-value comparison is not optimised alike by PostgreSQL, MariaDB and SQLite, so it
    is expanded: ``c0 > v0 OR (c0 = v0 AND (c1 > v1 OR ...))``, plus a plain range on c0.
    """
    assert op in (">", "<=")
    columns = list(columns[: len(values)])  # a bound may name only the leading columns
    strict = (lambda c, v: c > v) if op == ">" else (lambda c, v: c < v)
    last = (lambda c, v: c > v) if op == ">" else (lambda c, v: c <= v)
    expression = last(columns[-1], values[-1])
    for column, value in zip(reversed(columns[:-1]), reversed(values[:-1])):
        expression = or_(strict(column, value), and_(column == value, expression))
    leading = columns[0] >= values[0] if op == ">" else columns[0] <= values[0]
    return and_(leading, expression)


# -- batch descriptors -------------------------------------------------------------------
# A batch is journaled as its walk range. Bounds hold key and age values of whatever type
# the table has; JSON alone would lose datetimes, decimals and UUIDs, so each value is tagged.


def encode_range(batch: BatchRange) -> str:
    """JSON for a batch range, with typed values."""
    return json.dumps({"lower": _encode(batch.lower), "upper": _encode(batch.upper)}, sort_keys=True)


def decode_range(text: str) -> BatchRange:
    """Inverse of :func:`encode_range`."""
    data = json.loads(text)
    return BatchRange(_decode(data["lower"]), _decode(data["upper"]))


def _encode(bound: Bound | None) -> list[Any] | None:
    return None if bound is None else [_encode_value(v) for v in bound]


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, date):
        return {"date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": base64.b64encode(bytes(value)).decode()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return {"str": str(value)}


def _decode(bound: list[Any] | None) -> Bound | None:
    return None if bound is None else tuple(_decode_value(v) for v in bound)


def _decode_value(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    ((tag, text),) = value.items()
    return {
        "datetime": datetime.fromisoformat,
        "date": date.fromisoformat,
        "decimal": Decimal,
        "uuid": uuid.UUID,
        "bytes": base64.b64decode,
        "str": str,
    }[tag](text)
