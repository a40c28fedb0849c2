"""Dates and holds that must not fool a purge: a future as_of, holds lapsing by the clock,
holds that protect nothing (issue #9 items 3, 4 and 12)."""

from __future__ import annotations

from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from retention.connections import from_environment
from retention.errors import ConfigError, InvalidAsOf, TerminalError
from retention.evidence.audit import open_audit, purge_runs
from retention.evidence.signing import Signer
from retention.holds import HoldRegistry
from retention.interfaces.cli import main
from retention.plan.builder import build_plan
from retention.rules.loader import load_rule_file
from retention.run.journal import RunJournal
from retention.run.runner import Runner
from retention.targets import Targets

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers

UTC = timezone.utc
NOW = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)


def at(moment: datetime):
    """A clock stopped at ``moment``."""
    return lambda: moment


@pytest.fixture
def crm(sqlite_db, monkeypatch, audit_db, keys):
    """customers 1-40 closed in 2020 (expired under P2Y), 41-50 closed at NOW (kept)."""
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", OLD + timedelta(hours=i)) for i in range(1, 41)]
                     + [(i, "closed", NOW) for i in range(41, 51)])
    return sqlite_db


def rule(tmp_path, **target):
    target.setdefault("where", "{status: closed}")
    return load_rule_file(write_rule(tmp_path / "rules", targets=[target]))


def runner(clock=None) -> Runner:
    return Runner(RunJournal(open_audit(from_environment)), Targets(from_environment), Signer.from_environment(),
                  clock=clock)


def runs_opened() -> int:
    with open_audit(from_environment).connect() as conn:
        return conn.execute(sa.select(sa.func.count()).select_from(purge_runs)).scalar_one()


# -- item 3: a future as_of ------------------------------------------------------------------


def test_item03_a_future_as_of_is_refused_before_anything_is_touched(crm, tmp_path):
    rule_file = rule(tmp_path)
    # A year ahead, every row (also 41-50, closed "now") would be past a P2Y cutoff of 2029.
    with pytest.raises(InvalidAsOf, match="later than this machine's clock") as refused:
        runner(at(NOW)).run(rule_file, run_id="r1", as_of=datetime(2029, 1, 1, tzinfo=UTC))

    assert isinstance(refused.value, TerminalError)  # Airflow fails the task without retrying
    assert len(ids(crm)) == 50 and runs_opened() == 0
    # A few minutes of skew between hosts is not a future date.
    certificate = runner(at(NOW)).run(rule_file, run_id="r2", as_of=NOW + timedelta(minutes=3))
    assert certificate.data["targets"][0]["deleted"] == 40


def test_item03_the_cli_refuses_future_and_absurd_dates_in_one_line(crm, tmp_path, capsys):
    rules_dir = str(rule(tmp_path).path.parent)
    for as_of in ("2999-01-01", "9999-12-31T23:59:59+00:00", "0001-06-01"):
        assert main(["run", "--rules", rules_dir, "--as-of", as_of]) == 2, as_of
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert ("later than this machine's clock" in err) or ("before 1970" in err), err
    assert len(ids(crm)) == 50 and runs_opened() == 0

    # A plan looks ahead without touching anything: allowed, and said to be a what-if.
    assert main(["plan", "--rules", rules_dir, "--as-of", "2999-01-01"]) == 0
    captured = capsys.readouterr()
    assert "what-if" in captured.err and "50 records would be purged" in captured.out
    # A year-1 plan cannot compute a cutoff: one line, exit 2, no traceback.
    assert main(["plan", "--rules", rules_dir, "--as-of", "0001-06-01"]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and ("before year 1" in err or "before 1970" in err), err


# -- item 4: dated holds lapse by the clock ---------------------------------------------------


def real_now() -> datetime:
    return datetime.now(UTC)


def test_item04_a_dated_hold_lapses_by_the_clock_not_by_as_of(crm, tmp_path):
    rule_file = rule(tmp_path)
    audit = open_audit(from_environment)
    # The clock says the hold has ten days to go; a what-if as_of a month ahead must not end it.
    registry = HoldRegistry(audit, clock=at(NOW))
    registry.add(category="customer_accounts", match={"id": 7}, case_id="C-7", reason="r",
                 until=NOW.date() + timedelta(days=10))
    with Targets(from_environment) as targets:
        plan = build_plan(rule_file, NOW + timedelta(days=30), targets, holds=registry)
    assert plan.targets[0].held == 1

    # A backfill (as_of five days ago) must not revive a hold whose last day has passed on the clock,
    # and a hold whose last day is today still protects.
    today = real_now().date()
    earlier = HoldRegistry(audit, clock=at(real_now() - timedelta(days=10)))
    earlier.add(category="customer_accounts", match={"id": 8}, case_id="C-8", reason="r",
                until=today - timedelta(days=2))
    earlier.add(category="customer_accounts", match={"id": 9}, case_id="C-9", reason="r", until=today)
    certificate = runner().run(rule_file, run_id="backfill", as_of=real_now() - timedelta(days=5))

    left = ids(crm)  # (hold 7's last day, 2026-06-25, has passed on the real clock too)
    assert 9 in left and not {7, 8} & left
    assert certificate.data["targets"][0]["held"] == 1


def test_item04_hold_add_refuses_a_past_until_and_list_never_calls_a_lapsed_hold_in_force(
        crm, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rule(tmp_path).path.parent))
    placed = ["hold", "add", "--category", "customer_accounts", "--match", '{"id": 3}', "--case", "C-3",
              "--reason", "dispute"]
    yesterday = (real_now().date() - timedelta(days=1)).isoformat()
    assert main(placed + ["--until", yesterday]) == 2
    assert "in the past" in capsys.readouterr().err
    assert main(placed + ["--until", real_now().date().isoformat()]) == 0  # today: in force all day

    # One placed earlier, whose last day has since passed.
    HoldRegistry(open_audit(from_environment), clock=at(real_now() - timedelta(days=10))).add(
        category="customer_accounts", match={"id": 4}, case_id="C-4", reason="r", until=date.fromisoformat(yesterday))
    capsys.readouterr()
    assert main(["hold", "list"]) == 0
    listed = capsys.readouterr().out
    assert "C-3" in listed and "C-4" not in listed
    assert main(["hold", "list", "--all"]) == 0
    line = next(line for line in capsys.readouterr().out.splitlines() if "C-4" in line)
    assert "lapsed after" in line and "in force" not in line


