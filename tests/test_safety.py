"""A purge's worst days: legal holds, over-limit rules, two runs at once, stalls, retention lag."""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import threading
import time
from datetime import date, datetime, timedelta, timezone

import boto3
import pytest
import sqlalchemy as sa
from moto import mock_aws

from retention.connections import from_environment
from retention.errors import ConfigError, OverLimit, TerminalError, TransientError
from retention.evidence.audit import ensure_schema, open_audit
from retention.evidence.chain import find_certificate
from retention.holds import HoldRegistry
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file
from retention.run.locks import CategoryBusy

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)


@pytest.fixture
def crm(pg_db, monkeypatch, audit_db, keys):
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(i, "closed", OLD + timedelta(hours=i)) for i in range(1, 41)]
                     + [(i, "closed", AS_OF) for i in range(41, 51)])
    return pg_db


def rule(tmp_path, **target):
    target.setdefault("where", "{status: closed}")
    return load_rule_file(write_rule(tmp_path / "rules", targets=[target]))


def holds() -> HoldRegistry:
    return HoldRegistry(open_audit(from_environment))


# -- legal holds ---------------------------------------------------------------------------


def test_held_records_survive_and_the_certificate_names_the_hold(crm, tmp_path):
    hold = holds().add(category="customer_accounts", match={"id": 7}, case_id="CASE-7", reason="chargeback dispute")

    certificate = runner().run(rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert ids(crm) == {7} | set(range(41, 51))
    target = certificate.data["targets"][0]
    assert (target["deleted"], target["held"], target["status"]) == (39, 1, "complete")
    assert certificate.data["holds"] == [hold.id]


def test_a_hold_placed_between_plan_and_purge_still_protects(crm, tmp_path):
    rule_file = rule(tmp_path)
    r = runner()
    run, plan = r.start(rule_file, run_id="r1", as_of=AS_OF)
    assert plan.targets[0].matched == 40

    holds().add(category="customer_accounts", target="customers", match={"id": 12}, case_id="C-12", reason="audit")
    r.purge(rule_file, run, "customers")

    assert 12 in ids(crm)


def test_a_hold_placed_between_batches_still_protects(crm, tmp_path):
    rule_file = rule(tmp_path, max_batch_rows=5)
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    placed = []

    def place_after_first_batch(target, deleted, matched, rows, seconds):
        if not placed:
            placed.append(holds().add(category="customer_accounts", match={"id": 38}, case_id="C", reason="late"))

    r.purge(rule_file, run, "customers", progress=place_after_first_batch)
    certificate = r.certify(run)

    assert 38 in ids(crm)
    assert certificate.data["holds"] == [placed[0].id]


def test_releasing_a_hold_lets_the_next_run_take_the_records(crm, tmp_path):
    registry = holds()
    hold = registry.add(category="customer_accounts", match={"status": "closed"}, case_id="CASE-1",
                        reason="litigation on all closed accounts")
    first = runner().run(rule(tmp_path), run_id="r1", as_of=AS_OF)
    assert first.data["targets"][0]["held"] == 40 and len(ids(crm)) == 50

    registry.release(hold.id, reason="case settled")
    second = runner().run(rule(tmp_path), run_id="r2", as_of=AS_OF)

    assert second.data["targets"][0]["deleted"] == 40
    events = [e["event"] for e in registry.history(hold.id)]
    assert events == ["placed", "released"]
    with pytest.raises(sa.exc.DBAPIError, match="append-only"):  # released, never deleted
        with registry.engine.begin() as conn:
            conn.execute(sa.text("DELETE FROM legal_holds"))


def test_a_whole_target_hold_pauses_it_and_the_plan_says_why(crm, tmp_path, capsys):
    holds().add(category="customer_accounts", case_id="CASE-9", reason="regulator inquiry", until=date(2027, 1, 1))
    rule_file = rule(tmp_path)

    assert main(["plan", "--rules", str(rule_file.path.parent), "--as-of", AS_OF.isoformat()]) == 0
    out = capsys.readouterr().out
    certificate = runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert "paused by hold 1 (CASE-9): everything, until 2027-01-01: regulator inquiry" in out
    assert len(ids(crm)) == 50
    assert certificate.data["targets"][0]["held"] == 40 and certificate.status == "complete"


def test_a_lapsed_hold_no_longer_protects(crm, tmp_path):
    placed_then = HoldRegistry(open_audit(from_environment), clock=lambda: datetime(2026, 5, 1, tzinfo=UTC))
    placed_then.add(category="customer_accounts", match={"id": 5}, case_id="C", reason="r", until=date(2026, 6, 1))

    runner().run(rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert 5 not in ids(crm)


def test_hold_commands(crm, tmp_path, capsys, monkeypatch):
    rules_dir = rule(tmp_path).path.parent
    monkeypatch.setenv("RETENTION_RULES_DIR", str(rules_dir))

    assert main(["hold", "add", "--category", "customer_accounts", "--match", '{"id": 3}', "--case", "CASE-3",
                 "--reason", "dispute"]) == 0
    assert main(["hold", "add", "--category", "nope", "--case", "C", "--reason", "r"]) == 2
    assert main(["hold", "add", "--category", "customer_accounts", "--prefix", "x/", "--case", "C",
                 "--reason", "r"]) == 2
    assert main(["hold", "list"]) == 0
    listed = capsys.readouterr().out
    assert "CASE-3" in listed and '{"id": 3}' in listed and "in force" in listed
    assert main(["hold", "release", "1", "--reason", "settled"]) == 0
    assert main(["hold", "release", "1", "--reason", "again"]) == 2
    assert main(["hold", "list", "--all", "--json"]) == 0
    out = capsys.readouterr().out
    assert json.loads(out[out.index("["):])[0]["release_reason"] == "settled"


def test_an_s3_prefix_hold(monkeypatch, audit_db, keys, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "t", "password": "t", "extra": {"region_name": "us-east-1"}}))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="receipts-bucket")
        for key in ("r/2010/01/01/a", "r/2010/01/01/b", "r/2011/01/01/c"):
            s3.put_object(Bucket="receipts-bucket", Key=key, Body=b"x")
        holds().add(category="receipts", prefix="r/2010/", case_id="CASE-S3", reason="tax audit 2010")
        text = ("category: receipts\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P7Y\naction: delete\n"
                "targets:\n  - {name: r, kind: s3, connection: aws_default, bucket: receipts-bucket, prefix: r/,\n"
                "     age_from: key_date, key_date_format: 'r/%Y/%m/%d/', max_fraction: 1.0}\n")

        certificate = runner().run(load_rule_file(write_rule(tmp_path / "rules", "receipts", text=text)),
                                   run_id="r1", as_of=AS_OF)

        left = {o["Key"] for o in s3.list_objects_v2(Bucket="receipts-bucket")["Contents"]}
    assert left == {"r/2010/01/01/a", "r/2010/01/01/b"}
    assert certificate.data["targets"][0]["held"] == 2


