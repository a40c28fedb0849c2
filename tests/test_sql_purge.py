"""SQL purges on PostgreSQL, MariaDB and SQLite: exactly the expired rows, resumably."""

from __future__ import annotations

import dataclasses
from datetime import date, datetime, timedelta, timezone

import pytest

from retention import failpoints
from retention.errors import RuleError
from retention.failpoints import InjectedFault
from retention.rules.loader import load_rule_file
from retention.run.journal import RunJournal
from retention.run.runner import RunAlreadyCertified

from conftest import connect, write_rule
from sqlpurge import NAIVE_TIMESTAMP, ids, insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
CUTOFF = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)  # AS_OF - P2Y


@pytest.fixture
def crm(db, monkeypatch, audit_db, keys, tmp_path):
    """A customers table on ``db`` reachable as crm_db, with an audit db and a key."""
    connect(monkeypatch, "crm_db", db)
    make_customers(db)
    return db


def the_rule(tmp_path, **target):
    target.setdefault("where", "{status: closed}")
    return load_rule_file(write_rule(tmp_path / "rules", targets=[target]))


def test_purges_exactly_the_expired_rows(crm, tmp_path):
    # SQLite compares ages to the millisecond (julianday); the others to the microsecond.
    tick = timedelta(milliseconds=1) if crm.backend == "sqlite" else timedelta(microseconds=1)
    insert_customers(crm, [
        (1, "closed", CUTOFF - tick),            # expired by one tick
        (2, "closed", CUTOFF),                   # exactly at the cutoff: kept
        (3, "closed", CUTOFF + timedelta(seconds=1)),
        (4, "closed", None),                     # never closed: never expires
        (5, "closed", datetime(2019, 1, 1, tzinfo=UTC)),
        (6, "open", datetime(2019, 1, 1, tzinfo=UTC)),  # filtered out by where
        (7, "closed", datetime(2024, 6, 15, 13, 59, 59, tzinfo=timezone(timedelta(hours=2)))),  # 11:59:59Z
        (8, "closed", datetime(2024, 6, 15, 14, 0, 1, tzinfo=timezone(timedelta(hours=2)))),    # 12:00:01Z
    ])
    rule_file = the_rule(tmp_path)

    certificate = runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert ids(crm) == {2, 3, 4, 6, 8}
    assert certificate.status == "complete"
    (target,) = certificate.data["targets"]
    assert (target["matched"], target["deleted"], target["failed"]) == (3, 3, 0)
    assert certificate.data["cutoff"] == "2024-06-15T12:00:00.000000Z"


def test_as_of_with_an_offset_is_the_same_instant(crm, tmp_path):
    insert_customers(crm, [(1, "closed", CUTOFF - timedelta(seconds=1)), (2, "closed", CUTOFF)])
    as_of = AS_OF.astimezone(timezone(timedelta(hours=-7)))  # 05:00-07:00 is 12:00Z

    certificate = runner().run(the_rule(tmp_path), run_id="r1", as_of=as_of)

    assert ids(crm) == {2}
    assert certificate.data["as_of"] == "2026-06-15T12:00:00.000000Z"