# -- item 12: holds that protect nothing ------------------------------------------------------


@pytest.fixture
def emails(db, monkeypatch, audit_db, keys, tmp_path):
    """customers on each backend; 1 has a capitalised email, 2 a trailing space."""
    connect(monkeypatch, "crm_db", db)
    make_customers(db)
    insert_customers(db, [(i, "closed", OLD) for i in range(1, 6)])
    db.execute("UPDATE customers SET email = 'Alice@Example.com' WHERE id = 1")
    db.execute("UPDATE customers SET email = 'bob@example.com ' WHERE id = 2")
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rule(tmp_path).path.parent))
    return db


def held_by(match: dict, tmp_path) -> int:
    registry = HoldRegistry(open_audit(from_environment))
    hold = registry.add(category="customer_accounts", match=match, case_id="C", reason="r")
    with Targets(from_environment) as targets:
        plan = build_plan(rule(tmp_path), NOW, targets, holds=registry)
    registry.release(hold.id, reason="next case")
    return plan.targets[0].held


def test_item12_a_hold_matches_exactly_on_every_backend(emails, tmp_path):
    assert held_by({"email": "alice@example.com"}, tmp_path) == 0  # case counts (MariaDB's collation ignored it)
    assert held_by({"email": "bob@example.com"}, tmp_path) == 0  # so do trailing spaces (MariaDB pads)
    assert held_by({"email": "Alice@Example.com"}, tmp_path) == 1
    assert held_by({"email": "bob@example.com "}, tmp_path) == 1


def test_item12_a_hold_that_matches_no_row_warns_and_shows_near_matches(emails, capsys):
    add = ["hold", "add", "--category", "customer_accounts", "--case", "C", "--reason", "r", "--match"]

    assert main(add + ['{"email": "alice@example.com"}']) == 0
    err = capsys.readouterr().err
    assert "matches no row of crm_db:customers" in err and '"Alice@Example.com"' in err
    assert main(add + ['{"email": "bob@example.com"}']) == 0
    assert '"bob@example.com "' in capsys.readouterr().err
    assert main(add + ['{"email": "person3@example.com"}']) == 0
    assert "protects 1 row" in capsys.readouterr().err
    # PostgreSQL would fail every run on '3' against an integer; MariaDB would match '03'.
    assert main(add + ['{"id": "3"}']) == 2
    assert "holds integers" in capsys.readouterr().err