# -- blast radius ----------------------------------------------------------------------------


def test_a_mistyped_filter_matching_90_percent_stops_with_nothing_touched(pg_db, monkeypatch, audit_db, keys,
                                                                           tmp_path, capsys):
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(i, "closed" if i <= 90 else "open", OLD) for i in range(1, 101)])
    # The author meant status: deleted (a few rows); "closed" matches 90% of the table.
    path = write_rule(tmp_path / "rules", targets=[{"where": "{status: closed}", "max_fraction": 0.2}])

    code = main(["run", "--rules", str(path.parent), "--as-of", AS_OF.isoformat(), "--run-id", "oops"])

    err = capsys.readouterr().err
    assert code == 1
    assert "would purge 90 of 100 (90.0%), over its limit (max_fraction 20%" in err
    assert f"{path}:9" in err and "Nothing was touched" in err
    assert len(ids(pg_db)) == 100
    certificate = find_certificate(open_audit(from_environment), "customer_accounts", "oops")
    assert certificate.status == "failed" and certificate.data["totals"]["deleted"] == 0


def test_an_approved_run_over_its_limit_proceeds_and_the_certificate_says_why(crm, tmp_path):
    rule_file = rule(tmp_path, max_fraction=0.5, max_records=10)
    with pytest.raises(OverLimit, match="would purge 40 of 50"):
        runner().run(rule_file, run_id="r1", as_of=AS_OF)

    certificate = runner().run(rule_file, run_id="r2", as_of=AS_OF, approval="first run after the 2025 backlog")

    assert certificate.status == "complete" and certificate.data["totals"]["deleted"] == 40
    approval = certificate.data["approval"]
    assert approval["reason"] == "first run after the 2025 backlog"
    assert approval["targets"]["customers"]["matched"] == 40 and approval["by"]


