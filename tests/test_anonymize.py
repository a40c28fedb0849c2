"""Anonymize in place: strategies applied exactly, rows and keys kept, joins intact, reruns no-ops."""

from __future__ import annotations

import hashlib
import hmac
from datetime import date, datetime, timedelta, timezone

import pytest
import sqlalchemy as sa

from retention.errors import ConfigError, RuleError
from retention.rules.loader import load_rule_file
from retention.rules.strategies import Strategy
from retention.targets.sql.anonymize import Anonymizer

from conftest import connect, write_rule
from sqlpurge import runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, tzinfo=UTC)
CUTOFF = datetime(2024, 6, 15, tzinfo=UTC)
HASH_KEY = "a-test-key-of-more-than-16-bytes"
TIMESTAMP = {"postgresql": "TIMESTAMPTZ", "mariadb": "DATETIME(6)", "sqlite": "TIMESTAMP"}


def create_crm(db) -> None:
    ts = TIMESTAMP[db.backend]
    db.execute(
        "CREATE TABLE customers (id INTEGER PRIMARY KEY, email VARCHAR(255) NOT NULL, full_name VARCHAR(100), "
        f"phone VARCHAR(30), birth_date DATE, postcode VARCHAR(10), closed_at {ts}, anonymized_at {ts})"
    )
    db.execute("CREATE INDEX customers_closed_at ON customers (closed_at)")
    db.execute("CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_id INTEGER NOT NULL REFERENCES customers (id))")
    db.execute(f"CREATE TABLE newsletter (id INTEGER PRIMARY KEY, email VARCHAR(255), sent_at {ts}, anonymized_at {ts})")


def fill_crm(db, n: int = 30) -> set[int]:
    expired = {i for i in range(1, n + 1) if i % 3 == 0}
    customers, orders, letters = [], [], []
    for i in range(1, n + 1):
        closed = CUTOFF - timedelta(days=i) if i in expired else CUTOFF + timedelta(days=i)
        if db.backend != "postgresql":
            closed = closed.replace(tzinfo=None)
        customers.append({"id": i, "email": f"person{i}@example.com", "full_name": f"Person {i}",
                          "phone": f"+44 7700 900{i:03d}", "birth_date": date(1980, 1, 1) + timedelta(days=97 * i),
                          "postcode": f"SW{i % 9}A 1AA", "closed_at": closed, "anonymized_at": None})
        orders.append({"id": i, "customer_id": i})
        letters.append({"id": i, "email": f"person{i}@example.com", "sent_at": closed, "anonymized_at": None})
    meta = sa.MetaData()
    with db.engine.begin() as conn:
        for name, rows in (("customers", customers), ("orders", orders), ("newsletter", letters)):
            conn.execute(sa.Table(name, meta, autoload_with=conn).insert(), rows)
    return expired


def anonymize_rule(tmp_path, columns: str | None = None):
    columns = columns or (
        "        email: hash\n        full_name: 'null'\n        phone: {redact: {keep_last: 2}}\n"
        "        birth_date: {generalize: year}\n        postcode: {generalize: {prefix: 3}}\n"
    )
    text = (
        "category: closed_customers\ndescription: Closed customers kept for accounting, without personal data\n"
        "owner: crm\nlegal_basis: Accounting needs the rows; personal data goes after two years\n"
        "retain_for: P2Y\naction: anonymize\ntargets:\n"
        "  - name: customers\n    kind: sql\n    connection: crm_db\n    table: customers\n    key: [id]\n"
        "    age_column: closed_at\n    max_batch_rows: 4\n    max_fraction: 1.0\n    anonymize:\n      marker: anonymized_at\n"
        "      columns:\n" + columns +
        "  - name: newsletter\n    kind: sql\n    connection: crm_db\n    table: newsletter\n    key: [id]\n"
        "    age_column: sent_at\n    max_fraction: 1.0\n    anonymize:\n      marker: anonymized_at\n      columns:\n        email: hash\n"
    )
    return load_rule_file(write_rule(tmp_path / "rules", "closed_customers", text=text))


@pytest.fixture
def crm(db, monkeypatch, audit_db, keys):
    connect(monkeypatch, "crm_db", db)
    monkeypatch.setenv("RETENTION_HASH_KEY", HASH_KEY)
    create_crm(db)
    return db


def rows(db, table: str) -> dict[int, dict]:
    with db.engine.connect() as conn:
        t = sa.Table(table, sa.MetaData(), autoload_with=conn)
        return {r["id"]: dict(r) for r in conn.execute(sa.select(t)).mappings()}


