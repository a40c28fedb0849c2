"""The retention__erasure DAG: parsed from _subjects.yaml alone, and a dag.test() run files the
request its conf carries and erases the subject."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from test_airflow_dags import airflow_db  # noqa: F401 - the migrated Airflow metadata database
from test_erasure import ANA, HASH_KEY, SUBJECTS, _counts, world  # noqa: F401 - the erasure world fixture

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]


def test_the_erasure_dag_is_hourly_by_default_and_maps_one_task_per_request(tmp_path):
    from retention.interfaces.airflow_erasure import build_erasure_dag

    dag = build_erasure_dag(ROOT / "retention_rules")
    assert dag.dag_id == "retention__erasure" and dag.max_active_runs == 1 and not dag.catchup
    assert set(dag.task_ids) == {"file", "erase"} and dag.get_task("erase").upstream_task_ids == {"file"}
    assert dag.timetable.expression == "0 * * * *"
    (tmp_path / "_subjects.yaml").write_text('schedule: "15 */4 * * *"\n' + SUBJECTS)
    assert build_erasure_dag(tmp_path).timetable.expression == "15 */4 * * *"


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_a_request_filed_through_the_dag_conf_is_erased_and_certified(airflow_db, world, monkeypatch):  # noqa: F811
    from airflow.utils.state import DagRunState

    from retention.interfaces.airflow_erasure import build_erasure_dag

    monkeypatch.setenv("RETENTION_RULES_DIR", world["rules"])
    dag = build_erasure_dag(world["rules"])
    dag_run = dag.test(logical_date=datetime(2026, 6, 15, tzinfo=timezone.utc),
                       run_conf={"subject": "email=ana@example.com", "request": "DSR-AF-1"})
    assert dag_run.state == DagRunState.SUCCESS
    after = _counts(world)
    assert (after["ana"], after["ana_orders"], after["ana_objects"]) == (0, 0, 0)
    payload = json.loads(world["audit"].scalar("SELECT payload FROM purge_certificates"))
    assert payload["request"] == "DSR-AF-1" and payload["status"] == "done"
    assert world["audit"].scalar("SELECT state FROM erasure_requests") == "done"


@pytest.mark.parametrize("db", ["sqlite"], indirect=True)
def test_an_erasure_a_hold_keeps_partial_succeeds_and_the_next_run_after_the_release_finishes_it(
        airflow_db, world, monkeypatch, capsys):  # noqa: F811
    from airflow.utils.state import DagRunState

    from retention.interfaces.airflow_erasure import build_erasure_dag
    from retention.interfaces.cli import main

    assert main(["hold", "add", "--category", "orders", "--target", "orders", "--match", json.dumps({"id": 2 * ANA}),
                 "--case", "CASE-123", "--reason", "chargeback", "--rules", world["rules"]]) == 0
    monkeypatch.setenv("RETENTION_RULES_DIR", world["rules"])
    dag = build_erasure_dag(world["rules"])
    dag_run = dag.test(logical_date=datetime(2026, 6, 15, tzinfo=timezone.utc),
                       run_conf={"subject": "email=ana@example.com", "request": "DSR-AF-2"})
    assert dag_run.state == DagRunState.SUCCESS  # the hold beat the erasure, as the law says it must
    payload = json.loads(world["audit"].scalar("SELECT payload FROM purge_certificates"))
    assert payload["request"] == "DSR-AF-2" and payload["status"] == "partial"
    assert world["audit"].scalar("SELECT state FROM erasure_requests") == "partial"

    assert main(["hold", "release", "1", "--reason", "dispute settled"]) == 0
    dag_run = dag.test(logical_date=datetime(2026, 6, 16, tzinfo=timezone.utc))
    assert dag_run.state == DagRunState.SUCCESS
    assert world["audit"].scalar("SELECT state FROM erasure_requests") == "done"
    assert world["audit"].scalar("SELECT count(*) FROM purge_certificates") == 2
