"""S3 targets against moto: age by LastModified and key date, filters, versions, locks, faults."""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone

import boto3
import pytest
from moto import mock_aws

from retention import failpoints
from retention.connections import from_environment
from retention.errors import RuleError
from retention.evidence.audit import open_audit
from retention.evidence.signing import Signer
from retention.failpoints import InjectedFault
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file
from retention.run.journal import RunJournal
from retention.run.runner import Runner
from retention.targets import Targets

from conftest import write_rule

UTC = timezone.utc
BUCKET = "retail-receipts"


@pytest.fixture
def s3(monkeypatch, audit_db, keys):
    """A moto S3 reachable as Airflow connection aws_default, with an audit db and a key."""
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv(
        "AIRFLOW_CONN_AWS_DEFAULT",
        json.dumps({"conn_type": "aws", "login": "testing", "password": "testing",
                    "extra": {"region_name": "us-east-1"}}),
    )
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        yield client


def s3_rule(tmp_path, retain_for="P30D", **target):
    lines = "".join(f"    {k}: {v}\n" for k, v in target.items())
    text = (
        "category: receipts\n"
        "description: Receipts\n"
        "owner: finance\n"
        "legal_basis: Tax law\n"
        f"retain_for: {retain_for}\n"
        "action: delete\n"
        "targets:\n"
        "  - name: receipts\n"
        "    kind: s3\n"
        "    connection: aws_default\n"
        "    max_fraction: 1.0\n"
        f"    bucket: {BUCKET}\n" + lines
    )
    return load_rule_file(write_rule(tmp_path / "rules", "receipts", text=text))


def make_runner(targets: Targets | None = None) -> Runner:
    # moto stamps objects with today; these runs take place 90 days later, on the Runner's clock,
    # so an as_of weeks ahead of the real clock is not refused as a future one.
    return Runner(RunJournal(open_audit(from_environment)), targets or Targets(from_environment),
                  Signer.from_environment(), clock=lambda: datetime.now(UTC) + timedelta(days=90))


def keys_in(client, bucket=BUCKET, prefix="") -> set[str]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
    return {item["Key"] for page in pages for item in page.get("Contents", [])}


def put(client, *keys, bucket=BUCKET, body=b"receipt", **kwargs):
    for key in keys:
        client.put_object(Bucket=bucket, Key=key, Body=body, **kwargs)


