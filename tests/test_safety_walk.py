"""The walk's safety under a changing world: limits at every batch (issue #9 item 2), one
holds value per batch with parallel walkers (item 5), rows locked by other transactions
(item 7). Real PostgreSQL and MariaDB; S3 through moto."""

from __future__ import annotations

import json
import threading
from datetime import datetime, timedelta, timezone

import boto3
import pytest
import sqlalchemy as sa
from moto import mock_aws

from retention.connections import from_environment
from retention.errors import PurgeFailed
from retention.evidence.audit import open_audit, purge_batches
from retention.evidence.chain import find_certificate
from retention.holds import HoldRegistry, HoldView
from retention.rules.loader import load_rule_file

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = datetime(2020, 1, 1, tzinfo=UTC)
SERVERS = ["postgresql", "mariadb"]


@pytest.fixture(params=SERVERS)
def server(request, monkeypatch, audit_db, keys):
    """A real PostgreSQL or MariaDB database with an empty customers table, as crm_db."""
    db = request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mysql_db"}[request.param])
    connect(monkeypatch, "crm_db", db)
    make_customers(db)
    return db


def rule(tmp_path, **target):
    target.setdefault("where", "{status: closed}")
    return load_rule_file(write_rule(tmp_path / "rules", targets=[target]))


def expired_rows(first: int, count: int, *, step: timedelta = timedelta(minutes=1)):
    return [(i, "closed", OLD + step * i) for i in range(first, first + count)]


def certificate_of(run_id: str):
    return find_certificate(open_audit(from_environment), "customer_accounts", run_id)


# -- item 2: the blast-radius limit holds at every batch -------------------------------------


def test_item02_max_records_holds_when_rows_expire_between_plan_and_purge(server, tmp_path):
    rule_file = rule(tmp_path, max_records=80, max_batch_rows=7)
    insert_customers(server, expired_rows(1, 77) + [(i, "closed", AS_OF) for i in range(5001, 5011)])
    r = runner()
    run, plan = r.start(rule_file, run_id="r1", as_of=AS_OF)
    assert plan.targets[0].matched == 77
    insert_customers(server, expired_rows(1001, 900))  # expired after the plan, before the purge task

    with pytest.raises(PurgeFailed, match=r"max_records 80.*after 80 records; 897 expired records left"):
        r.purge(rule_file, run, "customers")
    with pytest.raises(PurgeFailed, match="max_records 80"):  # the Airflow retry: earlier batches count
        r.purge(rule_file, run, "customers")
    certificate = r.certify(run)

    assert len(ids(server)) == 977 - 80 + 10
    assert certificate.status != "complete"
    target = certificate.data["targets"][0]
    assert target["status"] == "failed" and target["deleted"] == 80 and target["failed"] == 897
    assert "max_records 80" in target["error"]


def test_item02_max_fraction_is_of_the_table_size_counted_at_plan(server, tmp_path):
    rule_file = rule(tmp_path, max_fraction=0.5, max_batch_rows=9)
    insert_customers(server, expired_rows(1, 40) + [(i, "closed", AS_OF) for i in range(5001, 5061)])
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)  # 40 of 100: within 50%
    insert_customers(server, expired_rows(1001, 110))  # now 150 of 210 expired

    with pytest.raises(PurgeFailed, match=r"max_fraction 50% of the 100 records counted at plan: 50"):
        r.purge(rule_file, run, "customers")
    certificate = r.certify(run)

    assert certificate.data["targets"][0]["deleted"] == 50
    assert len(ids(server)) == 210 - 50


def test_item02_parallel_walkers_together_never_pass_the_limit(server, tmp_path):
    rule_file = rule(tmp_path, max_records=25_000, workers=2, max_batch_rows=3000)
    insert_customers(server, expired_rows(1, 20_000, step=timedelta(seconds=1)))
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    insert_customers(server, expired_rows(100_001, 20_000, step=timedelta(seconds=1)))

    with pytest.raises(PurgeFailed, match="max_records 25,000"):
        r.purge(rule_file, run, "customers")

    assert r.certify(run).data["targets"][0]["deleted"] == 25_000
    assert len(ids(server)) == 40_000 - 25_000


