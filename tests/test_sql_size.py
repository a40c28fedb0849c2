"""The table size a plan's max_fraction is judged by (retention.targets.sql.size): proven from
the database's statistics far from the limit, counted exactly near it, and counted exactly
whenever the statistics overstate the table. Real PostgreSQL and MariaDB."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

import pytest

from retention.errors import OverLimit
from retention.rules.loader import load_rule_file
from retention.targets.sql import size
from retention.targets.sql.table import SqlTable

from conftest import connect, write_rule
from sqlpurge import insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)
YOUNG = datetime(2026, 6, 1, tzinfo=UTC)


@pytest.fixture(params=["postgresql", "mariadb"])
def server(request, monkeypatch, audit_db, keys):
    db = request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mysql_db"}[request.param])
    connect(monkeypatch, "crm_db", db)
    make_customers(db)
    # Small tables are always counted exactly; these tests are about the large-table path.
    monkeypatch.setattr(size, "EXACT_COUNT_BELOW", 50)
    return db


def fill(db, expired: int, young: int) -> None:
    insert_customers(db, [(i, "closed", OLD + timedelta(minutes=i)) for i in range(1, expired + 1)]
                     + [(i, "closed", YOUNG) for i in range(expired + 1, expired + young + 1)])


def analyze(db) -> None:
    db.execute("ANALYZE customers" if db.backend == "postgresql" else "ANALYZE TABLE customers")


def table(tmp_path, db, max_fraction: float) -> SqlTable:
    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[{"max_fraction": max_fraction}]))
    from retention.connections import create_sql_engine, from_environment

    return SqlTable(rule_file.rule.target("customers"), create_sql_engine(from_environment("crm_db")))


def test_far_from_the_limit_the_count_stops_at_a_proven_lower_bound(server, tmp_path):
    fill(server, expired=10, young=990)
    analyze(server)
    survey = table(tmp_path, server, 0.5).survey(AS_OF - timedelta(days=365))
    # Half of max_fraction: 10 matched need at least 10 / (0.5 * 0.5) = 40 rows (50 at the floor).
    assert survey.matched == 10
    assert survey.total == 50
    assert any("at least 50 rows" in note and "statistics" in note for note in survey.notes)


def test_near_the_limit_the_table_is_counted_exactly(server, tmp_path):
    fill(server, expired=300, young=700)
    analyze(server)
    survey = table(tmp_path, server, 0.5).survey(AS_OF - timedelta(days=365))
    assert (survey.matched, survey.total) == (300, 1000)
    assert not any(note.startswith("table size") for note in survey.notes)


def test_statistics_that_overstate_the_table_fall_back_to_an_exact_count(pg_db, monkeypatch, audit_db, keys, tmp_path):
    # PostgreSQL's statistics stay as ANALYZE left them until the next VACUUM or ANALYZE
    # (InnoDB recomputes its own in the background, so it cannot be caught stale on purpose).
    server = pg_db
    connect(monkeypatch, "crm_db", server)
    make_customers(server)
    monkeypatch.setattr(size, "EXACT_COUNT_BELOW", 50)
    server.execute("ALTER TABLE customers SET (autovacuum_enabled = false)")
    fill(server, expired=40, young=960)
    analyze(server)
    server.execute("DELETE FROM customers WHERE closed_at >= :young", {"young": YOUNG})
    # The statistics still say about 1,000 rows; 40 of the 40 left would go: over a 50 % limit.
    assert size.estimated_rows(table(tmp_path, server, 0.5)) >= 500
    survey = table(tmp_path, server, 0.5).survey(AS_OF - timedelta(days=365))
    assert (survey.matched, survey.total) == (40, 40)

    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[{"max_fraction": 0.5}]))
    with pytest.raises(OverLimit), runner() as r:
        r.start(rule_file, run_id="r1", as_of=AS_OF)


def test_a_plan_the_planner_expects_near_the_limit_counts_both_in_one_scan(pg_db, monkeypatch, audit_db, keys, tmp_path):
    # Near the limit the table is counted exactly anyway: with the planner's estimate saying
    # so beforehand, the plan's rows and the table's come from one scan, not two.

    server = pg_db
    connect(monkeypatch, "crm_db", server)
    make_customers(server)
    monkeypatch.setattr(size, "EXACT_COUNT_BELOW", 50)
    fill(server, expired=300, young=700)
    insert_customers(server, [(5000, "open", OLD)])  # expired, but outside the rule's where
    analyze(server)
    from retention.connections import create_sql_engine, from_environment

    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[
        {"max_fraction": 0.5, "where": "{status: closed}"}]))
    handle = SqlTable(rule_file.rule.target("customers"), create_sql_engine(from_environment("crm_db")))
    counts = _count_statements(handle.engine)
    survey = handle.survey(AS_OF - timedelta(days=365))
    assert (survey.matched, survey.total) == (300, 1001)
    assert len(counts) == 1, counts


def test_a_wrong_estimate_only_changes_the_order_of_the_counts(server, monkeypatch, tmp_path):
    # An estimate far off in either direction: both counts stay exact.
    fill(server, expired=300, young=700)
    analyze(server)
    for wrong in (0, 10_000_000):
        monkeypatch.setattr(size, "estimated_matches", lambda table, selection, wrong=wrong: wrong)
        survey = table(tmp_path, server, 0.5).survey(AS_OF - timedelta(days=365))
        assert (survey.matched, survey.total) == (300, 1000)


def test_a_partitioned_table_is_estimated_by_its_partitions_and_counted_in_one_scan(pg_db, monkeypatch, audit_db,
                                                                                     keys, tmp_path):
    # A partitioned table has no statistics of its own (no pages): its leaf partitions' are
    # summed (an empty one adds nothing), so a plan near the limit counts its rows and the
    # table's in one scan, not two.

    server = pg_db
    connect(monkeypatch, "crm_db", server)
    monkeypatch.setattr(size, "EXACT_COUNT_BELOW", 50)
    server.execute("CREATE TABLE customers (id INTEGER NOT NULL, email VARCHAR(100), status VARCHAR(20) NOT NULL, "
                   "closed_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (id, closed_at)) PARTITION BY RANGE (closed_at)")
    server.execute("CREATE TABLE customers_old PARTITION OF customers FOR VALUES FROM (MINVALUE) TO ('2025-01-01')")
    server.execute("CREATE TABLE customers_new PARTITION OF customers FOR VALUES FROM ('2025-01-01') TO ('2030-01-01')")
    server.execute("CREATE TABLE customers_later PARTITION OF customers FOR VALUES FROM ('2030-01-01') TO (MAXVALUE)")
    fill(server, expired=300, young=700)
    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[{"max_fraction": 0.5,
                                                                        "key": "[id, closed_at]"}]))
    from retention.connections import create_sql_engine, from_environment

    handle = SqlTable(rule_file.rule.target("customers"), create_sql_engine(from_environment("crm_db")))
    assert size.estimated_rows(handle) is None  # never analysed: no estimate
    analyze(server)
    assert size.estimated_rows(handle) == 1000
    counts = _count_statements(handle.engine)
    survey = handle.survey(AS_OF - timedelta(days=365))
    assert (survey.matched, survey.total) == (300, 1000)
    assert len(counts) == 1, counts


def _count_statements(engine) -> list[str]:
    """The count statements ``engine`` sends from now on, as they are sent."""
    import sqlalchemy as sa

    counts: list[str] = []
    sa.event.listen(engine, "before_cursor_execute",
                    lambda conn, cursor, statement, *a: counts.append(statement)
                    if "count(" in statement.lower() else None)
    return counts