def test_item12_unknown_category_target_or_column_is_refused_with_did_you_mean(crm, tmp_path, capsys,
                                                                                monkeypatch):
    runner(at(NOW)).run(rule(tmp_path), run_id="seen", as_of=NOW)  # the audit database has seen the category
    add = ["hold", "add", "--case", "C", "--reason", "r"]
    empty = tmp_path / "no_rules"
    empty.mkdir()

    assert main(add + ["--rules", str(empty), "--category", "customer_acounts"]) == 2
    assert "did you mean 'customer_accounts'?" in capsys.readouterr().err
    assert main(add + ["--rules", str(empty), "--category", "customer_accounts"]) == 0  # seen: allowed
    assert main(add + ["--rules", str(empty), "--category", "customer_acounts", "--force"]) == 0
    capsys.readouterr()

    monkeypatch.setenv("RETENTION_RULES_DIR", str(tmp_path / "rules"))
    assert main(add + ["--category", "customer_accounts", "--target", "custmers"]) == 2
    assert "did you mean 'customers'?" in capsys.readouterr().err
    assert main(add + ["--category", "customer_accounts", "--match", '{"emial": "a@b.c"}']) == 2
    err = capsys.readouterr().err
    assert "no column 'emial' (checked against the table) (did you mean 'email'?)" in err

    # Unreachable table: checked against what the rule declares, and said so.
    monkeypatch.delenv("AIRFLOW_CONN_CRM_DB")
    assert main(add + ["--category", "customer_accounts", "--match", '{"statu": "closed"}']) == 2
    err = capsys.readouterr().err
    assert "checked against the rule only" in err and "did you mean 'status'?" in err
    assert main(add + ["--category", "customer_accounts", "--match", '{"status": "closed"}']) == 0
    assert "checked against the rule only" in capsys.readouterr().err
    listed = HoldRegistry(open_audit(from_environment)).find()
    assert [h.category for h in listed] == ["customer_accounts", "customer_acounts", "customer_accounts"]


def test_item12_an_s3_prefix_outside_the_target_is_refused(audit_db, tmp_path, capsys):
    text = ("category: receipts\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P7Y\naction: delete\n"
            "targets:\n  - {name: r, kind: s3, connection: aws_default, bucket: receipts-bucket, prefix: r/,\n"
            "     age_from: key_date, key_date_format: 'r/%Y/%m/%d/', max_fraction: 1.0}\n")
    rules_dir = write_rule(tmp_path / "rules", "receipts", text=text).parent
    add = ["hold", "add", "--rules", str(rules_dir), "--category", "receipts", "--case", "C", "--reason", "r"]

    assert main(add + ["--prefix", "2010/"]) == 2
    assert "did you mean 'r/2010/'?" in capsys.readouterr().err
    assert main(add + ["--prefix", "r/2010/"]) == 0
    assert main(add + ["--prefix", ""]) == 0  # covers the whole target


@pytest.mark.airflow
def test_item03_the_dag_plan_task_refuses_a_future_logical_date(sqlite_db, monkeypatch, audit_db, keys, tmp_path):
    import os
    import subprocess
    import sys

    from airflow.utils.state import DagRunState, TaskInstanceState

    from retention.interfaces.airflow import build_dags

    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env=os.environ.copy())
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", real_now() - timedelta(days=30)) for i in range(1, 6)])
    rules = write_rule(tmp_path / "rules", retain_for="P1Y").parent
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rules))
    dag = build_dags(rules)["retention__customer_accounts"]

    dag_run = dag.test(logical_date=real_now() + timedelta(days=400))  # a manual trigger with a future date

    assert dag_run.state == DagRunState.FAILED
    plan = next(ti for ti in dag_run.get_task_instances() if ti.task_id == "plan")
    assert plan.state == TaskInstanceState.FAILED and plan.try_number == 1  # terminal: not retried
    assert len(ids(sqlite_db)) == 5 and runs_opened() == 0


def test_item12_a_hold_protects_a_latin1_column_on_mariadb(mysql_db, monkeypatch, audit_db, tmp_path):
    connect(monkeypatch, "crm_db", mysql_db)
    mysql_db.execute("CREATE TABLE customers (id INTEGER PRIMARY KEY, email VARCHAR(100) CHARACTER SET latin1, "
                     "status VARCHAR(20) NOT NULL, closed_at DATETIME)")
    mysql_db.execute("INSERT INTO customers VALUES (1, 'José@example.com', 'closed', '2020-01-01'), "
                     "(2, 'jose@example.com', 'closed', '2020-01-01')")

    assert held_by({"email": "José@example.com"}, tmp_path) == 1  # bytes compared in one charset, not latin1's
    assert held_by({"email": "JOSÉ@example.com"}, tmp_path) == 0


@pytest.mark.parametrize("field, value", [("case_id", "C" * 101), ("by", "b" * 101), ("category", "c" * 64),
                                          ("target", "t" * 64), ("prefix", "p" * 1025)])
def test_a_hold_field_longer_than_its_column_is_refused_by_name_and_nothing_is_placed(db, field, value, monkeypatch):
    """Over-long fields were left to the database: PostgreSQL and MariaDB raised a DataError
    (a traceback through the CLI), SQLite kept them. Now each is refused, naming the field."""
    connect(monkeypatch, "retention_audit", db)
    registry = HoldRegistry(open_audit(from_environment))
    fields = {"category": "orders", "case_id": "C-1", "reason": "r", "by": "ana", field: value}
    with pytest.raises(ConfigError, match=rf"{ {'case_id': 'case id', 'by': 'placed by'}.get(field, field)}.*at most"):
        registry.add(**fields)
    assert registry.find(include_released=True) == []