@pytest.mark.parametrize("backend_type", ["naive"])
def test_naive_timestamps_are_read_as_utc(db, monkeypatch, audit_db, keys, tmp_path, backend_type):
    connect(monkeypatch, "crm_db", db)
    make_customers(db, age_type=NAIVE_TIMESTAMP[db.backend])
    insert_customers(db, [(1, "closed", CUTOFF - timedelta(seconds=1)), (2, "closed", CUTOFF)], aware_column=False)

    runner().run(the_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert ids(db) == {2}


def test_a_date_expires_only_when_the_whole_day_is_past(db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "crm_db", db)
    make_customers(db, age_type="DATE")
    insert_customers(db, [
        (1, "closed", date(2024, 6, 14)),  # the whole day is before 2024-06-15T12:00Z
        (2, "closed", date(2024, 6, 15)),  # the cutoff falls inside this day: kept
        (3, "closed", date(2024, 6, 16)),
    ])

    runner().run(the_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert ids(db) == {2, 3}


def test_in_filter_and_composite_key(db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "crm_db", db)
    ts = {"postgresql": "TIMESTAMPTZ", "mariadb": "DATETIME(6)", "sqlite": "TIMESTAMP"}[db.backend]
    db.execute(
        f"CREATE TABLE tickets (tenant INTEGER NOT NULL, id INTEGER NOT NULL, status VARCHAR(20), "
        f"resolved_at {ts}, PRIMARY KEY (tenant, id))"
    )
    old = datetime(2020, 1, 1, tzinfo=UTC)
    rows = [(t, i, s, old) for t in (1, 2) for i, s in enumerate(["resolved", "closed", "open", "resolved"])]
    with db.engine.begin() as conn:
        import sqlalchemy as sa

        table = sa.Table("tickets", sa.MetaData(), autoload_with=conn)
        conn.execute(table.insert(), [
            {"tenant": t, "id": i, "status": s, "resolved_at": _stored(db, r)} for t, i, s, r in rows
        ])
    rule_file = the_rule(
        tmp_path, name="tickets", table="tickets", key="[tenant, id]", age_column="resolved_at",
        where="{status: {in: [resolved, closed]}}", max_batch_rows=2,
    )

    certificate = runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert sorted(db.rows("SELECT tenant, id FROM tickets")) == [(1, 2), (2, 2)]
    assert certificate.data["targets"][0]["deleted"] == 6


def _stored(db, moment):
    from sqlpurge import stored

    return stored(db, moment)


def test_many_rows_with_one_age_walk_by_key(crm, tmp_path):
    """Ties on the age column are broken by the key, so small batches miss nothing."""
    same = datetime(2020, 5, 5, tzinfo=UTC)
    insert_customers(crm, [(i, "closed", same) for i in range(1, 101)] + [(101, "closed", CUTOFF)])
    rule_file = the_rule(tmp_path, max_batch_rows=7)

    certificate = runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert ids(crm) == {101}
    assert certificate.data["targets"][0]["deleted"] == 100
    journal = runner().journal
    run = journal.get_run("customer_accounts", "r1")
    assert journal.targets(run)[0].deleted == 100


def test_rerun_is_idempotent(crm, tmp_path):
    insert_customers(crm, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(days=i)) for i in range(1, 51)]
                     + [(99, "closed", CUTOFF + timedelta(days=1))])
    rule_file = the_rule(tmp_path, max_batch_rows=10)
    r = runner()

    first = r.run(rule_file, run_id="r1", as_of=AS_OF)
    second = r.run(rule_file, run_id="r2", as_of=AS_OF)
    with pytest.raises(RunAlreadyCertified, match="run id r1 was certified as seq 1"):
        r.run(rule_file, run_id="r1", as_of=AS_OF)  # a certified run is never started again (issue #9 item 10)
    again = r.certify(r.journal.get_run("customer_accounts", "r1"))  # a retried certify: its certificate, unchanged

    assert ids(crm) == {99}
    assert first.data["totals"]["deleted"] == 50
    assert second.status == "complete"
    assert (second.data["totals"]["matched"], second.data["totals"]["deleted"]) == (0, 0)
    assert again.seq == first.seq and again.payload == first.payload


@pytest.mark.parametrize("point", ["sql.before_commit", "sql.after_commit"])
def test_crash_mid_run_then_retry_finishes_without_double_counting(crm, tmp_path, monkeypatch, point):
    """A crash in the 3rd batch, before or after its commit; the retried task completes the run."""
    insert_customers(crm, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(hours=i)) for i in range(1, 101)])
    rule_file = the_rule(tmp_path, max_batch_rows=10)
    r = runner()
    run, _plan = r.start(rule_file, run_id="r1", as_of=AS_OF)

    monkeypatch.setenv("RETENTION_FAILPOINTS", f"{point}=3:raise")
    with pytest.raises(InjectedFault):
        r.purge(rule_file, run, "customers")
    gone_after_crash = 100 - len(ids(crm))
    # The journal agrees with the data: a batch that committed counts, one that did not, does not.
    assert r.journal.ledger(run, "customers").deleted() == gone_after_crash > 0
    assert r.journal.ledger(run, "customers").unresolved() == []

    monkeypatch.delenv("RETENTION_FAILPOINTS")
    failpoints.reset()
    record = r.purge(rule_file, run, "customers")  # the Airflow retry of the same task
    certificate = r.certify(run)

    assert ids(crm) == set()
    assert record.deleted == 100
    assert certificate.status == "complete"
    assert certificate.data["targets"][0]["deleted"] == 100


