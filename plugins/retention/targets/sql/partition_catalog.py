"""What a table range-partitioned on its age column is made of, read from the catalog: its
partitions and their age ranges (:func:`list_partitions`), how one partition is counted
(:func:`count_query`) and where it stands (attached, detaching, detached or gone); and the
autocommit connection, with the table's timeouts, that partition DDL runs on.

:mod:`.partitions` decides which partitions go whole and drops them; :mod:`.partitions_archive`
archives them first.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import Column, MetaData, Table, case, cast, func, literal, select, text
from sqlalchemy import types as sqltypes
from sqlalchemy.sql import visitors

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection
    from sqlalchemy.sql import Select
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.sql.table import SqlTable


@dataclass(frozen=True)
class Partition:
    """One range partition of a target's table: its name and the exclusive upper bound of
    its age range (None: no upper bound, MAXVALUE or a default partition)."""

    schema: str | None
    name: str
    upper: date | datetime | None

    @property
    def qualified(self) -> str:
        """The name journaled: ``schema.name`` (PostgreSQL), or the partition's own name."""
        return f"{self.schema}.{self.name}" if self.schema else self.name


def list_partitions(table: SqlTable) -> list[Partition]:
    """The range partitions of ``table`` on its age column (none when it is not partitioned so)."""
    dialect = table.engine.dialect.name
    with table.engine.connect() as conn:
        if dialect == "postgresql":
            return _pg_partitions(table, conn)
        if dialect == "mysql":
            return _mysql_partitions(table, conn)
    return []


def _cutoff_bound(table: SqlTable, cutoff: datetime) -> date | datetime:
    """The cutoff as the age column compares it (see ``SqlTable._older_than``)."""
    column = table.table.c[table.target.age_column]
    cutoff = cutoff.astimezone(timezone.utc)
    if isinstance(column.type, sqltypes.Date) and not isinstance(column.type, sqltypes.DateTime):
        return cutoff.date()
    return cutoff if getattr(column.type, "timezone", False) else cutoff.replace(tzinfo=None)


def _not_after(upper: date | datetime, bound: date | datetime) -> bool:
    """Whether a range ending (exclusively) at ``upper`` lies wholly before ``bound``.

    Both are read as the age column's type, except MariaDB's ``TO_DAYS`` bounds: a date
    (its midnight) beside a DATETIME column's naive cutoff.
    """
    if isinstance(bound, datetime):
        if not isinstance(upper, datetime):
            upper = datetime(upper.year, upper.month, upper.day, tzinfo=bound.tzinfo)
        return upper <= bound
    return not isinstance(upper, datetime) and upper <= bound


def _pg_partitions(table: SqlTable, conn: Connection) -> list[Partition]:
    parent = conn.execute(text(
        "SELECT c.oid FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid "
        "JOIN pg_namespace n ON n.oid = c.relnamespace "
        "JOIN pg_attribute a ON a.attrelid = pt.partrelid AND a.attnum = pt.partattrs[0] "
        "WHERE n.nspname = coalesce(:schema, current_schema()) AND c.relname = :name "
        "AND pt.partstrat = 'r' AND pt.partnatts = 1 AND a.attname = :age"),
        {"schema": table.table.schema, "name": table.table.name, "age": table.target.age_column}).scalar()
    if parent is None:
        return []
    # Bounds are printed in the session's time zone; the cast below reads them in it too.
    rows = conn.execute(text(
        "SELECT n.nspname, c.relname, pg_get_expr(c.relpartbound, c.oid) FROM pg_inherits i "
        "JOIN pg_class c ON c.oid = i.inhrelid JOIN pg_namespace n ON n.oid = c.relnamespace "
        # Tables only (a foreign table's rows live elsewhere): other partitions are walked.
        "WHERE i.inhparent = :parent AND NOT i.inhdetachpending AND c.relkind IN ('r', 'p') "
        "ORDER BY c.relname"), {"parent": parent}).all()
    found = []
    for schema, name, bound in rows:
        upper = re.search(r"\bTO \((.*)\)\s*$", bound or "")
        found.append(Partition(schema, name, _typed_bound(table, conn, upper.group(1) if upper else None)))
    return found


def _mysql_partitions(table: SqlTable, conn: Connection) -> list[Partition]:
    rows = conn.execute(text(
        "SELECT PARTITION_NAME, PARTITION_METHOD, PARTITION_EXPRESSION, PARTITION_DESCRIPTION "
        "FROM information_schema.PARTITIONS WHERE TABLE_SCHEMA = coalesce(:schema, DATABASE()) "
        "AND TABLE_NAME = :name AND PARTITION_NAME IS NOT NULL ORDER BY PARTITION_ORDINAL_POSITION"),
        {"schema": table.table.schema, "name": table.table.name}).all()
    age = table.target.age_column.lower()
    found: dict[str, Partition] = {}
    for name, method, expression, description in rows:  # one row per subpartition: keep the first
        shape = (expression or "").replace("`", "").replace(" ", "").lower()
        if method == "RANGE COLUMNS" and shape == age:
            upper = _typed_bound(table, conn, description)
        elif method == "RANGE" and shape == f"to_days({age})":
            upper = None if description == "MAXVALUE" else conn.execute(
                select(func.from_days(int(description)))).scalar()
        else:
            return []  # partitioned otherwise: nothing to drop whole
        found.setdefault(name, Partition(None, name, upper))
    return list(found.values())


