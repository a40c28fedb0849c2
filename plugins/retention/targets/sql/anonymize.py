"""The anonymize action (:class:`AnonymizeRows`) and its strategies: what replaces a personal value when a row is kept.

``hash`` is an HMAC-SHA256 under a secret key (``RETENTION_HASH_KEY``): the same input
gives the same output everywhere the key is used, so joins on a hashed column still
work, while without the key an email's hash cannot be looked up in a table of emails.
The others drop information for good: ``null``, ``redact`` (keep the last N
characters), ``generalize`` (a date to its year or month, a text to its first N
characters).

A batch is one ``UPDATE … WHERE <range, expired, unheld>`` computing the values in the
database where it can compute them exactly (:mod:`retention.targets.sql.anonymize_sql`);
otherwise (SQLite, a strategy a backend cannot reproduce) its rows are read, locked and
rewritten by key from Python. Either way the batch is journaled pending before it
commits and done after, with the rows it changed.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import Mapping
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Date, DateTime, String, bindparam, inspect, select, update
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError

from retention import failpoints
from retention.errors import ConfigError, TargetError
from retention.rules.strategies import Strategy
from retention.targets.base import BatchResult
from retention.targets.sql.actions import SqlAction, postgres_bitmap
from retention.targets.sql.anonymize_sql import HmacPads, sql_values
from retention.targets.sql.descriptors import BatchDescriptor

if TYPE_CHECKING:
    from sqlalchemy import Column
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.rules.models import AnonymizeSpec
    from retention.targets.sql.batch import Batch
    from retention.targets.sql.descriptors import BatchRange
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)

HASH_KEY_ENV = "RETENTION_HASH_KEY"
MIN_HASH_KEY_BYTES = 16


class Anonymizer:
    """Applies strategies; holds the HMAC key, never logs or returns it."""

    def __init__(self, hash_key: bytes | None):
        self._key = hash_key

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None, *, required: bool) -> Anonymizer:
        """The key from ``RETENTION_HASH_KEY``; ConfigError when ``required`` and missing or short."""
        environ = os.environ if environ is None else environ
        text = environ.get(HASH_KEY_ENV)
        if not text:
            if required:
                raise ConfigError(
                    f"{HASH_KEY_ENV} is not set: the rule hashes columns with HMAC-SHA256 and needs a "
                    f"secret key of at least {MIN_HASH_KEY_BYTES} bytes (keep it; the same key keeps joins working)"
                )
            return cls(None)
        key = text.encode("utf-8")
        if len(key) < MIN_HASH_KEY_BYTES:
            raise ConfigError(f"{HASH_KEY_ENV} is shorter than {MIN_HASH_KEY_BYTES} bytes")
        return cls(key)

    def hmac_pads(self) -> HmacPads | None:
        """The key's HMAC pads, for the database to hash with (as secret as the key); None without a key."""
        return None if self._key is None else HmacPads.of(self._key)

    @property
    def key_id(self) -> str | None:
        """A public fingerprint of the key (not the key): which key hashed what."""
        if self._key is None:
            return None
        return hmac.new(self._key, b"retention key id", hashlib.sha256).hexdigest()[:16]

    def apply(self, strategy: Strategy, value: Any) -> Any:
        """The anonymized value; None stays None."""
        if value is None or strategy.kind == "null":
            return None
        if strategy.kind == "hash":
            if self._key is None:
                raise ConfigError(f"{HASH_KEY_ENV} is needed to hash")
            return hmac.new(self._key, str(value).encode("utf-8"), hashlib.sha256).hexdigest()
        if strategy.kind == "redact":
            text = str(value)
            keep = min(strategy.keep_last, len(text))
            return "*" * (len(text) - keep) + (text[len(text) - keep :] if keep else "")
        if strategy.unit == "prefix":
            return str(value)[: strategy.prefix]
        if isinstance(value, datetime):
            return value.replace(month=1 if strategy.unit == "year" else value.month, day=1,
                                 hour=0, minute=0, second=0, microsecond=0)
        if isinstance(value, date):
            return value.replace(month=1 if strategy.unit == "year" else value.month, day=1)
        if isinstance(value, str):  # SQLite keeps dates as text: YYYY-MM-DD…
            return value[:4] + "-01-01" if strategy.unit == "year" else value[:7] + "-01"
        raise ValueError(f"cannot generalize a {type(value).__name__} to a {strategy.unit}")


