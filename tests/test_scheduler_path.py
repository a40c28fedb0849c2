"""The scheduler path, not ``dags test``: a broken rule turns its running DAG red (issue #9 item 8).

A real api-server, scheduler and dag-processor (LocalExecutor, PostgreSQL metadata
database) parse the DAGs folder; the REST API unpauses and triggers, as a person would.
"""

from __future__ import annotations

from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from airflow_stack import AirflowStack
from retention.evidence.signing import SIGNING_KEY_ENV, generate_keypair

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]

RULE = """\
category: {category}
description: {category} resolved long ago
owner: customer-care
legal_basis: Warranty window of three years
retain_for: P3Y
schedule: "@weekly"
action: delete
targets:
  - name: {table}
    kind: sql
    connection: support_db
    table: {table}
    key: [id]
    age_column: resolved_at
    max_fraction: 1.0
"""


@pytest.fixture
def stack(tmp_path, new_database):
    """A running stack over two rules (support_tickets, web_sessions) on real PostgreSQL."""
    support = new_database("postgresql")
    audit = new_database("postgresql")
    metadata = new_database("postgresql")
    now = datetime.now(timezone.utc)
    for table in ("tickets", "sessions"):
        support.execute(f"CREATE TABLE {table} (id integer PRIMARY KEY, resolved_at timestamptz)")
        support.execute(f"INSERT INTO {table} VALUES (1, :old), (2, :old), (3, :new)",
                        {"old": now - timedelta(days=4 * 365), "new": now - timedelta(days=30)})
    rules = tmp_path / "retention_rules"
    rules.mkdir()
    (rules / "support_tickets.yaml").write_text(RULE.format(category="support_tickets", table="tickets"))
    (rules / "web_sessions.yaml").write_text(RULE.format(category="web_sessions", table="sessions"))
    private, _public = generate_keypair(tmp_path / "keys")
    env = {
        "PYTHONPATH": str(ROOT / "plugins"),
        "RETENTION_RULES_DIR": str(rules),
        SIGNING_KEY_ENV: str(private),
        "AIRFLOW_CONN_SUPPORT_DB": support.airflow_uri,
        "AIRFLOW_CONN_RETENTION_AUDIT": audit.airflow_uri,
    }
    running = AirflowStack(tmp_path / "airflow", dags_folder=ROOT / "dags", metadata_url=metadata.url, env=env)
    running.rules = rules
    running.support = support
    try:
        running.start()
        yield running
    finally:
        running.stop()  # before the databases are dropped


def _tags(dag: dict) -> set[str]:
    return {t["name"] if isinstance(t, dict) else t for t in dag["tags"]}


def test_item08_a_broken_rule_keeps_failing_in_the_unpaused_dag_that_was_running(stack):
    dag_id = "retention__support_tickets"
    before = stack.wait_for_dag(dag_id)
    stack.wait_for_dag("retention__web_sessions")
    assert before["is_paused"] is True  # new DAGs are paused: a person unpauses the rule
    stack.unpause(dag_id)  # catchup is off: the scheduler runs the latest weekly interval
    first = stack.wait_for_first_run(dag_id)["dag_run_id"]
    assert stack.wait_for_run(dag_id, first) == "success", stack.task_log(dag_id, first, "plan")
    assert stack.support.scalar("SELECT count(*) FROM tickets") == 1

    # The typo of the issue: a duration a person would write.
    path = stack.rules / "support_tickets.yaml"
    path.write_text(path.read_text().replace("retain_for: P3Y", "retain_for: 3 years"))

    # Wait for the re-parse to show, under either id (old code: a new, paused DAG).
    def reparsed() -> bool:
        dag = stack.dag(dag_id)
        return "invalid-rule" in _tags(dag) or stack.dag("retention__invalid__support_tickets") is not None
    stack.wait_until(reparsed, 120, "the broken rule file to be re-parsed")

    after = stack.dag(dag_id)
    assert stack.dag("retention__invalid__support_tickets") is None
    assert "invalid-rule" in _tags(after) and "owner:customer-care" in _tags(after)
    assert after["is_paused"] is False
    assert after["timetable_summary"] == before["timetable_summary"]
    assert stack.import_errors() == []

    second = stack.trigger(dag_id)
    assert stack.wait_for_run(dag_id, second) == "failed"
    ti = stack.wait_for_task(dag_id, second, "rule_is_invalid")
    assert (ti["state"], ti["try_number"]) == ("failed", 1)  # no retries: it would fail the same way
    assert [r["state"] for r in stack.runs(dag_id)] == ["success", "failed"]
    log = stack.task_log(dag_id, second, "rule_is_invalid")
    assert f"{path}:5: retain_for:" in log
    assert "nothing was purged" in log
    assert stack.support.scalar("SELECT count(*) FROM tickets") == 1

    # The other categories keep purging, and their plan task says what is broken.
    other = "retention__web_sessions"
    stack.unpause(other)
    third = stack.wait_until(lambda: stack.runs(other), 120, "the scheduler to start web_sessions")[0]["dag_run_id"]
    plan = stack.wait_for_task(other, third, "plan")
    plan_log = stack.task_log(other, third, "plan")
    assert plan["state"] == "success", plan_log
    assert f"{path}:5: retain_for:" in plan_log
    assert "not being purged" in plan_log