# -- concurrency -----------------------------------------------------------------------------


def test_two_concurrent_runs_purge_each_record_once(crm, tmp_path):
    path = rule(tmp_path, max_batch_rows=3).path
    command = [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(path.parent), "--as-of",
               AS_OF.isoformat()]
    runs = [subprocess.Popen(command + ["--run-id", f"run-{n}", "--json"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for n in range(2)]
    results = [(p.wait(), *p.communicate()) for p in runs]

    codes = sorted(code for code, _, _ in results)
    engine = open_audit(from_environment)
    certificates = [find_certificate(engine, "customer_accounts", f"run-{n}") for n in range(2)]
    deleted = sum(c.data["totals"]["deleted"] for c in certificates if c is not None)
    assert deleted == 40  # each record purged (and counted) once
    assert ids(crm) == set(range(41, 51))
    if codes != [0, 0]:  # the second one found the category busy and did not start
        assert codes == [0, 1]
        assert any("is being purged by run" in err for _, _, err in results), [err for _, _, err in results]


def test_a_second_run_can_wait_for_the_first(crm, tmp_path):
    rule_file = rule(tmp_path)
    first = runner()
    run, _ = first.start(rule_file, run_id="first", as_of=AS_OF)
    with pytest.raises(CategoryBusy, match="is being purged by run first"):
        runner().start(rule_file, run_id="second", as_of=AS_OF)

    def finish_first():
        time.sleep(1.0)
        first.purge(rule_file, run, "customers")
        first.certify(run)

    thread = threading.Thread(target=finish_first)
    thread.start()
    second = runner().run(rule_file, run_id="second", as_of=AS_OF, wait=30)
    thread.join()

    assert second.status == "complete" and second.data["totals"]["deleted"] == 0
    assert find_certificate(open_audit(from_environment), "customer_accounts", "first").data["totals"]["deleted"] == 40


# -- stalls and transient faults -------------------------------------------------------------


@pytest.mark.parametrize("backend", ["postgresql", "mariadb"])
def test_a_batch_blocked_by_a_lock_times_out_is_retried_and_finishes_after_release(
    backend, request, monkeypatch, audit_db, keys, tmp_path
):
    db = request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mysql_db"}[backend])
    connect(monkeypatch, "crm_db", db)
    make_customers(db)
    insert_customers(db, [(i, "closed", OLD + timedelta(hours=i)) for i in range(1, 21)])
    blocker = db.engine.connect()
    transaction = blocker.begin()
    blocker.execute(sa.text("SELECT id FROM customers WHERE id <= 5 FOR UPDATE"))  # someone else's long transaction
    retried = threading.Event()

    class ReleaseAfterARetry(logging.Handler):
        """The other transaction ends a second after the purge has timed out on its lock and passed over it."""

        def emit(self, record):
            if "passing over them for now" in record.getMessage() and not retried.is_set():
                retried.set()
                threading.Timer(1.0, transaction.commit).start()

    handler = ReleaseAfterARetry()
    logger = logging.getLogger("retention")
    logger.addHandler(handler)
    level = logger.level
    logger.setLevel(logging.INFO)
    try:
        certificate = runner().run(rule(tmp_path), run_id="r1", as_of=AS_OF)
    finally:
        logger.removeHandler(handler)
        logger.setLevel(level)
        if transaction.is_active:
            transaction.rollback()
        blocker.close()

    assert retried.is_set()  # the batch timed out on the lock and was passed over, not queued forever
    assert certificate.status == "complete" and certificate.data["totals"]["deleted"] == 20


def test_terminal_and_transient_errors_map_to_airflow_retries():
    from airflow.sdk.definitions.retry_policy import RetryAction

    from retention.interfaces.airflow import RETRY_POLICY

    assert RETRY_POLICY.evaluate(OverLimit("x"), 1, 3).action == RetryAction.FAIL
    assert RETRY_POLICY.evaluate(ConfigError("x"), 1, 3).action == RetryAction.FAIL
    assert RETRY_POLICY.evaluate(TerminalError("x"), 1, 3).action == RetryAction.FAIL
    assert RETRY_POLICY.evaluate(CategoryBusy("x"), 1, 3).action == RetryAction.RETRY
    assert RETRY_POLICY.evaluate(TransientError("x"), 1, 3).action == RetryAction.RETRY


def test_a_terminal_database_error_fails_at_once(crm, tmp_path):
    rule_file = rule(tmp_path)
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    # Something the plan could not see: a trigger that refuses deletes (retrying cannot help).
    crm.execute("CREATE FUNCTION frozen() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'deletes are frozen'; END $$")
    crm.execute("CREATE TRIGGER frozen BEFORE DELETE ON customers FOR EACH ROW EXECUTE FUNCTION frozen()")
    started = time.monotonic()

    with pytest.raises(TerminalError, match="RaiseException"):
        r.purge(rule_file, run, "customers")

    assert time.monotonic() - started < 5  # no backoff on what cannot succeed
    assert len(ids(crm)) == 50


# -- retention lag ---------------------------------------------------------------------------


def test_status_shows_how_far_behind_retention_is(crm, audit_db, tmp_path, capsys):
    ensure_schema(audit_db.engine)  # a deployment's init step: audit tables, no run yet (status reads, never creates)
    rules_dir = rule(tmp_path).path.parent
    assert main(["status", "--rules", str(rules_dir), "--as-of", AS_OF.isoformat(), "--json"]) == 1
    before = json.loads(capsys.readouterr().out)[0]
    assert before["last_status"] is None and before["expired"] == 40
    cutoff = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)
    assert before["lag_seconds"] == (cutoff - (OLD + timedelta(hours=1))).total_seconds()

    runner().run(rule(tmp_path), run_id="r1", as_of=AS_OF)
    assert main(["status", "--rules", str(rules_dir), "--as-of", AS_OF.isoformat(), "--json"]) == 0
    after = json.loads(capsys.readouterr().out)[0]

    assert (after["last_status"], after["expired"], after["lag_seconds"], after["healthy"]) == ("complete", 0, None, True)


def test_status_counts_what_a_hold_on_matching_rows_keeps(crm, tmp_path, capsys):
    """Found by the compliance page: status failed ("already initialized a Transaction") on any
    SQL target with a matching-rows hold in force."""
    holds().add(category="customer_accounts", match={"id": 7}, case_id="CASE-7", reason="chargeback dispute")
    rules_dir = rule(tmp_path).path.parent
    assert main(["status", "--rules", str(rules_dir), "--as-of", AS_OF.isoformat(), "--json"]) == 1
    report = json.loads(capsys.readouterr().out)[0]
    assert (report["expired"], report["held"], report["error"]) == (39, 1, None)


__all__ = ["os"]