class AnonymizeRows(SqlAction):
    """Rewrite the rule's columns in place and set the marker; the row stays."""

    removes_rows = False

    set_based = True
    """Where the backend can compute every strategy of a table exactly (PostgreSQL, MariaDB,
    MySQL), a batch is one UPDATE; False: always row by row in Python (for comparisons)."""

    def __init__(self, anonymizer: Anonymizer, *, as_of: datetime):
        self.anonymizer = anonymizer
        self.as_of = as_of
        self._set_clauses: dict[str, dict[str, ColumnElement[Any]] | None] = {}

    @staticmethod
    def _spec(table: SqlTable) -> AnonymizeSpec:
        spec = table.target.anonymize
        assert spec is not None  # a rule with action anonymize declares it on every target (checked at load)
        return spec

    def condition(self, table: SqlTable) -> ColumnElement[bool]:
        return table.table.c[self._spec(table).marker].is_(None)

    def check(self, table: SqlTable) -> None:
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

    def notes(self, table: SqlTable) -> list[str]:
        spec = self._spec(table)
        described = ", ".join(f"{c} → {s.describe()}" for c, s in spec.columns.items())
        notes = [f"anonymized in place ({described}); {spec.marker} marks rows done"]
        indexed = indexed_columns(table, [*spec.columns, spec.marker])
        if indexed:
            names = ", ".join(indexed)
            if table.engine.dialect.name == "postgresql":
                # Changing an indexed column rules out a HOT update (the new row version in the
                # old one's page, no index touched): every index of the table gets a new entry.
                cost = "so every anonymized row also gets a new entry in every index of the table (no HOT update)"
            else:
                cost = "so every anonymized row also rewrites its entries in those indexes"
            notes.append(f"the anonymize rewrites indexed columns ({names}), {cost}; "
                         "drop indexes anonymized data no longer needs")
        return notes

    def apply(self, table: SqlTable, conn: Connection, batch: Batch) -> BatchResult:
        ledger, batch_no = batch.ledger, batch.number
        values = self._sql_values(table, conn)
        started = time.perf_counter()
        with conn.begin():
            span = batch.cut(table, conn)
            if values is None:
                count = self._rewrite_rows(table, conn, batch, span)
            else:
                postgres_bitmap(table, conn)
                count = self._update_range(table, conn, batch, span, values)
            if count:
                ledger.pending(batch_no, BatchDescriptor(span, tables={table.family.name: count},
                                                         holds=batch.holds).encode(), count)
                failpoints.hit("sql.before_commit")
        seconds = time.perf_counter() - started
        if count:
            failpoints.hit("sql.after_commit")
            ledger.done(batch_no, tables={table.family.name: count})
        return BatchResult(span, count, {table.family.name: count}, seconds)

    def _sql_values(self, table: SqlTable, conn: Connection) -> dict[str, ColumnElement[Any]] | None:
        """The set-based SET clause of ``table`` (None: the Python path), decided once per table."""
        name = table.target.name
        if name not in self._set_clauses:
            values: dict[str, ColumnElement[Any]] | None = None
            why = "set-based batches are turned off"
            if self.set_based:
                pads = self.anonymizer.hmac_pads()
                values, why = sql_values(table.table, self._spec(table).columns, conn.dialect, pads)
            log.info("%s: anonymized %s", name, "in one UPDATE per batch" if values is not None
                     else f"row by row in Python: {why}")
            self._set_clauses[name] = values
        return self._set_clauses[name]

    def _update_range(self, table: SqlTable, conn: Connection, batch: Batch, span: BatchRange,
                      values: dict[str, ColumnElement[Any]]) -> int:
        """Rewrite the batch's rows in one UPDATE; return how many (over the cap: BatchOverCap, rolled back)."""
        t = table.table
        marker = self._spec(table).marker
        statement = (update(t).where(batch.expired, table.in_range(span))
                     .values({**values, marker: _as_column_value(t.c[marker], self.as_of)}))
        try:
            count = int(conn.execute(statement).rowcount)
        except DBAPIError as exc:
            exc.hide_parameters = True  # the HMAC key pads are parameters: keep them out of logs
            raise
        batch.check_cap(count)
        return count

    def _rewrite_rows(self, table: SqlTable, conn: Connection, batch: Batch, span: BatchRange) -> int:
        """Read and lock the batch's rows, compute their values in Python, write them back by key."""
        spec = self._spec(table)
        t = table.table
        key = [t.c[k] for k in table.target.key]
        columns = list(spec.columns)
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
        return len(rows)


def indexed_columns(table: SqlTable, names: list[str]) -> list[str]:
    """Which of ``names`` an index of ``table`` holds, includes, or reads in an expression or predicate."""
    found: set[str] = set()
    for index in inspect(table.engine).get_indexes(table.table.name, table.table.schema):
        used = {c for c in index.get("column_names") or [] if c} | set(index.get("include_columns") or [])
        texts = [e for e in index.get("expressions") or [] if e]
        texts += [str(v) for k, v in (index.get("dialect_options") or {}).items() if k.endswith("_where")]
        for text in texts:  # expression and partial indexes: the identifiers they read
            used |= {word.strip('"') for word in re.findall(r'"[^"]+"|[A-Za-z_][A-Za-z0-9_$]*', text)}
        found |= used & set(names)
    return [name for name in names if name in found]


def _as_column_value(column: Column[Any], moment: datetime) -> Any:
    """``moment`` as the column stores it: a date, or a timestamp with or without zone."""
    moment = moment.astimezone(timezone.utc)
    if isinstance(column.type, sqltypes.Date) and not isinstance(column.type, sqltypes.DateTime):
        return moment.date()
    if getattr(column.type, "timezone", False):
        return moment
    return moment.replace(tzinfo=None)
