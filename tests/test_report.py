"""``retention report``: the period's purge report, read from real audit databases."""

from __future__ import annotations

import csv
import io
import json
import shutil
import subprocess
from datetime import datetime, timedelta, timezone

import pytest

from retention.connections import from_environment
from retention.evidence.audit import open_audit
from retention.evidence.signing import Signer
from retention.holds import HoldRegistry
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file
from retention.run.journal import RunJournal
from retention.run.runner import Runner
from retention.targets import Targets

from conftest import connect, write_rule
from sqlpurge import insert_customers, make_customers

UTC = timezone.utc


@pytest.fixture(params=["postgresql", "mariadb", "sqlite"])
def certified(request, sqlite_db, monkeypatch, keys, tmp_path):
    """Three nightly runs (Nov 1, 2, 3 at 23:30Z) certified in a PostgreSQL, MariaDB or SQLite
    audit database, a hold in force, and the rules directory."""
    audit = request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mysql_db", "sqlite": "audit_db"}[request.param])
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", audit.airflow_uri)
    connect(monkeypatch, "crm_db", sqlite_db)
    make_customers(sqlite_db)
    insert_customers(sqlite_db, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=30 * i))
                                 for i in range(1, 41)])
    rules = tmp_path / "rules"
    rule_file = load_rule_file(write_rule(rules))
    for day in (1, 2, 3):
        issued = datetime(2026, 11, day, 23, 30, tzinfo=UTC)
        r = Runner(RunJournal(open_audit(from_environment), clock=lambda issued=issued: issued),
                   Targets(from_environment), Signer.from_environment())
        r.run(rule_file, run_id=f"night-{day}", as_of=datetime(2022, 1 + day, 1, tzinfo=UTC))
    HoldRegistry(open_audit(from_environment)).add(category="customer_accounts", target=None, match={"id": 40},
                                                   prefix=None, case_id="CASE-7", reason="litigation", until=None)
    return rules, keys[1]


def report(capsys, rules, public_key, fmt, *extra) -> tuple[int, str]:
    code = main(["report", "--since", "2026-11-02", "--until", "2026-11-04", "--rules", str(rules),
                 "--public-key", str(public_key), "--format", fmt, *extra])
    captured = capsys.readouterr()
    return code, captured.out


def test_item02_json_report_counts_the_periods_certificates(certified, capsys):
    rules, public_key = certified
    code, out = report(capsys, rules, public_key, "json")
    data = json.loads(out)

    assert code == 0
    assert [r["run_id"] for r in data["certificates"]] == ["night-2", "night-3"]  # night-1 is before the period
    (category,) = data["categories"]
    assert category["category"] == "customer_accounts" and category["legal_basis"] == "Tests"
    assert category["retention"] == "2 years" and category["runs"] == 2
    assert category["deleted"] == sum(r["deleted"] for r in data["certificates"]) > 0
    assert category["statuses"] == {"complete": 2}
    assert data["incidents"] == []
    assert [h["case_id"] for h in data["holds_in_force"]] == ["CASE-7"]
    verification = data["verification"]
    assert verification["ok"] is True and verification["head_seq"] == 3 and verification["certificates"] == 3
    assert len(verification["head_hash"]) == 64


def test_item02_csv_has_one_row_per_certificate_and_target(certified, capsys):
    rules, public_key = certified
    code, out = report(capsys, rules, public_key, "csv")
    rows = list(csv.DictReader(io.StringIO(out)))

    assert code == 0
    assert [(r["seq"], r["target"], r["run_status"]) for r in rows] == [("2", "customers", "complete"),
                                                                      ("3", "customers", "complete")]
    assert all(len(r["entry_hash"]) == 64 for r in rows)


def test_item02_html_report_renders_to_pdf_in_chromium(certified, capsys, tmp_path):
    rules, public_key = certified
    page = tmp_path / "report.html"
    code, _ = report(capsys, rules, public_key, "html", "--out", str(page))
    text = page.read_text()

    assert code == 0
    assert "Valid: 3 certificates" in text and "CASE-7" in text and "night-3" in text and "night-1" not in text
    chromium = shutil.which("chromium")
    if chromium is None:
        pytest.fail("Debian's chromium is not installed: apt-get install -y chromium")
    pdf = tmp_path / "report.pdf"
    done = subprocess.run([chromium, "--headless", "--no-sandbox", "--disable-gpu", "--no-pdf-header-footer",
                           f"--print-to-pdf={pdf}", page.as_uri()], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert pdf.read_bytes().startswith(b"%PDF-") and pdf.stat().st_size > 1000


def test_item02_a_tampered_chain_is_reported_and_exits_1(certified, capsys):
    rules, public_key = certified
    engine = open_audit(from_environment)
    if engine.dialect.name != "sqlite":
        pytest.skip("the append-only triggers differ per server; tampering is exercised on SQLite")
    import sqlalchemy as sa

    with engine.begin() as conn:
        conn.execute(sa.text("DROP TRIGGER IF EXISTS purge_certificates_no_update"))
        names = [r[0] for r in conn.execute(sa.text("SELECT name FROM sqlite_master WHERE type='trigger'"))]
        for name in names:
            conn.execute(sa.text(f'DROP TRIGGER "{name}"'))
        conn.execute(sa.text("UPDATE purge_certificates SET payload = replace(payload, 'night-2', 'night-9') "
                             "WHERE seq = 2"))
    code, out = report(capsys, rules, public_key, "json")
    data = json.loads(out)

    assert code == 1
    assert data["verification"]["ok"] is False and data["verification"]["bad_seq"] == 2


@pytest.mark.parametrize("since, until, message", [
    ("2026-11-04", "2026-11-02", "is not after"),
    ("2026-13-01", "2026-11-02", "is not an ISO 8601 date"),
    ("2026-11-01T00:00:00", "2026-11-02", "has no time zone"),
])
def test_item02_a_wrong_period_is_refused_in_one_line(audit_db, capsys, since, until, message):
    with pytest.raises(SystemExit) if "after" not in message else _returns(2) as outcome:
        outcome.code = main(["report", "--since", since, "--until", until, "--format", "json"])
    err = capsys.readouterr().err
    assert message in err and "Traceback" not in err


class _returns:
    def __init__(self, code):
        self.expected = code
        self.code = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        assert self.code == self.expected
        return False