def test_strategies_are_applied_exactly_and_only_to_expired_rows(crm, tmp_path):
    expired = fill_crm(crm)
    before = rows(crm, "customers")

    certificate = runner().run(anonymize_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert certificate.status == "complete"
    after = rows(crm, "customers")
    assert set(after) == set(before)  # no row deleted
    for i, row in after.items():
        if i not in expired:
            assert row == before[i]
            continue
        old = before[i]
        assert row["email"] == hmac.new(HASH_KEY.encode(), old["email"].encode(), hashlib.sha256).hexdigest()
        assert row["full_name"] is None
        assert row["phone"] == "*" * (len(old["phone"]) - 2) + old["phone"][-2:]
        assert row["birth_date"] == date(old["birth_date"].year, 1, 1)
        assert row["postcode"] == old["postcode"][:3]
        assert row["closed_at"] == old["closed_at"]
        assert row["anonymized_at"] is not None
    assert certificate.data["targets"][0]["anonymized"] == len(expired)
    assert certificate.data["targets"][0]["deleted"] == 0


def test_foreign_keys_and_hash_joins_survive(crm, tmp_path):
    expired = fill_crm(crm)

    runner().run(anonymize_rule(tmp_path), run_id="r1", as_of=AS_OF)

    with crm.engine.connect() as conn:
        orphans = conn.execute(sa.text(
            "SELECT count(*) FROM orders o LEFT JOIN customers c ON c.id = o.customer_id WHERE c.id IS NULL")).scalar()
        joined = conn.execute(sa.text(
            "SELECT count(*) FROM customers c JOIN newsletter n ON n.email = c.email "
            "WHERE c.anonymized_at IS NOT NULL")).scalar()
    assert orphans == 0
    assert joined == len(expired)  # the same key hashed the same email in both tables


def test_a_run_reflects_each_table_once(crm, tmp_path, monkeypatch):
    """The purge reuses the plan's reflection, though the journal keeps the target's columns sorted."""
    from retention.targets.sql.table import SqlTable

    reflected: list[str] = []
    original = SqlTable._reflect
    monkeypatch.setattr(SqlTable, "_reflect", lambda self: reflected.append(self.target.name) or original(self))
    fill_crm(crm)
    runner().run(anonymize_rule(tmp_path), run_id="r1", as_of=AS_OF)
    assert sorted(reflected) == ["customers", "newsletter"]


def test_a_rerun_is_a_no_op(crm, tmp_path):
    fill_crm(crm)
    rule_file = anonymize_rule(tmp_path)
    runner().run(rule_file, run_id="r1", as_of=AS_OF)
    once = rows(crm, "customers")

    second = runner().run(rule_file, run_id="r2", as_of=AS_OF + timedelta(hours=1))

    assert rows(crm, "customers") == once
    assert second.data["totals"]["matched"] == 0 and second.data["totals"]["anonymized"] == 0


def test_a_column_that_does_not_exist_is_a_rule_error_before_anything_runs(crm, tmp_path):
    fill_crm(crm)
    before = rows(crm, "customers")
    rule_file = anonymize_rule(tmp_path, columns="        email: hash\n        nickname: 'null'\n")

    with pytest.raises(RuleError) as caught:
        runner().run(rule_file, run_id="r1", as_of=AS_OF)

    (problem,) = caught.value.problems
    assert problem.field == "targets[0].anonymize.columns.nickname"
    assert "does not exist" in problem.message
    assert rows(crm, "customers") == before


@pytest.mark.parametrize("columns, field, says", [
    ("        email: scramble\n", "targets[0].anonymize.columns.email", "is not a strategy"),
    ("        phone: {redact: {keep_first: 2}}\n", "targets[0].anonymize.columns.phone", "is not a strategy"),
    ("        birth_date: {generalize: decade}\n", "targets[0].anonymize.columns.birth_date", "generalize takes"),
])
def test_an_unknown_strategy_is_a_rule_error(tmp_path, columns, field, says):
    with pytest.raises(RuleError) as caught:
        anonymize_rule(tmp_path, columns=columns)

    assert any(p.field == field and says in p.message for p in caught.value.problems)


def test_a_hash_into_a_short_column_or_without_a_key_is_refused(crm, tmp_path, monkeypatch):
    fill_crm(crm)
    with pytest.raises(RuleError) as caught:
        runner().run(anonymize_rule(tmp_path, columns="        postcode: hash\n"), run_id="r1", as_of=AS_OF)
    assert "holds 10" in caught.value.problems[0].message

    monkeypatch.delenv("RETENTION_HASH_KEY")
    with pytest.raises(ConfigError, match="RETENTION_HASH_KEY"):
        runner().run(anonymize_rule(tmp_path), run_id="r2", as_of=AS_OF)
    assert all(r["anonymized_at"] is None for r in rows(crm, "customers").values())


def test_strategies_on_their_own():
    anonymizer = Anonymizer(b"k" * 16)
    assert anonymizer.apply(Strategy.parse({"redact": {"keep_last": 4}}), "4111111111111111") == "************1111"
    assert anonymizer.apply(Strategy.parse({"redact": {"keep_last": 9}}), "abc") == "abc"
    assert anonymizer.apply(Strategy.parse({"generalize": "month"}), date(1990, 7, 14)) == date(1990, 7, 1)
    assert anonymizer.apply(Strategy.parse({"generalize": "year"}),
                            datetime(1990, 7, 14, 8, 30)) == datetime(1990, 1, 1)
    assert anonymizer.apply(Strategy.parse({"generalize": {"prefix": 2}}), "75011") == "75"
    assert anonymizer.apply(Strategy.parse("hash"), None) is None
    assert anonymizer.apply(Strategy.parse("hash"), "x") == anonymizer.apply(Strategy.parse("hash"), "x")
    assert anonymizer.apply(Strategy.parse("hash"), "x") != Anonymizer(b"j" * 16).apply(Strategy.parse("hash"), "x")
