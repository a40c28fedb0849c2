"""Set-based anonymize: each strategy as the SQL expression that computes, in the database,
exactly the value :meth:`retention.targets.sql.anonymize.Anonymizer.apply` computes in Python,
so that a batch is one ``UPDATE … SET … WHERE <range, expired, unheld>`` (:func:`sql_values`).

Exactly means byte for byte, NULL for NULL:

- ``hash`` is HMAC-SHA256 (RFC 2104) as two SHA-256 calls over the key pads
  (:class:`HmacPads`), of the value's UTF-8 bytes, as 64 lowercase hex characters.
  PostgreSQL ≥ 11 has ``sha256(bytea)``; MariaDB/MySQL have ``SHA2(…, 256)`` (hex, so the
  inner digest is ``UNHEX``-ed). The pads travel as bound parameters: they are as secret as
  the key, so a database that logs statements with their parameters logs them too.
- ``redact`` and ``generalize: {prefix}`` count characters (code points), as Python does.
- ``generalize: year|month`` truncates the value as the driver hands it to Python: a
  PostgreSQL ``timestamptz`` in the session's time zone, keeping that value's UTC offset
  (Python's ``datetime.replace`` keeps ``tzinfo``), a naive value as it is stored.

Text strategies run in SQL only on plain text columns (VARCHAR and TEXT): a ``CHAR`` is
padded or trimmed differently by drivers and SQL functions, an ENUM or SET is not text to
Python. Any column that cannot be computed exactly sends its table back to the Python path,
as SQLite always is.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from sqlalchemy import Date, DateTime, Integer, LargeBinary, String, cast, func, literal, null
from sqlalchemy import types as sqltypes

if TYPE_CHECKING:
    from sqlalchemy import Column, Table
    from sqlalchemy.engine import Dialect
    from sqlalchemy.sql.elements import ColumnElement

    from retention.rules.strategies import Strategy

_SHA256_BLOCK = 64


@dataclass(frozen=True)
class HmacPads:
    """The inner and outer HMAC-SHA256 key pads: as secret as the key, never shown."""

    inner: bytes = field(repr=False)
    outer: bytes = field(repr=False)

    @classmethod
    def of(cls, key: bytes) -> HmacPads:
        """The pads of ``key`` as :func:`hmac.new` derives them (a key over 64 bytes is hashed first)."""
        if len(key) > _SHA256_BLOCK:
            key = hashlib.sha256(key).digest()
        key = key.ljust(_SHA256_BLOCK, b"\0")
        return cls(bytes(b ^ 0x36 for b in key), bytes(b ^ 0x5C for b in key))


def sql_values(table: Table, strategies: Mapping[str, Strategy], dialect: Dialect,
               pads: HmacPads | None) -> tuple[dict[str, ColumnElement[Any]] | None, str]:
    """The SET clause of a set-based batch (column → expression of itself) and why; None when a
    column cannot be computed exactly in SQL on this backend (the table takes the Python path)."""
    backend = _backend(dialect)
    if backend is None:
        return None, f"{dialect.name} {_version(dialect)} has no set-based anonymize"
    values: dict[str, ColumnElement[Any]] = {}
    for name, strategy in strategies.items():
        value = _expression(backend, table.c[name], strategy, pads)
        if value is None:
            return None, f"{strategy.describe()} of {name!r} ({table.c[name].type}) is computed in Python"
        values[name] = value
    return values, "set-based"


def _backend(dialect: Dialect) -> str | None:
    if dialect.name == "postgresql" and (dialect.server_version_info or (0,)) >= (11,):
        return "postgresql"  # sha256() came with 11
    if dialect.name == "mysql":  # MariaDB and MySQL
        return "mysql"
    return None


def _version(dialect: Dialect) -> str:
    return ".".join(str(part) for part in dialect.server_version_info or ())


def _expression(backend: str, column: Column[Any], strategy: Strategy,
                pads: HmacPads | None) -> ColumnElement[Any] | None:
    if strategy.kind == "null":
        return null()
    if strategy.needs_text and not _plain_text(backend, column.type):
        return None
    if strategy.kind == "hash":
        if pads is None:  # the Python path raises the advice about the missing key
            return None
        return _hmac_hex(backend, column, pads)
    if strategy.kind == "redact":
        keep = literal(strategy.keep_last, Integer)
        stars = func.repeat(literal("*", String), func.greatest(func.char_length(column) - keep, 0), type_=String)
        # ``concat`` is || on PostgreSQL and CONCAT() on MariaDB: both give NULL for a NULL.
        return stars.concat(func.right(column, keep, type_=String))
    if strategy.unit == "prefix":
        return func.left(column, literal(strategy.prefix, Integer), type_=String)
    assert strategy.unit in ("year", "month")
    return _truncated(backend, column, strategy.unit)


def _plain_text(backend: str, column_type: sqltypes.TypeEngine[Any]) -> bool:
    if isinstance(column_type, (sqltypes.Enum, sqltypes.CHAR, sqltypes.NCHAR)):
        return False
    if isinstance(column_type, (sqltypes.VARCHAR, sqltypes.NVARCHAR, sqltypes.Text)):
        return True
    if backend == "mysql":
        from sqlalchemy.dialects.mysql import LONGTEXT, MEDIUMTEXT, TINYTEXT

        return isinstance(column_type, (TINYTEXT, MEDIUMTEXT, LONGTEXT))
    return False


def _hmac_hex(backend: str, column: Column[Any], pads: HmacPads) -> ColumnElement[Any]:
    """HMAC-SHA256 of the value's UTF-8 bytes as lowercase hex: sha256(outer ‖ sha256(inner ‖ value))."""
    if backend == "postgresql":
        def sha256(pad: bytes, message: ColumnElement[Any]) -> ColumnElement[Any]:
            joined = literal(pad, LargeBinary).op("||", return_type=LargeBinary)(message)
            return func.sha256(joined, type_=LargeBinary)

        message = func.convert_to(column, literal("UTF8", String), type_=LargeBinary)
        return func.encode(sha256(pads.outer, sha256(pads.inner, message)), literal("hex", String), type_=String)
    from sqlalchemy.dialects.mysql import BINARY, CHAR

    # The value in utf8mb4 first, whatever the column's charset: Python hashes UTF-8.
    utf8 = cast(cast(column, CHAR(charset="utf8mb4")), BINARY())
    inner = func.unhex(func.sha2(func.concat(func.unhex(literal(pads.inner.hex(), String)), utf8), 256))
    return func.sha2(func.concat(func.unhex(literal(pads.outer.hex(), String)), inner), 256, type_=String)


def _truncated(backend: str, column: Column[Any], unit: str) -> ColumnElement[Any] | None:
    """The first day (midnight) of the value's year or month."""
    column_type = column.type
    if not isinstance(column_type, (DateTime, Date)):
        return None
    if backend == "mysql":
        if unit == "year":
            return func.makedate(func.year(column), 1, type_=Date)
        return func.subdate(cast(column, Date), func.dayofmonth(column) - 1, type_=Date)
    field_name = literal(unit, String)
    if not isinstance(column_type, DateTime):  # a date
        return cast(func.date_trunc(field_name, cast(column, DateTime())), Date)
    if not column_type.timezone:
        return func.date_trunc(field_name, column, type_=DateTime())
    # timestamptz: Python truncates the wall-clock time in the session's zone and keeps the
    # value's own UTC offset (a July value keeps its summer offset on 1 January).
    wall = cast(column, DateTime())
    offset = wall - func.timezone(literal("UTC", String), column, type_=DateTime())
    return func.timezone(literal("UTC", String), func.date_trunc(field_name, wall, type_=DateTime()) - offset,
                         type_=DateTime(timezone=True))