def test_crash_then_a_new_run_certifies_the_interrupted_one_exactly(crm, tmp_path, monkeypatch):
    insert_customers(crm, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(hours=i)) for i in range(1, 101)])
    rule_file = the_rule(tmp_path, max_batch_rows=10)
    monkeypatch.setenv("RETENTION_FAILPOINTS", "sql.after_commit=4:raise")

    interrupted = runner()
    run, _plan = interrupted.start(rule_file, run_id="night-1", as_of=AS_OF)
    with pytest.raises(InjectedFault):
        interrupted.purge(rule_file, run, "customers")
    gone_after_crash = 100 - len(ids(crm))
    # the worker dies here: no certify. The next night's run settles it first.
    monkeypatch.delenv("RETENTION_FAILPOINTS")
    failpoints.reset()

    # The crashed worker's lease is not renewed; once it is stale the next night takes over.
    next_night = dataclasses.replace(runner(), lease_ttl=timedelta(0)).run(
        rule_file, run_id="night-2", as_of=AS_OF + timedelta(days=1))

    journal: RunJournal = runner().journal
    first = journal.get_run("customer_accounts", "night-1")
    assert first.state == "certified"
    from retention.evidence.chain import find_certificate
    from retention.evidence.signing import PublicKeys
    from retention.evidence.verify import verify_chain

    first_cert = find_certificate(journal.engine, "customer_accounts", "night-1")
    assert first_cert.status == "partial"
    assert first_cert.data["targets"][0]["deleted"] == gone_after_crash > 0
    assert first_cert.data["targets"][0]["error"]
    assert next_night.data["targets"][0]["deleted"] == 100 - gone_after_crash
    assert first_cert.seq < next_night.seq
    assert ids(crm) == set()
    assert verify_chain(journal.engine, PublicKeys.from_pem_files([str(tmp_path / "keys" / "retention-signing.pub.pem")])).ok


def test_rows_that_expire_behind_the_walk_are_taken_in_another_pass(crm, tmp_path, monkeypatch):
    insert_customers(crm, [(i, "closed", datetime(2021, 1, 1, tzinfo=UTC) + timedelta(hours=i)) for i in range(1, 31)])
    rule_file = the_rule(tmp_path, max_batch_rows=10)
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    inserted = []

    def progress(target, deleted, matched, rows, seconds):
        if not inserted:  # after the first batch, an old row lands behind the walk
            insert_customers(crm, [(1000, "closed", datetime(2019, 1, 1, tzinfo=UTC))])
            inserted.append(1000)

    record = r.purge(rule_file, run, "customers", progress=progress)

    assert ids(crm) == set()
    assert record.deleted == 31


def test_a_rule_that_does_not_match_the_table_touches_nothing(crm, tmp_path):
    insert_customers(crm, [(1, "closed", datetime(2019, 1, 1, tzinfo=UTC))])
    rule_file = the_rule(tmp_path, age_column="closed_on")

    with pytest.raises(RuleError) as caught:
        runner().run(rule_file, run_id="r1", as_of=AS_OF)

    (problem,) = caught.value.problems
    assert problem.field == "targets[0].age_column"
    assert problem.line == 14
    assert "closed_on" in problem.message
    assert ids(crm) == {1}
    from retention.evidence.chain import find_certificate

    certificate = find_certificate(runner().journal.engine, "customer_accounts", "r1")
    assert certificate.status == "failed"
    assert certificate.data["targets"][0]["deleted"] == 0


def test_a_key_that_is_not_unique_is_refused(crm, tmp_path):
    rule_file = the_rule(tmp_path, key="[status]")

    with pytest.raises(RuleError) as caught:
        runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert caught.value.problems[0].field == "targets[0].key"


def test_a_rule_edited_during_a_run_is_refused(crm, tmp_path):
    insert_customers(crm, [(1, "closed", datetime(2019, 1, 1, tzinfo=UTC))])
    rule_file = the_rule(tmp_path)
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    rule_file.path.write_text(rule_file.path.read_text().replace("P2Y", "P1Y"))

    from retention.errors import TerminalError

    with pytest.raises(TerminalError, match="changed since run r1 started"):
        r.purge(load_rule_file(rule_file.path), run, "customers")
    assert ids(crm) == {1}


