"""Upkeep after a large purge (the target's ``maintenance: {after_rows: N}``): so that space
and the planner's statistics catch up with the rows gone, each table of the target's family
gets PostgreSQL ``VACUUM (ANALYZE)``, MariaDB/MySQL ``OPTIMIZE TABLE`` or SQLite ``ANALYZE``.

Off unless the rule asks for it. The rows are gone whatever happens here: a failure is a
warning in the log and a journaled note the certificate shows, never a failed purge.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from sqlalchemy.exc import DBAPIError

from retention.retry import describe_error
from retention.targets.sql.family import family_members

if TYPE_CHECKING:
    from sqlalchemy import Table

    from retention.targets.base import BatchLedger
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)

UPKEEP_NOTE = "upkeep"
"""The journal's name for upkeep run after a purge (a note row of the target's batches)."""

STATEMENTS = {"postgresql": "VACUUM (ANALYZE)", "mysql": "OPTIMIZE TABLE", "sqlite": "ANALYZE"}


def upkeep_after(table: SqlTable, purged: int, ledger: BatchLedger) -> dict[str, Any] | None:
    """Run the target's upkeep when ``purged`` rows reach its threshold; journal and return
    what happened (None: not asked for, or too few rows went)."""
    spec = table.target.maintenance
    if spec is None or purged < spec.after_rows:
        return None
    statement = STATEMENTS[table.engine.dialect.name]
    started = time.perf_counter()
    note: dict[str, Any] = {"statement": statement, "rows": purged}
    try:
        for member in family_members(table.family):
            _run(table, statement, member.table)
    except (DBAPIError, UpkeepFailed) as exc:
        note["error"] = describe_error(exc) if isinstance(exc, DBAPIError) else str(exc)[:200]
        detail = str(exc.orig if isinstance(exc, DBAPIError) else exc).strip().splitlines()[0][:200]
        log.warning("%s: %s after purging %d rows failed (%s); the rows are gone, the tables are left as they are",
                    table.target.name, statement, purged, detail)
    else:
        log.info("%s: %s after purging %d rows took %.1fs", table.target.name, statement, purged,
                 time.perf_counter() - started)
    note["status"] = "failed" if "error" in note else "done"
    ledger.note(UPKEEP_NOTE, note)
    return note


def _run(table: SqlTable, statement: str, target: Table) -> None:
    name = table.engine.dialect.identifier_preparer.format_table(target)
    if table.engine.dialect.name == "sqlite":
        with table.engine.connect() as conn:
            conn.exec_driver_sql(f"{statement} {name}")
            conn.commit()
        return
    from retention.targets.sql.partition_catalog import _autocommit  # the one autocommit connection, with timeouts

    # VACUUM cannot run inside a transaction block; OPTIMIZE needs none either.
    with _autocommit(table) as conn:
        result = conn.exec_driver_sql(f"{statement} {name}")
        if table.engine.dialect.name == "mysql":
            # OPTIMIZE reports a failure as a result row, not as an error.
            for row in result.mappings():
                if str(row.get("Msg_type", "")).lower() == "error":
                    raise UpkeepFailed(f"{statement} {target.name}: {row.get('Msg_text', '')}")


class UpkeepFailed(Exception):
    """OPTIMIZE TABLE reported an error row."""
