"""Predicates of SQL targets: rows a hold matches exactly, and lexicographic walk bounds."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from sqlalchemy import Table, and_, cast, literal, or_
from sqlalchemy import types as sqltypes

from retention.targets.sql.descriptors import Bound

if TYPE_CHECKING:
    from sqlalchemy.sql.elements import ColumnElement


def hold_match(table: Table, match: dict[str, Any], dialect: str) -> ColumnElement[bool]:
    """Rows whose columns equal ``match``'s values exactly: case- and space-sensitive, on every backend.

    A hold must protect the same rows wherever its table lives. MariaDB and MySQL compare
    strings by collation (usually case-insensitive, trailing spaces ignored), so they
    compare bytes here; SQLite compares with BINARY even where a column says NOCASE.
    PostgreSQL's deterministic collations already compare exactly.
    """
    conditions = []
    for name, value in match.items():
        column = table.c[name]
        if value is not None and isinstance(column.type, sqltypes.String):
            if dialect == "mysql":
                from sqlalchemy.dialects.mysql import BINARY, CHAR

                # In the connection's charset (utf8mb4) first: a latin1 'José' has other bytes.
                as_utf8 = cast(column, CHAR(charset="utf8mb4"))
                conditions.append(cast(as_utf8, BINARY()).is_not_distinct_from(cast(literal(value), BINARY())))
                continue
            if dialect == "sqlite":
                conditions.append(column.collate("BINARY").is_not_distinct_from(value))
                continue
        conditions.append(column.is_not_distinct_from(value))
    return and_(*conditions)


def lexicographic(columns: Sequence[ColumnElement[Any]], values: Bound, op: str) -> ColumnElement[bool]:
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