def test_age_by_last_modified(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    put(s3, "old/a", "old/b")
    time.sleep(1.1)
    put(s3, "new/c")
    modified = {k: s3.head_object(Bucket=BUCKET, Key=k)["LastModified"] for k in ("old/a", "new/c")}
    # Aged by as_of: the cutoff (as_of - P30D) falls between the two uploads.
    between = modified["old/a"] + (modified["new/c"] - modified["old/a"]) / 2
    as_of = between + timedelta(days=30)

    certificate = make_runner().run(s3_rule(tmp_path), run_id="r1", as_of=as_of)

    assert keys_in(s3) == {"new/c"}
    target = certificate.data["targets"][0]
    assert (target["matched"], target["deleted"], target["held"], target["failed"]) == (2, 2, 0, 0)
    assert target["bytes"] == 2 * len(b"receipt")
    assert target["location"] == f"s3://{BUCKET}/"


def test_age_by_key_date_and_prefix(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    put(s3, "receipts/2018/03/01/r1.pdf", "receipts/2019/06/14/r2.pdf",  # expired
        "receipts/2019/06/15/r3.pdf",  # the cutoff (2019-06-15T12:00Z) falls inside this day: kept
        "receipts/2024/01/01/r4.pdf", "receipts/misc/readme.txt",  # recent; no date: kept
        "receipts/2019/13/40/bad.pdf",  # not a date: kept
        "exports/2010/01/01/e.csv")  # outside the prefix
    rule_file = s3_rule(tmp_path, retain_for="P7Y", prefix="receipts/", age_from="key_date",
                        key_date_format='"receipts/%Y/%m/%d/"')
    as_of = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)

    with Targets(from_environment) as targets:
        from retention.plan.builder import build_plan

        plan = build_plan(rule_file, as_of, targets)
    certificate = make_runner().run(rule_file, run_id="r1", as_of=as_of)

    assert (plan.targets[0].matched, plan.targets[0].total, plan.targets[0].bytes) == (2, 6, 2 * len(b"receipt"))
    assert any("2 objects without a date" in note for note in plan.targets[0].notes)
    assert keys_in(s3) == {"receipts/2019/06/15/r3.pdf", "receipts/2024/01/01/r4.pdf",
                           "receipts/misc/readme.txt", "receipts/2019/13/40/bad.pdf", "exports/2010/01/01/e.csv"}
    assert certificate.data["targets"][0]["deleted"] == 2


def test_tag_filter(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    put(s3, "a", "b", Tagging="category=receipt&region=eu")
    put(s3, "c", Tagging="category=invoice")
    put(s3, "d")

    make_runner().run(s3_rule(tmp_path, tags="{category: receipt}"), run_id="r1",
                      as_of=datetime.now(UTC) + timedelta(days=60))

    assert keys_in(s3) == {"c", "d"}


def test_more_than_a_page_of_keys(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    put(s3, *[f"r/{i:05d}" for i in range(2500)], body=b"")
    batches = []

    certificate = make_runner().run(
        s3_rule(tmp_path, concurrency=3), run_id="r1", as_of=datetime.now(UTC) + timedelta(days=60),
        progress=lambda target, deleted, matched, rows, seconds: batches.append(rows),
    )

    assert keys_in(s3) == set()
    assert certificate.data["targets"][0]["deleted"] == 2500
    assert sorted(batches) == [500, 1000, 1000]


def test_a_versioned_bucket_keeps_no_version_of_an_expired_key(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET)
    s3.put_bucket_versioning(Bucket=BUCKET, VersioningConfiguration={"Status": "Enabled"})
    put(s3, "gone", body=b"v1")
    put(s3, "gone", body=b"v2-longer")
    s3.delete_object(Bucket=BUCKET, Key="gone")  # a delete marker hides the versions
    put(s3, "also-gone", body=b"x")
    as_of = datetime.now(UTC) + timedelta(days=60)

    certificate = make_runner().run(s3_rule(tmp_path), run_id="r1", as_of=as_of)

    listing = s3.list_object_versions(Bucket=BUCKET)
    assert listing.get("Versions", []) == [] and listing.get("DeleteMarkers", []) == []
    target = certificate.data["targets"][0]
    assert (target["deleted"], target["bytes"]) == (2, len(b"v1") + len(b"v2-longer") + len(b"x"))


def test_object_lock_holds_are_counted_not_failed(s3, tmp_path):
    s3.create_bucket(Bucket=BUCKET, ObjectLockEnabledForBucket=True)
    put(s3, "free")
    put(s3, "on-hold", ObjectLockLegalHoldStatus="ON")
    put(s3, "retained", ObjectLockMode="COMPLIANCE",
        ObjectLockRetainUntilDate=datetime.now(UTC) + timedelta(days=365))
    rule_file, as_of = s3_rule(tmp_path), datetime.now(UTC) + timedelta(days=60)

    with Targets(from_environment) as targets:
        from retention.plan.builder import build_plan

        plan = build_plan(rule_file, as_of, targets).targets[0]
    certificate = make_runner().run(rule_file, run_id="r1", as_of=as_of)

    assert (plan.matched, plan.held, plan.bytes) == (1, 2, len(b"receipt"))  # the plan says what the run will do
    assert keys_in(s3) == {"on-hold", "retained"}
    target = certificate.data["targets"][0]
    assert (target["deleted"], target["held"], target["failed"], target["status"]) == (1, 2, 0, "complete")
    assert certificate.status == "complete"
    assert certificate.data["totals"]["held"] == 2


def test_per_key_errors_make_the_run_partial_and_a_rerun_finishes(s3, tmp_path, monkeypatch):
    s3.create_bucket(Bucket=BUCKET)
    put(s3, *[f"k{i}" for i in range(20)])
    targets = Targets(from_environment)
    client = targets.s3_client("aws_default")
    real_delete = client.delete_objects
    calls = []

    def flaky_delete(Bucket, Delete):
        """S3 answering per key: k1-k3 always AccessDenied; k4 and k5 SlowDown once."""
        calls.append(len(Delete["Objects"]))
        refused = {"k1": "AccessDenied", "k2": "AccessDenied", "k3": "AccessDenied"}
        if len(calls) == 1:
            refused |= {"k4": "SlowDown", "k5": "InternalError"}
        keep = [o for o in Delete["Objects"] if o["Key"] not in refused]
        response = real_delete(Bucket=Bucket, Delete={**Delete, "Objects": keep})
        errors = [{"Key": o["Key"], "Code": refused[o["Key"]], "Message": "injected"}
                  for o in Delete["Objects"] if o["Key"] in refused]
        return {**response, "Errors": response.get("Errors", []) + errors}

    rule_file = s3_rule(tmp_path)
    as_of = datetime.now(UTC) + timedelta(days=60)

    with monkeypatch.context() as patch:
        patch.setattr(client, "delete_objects", flaky_delete)
        first = make_runner(targets).run(rule_file, run_id="r1", as_of=as_of)

    assert first.status == "partial"
    target = first.data["targets"][0]
    assert (target["deleted"], target["failed"], target["status"]) == (17, 3, "failed")
    assert "AccessDenied x3" in target["error"]
    assert keys_in(s3) == {"k1", "k2", "k3"}  # the transient ones were retried and went

    second = make_runner().run(rule_file, run_id="r2", as_of=as_of)

    assert second.status == "complete" and second.data["targets"][0]["deleted"] == 3
    assert keys_in(s3) == set()


def test_a_crash_after_a_delete_is_settled_and_not_double_counted(s3, tmp_path, monkeypatch):
    s3.create_bucket(Bucket=BUCKET)
    put(s3, *[f"k{i:04d}" for i in range(2200)], body=b"")
    rule_file = s3_rule(tmp_path, concurrency=1)
    runner = make_runner()
    run, _ = runner.start(rule_file, run_id="r1", as_of=datetime.now(UTC) + timedelta(days=60))
    monkeypatch.setenv("RETENTION_FAILPOINTS", "s3.after_delete=2:raise")

    with pytest.raises(InjectedFault):
        runner.purge(rule_file, run, "receipts")
    gone = 2200 - len(keys_in(s3))
    ledger = runner.journal.ledger(run, "receipts")
    # The batch that crashed after its delete was settled on the way out: the journal
    # counts exactly what S3 no longer has (batches already in flight finished too).
    assert ledger.unresolved() == []
    assert ledger.deleted() == gone >= 2000

    monkeypatch.delenv("RETENTION_FAILPOINTS")
    failpoints.reset()
    runner.purge(rule_file, run, "receipts")
    certificate = runner.certify(run)

    assert keys_in(s3) == set()
    assert certificate.data["targets"][0]["deleted"] == 2200


def test_a_missing_bucket_is_a_rule_error_that_touches_nothing(s3, tmp_path):
    with pytest.raises(RuleError) as caught:
        make_runner().run(s3_rule(tmp_path), run_id="r1", as_of=datetime.now(UTC))

    (problem,) = caught.value.problems
    assert problem.field == "targets[0].bucket" and problem.line == 12
    assert "does not exist" in problem.message


@pytest.mark.parametrize(
    "line, field, says",
    [
        ("    bucket: Retail_Receipts\n", "targets[0].bucket", "not an S3 bucket name"),
        ("    bucket: b1\n    age_from: key_date\n    key_date_format: 'r/%Y/%q/'\n", "targets[0].key_date_format",
         "%q is not supported"),
        ("    bucket: b1\n    age_from: created\n", "targets[0].age_from", "'last_modified' or 'key_date'"),
        ("    bucket: b1\n    age_from: key_date\n", "targets[0].key_date_format", "needs key_date_format"),
        ("    prefix: receipts/\n", "targets[0].bucket", "is required"),
    ],
)
def test_bad_s3_rules_exit_2_naming_the_line(tmp_path, capsys, line, field, says):
    text = (
        "category: receipts\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P7Y\naction: delete\n"
        "targets:\n  - name: receipts\n    kind: s3\n    connection: aws_default\n" + line
    )
    path = write_rule(tmp_path, "receipts", text=text)

    code = main(["validate", str(tmp_path)])

    err = capsys.readouterr().err
    assert code == 2
    assert f"{path}:" in err and field in err and says in err


def test_sigkill_mid_delete_is_settled_by_the_next_run(aws_server, audit_db, keys, tmp_path):
    """A worker killed between a DeleteObjects and its journal entry; the next run asks S3."""
    import os
    import subprocess
    import sys

    bucket = f"killed-{os.getpid()}-{time.monotonic_ns() % 10**6}"
    aws_server.create_bucket(Bucket=bucket)
    put(aws_server, *[f"k{i:04d}" for i in range(1500)], bucket=bucket, body=b"12345")
    rules = write_rule(tmp_path / "rules", "receipts", text=(
        "category: receipts\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: PT1M\naction: delete\n"
        f"targets:\n  - {{name: receipts, kind: s3, connection: aws_default, bucket: {bucket}, concurrency: 1,\n"
        "     max_fraction: 1.0}\n"
    )).parent
    as_of = (datetime.now(UTC) + timedelta(minutes=4)).isoformat()  # the CLI refuses more than 5 min ahead
    command = [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rules), "--as-of", as_of]

    killed = subprocess.run(command + ["--run-id", "killed"], capture_output=True, text=True,
                            env={**os.environ, "RETENTION_FAILPOINTS": "s3.after_delete=1:kill"})
    assert killed.returncode == -9
    gone_at_kill = 1500 - len(keys_in(aws_server, bucket))
    assert gone_at_kill >= 1000

    finished = subprocess.run(command + ["--run-id", "next"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr

    engine = open_audit(from_environment)
    from retention.evidence.chain import find_certificate

    killed_target = find_certificate(engine, "receipts", "killed").data["targets"][0]
    next_target = find_certificate(engine, "receipts", "next").data["targets"][0]
    assert (killed_target["deleted"], killed_target["bytes"]) == (gone_at_kill, 5 * gone_at_kill)
    assert killed_target["unconfirmed"] == 0
    assert next_target["deleted"] == 1500 - gone_at_kill
    assert keys_in(aws_server, bucket) == set()


def test_keys_throttled_on_every_attempt_fail_after_the_last_one(s3, tmp_path, monkeypatch):
    s3.create_bucket(Bucket=BUCKET)
    put(s3, "k1", "k2", "k3")
    targets = Targets(from_environment)
    client = targets.s3_client("aws_default")
    real_delete = client.delete_objects
    calls = []

    def throttled_delete(Bucket, Delete):
        """S3 answering SlowDown for k2, every time."""
        calls.append(sorted(o["Key"] for o in Delete["Objects"]))
        keep = [o for o in Delete["Objects"] if o["Key"] != "k2"]
        response = real_delete(Bucket=Bucket, Delete={**Delete, "Objects": keep}) if keep else {}
        errors = [{"Key": "k2", "Code": "SlowDown", "Message": "injected"}]
        return {**response, "Errors": response.get("Errors", []) + errors}

    monkeypatch.setattr(client, "delete_objects", throttled_delete)
    certificate = make_runner(targets).run(s3_rule(tmp_path), run_id="r1", as_of=datetime.now(UTC) + timedelta(days=60))

    assert calls == [["k1", "k2", "k3"]] + [["k2"]] * 4  # five attempts in all, the retries at k2 alone
    target = certificate.data["targets"][0]
    assert (target["deleted"], target["failed"]) == (2, 1)
    assert "SlowDown x1" in target["error"]
    assert keys_in(s3) == {"k2"}
