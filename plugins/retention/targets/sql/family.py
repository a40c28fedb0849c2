"""A SQL target's family: the target's table and the child tables declared under it,
reflected and checked against the database's foreign keys, and the conditions that pick
the children's rows of a batch (deepest first, so no foreign key is ever broken)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

from sqlalchemy import Table, inspect, select, tuple_
from sqlalchemy.exc import NoSuchTableError

from retention.errors import TargetError

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Engine
    from sqlalchemy.sql.elements import ColumnElement

    from retention.rules.models import ChildTable, SqlTarget


@dataclass(frozen=True)
class Member:
    """A table of a target's family: the target itself, or a child declared under it.

    ``link`` are this table's columns that reference ``parent_key`` of its parent
    (both empty for the target itself).
    """

    name: str
    table: Table
    link: tuple[str, ...] = ()
    parent_key: tuple[str, ...] = ()
    children: tuple[Member, ...] = ()


def reflect_family(target: SqlTarget, table: Table, engine: Engine, *, removes_rows: bool) -> Member:
    """The target's ``table`` and its declared children, reflected; when the action
    ``removes_rows``, every foreign key into the family must be declared."""
    children = tuple(
        _child(target, engine, table, tuple(target.key), child, f"children[{i}]")
        for i, child in enumerate(target.children)
    )
    family = Member(qualified(table), table, children=children)
    if removes_rows:
        _check_references(engine, family)
    return family


def family_members(member: Member) -> Iterator[Member]:
    """``member`` and every table under it, parents before children."""
    yield member
    for child in member.children:
        yield from family_members(child)


def family_conditions(
    family: Member, selection: ColumnElement[bool],
) -> list[tuple[Member, ColumnElement[bool]]]:
    """Each family member with the condition that picks the rows belonging to the
    target's rows in ``selection``; deepest children first, the target last."""
    ordered: list[tuple[Member, ColumnElement[bool]]] = []

    def visit(member: Member, condition: ColumnElement[bool]) -> None:
        for child in member.children:
            parent_key = [member.table.c[k] for k in child.parent_key]
            link = [child.table.c[c] for c in child.link]
            picked = select(*parent_key).where(condition)
            visit(child, link[0].in_(picked) if len(link) == 1 else tuple_(*link).in_(picked))
        ordered.append((member, condition))

    visit(family, selection)
    return ordered


def qualified(table: Table) -> str:
    """The table's name as rules and journals spell it: ``schema.name``, or ``name`` alone."""
    return f"{table.schema}.{table.name}" if table.schema else table.name


def _child(target: SqlTarget, engine: Engine, parent: Table, parent_key: tuple[str, ...], spec: ChildTable,
           field: str) -> Member:
    schema, _, name = spec.table.rpartition(".")
    try:
        table = Table(name, parent.metadata, schema=schema or parent.schema, autoload_with=engine)
    except NoSuchTableError:
        raise TargetError(f"child table {spec.table} does not exist in {target.connection}",
                          f"{field}.table") from None
    missing = [c for c in spec.foreign_key if c not in table.c]
    if missing:
        raise TargetError(f"column {missing[0]!r} does not exist in child table {spec.table}",
                          f"{field}.foreign_key")
    if len(spec.foreign_key) != len(parent_key):
        raise TargetError(
            f"{spec.table}.foreign_key has {len(spec.foreign_key)} columns but the key it references "
            f"({', '.join(parent_key)}) has {len(parent_key)}",
            f"{field}.foreign_key",
        )
    own_key = tuple(c.name for c in table.primary_key.columns)
    if spec.children and not own_key:
        raise TargetError(f"child table {spec.table} has no primary key for its own children to reference",
                          f"{field}.children")
    grandchildren = tuple(
        _child(target, engine, table, own_key, grandchild, f"{field}.children[{i}]")
        for i, grandchild in enumerate(spec.children)
    )
    return Member(qualified(table), table, tuple(spec.foreign_key), parent_key, grandchildren)


def _check_references(engine: Engine, family: Member) -> None:
    """Every foreign key into a purged table must be declared as a child, or a batch
    would fail on it half-way (or cascade past the archive)."""
    insp = inspect(engine)
    declared = {(m.table.schema, m.table.name): m for m in family_members(family)}
    references = insp.get_multi_foreign_keys(schema=family.table.schema)
    for (schema, name), keys in references.items():
        for fk in keys:
            parent = declared.get((fk.get("referred_schema") or family.table.schema, fk["referred_table"]))
            if parent is None or (schema, name) == (parent.table.schema, parent.table.name):
                continue  # not into the family, or a table referencing itself
            child = declared.get((schema, name))
            if child is not None and child in parent.children:
                continue
            columns = ", ".join(fk["constrained_columns"])
            raise TargetError(
                f"{name}({columns}) references {parent.table.name} through constraint {fk['name']!r}, "
                f"but the rule does not declare {name} under children of {parent.table.name}: purging "
                f"{parent.table.name} would fail half-way or cascade past the archive. Declare "
                f"{{table: {name}, foreign_key: [{columns}]}}",
                "children",
            )
