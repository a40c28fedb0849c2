"""Helpers for SQL purge tests: a customers table on any backend, and a Runner."""

from __future__ import annotations

from datetime import date, datetime, timezone

import sqlalchemy as sa

from retention.run.runner import Runner

TIMESTAMP = {"postgresql": "TIMESTAMPTZ", "mariadb": "DATETIME(6)", "sqlite": "TIMESTAMP"}
NAIVE_TIMESTAMP = {"postgresql": "TIMESTAMP", "mariadb": "DATETIME(6)", "sqlite": "TIMESTAMP"}


def make_customers(db, *, age_type: str | None = None, table: str = "customers", index: bool = True) -> None:
    """customers(id, email, status, closed_at) with an index on closed_at."""
    age_type = age_type or TIMESTAMP[db.backend]
    db.execute(
        f"CREATE TABLE {table} (id INTEGER PRIMARY KEY, email VARCHAR(100), "
        f"status VARCHAR(20) NOT NULL, closed_at {age_type})"
    )
    if index:
        db.execute(f"CREATE INDEX {table}_closed_at ON {table} (closed_at)")


def stored(db, moment: datetime | date | None, *, aware_column: bool = True):
    """``moment`` as the backend's driver wants it for the age column."""
    if moment is None or not isinstance(moment, datetime):
        return moment
    utc = moment.astimezone(timezone.utc)
    if db.backend == "postgresql" and aware_column:
        return moment
    return utc.replace(tzinfo=None)


def insert_customers(db, rows, *, table: str = "customers", aware_column: bool = True) -> None:
    """Insert (id, status, closed_at) rows; emails are derived from ids."""
    customers = sa.Table(table, sa.MetaData(), autoload_with=db.engine)
    with db.engine.begin() as conn:
        conn.execute(
            customers.insert(),
            [
                {"id": i, "email": f"person{i}@example.com", "status": status,
                 "closed_at": stored(db, closed, aware_column=aware_column)}
                for i, status, closed in rows
            ],
        )


def ids(db, table: str = "customers") -> set[int]:
    """Ids left in the table."""
    return {r[0] for r in db.rows(f"SELECT id FROM {table}")}


def runner() -> Runner:
    """A Runner on the connections and key the environment defines (as the CLI builds it)."""
    return Runner.from_environment(checkpoints=None)
