"""Sharded purges: a large table's expired rows cut into walk-order ranges, each purged by its
own task (in its own process, at the same time), summed into the run's one certificate."""

from __future__ import annotations

import json
import multiprocessing
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone

import pytest
from sqlalchemy import and_, select

from retention.connections import from_environment
from retention.errors import PurgeFailed, RuleError
from retention.evidence.audit import open_audit
from retention.evidence.chain import read_certificates
from retention.rules.loader import load_rule_file
from retention.run.shards import shard_records
from retention.targets import RunContext, Targets
from retention.targets.sql.shards import plan_shards
from retention.targets.sql.table import SqlTable
from test_airflow_dags import airflow_db, rule_dag  # noqa: F401  (airflow_db: a fixture, used by name)

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
CUTOFF = datetime(2024, 6, 15, 12, 0, tzinfo=UTC)  # AS_OF - P2Y


@pytest.fixture
def crm(db, monkeypatch, audit_db, keys, tmp_path):
    """customers on ``db`` as crm_db: 1,000 rows, 600 expired (ages with ties), 50 of those open."""
    connect(monkeypatch, "crm_db", db)
    make_customers(db)
    insert_customers(db, customer_rows())
    return db


def customer_rows() -> list[tuple[int, str, datetime]]:
    rows = [(i, "open" if i % 12 == 0 else "closed", CUTOFF - timedelta(minutes=i // 3 + 1)) for i in range(1, 601)]
    return rows + [(i, "closed", CUTOFF + timedelta(minutes=i)) for i in range(601, 1001)]


def the_rule(tmp_path, name: str = "rules", **target):
    target.setdefault("where", "{status: closed}")
    return load_rule_file(write_rule(tmp_path / name, targets=[target]))


def expired_ids() -> set[int]:
    return {i for i in range(1, 601) if i % 12}


def test_shards_cover_the_expired_rows_exactly_without_overlap(crm, tmp_path):
    target = the_rule(tmp_path, shard_rows=70).rule.targets[0]
    with Targets(from_environment) as targets:
        table = targets.open(target, RunContext("delete", "c", "r", AS_OF))
        assert isinstance(table, SqlTable)
        shards = plan_shards(table, CUTOFF, shard_rows=70)
        capped = plan_shards(table, CUTOFF, shard_rows=70, max_shards=3)
        single = plan_shards(table, CUTOFF, shard_rows=10_000)
        assert len(shards) == 8  # 550 rows of about 70
        assert len(capped) == 3 and len(single) == 1
        assert sum(s.rows for s in shards) == 550
        for cut in (shards, capped, single):
            assert cut[0].span.lower is None and cut[-1].span.upper is None
            assert all(a.span.upper == b.span.lower for a, b in zip(cut, cut[1:]))  # consecutive
            seen: list[int] = []
            with table.engine.connect() as conn:
                for shard in cut:
                    seen += [r[0] for r in conn.execute(select(table.table.c.id).where(
                        and_(table.expired(CUTOFF), table.in_range(shard.span))))]
            assert sorted(seen) == sorted(expired_ids())  # every expired row in exactly one shard


def test_shard_rows_must_be_positive_and_names_its_line(tmp_path):
    with pytest.raises(RuleError) as caught:
        the_rule(tmp_path, shard_rows=0)
    assert "shard_rows" in str(caught.value) and "customer_accounts.yaml:" in str(caught.value)


def test_a_sharded_run_deletes_what_the_single_task_run_deletes(crm, tmp_path, db):
    baseline = runner().run(the_rule(tmp_path, "single"), run_id="whole", as_of=AS_OF)
    left = ids(crm)
    crm.execute("DELETE FROM customers")
    insert_customers(crm, customer_rows())
    rule_file = the_rule(tmp_path, "sharded", shard_rows=70, max_batch_rows=25)

    sharded = runner().run(rule_file, run_id="sharded", as_of=AS_OF)

    assert ids(crm) == left == set(range(1, 1001)) - expired_ids()
    assert sharded.status == baseline.status == "complete"
    (whole,), (split,) = baseline.data["targets"], sharded.data["targets"]
    for field in ("matched", "deleted", "held", "failed", "unconfirmed", "status", "error"):
        assert split[field] == whole[field], field
    journal = runner().journal
    run = journal.get_run("customer_accounts", "sharded")
    assert shard_records(journal, run, "customers") == []  # scrubbed with the batches' bounds


def _purge_shards(indexes: list[int], rules: str, env: dict[str, str]) -> None:
    os.environ.update(env)
    rule_file = load_rule_file(rules)
    with runner() as r:
        run = r.journal.get_run("customer_accounts", "limited")
        assert run is not None
        for index in indexes:
            try:
                r.purge(rule_file, run, "customers", shard=index)
            except PurgeFailed:
                pass  # stopped at the limit; the certificate says so


def late_rows() -> list[tuple[int, str, datetime]]:
    """30 rows that expire behind the plan, spread over every shard's range."""
    return [(2000 + i, "closed", CUTOFF - timedelta(minutes=i * 7, seconds=30)) for i in range(30)]


@pytest.mark.parametrize("processes", [1, 2])
def test_the_record_limit_holds_across_shards_running_at_once(crm, tmp_path, db, processes):
    if processes > 1 and db.backend == "sqlite":
        pytest.skip("SQLite allows one writer: its shards take turns (the one-process case)")
    rule_file = the_rule(tmp_path, shard_rows=50, max_batch_rows=10, max_records=560)
    with runner() as r:
        run, _plan = r.start(rule_file, run_id="limited", as_of=AS_OF)
        count = len(shard_records(r.journal, run, "customers"))
        assert count == 11
        insert_customers(crm, late_rows())  # 580 now expired; the limit is 560
        env = {k: v for k, v in os.environ.items() if k.startswith(("RETENTION", "AIRFLOW_CONN"))}
        if processes == 1:
            _purge_shards(list(range(count)), str(rule_file.path), env)
        else:
            spawn = multiprocessing.get_context("spawn")
            workers = [spawn.Process(target=_purge_shards, args=(list(range(i, count, 2)), str(rule_file.path), env))
                       for i in range(processes)]
            for worker in workers:
                worker.start()
            for worker in workers:
                worker.join(180)
                assert worker.exitcode == 0
        certificate = r.certify(run)
    (target,) = certificate.data["targets"]
    assert target["deleted"] == 560  # never more, however the shards raced for it
    assert len(set(range(1, 1001)) - expired_ids() - ids(crm)) == 0  # nothing unexpired went
    assert certificate.status == "partial" and target["failed"] == 20
    assert "blast-radius limit" in target["error"]


def test_a_kill_inside_one_shard_is_settled_by_the_next_run(pg_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, customer_rows())
    rules = write_rule(tmp_path / "rules", targets=[{"where": "{status: closed}", "shard_rows": 100,
                                                      "max_batch_rows": 20}]).parent

    def run(run_id: str, point: str | None = None) -> subprocess.CompletedProcess:
        env = dict(os.environ)
        if point:
            env["RETENTION_FAILPOINTS"] = f"{point}:kill"
        return subprocess.run([sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rules),
                               "--as-of", "2026-06-15T12:00:00Z", "--run-id", run_id],
                              capture_output=True, text=True, env=env)

    killed = run("killed", "sql.before_commit=9")  # inside the second shard
    assert killed.returncode == -9, killed.stderr
    finished = run("next")
    assert finished.returncode == 0, finished.stderr

    assert ids(pg_db) == set(range(1, 1001)) - expired_ids()
    certificates = {c.run_id: c for c in read_certificates(open_audit(from_environment))}
    assert set(certificates) == {"killed", "next"}
    first, second = certificates["killed"].data["targets"][0], certificates["next"].data["targets"][0]
    assert first["status"] == "failed" and first["error"] == "interrupted"
    assert first["deleted"] + second["deleted"] == 550  # the killed batch counted exactly once
    assert certificates["killed"].status == "partial" and certificates["next"].status == "complete"


@pytest.mark.airflow
@pytest.mark.usefixtures("airflow_db")
def test_a_dag_with_a_sharded_target_maps_one_purge_task_per_shard(pg_db, monkeypatch, keys, tmp_path):
    from airflow.models.taskinstance import TaskInstance
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState, TaskInstanceState

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, customer_rows())
    make_customers(pg_db, table="leads")
    insert_customers(pg_db, [(1, "closed", CUTOFF - timedelta(days=1)), (2, "closed", CUTOFF)], table="leads")
    write_rule(tmp_path / "rules", targets=[{"where": "{status: closed}", "shard_rows": 150, "max_batch_rows": 40},
                                            {"name": "leads", "table": "leads"}])
    dag = rule_dag(tmp_path / "rules", "retention__customer_accounts", monkeypatch)
    assert set(dag.task_ids) == {"plan", "purge", "shards", "purge_shards", "certify"}
    assert dag.get_task("shards").upstream_task_ids == {"plan"}
    assert dag.get_task("purge_shards").upstream_task_ids == {"shards"}
    assert dag.get_task("purge_shards").pool == "retention__crm_db"
    assert dag.get_task("certify").upstream_task_ids == {"purge", "purge_shards"}

    dag_run = dag.test(logical_date=AS_OF)

    assert dag_run.state == DagRunState.SUCCESS
    with create_session() as session:
        purges = session.query(TaskInstance).filter(
            TaskInstance.dag_id == dag.dag_id, TaskInstance.run_id == dag_run.run_id,
            TaskInstance.task_id == "purge_shards").all()
    assert sorted(ti.map_index for ti in purges) == [0, 1, 2, 3]  # 550 expired rows in shards of about 150
    assert {ti.state for ti in purges} == {TaskInstanceState.SUCCESS}
    assert sorted(ti.rendered_map_index for ti in purges) == [f"customers {i}/4" for i in range(1, 5)]
    assert ids(pg_db) == set(range(1, 1001)) - expired_ids()
    assert ids(pg_db, "leads") == {2}
    (payload,) = [json.loads(p) for (p,) in pg_db.rows("SELECT payload FROM purge_certificates")]  # one certificate
    assert payload["status"] == "complete"
    assert [t["deleted"] for t in payload["targets"]] == [550, 1]
