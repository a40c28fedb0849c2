"""Runs never wedge, failures are classified, the journal forgets what it purged (issue #9: 6, 9, 10, 16)."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import boto3
import pytest
import sqlalchemy as sa
from moto import mock_aws

from retention.connections import from_environment
from retention.errors import RuleError, TerminalError, TransientError
from retention.evidence.audit import ensure_schema, open_audit
from retention.evidence.chain import count_certificates, find_certificate, read_certificates
from retention.evidence.signing import Signer
from retention.interfaces.cli import main
from retention.interfaces.render import describe_certificate
from retention.rules.loader import load_rule_file
from retention.run.journal import RunJournal
from retention.run.runner import Runner
from retention.targets import Targets

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def crm(pg_db, monkeypatch, audit_db, keys):
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(i, "closed", OLD + timedelta(hours=i)) for i in range(1, 21)])
    return pg_db


@pytest.fixture
def aws(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": "us-east-1"}}))
    with mock_aws():
        yield boto3.client("s3", region_name="us-east-1")


def archive_rule(tmp_path, bucket: str):
    text = (
        "category: orders\ndescription: Closed accounts, archived\nowner: shop\nlegal_basis: Tax law\n"
        "retain_for: P2Y\naction: archive\n"
        f"archive:\n  connection: aws_default\n  bucket: {bucket}\n  prefix: accounts/\n"
        "targets:\n  - name: customers\n    kind: sql\n    connection: crm_db\n    table: customers\n"
        "    key: [id]\n    age_column: closed_at\n    max_fraction: 1.0\n    max_batch_rows: 5\n"
    )
    return load_rule_file(write_rule(tmp_path / "rules", "orders", text=text))


def audit_dump(engine) -> str:
    """Every row of every table of the audit database, as text."""
    meta = sa.MetaData()
    meta.reflect(engine)
    out = []
    with engine.connect() as conn:
        for table in meta.sorted_tables:
            out += [f"{table.name}: {tuple(row)!r}" for row in conn.execute(sa.select(table))]
    return "\n".join(out)


def bucket_keys(client, bucket: str) -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


# -- item 6: a missing archive bucket poisons every later run ------------------------------------


def test_item06_a_missing_archive_bucket_stops_the_plan_naming_file_line_and_bucket(crm, aws, tmp_path, capsys):
    rule_file = archive_rule(tmp_path, "no-such-archive")

    code = main(["run", "--rules", str(rule_file.path.parent), "--as-of", AS_OF.isoformat(), "--run-id", "r1"])

    err = capsys.readouterr().err
    assert code == 2
    assert "Traceback" not in err
    line = next(line for line in err.splitlines() if "no-such-archive" in line)
    assert f"{rule_file.path}:9: archive.bucket:" in line and "does not exist" in line and "NoSuchBucket" in line
    assert len(ids(crm)) == 20  # nothing touched
    with pytest.raises(RuleError, match="no-such-archive"):  # `retention plan` says the same
        from retention.plan.builder import build_plan

        build_plan(rule_file, AS_OF, Targets(from_environment))
    # The night's run is still certified (failed), and its missing manifest is recorded as such.
    certificate = find_certificate(open_audit(from_environment), "orders", "r1")
    assert certificate.status == "failed"
    assert "archive" not in certificate.data and "NoSuchBucket" in certificate.data["archive_error"]
    assert "manifest not written" in describe_certificate(certificate)


def test_item06_settling_a_run_whose_bucket_vanished_does_not_block_the_next_run(crm, aws, tmp_path):
    aws.create_bucket(Bucket="old-archive")
    aws.create_bucket(Bucket="new-archive")
    dead = Runner(RunJournal(open_audit(from_environment)), Targets(from_environment), Signer.from_environment(),
                  lease_ttl=timedelta(0))
    first_rule = archive_rule(tmp_path, "old-archive")
    run, _ = dead.start(first_rule, run_id="r1", as_of=AS_OF)
    dead.purge(first_rule, run, "customers")  # ...and the worker dies before certifying
    for key in bucket_keys(aws, "old-archive"):  # then the bucket goes (or the rule named a wrong one)
        aws.delete_object(Bucket="old-archive", Key=key)
    aws.delete_bucket(Bucket="old-archive")
    insert_customers(crm, [(i, "closed", OLD) for i in range(21, 26)])

    fixed = archive_rule(tmp_path, "new-archive")
    next_runner = Runner(RunJournal(open_audit(from_environment)), Targets(from_environment),
                         Signer.from_environment(), lease_ttl=timedelta(0))
    second = next_runner.run(fixed, run_id="r2", as_of=AS_OF)

    settled = find_certificate(open_audit(from_environment), "orders", "r1")
    assert settled is not None and settled.seq == 1
    # It purged (and archived) 20 rows, but its manifest could not be written: never "complete".
    assert settled.status == "partial" and settled.data["totals"]["archived"] == 20
    assert "NoSuchBucket" in settled.data["archive_error"] and "old-archive" in settled.data["archive_error"]
    assert second.status == "complete" and second.data["totals"]["archived"] == 5
    assert ids(crm) == set()
    assert any(k.endswith("manifest.json") for k in bucket_keys(aws, "new-archive"))


def test_item06_an_unwritable_checkpoint_store_stops_the_run_before_anything(crm, aws, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("RETENTION_CHECKPOINTS", "s3://no-such-evidence/retention")
    path = write_rule(tmp_path / "rules", targets=[{"where": "{status: closed}"}])

    code = main(["run", "--rules", str(path.parent), "--as-of", AS_OF.isoformat(), "--run-id", "r1"])

    err = capsys.readouterr().err
    assert code == 2 and "no-such-evidence" in err and "Traceback" not in err
    assert len(ids(crm)) == 20
    assert count_certificates(open_audit(from_environment)) == 0


# -- item 9: plan-time database errors are classified ------------------------------------------


def unreachable(monkeypatch, conn_id: str = "crm_db") -> None:
    # Nothing listens on port 1: the connection is refused at once.
    monkeypatch.setenv(f"AIRFLOW_CONN_{conn_id.upper()}", "postgres://postgres@127.0.0.1:1/crm")


def test_item09_an_unreachable_database_is_a_transient_plan_failure_and_the_certificate_says_plan_failed(
    monkeypatch, audit_db, keys, tmp_path
):
    from airflow.sdk.definitions.retry_policy import RetryAction

    from retention.interfaces.airflow import RETRY_POLICY

    unreachable(monkeypatch)
    rule_file = load_rule_file(write_rule(tmp_path / "rules"))
    r = runner()

    with pytest.raises(TransientError) as caught:
        r.start(rule_file, run_id="r1", as_of=AS_OF)
    assert RETRY_POLICY.evaluate(caught.value, 1, 3).action == RetryAction.RETRY
    assert "customers" in str(caught.value) and "plan failed" in str(caught.value)

    certificate = r.certify(r.journal.get_run("customer_accounts", "r1"))  # what the certify task does

    target = certificate.data["targets"][0]
    assert certificate.status == "failed"
    assert target["status"] == "failed"
    assert target["error"] == "plan failed: OperationalError (code 08001)"
    assert target["counted"] is False and certificate.data["totals"]["uncounted"] == 1
    shown = describe_certificate(certificate)
    row = next(line for line in shown.splitlines() if line.startswith("customers"))
    assert row.split()[3] == "?"  # MATCHED is not shown as a count of zero
    assert "plan failed: OperationalError (code 08001)" in row


def test_item09_a_database_that_refuses_the_connection_is_a_terminal_plan_failure(
    pg_db, monkeypatch, audit_db, keys, tmp_path
):
    from airflow.sdk.definitions.retry_policy import RetryAction

    from retention.interfaces.airflow import RETRY_POLICY

    url = pg_db.url
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", f"postgres://postgres@{url.host}:{url.port}/no_such_database")
    rule_file = load_rule_file(write_rule(tmp_path / "rules"))

    with pytest.raises(TerminalError) as caught:
        runner().start(rule_file, run_id="r1", as_of=AS_OF)

    assert RETRY_POLICY.evaluate(caught.value, 1, 3).action == RetryAction.FAIL
    record = RunJournal(open_audit(from_environment)).targets(
        RunJournal(open_audit(from_environment)).get_run("customer_accounts", "r1"))[0]
    assert record.state == "failed" and record.error == "plan failed: OperationalError"


def test_item09_the_cli_run_and_certificates_show_a_plan_failure_not_nothing_due(
    monkeypatch, audit_db, keys, tmp_path, capsys
):
    unreachable(monkeypatch)
    path = write_rule(tmp_path / "rules")

    code = main(["run", "--rules", str(path.parent), "--as-of", AS_OF.isoformat(), "--run-id", "r1"])

    out, err = capsys.readouterr()
    assert code == 1 and "Traceback" not in err
    assert "customer_accounts.customers: plan failed: OperationalError (code 08001)" in err
    assert main(["certificates"]) == 0
    listing = capsys.readouterr().out
    row = next(line for line in listing.splitlines() if "customer_accounts" in line)
    assert "failed (plan)" in row
    assert main(["certificates", "--seq", "1", "--json"]) == 0
    payload = json.loads(capsys.readouterr().out)
    assert payload["targets"][0]["counted"] is False


def test_item09_status_shows_every_target_even_when_one_is_broken(crm, audit_db, monkeypatch, tmp_path, capsys):
    ensure_schema(audit_db.engine)  # a deployment's init step: audit tables, no run yet (status reads, never creates)
    unreachable(monkeypatch, "broken_db")
    rules = tmp_path / "rules"
    write_rule(rules, targets=[{"where": "{status: closed}"}])
    write_rule(rules, "invoices", targets=[{"name": "invoices", "connection": "broken_db", "table": "invoices"}])
    write_rule(rules, "leads", targets=[{"name": "leads", "table": "customers"}])

    code = main(["status", "--rules", str(rules), "--as-of", AS_OF.isoformat(), "--json"])

    report = {r["target"]: r for r in json.loads(capsys.readouterr().out)}
    assert code == 1
    assert set(report) == {"customers", "invoices", "leads"}
    assert "broken_db:invoices" in report["invoices"]["error"]
    assert "OperationalError (code 08001)" in report["invoices"]["error"]
    assert report["invoices"]["healthy"] is False and report["invoices"]["expired"] is None
    assert report["leads"]["expired"] == 20 and report["leads"]["error"] is None
    assert main(["status", "--rules", str(rules), "--as-of", AS_OF.isoformat()]) == 1
    table = capsys.readouterr().out
    assert "OperationalError (code 08001)" in next(line for line in table.splitlines() if "invoices" in line)
    assert "leads" in table


# -- item 10: a certified run id is not started again ------------------------------------------


def test_item10_reusing_a_certified_run_id_is_refused_with_exit_2_and_nothing_touched(crm, tmp_path, capsys):
    path = write_rule(tmp_path / "rules", targets=[{"where": "{status: closed}"}])
    run = ["run", "--rules", str(path.parent), "--as-of", AS_OF.isoformat(), "--run-id", "nightly-1"]
    assert main(run) == 0
    capsys.readouterr()
    insert_customers(crm, [(i, "closed", OLD) for i in range(21, 26)])
    engine = open_audit(from_environment)
    before = audit_dump(engine)

    code = main(run)

    out, err = capsys.readouterr()
    assert code == 2
    assert "run id nightly-1 was certified as seq 1" in err and "Traceback" not in err
    assert ids(crm) == set(range(21, 26))  # the new expired rows were not touched
    assert audit_dump(engine) == before  # no lease, no journal row, no certificate
    assert main(run + ["--dry-run"]) == 0  # a dry run touches nothing, so it may name any id


def test_item10_the_runner_refuses_to_start_a_certified_run_but_certify_stays_idempotent(crm, tmp_path):
    rule_file = load_rule_file(write_rule(tmp_path / "rules"))
    r = runner()
    certificate = r.run(rule_file, run_id="r1", as_of=AS_OF)

    with pytest.raises(TerminalError, match="run id r1 was certified as seq 1"):
        runner().start(rule_file, run_id="r1", as_of=AS_OF)
    with pytest.raises(TerminalError, match="run id r1 was certified as seq 1"):
        runner().run(rule_file, run_id="r1", as_of=AS_OF)

    again = runner().certify(r.journal.get_run("customer_accounts", "r1"))  # a retried certify task
    assert again.seq == certificate.seq and again.entry_hash == certificate.entry_hash
    assert count_certificates(r.journal.engine) == 1


# -- item 16: the journal keeps no identifier of a purged record -------------------------------


def test_item16_a_certified_run_leaves_no_key_of_a_purged_row_in_the_audit_database(pg_db, monkeypatch, audit_db,
                                                                                     keys, tmp_path):
    connect(monkeypatch, "crm_db", pg_db)
    pg_db.execute("CREATE TABLE subscribers (email VARCHAR(100) PRIMARY KEY, closed_at TIMESTAMPTZ NOT NULL)")
    pg_db.execute("CREATE INDEX subscribers_closed_at ON subscribers (closed_at)")
    emails = [f"subscriber{i}@example.com" for i in range(1, 13)]
    for email in emails:  # one closing time for all: batch bounds then need the key to cut between rows
        pg_db.execute("INSERT INTO subscribers VALUES (:e, :t)", {"e": email, "t": OLD})
    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[
        {"name": "subscribers", "table": "subscribers", "key": "[email]", "max_batch_rows": 3}]))
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    r.purge(rule_file, run, "subscribers")
    open_run = audit_dump(r.journal.engine)
    assert any(email in open_run for email in emails)  # kept while the run is open: settlement reads them

    certificate = r.certify(run)

    assert certificate.status == "complete" and certificate.data["totals"]["deleted"] == 12
    dump = audit_dump(r.journal.engine)
    assert [email for email in emails if email in dump] == []


def test_item16_s3_keys_of_purged_and_archived_objects_are_gone_after_certify(aws, audit_db, keys, tmp_path):
    aws.create_bucket(Bucket="receipts-bucket")
    aws.create_bucket(Bucket="archive-bucket")
    purged = [f"r/2010/01/0{d}/customer-4711{d}.pdf" for d in range(1, 4)]
    for key in purged + ["r/2026/06/01/customer-99999.pdf"]:
        aws.put_object(Bucket="receipts-bucket", Key=key, Body=b"receipt")
    text = ("category: receipts\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P7Y\naction: archive\n"
            "archive: {connection: aws_default, bucket: archive-bucket, prefix: a/}\n"
            "targets:\n  - {name: r, kind: s3, connection: aws_default, bucket: receipts-bucket, prefix: r/,\n"
            "     age_from: key_date, key_date_format: 'r/%Y/%m/%d/', max_fraction: 1.0}\n")
    rule_file = load_rule_file(write_rule(tmp_path / "rules", "receipts", text=text))

    certificate = runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert certificate.status == "complete" and certificate.data["totals"]["deleted"] == 3
    dump = audit_dump(open_audit(from_environment))
    assert "customer-4711" not in dump
    # The manifest still lists every archived object: the archive, not the journal, is the record.
    manifest = aws.get_object(Bucket="archive-bucket", Key=certificate.data["archive"]["manifest"].split("/", 3)[3])
    assert sorted(o["source"] for o in json.loads(manifest["Body"].read())["s3_objects"]) == purged


def test_item16_runs_certified_by_older_versions_are_scrubbed_by_the_next_run(crm, tmp_path):
    rule_file = load_rule_file(write_rule(tmp_path / "rules", targets=[{"max_batch_rows": 4}]))
    r = runner()
    run, _ = r.start(rule_file, run_id="old", as_of=AS_OF)
    r.purge(rule_file, run, "customers")
    with r.journal.engine.connect() as conn:
        kept = conn.execute(sa.text("SELECT batch_no, bounds FROM purge_batches")).all()
    r.certify(run)
    # What an older version left behind: the batch bounds of a certified run, never scrubbed.
    with r.journal.engine.begin() as conn:
        for batch_no, bounds in kept:
            conn.execute(sa.text("UPDATE purge_batches SET bounds = :b WHERE batch_no = :n"),
                         {"b": bounds, "n": batch_no})
        if "scrubbed_at" in {c["name"] for c in sa.inspect(conn).get_columns("purge_runs")}:
            conn.execute(sa.text("UPDATE purge_runs SET scrubbed_at = NULL"))
    assert "2020-01-01T0" in audit_dump(r.journal.engine)  # the ages of purged rows, with their keys

    runner().run(rule_file, run_id="new", as_of=AS_OF)

    with r.journal.engine.connect() as conn:
        left = conn.execute(sa.text("SELECT DISTINCT bounds FROM purge_batches")).scalars().all()
    assert all("lower" not in b and "upper" not in b for b in left), left
    assert len(list(read_certificates(r.journal.engine))) == 2
