"""How many rows a plan takes and how many the table holds, as its ``max_fraction`` needs them
(:func:`counted`): counted exactly near the limit (in one scan when the planner expects the
plan to be near it), proven "at least enough" far from it, with the database's statistics
(:func:`estimated_rows`, :func:`estimated_matches`) deciding which.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from sqlalchemy import case, func, literal, not_, select, text

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)

EXACT_COUNT_BELOW = 100_000
"""Tables smaller than this are always counted exactly: it costs milliseconds."""
ESTIMATE_MARGIN = 0.5
"""A plan is far from its ``max_fraction`` when it takes at most this much less than the limit
allows by the database's statistics (half of it): only then is the exact count skipped."""


def counted(table: SqlTable, selection: ColumnElement[bool], cutoff: datetime) -> tuple[int, int, str | None]:
    """The rows ``selection`` takes, the table's rows as ``max_fraction`` needs them, and how
    the latter were counted (None: exactly).

    Near the limit the whole table is counted anyway; when the planner's estimate of the
    selection already puts the plan there, both counts come from one scan of the table
    instead of a count of the selection and then one of the table. Either way both
    counts are exact; the estimate only picks the cheaper order.
    """
    estimate = estimated_rows(table)
    if estimate is not None and estimate >= EXACT_COUNT_BELOW:
        expected = estimated_matches(table, selection)
        if expected is not None and expected > table.target.max_fraction * estimate * (1 - ESTIMATE_MARGIN):
            query = select(func.count(case((selection, 1))), func.count()).select_from(table.table)
            matched, total = table.with_retries(lambda conn: tuple(conn.execute(query).one()))
            return int(matched), int(total), None
    matched = table.with_retries(lambda conn: table.count(conn, selection, after_walk=False))
    total, how = total_for_limit(table, matched, cutoff, estimate)
    return matched, total, how


def total_for_limit(table: SqlTable, matched: int, cutoff: datetime, estimate: int | None) -> tuple[int, str | None]:
    """The table's rows as ``max_fraction`` needs them, and how they were counted (None: exactly),
    given the ``matched`` rows and the table's ``estimate`` by its statistics.

    Counting every row of a large table to learn that a plan takes a sliver of it costs
    more than the purge. So when the database's statistics put the plan below half of
    what ``max_fraction`` allows (:data:`ESTIMATE_MARGIN`), the count stops as soon as
    it has proven the table holds enough rows for the plan to be that far inside the
    limit: the ``matched`` rows plus rows younger than the cutoff, read from the age
    index until there are enough. The result is a proven lower bound, never an estimate,
    so the limit (and the run's budget, a fraction of it) can only be stricter than the
    exact count would make it. A plan near the limit, a small or never-analysed table,
    or statistics that overstate the table (the proof falls short) are counted exactly.
    """
    fraction = table.target.max_fraction
    if (estimate is None or estimate < EXACT_COUNT_BELOW
            or matched > fraction * estimate * (1 - ESTIMATE_MARGIN)):
        return table.count_rows(), None
    # need <= estimate: the plan is within half of max_fraction of the estimate.
    need = max(math.ceil(matched / (fraction * (1 - ESTIMATE_MARGIN))), EXACT_COUNT_BELOW)
    young = select(literal(1)).select_from(table.table).where(not_(table.older_than(cutoff))).limit(need - matched)
    found = matched + table.with_retries(
        lambda conn: int(conn.execute(select(func.count()).select_from(young.subquery())).scalar_one()))
    if found < need:  # fewer rows than the statistics promised: count them all
        log.info("%s: the database's statistics overstate the table (%d estimated, under %d found); "
                 "counting it exactly", table.target.name, estimate, need)
        return table.count_rows(), None
    return found, (f"table size: at least {found:,} rows counted, enough for max_fraction "
                   f"(about {estimate:,} by the database's statistics)")


def estimated_rows(table: SqlTable) -> int | None:
    """The table's rows by the database's statistics (PostgreSQL's planner estimate, MariaDB/MySQL's
    TABLE_ROWS); None where there are none (SQLite, a table never analysed)."""
    dialect = table.engine.dialect.name
    schema, name = table.table.schema, table.table.name
    if dialect == "postgresql":
        # As the planner does: the density ANALYZE/VACUUM measured, over the pages there are now;
        # a partitioned table (no storage of its own) by its leaf partitions', one row each.
        query = text(
            "WITH t AS (SELECT to_regclass(format('%I.%I', coalesce(:schema, current_schema()), :name)) AS oid) "
            "SELECT c.reltuples, c.relpages, pg_relation_size(c.oid) / current_setting('block_size')::int, "
            "c.oid <> (SELECT oid FROM t) FROM pg_class c WHERE c.relkind = 'r' AND (c.oid = (SELECT oid FROM t) OR c.oid IN ("
            "SELECT p.relid FROM pg_partition_tree((SELECT oid FROM t)) p WHERE p.isleaf "
            "AND EXISTS (SELECT 1 FROM pg_class r WHERE r.oid = (SELECT oid FROM t) AND r.relkind = 'p')))")
    elif dialect == "mysql":
        query = text("SELECT TABLE_ROWS, NULL, NULL, FALSE FROM information_schema.TABLES "
                     "WHERE TABLE_SCHEMA = coalesce(:schema, DATABASE()) AND TABLE_NAME = :name")
    else:
        return None
    with table.engine.connect() as conn:
        rows = conn.execute(query, {"schema": schema, "name": name}).all()
    if not rows:
        return None
    total = 0.0
    for row in rows:  # every leaf must have statistics, or there is no estimate
        if row[0] is None or row[0] < 0:
            return None
        tuples, pages, now, leaf = float(row[0]), row[1], row[2], bool(row[3])
        if pages is not None and now is not None:
            if pages <= 0:
                if not leaf or now > 0 or tuples > 0:
                    return None  # never measured, or written since ANALYZE saw it empty: no density
                continue  # a leaf partition ANALYZE saw empty, and empty still
            tuples = tuples / pages * now
        total += tuples
    return int(total)


def estimated_matches(table: SqlTable, selection: ColumnElement[bool]) -> int | None:
    """The rows ``selection`` takes by the planner's estimate (PostgreSQL's ``EXPLAIN``), or
    None where there is none (other databases, or an EXPLAIN that failed)."""
    if table.engine.dialect.name != "postgresql":
        return None
    statement = select(literal(1)).select_from(table.table).where(selection)
    compiled = statement.compile(dialect=table.engine.dialect)
    try:
        with table.engine.connect() as conn:
            plan = conn.exec_driver_sql(f"EXPLAIN (FORMAT JSON) {compiled}", compiled.params).scalar_one()
    except Exception:  # noqa: BLE001 - an estimate only picks the order of two exact counts
        log.debug("%s: no planner estimate of the plan's rows", table.target.name, exc_info=True)
        return None
    if isinstance(plan, str):
        import json

        plan = json.loads(plan)
    try:
        return int(plan[0]["Plan"]["Plan Rows"])
    except (KeyError, IndexError, TypeError, ValueError):
        return None
