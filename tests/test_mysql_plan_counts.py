"""MariaDB: a plan its optimizer expects near max_fraction counts its rows and the table's in one
scan (retention.targets.sql.size.counted), both exactly."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from retention.connections import create_sql_engine, from_environment
from retention.rules.loader import load_rule_file
from retention.targets.sql import size
from retention.targets.sql.table import SqlTable

from conftest import connect, write_rule
from sqlpurge import insert_customers, make_customers

UTC = timezone.utc
CUTOFF = datetime(2025, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)
YOUNG = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture
def server(mysql_db, monkeypatch, audit_db, keys):
    connect(monkeypatch, "crm_db", mysql_db)
    make_customers(mysql_db)
    monkeypatch.setattr(size, "EXACT_COUNT_BELOW", 50)  # the large-table path, on a small table
    return mysql_db


def surveyed(tmp_path, max_fraction: float, where: str | None) -> tuple[int, int, list[str]]:
    target = {"max_fraction": max_fraction, **({"where": where} if where else {})}
    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[target]))
    handle = SqlTable(rule_file.rule.target("customers"), create_sql_engine(from_environment("crm_db")))
    counts: list[str] = []
    sa.event.listen(handle.engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *a: counts.append(statement)
                    if "count(" in statement.lower() else None)
    survey = handle.survey(CUTOFF)
    return survey.matched, survey.total, counts


@pytest.mark.parametrize("where", [None, "{status: closed}"])
def test_a_plan_the_optimizer_expects_near_the_limit_counts_both_in_one_scan(server, tmp_path, where):
    insert_customers(server, [(i, "closed", OLD + timedelta(minutes=i)) for i in range(1, 301)]
                     + [(i, "closed", YOUNG) for i in range(301, 1001)] + [(5000, "open", OLD)])
    server.execute("ANALYZE TABLE customers")

    matched, total, counts = surveyed(tmp_path, 0.5, where)

    assert (matched, total) == (300 if where else 301, 1001)
    assert len(counts) == 1, counts


def test_far_from_the_limit_the_plan_is_still_counted_apart(server, tmp_path):
    insert_customers(server, [(i, "closed", OLD + timedelta(minutes=i)) for i in range(1, 21)]
                     + [(i, "closed", YOUNG) for i in range(21, 1001)])
    server.execute("ANALYZE TABLE customers")

    matched, total, counts = surveyed(tmp_path, 0.5, None)

    assert matched == 20 and 80 <= total <= 1000  # a proven lower bound, far inside the limit
    assert len(counts) == 2, counts
