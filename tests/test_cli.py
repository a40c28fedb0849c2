"""The ``retention`` command as a user runs it: exit codes, what it prints, what it touches.

Exit status 0 is success, 2 is invalid rules or usage; an invalid rule must stop a run
before any database is touched and before any certificate is written.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import sqlalchemy as sa

from retention.evidence.signing import SIGNING_KEY_ENV
from retention.interfaces.cli import main

from conftest import Database, connect, write_rule

AS_OF = "2025-06-15T00:00:00Z"
"""With P2Y, records closed strictly before 2023-06-15 00:00:00 UTC have expired."""

CUSTOMERS = [
    (1, "ann@example.com", "closed", "2020-01-01 00:00:00"),   # expired
    (2, "bob@example.com", "closed", "2023-06-14 23:59:59"),   # expired: one second before the cutoff
    (3, "cat@example.com", "closed", "2023-06-15 00:00:00"),   # at the cutoff: kept
    (4, "dan@example.com", "closed", "2024-01-01 00:00:00"),   # kept
    (5, "eve@example.com", "active", None),                    # no age: never expires
    (6, "fay@example.com", "closed", "2021-05-05 12:30:00"),   # expired
    (7, "gus@example.com", "active", "2019-01-01 00:00:00"),   # old, but the rule wants closed only
]
ALL_IDS = [row[0] for row in CUSTOMERS]
EXPIRED_IDS = [1, 2, 6]


def _create_customers(db: Database) -> None:
    db.execute(
        "CREATE TABLE customers (id integer primary key, email varchar(100), status varchar(20), "
        "closed_at timestamp null)"
    )
    db.execute("CREATE INDEX customers_closed_at ON customers (closed_at)")
    with db.engine.begin() as conn:
        conn.execute(
            sa.text("INSERT INTO customers (id, email, status, closed_at) VALUES (:id, :email, :status, :closed_at)"),
            [dict(zip(("id", "email", "status", "closed_at"), row)) for row in CUSTOMERS],
        )


def _customer_ids(db: Database) -> list[int]:
    return [row[0] for row in db.rows("SELECT id FROM customers ORDER BY id")]


def _certificates(audit: Database) -> int:
    """How many certificates the audit database holds (0 when it has no table yet)."""
    if not sa.inspect(audit.engine).has_table("purge_certificates"):
        return 0
    return audit.scalar("SELECT count(*) FROM purge_certificates")


@pytest.fixture
def customers(db, monkeypatch) -> Database:
    """A ``customers`` table with three expired closed accounts, reachable as crm_db."""
    _create_customers(db)
    connect(monkeypatch, "crm_db", db)
    return db


@pytest.fixture
def rules_dir(tmp_path) -> Path:
    """Where the rule files of a test go (created by the first write_rule)."""
    return tmp_path / "retention_rules"


def _valid_rule(directory: Path) -> Path:
    """customer_accounts: closed accounts, P2Y after closed_at, in crm_db.customers."""
    return write_rule(directory, "customer_accounts", targets=[{"where": "{status: closed}"}])


def _lines_with(text: str, fragment: str) -> list[str]:
    return [line for line in text.splitlines() if fragment in line]


# -- validate --------------------------------------------------------------------------


def test_validate_accepts_a_good_directory_and_lists_the_categories(rules_dir, capsys):
    _valid_rule(rules_dir)
    write_rule(rules_dir, "support_tickets", retain_for="P90D")

    status = main(["validate", str(rules_dir)])

    out, err = capsys.readouterr()
    assert status == 0
    assert "2 rule files valid" in out
    assert "customer_accounts, support_tickets" in out
    assert err == ""


def test_validate_reads_the_directory_from_the_environment(rules_dir, capsys, monkeypatch):
    _valid_rule(rules_dir)
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rules_dir))

    assert main(["validate"]) == 0
    assert "customer_accounts" in capsys.readouterr().out


def _broken(directory: Path, case: str) -> tuple[Path, int, str]:
    """Write a broken ``support_tickets`` rule; return its file, the line at fault and a word
    the error must say."""
    category = "support_tickets"
    if case == "bad_yaml":
        return write_rule(directory, category, text=f"category: {category}\nowner: crm: team\n"), 2, "not valid YAML"
    if case == "unknown_key":
        path = write_rule(directory, category, targets=[{"age_colum": "closed_at"}])
        return path, 16, "did you mean 'age_column'?"
    if case == "bad_duration":
        return write_rule(directory, category, retain_for="2 years"), 5, "ISO 8601"
    if case == "bad_cron":
        path = write_rule(directory, category)
        path.write_text(path.read_text().replace('"@daily"', '"61 3 * * *"'))
        return path, 6, "not a schedule"
    if case == "duplicate_category":
        write_rule(directory, category)  # a file is named after its category: .yaml and .yml collide
        return write_rule(directory, category, filename=f"{category}.yml"), 1, f"{category}.yaml"
    if case == "sql_injection":
        path = write_rule(directory, category, targets=[{"table": '"customers; drop table orders"'}])
        return path, 12, "not a table name"
    raise AssertionError(case)


BROKEN = ["bad_yaml", "unknown_key", "bad_duration", "bad_cron", "duplicate_category", "sql_injection"]


@pytest.mark.parametrize("case", BROKEN)
def test_validate_refuses_a_broken_rule_naming_file_and_line(rules_dir, capsys, case):
    path, line, says = _broken(rules_dir, case)

    status = main(["validate", str(rules_dir)])

    out, err = capsys.readouterr()
    assert status == 2
    assert "valid in" not in out
    [reported] = _lines_with(err, f"{path}:{line}:")
    assert says in reported
    assert "invalid rules (1 problem)" in err
    assert "nothing was touched" in err


def test_validate_reports_every_broken_file(rules_dir, capsys):
    bad_duration = write_rule(rules_dir, "customer_accounts", retain_for="P1.5Y")
    bad_key = write_rule(rules_dir, "support_tickets", targets=[{"key": '["id; --"]'}])

    assert main(["validate", str(rules_dir)]) == 2

    err = capsys.readouterr().err
    assert "invalid rules (2 problems)" in err
    assert _lines_with(err, f"{bad_duration}:5: retain_for:")
    assert _lines_with(err, f"{bad_key}:13: targets[0].key[0]:")


def test_validate_of_a_missing_directory_exits_2(tmp_path, capsys):
    assert main(["validate", str(tmp_path / "nowhere")]) == 2
    assert "does not exist" in capsys.readouterr().err


# -- plan ------------------------------------------------------------------------------


def test_plan_json_counts_exactly_and_changes_nothing(customers, rules_dir, capsys):
    _valid_rule(rules_dir)

    status = main(["plan", "--rules", str(rules_dir), "--as-of", AS_OF, "--json"])

    out, _ = capsys.readouterr()
    assert status == 0
    [plan] = json.loads(out)
    assert plan["category"] == "customer_accounts"
    assert plan["as_of"].startswith("2025-06-15T00:00:00")
    assert plan["cutoff"].startswith("2023-06-15T00:00:00")
    assert plan["matched"] == len(EXPIRED_IDS)
    [target] = plan["targets"]
    assert (target["name"], target["matched"], target["total"]) == ("customers", 3, len(CUSTOMERS))
    assert target["location"] == "crm_db:customers"
    assert target["notes"] == []  # closed_at is indexed
    assert _customer_ids(customers) == ALL_IDS


def test_plan_as_of_with_offset_means_the_same_instant(customers, rules_dir, capsys):
    """02:00:01 at +02:00 is one second after midnight UTC: row 3 is then expired too."""
    _valid_rule(rules_dir)

    assert main(["plan", "--rules", str(rules_dir), "--as-of", "2025-06-15T02:00:01+02:00", "--json"]) == 0

    [plan] = json.loads(capsys.readouterr().out)
    assert plan["matched"] == 4


def test_plan_text_says_nothing_was_changed(customers, rules_dir, capsys):
    _valid_rule(rules_dir)

    assert main(["plan", "--rules", str(rules_dir), "--as-of", AS_OF]) == 0

    out = capsys.readouterr().out
    assert "customer_accounts" in out
    assert "Plan only: nothing was changed. 3 records would be purged." in out
    assert _customer_ids(customers) == ALL_IDS


@pytest.mark.parametrize(
    ("target", "line", "field"),
    [
        ({"age_column": "deleted_at"}, 14, "targets[0].age_column"),
        ({"where": "{region: eu}"}, 16, "targets[0].where.region"),
    ],
)
def test_plan_refuses_a_column_the_table_lacks(customers, rules_dir, capsys, target, line, field):
    path = write_rule(rules_dir, "customer_accounts", targets=[target])

    status = main(["plan", "--rules", str(rules_dir), "--as-of", AS_OF])

    out, err = capsys.readouterr()
    assert status == 2
    [reported] = _lines_with(err, f"{path}:{line}: {field}:")
    assert "does not exist in crm_db:customers" in reported
    assert "would be purged" not in out
    assert _customer_ids(customers) == ALL_IDS


# -- run -------------------------------------------------------------------------------


def test_run_purges_expired_rows_and_certifies(customers, audit_db, keys, rules_dir, capsys):
    """The control for the tests below: with valid rules, the same setup does change things."""
    _valid_rule(rules_dir)

    status = main(["run", "--rules", str(rules_dir), "--as-of", AS_OF])

    out, _ = capsys.readouterr()
    assert status == 0
    assert _customer_ids(customers) == [i for i in ALL_IDS if i not in EXPIRED_IDS]
    assert _certificates(audit_db) == 1
    assert "certificate seq 1 for customer_accounts: complete" in out


@pytest.mark.parametrize("case", BROKEN)
def test_run_with_an_invalid_rule_touches_nothing(customers, audit_db, keys, rules_dir, capsys, case):
    _valid_rule(rules_dir)
    path, line, _ = _broken(rules_dir, case)

    status = main(["run", "--rules", str(rules_dir), "--as-of", AS_OF])

    out, err = capsys.readouterr()
    assert status == 2
    assert len(_lines_with(err, f"{path}:{line}:")) == 1
    assert "invalid rules (1 problem)" in err  # the valid rule is not what is wrong
    assert "nothing was touched" in err
    assert out == ""
    assert _customer_ids(customers) == ALL_IDS
    assert _certificates(audit_db) == 0


def test_run_with_an_invalid_rule_of_another_category_touches_nothing(
    customers, audit_db, keys, rules_dir, capsys
):
    _valid_rule(rules_dir)
    broken = write_rule(rules_dir, "support_tickets", retain_for="P0D")

    status = main(["run", "--rules", str(rules_dir), "--category", "customer_accounts", "--as-of", AS_OF])

    assert status == 2
    assert _lines_with(capsys.readouterr().err, f"{broken}:5: retain_for:")
    assert _customer_ids(customers) == ALL_IDS
    assert _certificates(audit_db) == 0


def test_run_dry_run_changes_nothing_and_certifies_nothing(customers, audit_db, keys, rules_dir, capsys):
    _valid_rule(rules_dir)

    status = main(["run", "--rules", str(rules_dir), "--as-of", AS_OF, "--dry-run"])

    out, _ = capsys.readouterr()
    assert status == 0
    assert "Dry run: nothing was changed and no certificate was written." in out
    assert _customer_ids(customers) == ALL_IDS
    assert _certificates(audit_db) == 0


def test_run_without_a_signing_key_touches_nothing(customers, audit_db, rules_dir, capsys, monkeypatch):
    monkeypatch.delenv(SIGNING_KEY_ENV, raising=False)
    _valid_rule(rules_dir)

    status = main(["run", "--rules", str(rules_dir), "--as-of", AS_OF])

    err = capsys.readouterr().err
    assert status == 2
    assert f"{SIGNING_KEY_ENV} is not set" in err
    assert _customer_ids(customers) == ALL_IDS
    assert _certificates(audit_db) == 0


def test_run_with_a_missing_signing_key_file_touches_nothing(
    customers, audit_db, rules_dir, tmp_path, capsys, monkeypatch
):
    monkeypatch.setenv(SIGNING_KEY_ENV, str(tmp_path / "no-such-key.pem"))
    _valid_rule(rules_dir)

    assert main(["run", "--rules", str(rules_dir), "--as-of", AS_OF]) == 2

    assert "does not exist" in capsys.readouterr().err
    assert _customer_ids(customers) == ALL_IDS
    assert _certificates(audit_db) == 0


# -- usage -----------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["plan", "run"])
def test_as_of_without_time_zone_is_a_usage_error(rules_dir, capsys, command):
    _valid_rule(rules_dir)

    with pytest.raises(SystemExit) as exited:
        main([command, "--rules", str(rules_dir), "--as-of", "2025-06-15T00:00:00"])

    assert exited.value.code == 2
    assert "has no time zone" in capsys.readouterr().err


def test_as_of_that_is_not_a_timestamp_is_a_usage_error(rules_dir, capsys):
    with pytest.raises(SystemExit) as exited:
        main(["plan", "--rules", str(rules_dir), "--as-of", "yesterday"])

    assert exited.value.code == 2
    assert "not an ISO 8601 date or timestamp" in capsys.readouterr().err


def test_command_groups_name_every_command_they_register():
    """A command loads only its group, found by name in COMMAND_GROUPS: the names must be the ones registered."""
    import argparse
    import importlib

    from retention.interfaces.cli import COMMAND_GROUPS, command_groups

    for module_name, declared in COMMAND_GROUPS.items():
        commands = argparse.ArgumentParser().add_subparsers()
        importlib.import_module(module_name).register(commands)
        assert tuple(commands.choices) == declared, module_name
    assert [m.__name__ for m in command_groups(["-v", "run", "--rules", "x"])] == ["retention.interfaces.cli.rules"]
    assert len(command_groups(["--help", "run"])) == len(COMMAND_GROUPS)
    assert len(command_groups(["nosuchcommand"])) == len(COMMAND_GROUPS)