def _typed_bound(table: SqlTable, conn: Connection, bound: str | None) -> date | datetime | None:
    """A bound as the catalog prints it (a quoted literal, or MAXVALUE) as the age column's value."""
    quoted = re.fullmatch(r"'((?:[^']|'')*)'", (bound or "").strip())
    if quoted is None:
        return None  # MAXVALUE, a default partition, or nothing we can read: never dropped whole
    column = table.table.c[table.target.age_column]
    value = conn.execute(select(cast(literal(quoted.group(1).replace("''", "'")), column.type))).scalar()
    return value if isinstance(value, (date, datetime)) else None


def _count(table: SqlTable, conn: Connection, partition: Partition,
           unheld: ColumnElement[bool] | None) -> tuple[int, int]:
    """The partition's rows, and how many of them are expired and unheld (``unheld`` None:
    all of them are, as its range says, so only its rows are counted)."""
    counted: tuple[Any, ...] = tuple(conn.execute(count_query(table, partition, unheld)).one())
    conn.rollback()
    rows = int(counted[0])
    return rows, rows if unheld is None else int(counted[1] or 0)


def count_query(table: SqlTable, partition: Partition, unheld: ColumnElement[bool] | None) -> Select[Any]:
    """SELECT the partition's rows, and (``unheld`` not None) how many are expired and unheld."""
    source = _partition_table(table, partition.schema, partition.name)
    if source is table.table:
        preparer = table.engine.dialect.identifier_preparer
        # MariaDB reads just the partition named; the condition is on the parent's columns.
        query = select(func.count()).select_from(source).with_hint(
            source, f"PARTITION ({preparer.quote(partition.name)})", "mysql")
    else:
        query = select(func.count()).select_from(source)
        unheld = None if unheld is None else _on(table.table, source, unheld)
    if unheld is not None:
        query = query.add_columns(func.sum(case((unheld, 1), else_=0)))
    return query


def _partition_table(table: SqlTable, schema: str | None, name: str) -> Table:
    """PostgreSQL: the partition as a table of its own (the parent's columns); MariaDB: the parent."""
    if table.engine.dialect.name != "postgresql":
        return table.table
    columns = [Column(c.name, c.type) for c in table.table.columns]
    return Table(name, MetaData(), *columns, schema=schema)


def _on(parent: Table, partition: Table, condition: ColumnElement[bool]) -> ColumnElement[bool]:
    """``condition`` on the parent's columns, read on the partition's instead."""

    def swap(element: Any, **_kw: Any) -> Any:
        if isinstance(element, Column) and element.table is parent:
            return partition.c[element.name]
        return None

    return visitors.replacement_traverse(condition, {}, swap)


class _autocommit:
    """A connection outside any transaction block (DETACH … CONCURRENTLY needs one), with the
    table's lock and statement timeouts, so DDL never queues behind a long transaction."""

    def __init__(self, table: SqlTable):
        self.table = table

    def __enter__(self) -> Connection:
        table = self.table
        self.conn = table.engine.connect().execution_options(isolation_level="AUTOCOMMIT")
        if table.engine.dialect.name == "postgresql":
            self.conn.execute(text(f"SET lock_timeout = '{int(table.lock_timeout * 1000)}ms'"))
            self.conn.execute(text(f"SET statement_timeout = '{int(table.statement_timeout * 1000)}ms'"))
        else:
            self.conn.execute(text(f"SET SESSION lock_wait_timeout = {max(1, round(table.lock_timeout))}"))
        return self.conn

    def __exit__(self, *exc: object) -> None:
        self.conn.close()


def _has_default_partition(table: SqlTable) -> bool:
    with table.engine.connect() as conn:
        return bool(conn.execute(text(
            "SELECT 1 FROM pg_partitioned_table pt JOIN pg_class c ON c.oid = pt.partrelid "
            "JOIN pg_namespace n ON n.oid = c.relnamespace WHERE pt.partdefid <> 0 "
            "AND n.nspname = coalesce(:schema, current_schema()) AND c.relname = :name"),
            {"schema": table.table.schema, "name": table.table.name}).first())


def _partition_state(table: SqlTable, qualified: str) -> str:
    """attached, detaching (a DETACH CONCURRENTLY interrupted), detached, or gone."""
    schema, _, name = qualified.rpartition(".")
    with table.engine.connect() as conn:
        if table.engine.dialect.name == "mysql":
            there = conn.execute(text(
                "SELECT 1 FROM information_schema.PARTITIONS WHERE TABLE_SCHEMA = coalesce(:schema, DATABASE()) "
                "AND TABLE_NAME = :table AND PARTITION_NAME = :name"),
                {"schema": table.table.schema, "table": table.table.name, "name": name}).first()
            return "attached" if there else "gone"
        row = conn.execute(text(
            "SELECT c.oid, i.inhdetachpending FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
            "LEFT JOIN pg_inherits i ON i.inhrelid = c.oid WHERE n.nspname = :schema AND c.relname = :name "
            "AND c.relkind IN ('r', 'p')"),
            {"schema": schema, "name": name}).first()
    if row is None:
        return "gone"
    if row[1] is None:
        return "detached"
    return "detaching" if row[1] else "attached"
