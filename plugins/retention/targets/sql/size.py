"""How many rows a table holds, as a plan's ``max_fraction`` needs it (:func:`total_for_limit`):
counted exactly near the limit, proven "at least enough" far from it, with the database's
statistics (:func:`estimated_rows`) deciding which.
"""

from __future__ import annotations

import logging
import math
from typing import TYPE_CHECKING

from sqlalchemy import func, literal, not_, select, text

if TYPE_CHECKING:
    from datetime import datetime

    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)

EXACT_COUNT_BELOW = 100_000
"""Tables smaller than this are always counted exactly: it costs milliseconds."""
ESTIMATE_MARGIN = 0.5
"""A plan is far from its ``max_fraction`` when it takes at most this much less than the limit
allows by the database's statistics (half of it): only then is the exact count skipped."""


def total_for_limit(table: SqlTable, matched: int, cutoff: datetime) -> tuple[int, str | None]:
    """The table's rows as ``max_fraction`` needs them, and how they were counted (None: exactly).

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
    estimate = estimated_rows(table)
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
        # As the planner does: the density ANALYZE/VACUUM measured, over the pages there are now.
        query = text(
            "SELECT c.reltuples, c.relpages, pg_relation_size(c.oid) / current_setting('block_size')::int "
            "FROM pg_class c WHERE c.oid = to_regclass(format('%I.%I', coalesce(:schema, current_schema()), "
            ":name)) AND c.relkind = 'r'")
    elif dialect == "mysql":
        query = text("SELECT TABLE_ROWS, NULL, NULL FROM information_schema.TABLES "
                     "WHERE TABLE_SCHEMA = coalesce(:schema, DATABASE()) AND TABLE_NAME = :name")
    else:
        return None
    with table.engine.connect() as conn:
        row = conn.execute(query, {"schema": schema, "name": name}).first()
    if row is None or row[0] is None or row[0] < 0:
        return None
    tuples, pages, now = float(row[0]), row[1], row[2]
    if pages is not None and now is not None:
        if pages <= 0:
            return None
        tuples = tuples / pages * now
    return int(tuples)