def test_item02_an_approval_covers_only_the_numbers_it_approved(server, tmp_path):
    rule_file = rule(tmp_path, max_records=10, max_batch_rows=6)
    insert_customers(server, expired_rows(1, 40))
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF, approval="backlog after the migration")
    insert_customers(server, expired_rows(1001, 30))

    with pytest.raises(PurgeFailed, match="approved up to 40"):
        r.purge(rule_file, run, "customers")

    assert r.certify(run).data["targets"][0]["deleted"] == 40
    assert len(ids(server)) == 30


def test_item02_an_s3_target_stops_at_its_limit_too(monkeypatch, audit_db, keys, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "t", "password": "t", "extra": {"region_name": "us-east-1"}}))
    text = ("category: receipts\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P7Y\naction: delete\n"
            "targets:\n  - {name: r, kind: s3, connection: aws_default, bucket: receipts-bucket, prefix: r/,\n"
            "     age_from: key_date, key_date_format: 'r/%Y/%m/%d/', max_fraction: 1.0, max_records: 6,\n"
            "     max_batch_keys: 4, concurrency: 3}\n")
    rule_file = load_rule_file(write_rule(tmp_path / "rules", "receipts", text=text))
    with mock_aws():
        s3 = boto3.client("s3", region_name="us-east-1")
        s3.create_bucket(Bucket="receipts-bucket")
        for n in range(5):
            s3.put_object(Bucket="receipts-bucket", Key=f"r/2010/01/01/{n}", Body=b"x")
        r = runner()
        run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
        for n in range(5, 20):
            s3.put_object(Bucket="receipts-bucket", Key=f"r/2010/01/01/{n}", Body=b"x")

        with pytest.raises(PurgeFailed, match=r"max_records 6\).*after 6 records; 14 expired records left"):
            r.purge(rule_file, run, "r")
        certificate = r.certify(run)
        left = s3.list_objects_v2(Bucket="receipts-bucket")["KeyCount"]

    assert left == 14
    assert certificate.data["targets"][0]["deleted"] == 6 and certificate.data["targets"][0]["status"] == "failed"


# -- item 5: each batch carries its own holds ------------------------------------------------


def test_item05_each_parallel_batch_journals_the_holds_it_was_judged_by(server, tmp_path):
    rule_file = rule(tmp_path, workers=2, max_batch_rows=2000)
    insert_customers(server, expired_rows(1, 24_000, step=timedelta(seconds=1)))
    r = runner()
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    registry = HoldRegistry(r.journal.engine)
    placed = threading.Event()
    read_after: dict[str, bool] = {}  # thread -> its latest hold reading came after the hold
    other_cut = threading.Event()
    first: dict[str, object] = {}

    class RecordingView(HoldView):
        def current(self):
            holds = super().current()
            read_after[threading.current_thread().name] = placed.is_set()
            return holds

    journal_ledger = r.journal.ledger(run, "customers")

    class Ledger:
        """The journal's ledger; the first batch number taken (by a walker that read no
        hold) waits until the other walker has cut a batch under a hold placed meanwhile."""

        def __getattr__(self, name):
            return getattr(journal_ledger, name)

        def next_batch_no(self):
            number = journal_ledger.next_batch_no()
            me = threading.current_thread().name
            with lock:
                mine = not first
                if mine:
                    first.update(thread=me, batch=number)
            if mine:
                registry.add(category="customer_accounts", match={"id": 23_999}, case_id="CASE-5",
                             reason="a hold placed while the walkers run")
                placed.set()
                assert other_cut.wait(60), "the other walker never cut a batch"
            elif me != first.get("thread") and read_after.get(me):
                other_cut.set()
            return number

    lock = threading.Lock()
    view = RecordingView(registry, "customer_accounts", "customers", run.as_of)
    table = r.targets.open(rule_file.rule.target("customers"), holds=view)
    table.purge(run.cutoff, Ledger())

    with r.journal.engine.connect() as conn:
        bounds = dict(conn.execute(sa.select(purge_batches.c.batch_no, purge_batches.c.bounds).where(
            purge_batches.c.run_id == "r1", purge_batches.c.state == "done")).all())
    hold_id = registry.in_force("customer_accounts", "customers", run.as_of)[0].id
    assert json.loads(bounds[first["batch"]])["holds"] == []  # cut before the hold existed
    assert any(json.loads(b)["holds"] == [hold_id] for b in bounds.values())
    assert 23_999 in ids(server)