def test_batches_adapt_but_never_exceed_the_cap(crm, tmp_path):
    insert_customers(crm, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(minutes=i)) for i in range(1, 3001)])
    rule_file = the_rule(tmp_path, max_batch_rows=500)
    sizes = []
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)

    r.purge(rule_file, run, "customers", progress=lambda t, d, m, rows, s: sizes.append(rows))

    assert sum(sizes) == 3000
    assert max(sizes) <= 500
    assert len(sizes) >= 6


@pytest.mark.parametrize("point", ["sql.before_commit", "sql.after_commit"])
def test_sigkill_mid_batch_is_settled_by_the_next_run(pg_db, monkeypatch, audit_db, keys, tmp_path, point):
    """A worker killed outright (no except block runs) leaves a pending batch; the next run settles it."""
    import os
    import subprocess
    import sys

    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(i, "closed", datetime(2020, 1, 1, tzinfo=UTC) + timedelta(hours=i)) for i in range(1, 101)])
    rule_file = the_rule(tmp_path, max_batch_rows=10)
    command = [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rule_file.path.parent),
               "--as-of", "2026-06-15T12:00:00Z"]

    killed = subprocess.run(command + ["--run-id", "killed"], env={**os.environ, "RETENTION_FAILPOINTS": f"{point}=3:kill"},
                            capture_output=True, text=True)
    assert killed.returncode == -9
    gone_at_kill = 100 - len(ids(pg_db))
    journal = runner().journal
    pending = journal.ledger(journal.get_run("customer_accounts", "killed"), "customers").unresolved()
    assert len(pending) == 1  # the batch in flight when the process died

    finished = subprocess.run(command + ["--run-id", "next", "--json"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr

    from retention.evidence.chain import find_certificate

    killed_cert = find_certificate(journal.engine, "customer_accounts", "killed")
    next_cert = find_certificate(journal.engine, "customer_accounts", "next")
    assert killed_cert.data["targets"][0]["deleted"] == gone_at_kill
    assert killed_cert.data["targets"][0]["unconfirmed"] == 0
    assert next_cert.data["targets"][0]["deleted"] == 100 - gone_at_kill
    assert ids(pg_db) == set()


@pytest.mark.parametrize("action", ["delete", "archive"])
def test_parallel_workers_split_the_rows_and_purge_each_once(pg_db, monkeypatch, audit_db, keys, tmp_path, action):
    """Two walkers, each over its own age range: every expired row goes exactly once."""
    import threading

    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    with pg_db.engine.begin() as conn:  # 30,000 rows, 24,000 expired, many sharing an age
        conn.exec_driver_sql(
            "INSERT INTO customers SELECT g, 'p' || g || '@example.com', 'closed', "
            "timestamptz '2020-01-01' + (g / 7) * interval '1 minute' FROM generate_series(1, 24000) g")
        conn.exec_driver_sql(
            "INSERT INTO customers SELECT g, 'p' || g, 'closed', timestamptz '2026-01-01' "
            "FROM generate_series(24001, 30000) g")
    target = {"workers": 2, "max_batch_rows": 2000}
    if action == "archive":
        pytest.importorskip("moto")
        from moto import mock_aws

        monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", '{"conn_type": "aws", "login": "t", "password": "t"}')
        mock = mock_aws()
        mock.start()
        import boto3

        boto3.client("s3", region_name="us-east-1").create_bucket(Bucket="archive-bucket")
        path = write_rule(tmp_path / "rules", targets=[target])
        path.write_text(path.read_text().replace(
            "action: delete", "action: archive\narchive: {connection: aws_default, bucket: archive-bucket}"))
        rule_file = load_rule_file(path)
    else:
        rule_file = the_rule(tmp_path, where="{status: closed}", **target)
    threads = set()

    try:
        certificate = runner().run(rule_file, run_id="r1", as_of=AS_OF,
                                   progress=lambda *a: threads.add(threading.current_thread().name))
    finally:
        if action == "archive":
            mock.stop()

    assert certificate.status == "complete"
    assert certificate.data["targets"][0]["deleted"] == 24000
    assert pg_db.scalar("SELECT count(*) FROM customers") == 6000
    assert len({name for name in threads if name.startswith("walk-")}) == 2
