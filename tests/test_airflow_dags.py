"""The Airflow side: DAGs parse cleanly from YAML alone, and a real dag.test() run purges."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
UTC = timezone.utc


@pytest.fixture(scope="session")
def airflow_db():
    """The Airflow metadata database (SQLite in the test AIRFLOW_HOME), migrated once."""
    subprocess.run([sys.executable, "-m", "airflow", "db", "migrate"], check=True, capture_output=True,
                   env=os.environ.copy())


def rule_dag(rules: Path, dag_id: str, monkeypatch, *, pools_synced: bool = True):
    """The DAG the real dags/ folder builds from ``rules``.

    dag.test() re-parses the DAGs folder to serialize the DAG it runs, so the rules
    directory is set the way a deployment sets it, not just passed to build_dags.
    """
    from retention.interfaces.airflow import build_dags

    monkeypatch.setenv("RETENTION_RULES_DIR", str(rules))
    if pools_synced:
        # What `retention airflow sync-pools` records (dag.test() itself ignores pools); a
        # platform that manages its pools elsewhere sets the same Variable.
        from retention.interfaces.pools import (
            POOLS_VARIABLE,
            load_pool_config,
            load_pool_rules,
            pools_receipt,
            required_pools,
        )

        receipt = pools_receipt(required_pools(load_pool_rules(rules), load_pool_config(rules)))
        monkeypatch.setenv(f"AIRFLOW_VAR_{POOLS_VARIABLE.upper()}", receipt)
    return build_dags(rules)[dag_id]


def test_the_dags_folder_imports_without_errors():
    from airflow.dag_processing.dagbag import DagBag

    bag = DagBag(dag_folder=str(ROOT / "dags"))

    assert bag.import_errors == {}
    categories = sorted(p.stem for p in (ROOT / "retention_rules").glob("*.yaml") if not p.name.startswith("_"))
    assert sorted(bag.dag_ids) == sorted([f"retention__{c}" for c in categories] + ["retention__erasure"])
    for dag_id in set(bag.dag_ids) - {"retention__erasure"}:  # the erasure DAG: tests/test_erasure_airflow.py
        dag = bag.dags[dag_id]
        assert dag.catchup is False
        assert dag.max_active_runs == 1
        assert "retention" in dag.tags and any(t.startswith("owner:") for t in dag.tags)
        purges = {t for t in dag.task_ids if t == "purge" or t.startswith("purge__")}  # one per connection
        assert set(dag.task_ids) == {"plan", "certify"} | purges and purges
        assert dag.get_task("certify").trigger_rule == "all_done"
        assert all(dag.get_task(t).upstream_task_ids == {"plan"} for t in purges)
        assert dag.get_task("certify").upstream_task_ids == purges


def test_each_dag_takes_its_rules_schedule(tmp_path, monkeypatch):
    from retention.interfaces.airflow import build_dags

    write_rule(tmp_path, "nightly", text=_rule("nightly", 'schedule: "15 2 * * *"'))
    write_rule(tmp_path, "manual", text=_rule("manual", "schedule: null"))

    dags = build_dags(tmp_path)

    assert dags["retention__nightly"].timetable.expression == "15 2 * * *"
    assert not dags["retention__manual"].timetable.can_be_scheduled


def test_parsing_reads_only_yaml(tmp_path):
    """No database driver, no boto3, no connection and no key are needed to parse the DAGs."""
    script = (
        "import runpy, sys, json\n"
        f"runpy.run_path({str(ROOT / 'dags' / 'retention_dags.py')!r})\n"
        "mods = ['retention.targets.sql.table', 'retention.run.runner', 'boto3', 'psycopg2', 'pymysql', 'retention.evidence.signing']\n"
        "print(json.dumps([m for m in mods if m in sys.modules]))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AIRFLOW_CONN_", "RETENTION_"))}
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, check=True)

    assert json.loads(result.stdout.strip().splitlines()[-1]) == []


def test_an_invalid_rule_file_fails_loudly_without_hiding_the_others(tmp_path):
    from retention.interfaces.airflow import build_dags

    write_rule(tmp_path, "good", text=_rule("good"))
    write_rule(tmp_path, "broken", text=_rule("broken", "retain_for: two years"))

    dags = build_dags(tmp_path)

    # The broken rule keeps its DAG id (issue #9 item 8): it fails where it used to run.
    assert set(dags) == {"retention__good", "retention__broken"}
    broken = dags["retention__broken"]
    assert broken.task_ids == ["rule_is_invalid"]
    assert "broken.yaml:5" in broken.doc_md


def test_a_missing_rules_directory_is_an_import_error(tmp_path):
    from retention.errors import ConfigError
    from retention.interfaces.airflow import build_dags

    with pytest.raises(ConfigError, match="does not exist"):
        build_dags(tmp_path / "nowhere")


def test_dag_test_purges_postgresql_and_appends_a_certificate(
    airflow_db, pg_db, monkeypatch, keys, tmp_path, request
):
    from airflow.utils.state import DagRunState

    audit = request.getfixturevalue("mysql_db")  # a server-side audit database, as in production
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", audit.airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    logical_date = datetime(2026, 6, 15, 3, 0, tzinfo=UTC)
    cutoff = datetime(2024, 6, 15, 3, 0, tzinfo=UTC)
    insert_customers(pg_db, [(i, "closed", cutoff - timedelta(hours=i)) for i in range(1, 251)]
                     + [(1000, "closed", cutoff), (1001, "open", cutoff - timedelta(days=9))])
    rule_path = write_rule(tmp_path / "rules", targets=[{"where": "{status: closed}", "max_batch_rows": 40}])
    dag = rule_dag(tmp_path / "rules", "retention__customer_accounts", monkeypatch)

    dag_run = dag.test(logical_date=logical_date)

    assert dag_run.state == DagRunState.SUCCESS
    assert ids(pg_db) == {1000, 1001}
    payload = json.loads(audit.scalar("SELECT payload FROM purge_certificates WHERE seq = 1"))
    assert payload["run_id"] == dag_run.run_id
    assert payload["as_of"] == "2026-06-15T03:00:00.000000Z"
    assert payload["status"] == "complete"
    assert payload["targets"][0]["deleted"] == 250
    assert payload["rule"]["sha256"] == hashlib.sha256(rule_path.read_bytes()).hexdigest()  # this rule, not the repo's
    from retention.interfaces.cli import main

    assert main(["verify", "--public-key", str(keys[1])]) == 0


def test_a_failed_target_fails_the_dag_run_with_a_certificate(airflow_db, pg_db, monkeypatch, keys, tmp_path):
    from airflow.utils.state import DagRunState

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(1, "closed", datetime(2019, 1, 1, tzinfo=UTC))])
    write_rule(tmp_path / "rules", targets=[{}, {"name": "ghosts", "table": "ghost_table"}])
    dag = rule_dag(tmp_path / "rules", "retention__customer_accounts", monkeypatch)

    dag_run = dag.test(logical_date=datetime(2026, 6, 15, tzinfo=UTC))

    assert dag_run.state == DagRunState.FAILED
    assert ids(pg_db) == {1}  # the rule did not match the database: nothing was touched
    row = pg_db.rows("SELECT status, payload FROM purge_certificates")
    assert len(row) == 1 and row[0][0] == "failed"
    assert json.loads(row[0][1])["targets"][1]["error"] == "rule does not match the database"


def _rule(category: str, *replace: str) -> str:
    text = (
        f"category: {category}\n"
        "description: test\n"
        "owner: team\n"
        "legal_basis: test\n"
        "retain_for: P2Y\n"
        'schedule: "@daily"\n'
        "action: delete\n"
        "targets:\n"
        "  - {name: customers, kind: sql, connection: crm_db, table: customers, key: [id], age_column: closed_at}\n"
    )
    for line in replace:
        key = line.split(":")[0]
        text = "\n".join(line if existing.startswith(key + ":") else existing for existing in text.split("\n"))
    return text


def test_dag_test_purges_a_bucket_on_a_moto_server(airflow_db, aws_server, audit_db, keys, tmp_path, monkeypatch):
    """The S3 path end to end: Airflow resolves aws_default (endpoint_url in its extra)."""
    from airflow.utils.state import DagRunState

    bucket = f"dag-test-{os.getpid()}"
    aws_server.create_bucket(Bucket=bucket)
    aws_server.create_bucket(Bucket=f"{bucket}-audit")
    monkeypatch.setenv("RETENTION_CHECKPOINTS", f"s3://{bucket}-audit/checkpoints")
    aws_server.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    for key in ("exports/2019/01/05/a.csv", "exports/2019/01/05/a.csv", "exports/2026/06/01/b.csv"):
        aws_server.put_object(Bucket=bucket, Key=key, Body=b"rows")
    write_rule(tmp_path / "rules", "exports", text=(
        "category: exports\ndescription: Clickstream exports\nowner: data\nlegal_basis: Analytics, 1 year\n"
        "retain_for: P1Y\naction: delete\ntargets:\n"
        f"  - {{name: exports, kind: s3, connection: aws_default, bucket: {bucket}, prefix: exports/,\n"
        "     age_from: key_date, key_date_format: 'exports/%Y/%m/%d/', max_fraction: 1.0}\n"
    ))
    dag = rule_dag(tmp_path / "rules", "retention__exports", monkeypatch)

    dag_run = dag.test(logical_date=datetime(2026, 6, 15, tzinfo=UTC))

    assert dag_run.state == DagRunState.SUCCESS
    versions = aws_server.list_object_versions(Bucket=bucket)
    assert {v["Key"] for v in versions.get("Versions", [])} == {"exports/2026/06/01/b.csv"}
    payload = json.loads(audit_db.scalar("SELECT payload FROM purge_certificates"))
    target = payload["targets"][0]
    assert (target["deleted"], target["bytes"], target["location"]) == (1, 8, f"s3://{bucket}/exports/")
    checkpoints = aws_server.list_objects_v2(Bucket=f"{bucket}-audit")["Contents"]
    assert [c["Key"] for c in checkpoints] == ["checkpoints/000000000001.checkpoint"]
    from retention.interfaces.cli import main

    assert main(["verify", "--public-key", str(keys[1]), "--checkpoint", f"s3://{bucket}-audit/checkpoints"]) == 0


def test_an_over_limit_run_fails_until_the_dag_param_approves_it(airflow_db, pg_db, monkeypatch, keys, tmp_path):
    from airflow.utils.state import DagRunState

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(i, "closed", datetime(2019, 1, 1, tzinfo=UTC)) for i in range(1, 11)])
    write_rule(tmp_path / "rules", targets=[{"max_fraction": 0.2}])
    dag = rule_dag(tmp_path / "rules", "retention__customer_accounts", monkeypatch)

    refused = dag.test(logical_date=datetime(2026, 6, 15, tzinfo=UTC))
    approved = dag.test(logical_date=datetime(2026, 6, 16, tzinfo=UTC),
                        run_conf={"approve_over_limit": "backlog after the migration, ticket OPS-7"})

    assert refused.state == DagRunState.FAILED
    assert approved.state == DagRunState.SUCCESS
    rows = pg_db.rows("SELECT status, payload FROM purge_certificates ORDER BY seq")
    assert [r[0] for r in rows] == ["failed", "complete"]
    assert json.loads(rows[1][1])["approval"]["reason"] == "backlog after the migration, ticket OPS-7"
    assert ids(pg_db) == set()