# -- item 7: rows locked by other transactions -----------------------------------------------


LOCKED = (17, 93, 151)


def near(locked) -> set[int]:
    return {n + d for n in locked for d in (-1, 0, 1)}


def hold_locks(db, until: threading.Event, seconds: float, seen: dict) -> threading.Thread:
    """Another transaction locks scattered expired rows for ``seconds`` (or until ``until``);
    just before it ends, ``seen['left']`` gets the ids still in the table."""
    ready = threading.Event()

    def run():
        with db.engine.connect() as conn:
            transaction = conn.begin()
            conn.execute(sa.text("SELECT id FROM customers WHERE id IN (17, 93, 151) FOR UPDATE"))
            ready.set()
            until.wait(seconds)
            seen["left"] = {row[0] for row in conn.execute(sa.text("SELECT id FROM customers"))}
            transaction.commit()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    assert ready.wait(30)
    return thread


def test_item07_a_30s_lock_on_scattered_rows_does_not_end_the_run(server, tmp_path):
    insert_customers(server, expired_rows(1, 200))
    seen: dict = {}
    locker = hold_locks(server, threading.Event(), 30, seen)

    certificate = runner().run(rule(tmp_path, max_batch_rows=50), run_id="r1", as_of=AS_OF)
    locker.join()

    assert certificate.status == "complete" and certificate.data["totals"]["deleted"] == 200
    assert ids(server) == set()
    # Everything not locked went while the lock was held. InnoDB also makes a delete wait
    # on the row just past its range, so there a locked row's neighbours in walk order wait too.
    assert set(LOCKED) <= seen["left"] <= (set(LOCKED) if server.backend == "postgresql" else near(LOCKED))


def test_item07_locks_beyond_the_budget_end_the_run_partial_with_the_count_left(server, tmp_path):
    insert_customers(server, expired_rows(1, 200))
    release = threading.Event()
    seen: dict = {}
    locker = hold_locks(server, release, 600, seen)
    try:
        certificate = runner().run(rule(tmp_path, max_batch_rows=50, lock_wait_budget=5), run_id="r1",
                                   as_of=AS_OF)
    finally:
        release.set()
        locker.join()

    assert certificate.status != "complete"
    target = certificate.data["targets"][0]
    left = ids(server)
    assert set(LOCKED) <= left  # how much went around them within 5 s depends on the server
    assert target["status"] == "failed" and target["failed"] == len(left) and target["deleted"] == 200 - len(left)
    assert f"{len(left)} records could not be purged" in target["error"]
    assert "lock-wait budget of 5s" in target["error"]
    with open_audit(from_environment).connect() as conn:
        states = set(conn.execute(sa.select(purge_batches.c.state)).scalars())
    assert "pending" not in states  # every batch that hit a lock was settled


def test_item07_lock_wait_budget_is_a_checked_rule_field(tmp_path):
    from retention.errors import RuleError

    assert rule(tmp_path).rule.targets[0].lock_wait_budget == 600
    with pytest.raises(RuleError, match="lock_wait_budget"):
        rule(tmp_path, lock_wait_budget=0)
