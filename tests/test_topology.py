"""The production topology end to end, without Docker (issue #12 item 2).

What docker-compose.yml runs as containers, run here as processes: api-server, scheduler and
dag-processor with LocalExecutor on a PostgreSQL metadata database, the audit database a
separate PostgreSQL database, S3 a moto server, the repository's own seven rules over the
demo's seeded estate. Runs start as a platform team starts them: unpausing (the scheduler
then runs the latest interval) and triggering through the REST API v2.

It takes a few minutes: every task is its own process on a two-core machine.
"""

from __future__ import annotations

import sqlite3
import subprocess
import sys
from datetime import datetime, timezone
from pathlib import Path

import pytest

from airflow_stack import AirflowStack
from retention.evidence.chain import read_certificates
from retention.evidence.signing import generate_keypair
from retention.interfaces import demo
from retention.rules.loader import load_rules

pytestmark = pytest.mark.airflow

ROOT = Path(__file__).resolve().parents[1]
FROZEN = "web_sessions"  # the category whose target is made to fail
# Sessions of the last days before the cutoff refuse to go: the run purges the older ones, then fails.
FREEZE = ("CREATE TRIGGER frozen BEFORE DELETE ON sessions WHEN OLD.last_seen_at > datetime('now', '-100 days') "
          "BEGIN SELECT RAISE(ABORT, 'sessions are frozen for a migration'); END")


@pytest.fixture
def topology(tmp_path, new_database):
    """The stack over the repository's rules and the demo's estate; yields it with its parts."""
    now = datetime.now(timezone.utc)
    home = tmp_path / "estate"
    public = generate_keypair(home / "keys")[1]
    (home / "keys" / "hash.key").write_text("ab" * 32 + "\n")
    databases = demo.seed(home / "data", now)
    server, endpoint = demo.start_s3()
    audit = new_database("postgresql")
    metadata = new_database("postgresql")
    env = {k: v for k, v in demo.environment(home, databases, endpoint).items()
           if k.startswith(("RETENTION_", "AIRFLOW_CONN_"))}
    env |= {"AIRFLOW_CONN_RETENTION_AUDIT": audit.airflow_uri, "PYTHONPATH": str(ROOT / "plugins")}
    stack = AirflowStack(tmp_path / "airflow", dags_folder=ROOT / "dags", metadata_url=metadata.url, env=env)
    try:
        demo.seed_receipts(endpoint, now)
        stack.start()
        stack.audit, stack.public_key, stack.checkpoints = audit, public, home / "checkpoints"
        stack.sessions = databases["web_db"]
        stack.cli_env = {**env, "PATH": str(Path(sys.executable).parent)}
        yield stack
    finally:
        stack.stop()
        server.stop()


def _sql(path: Path, statement: str):
    with sqlite3.connect(path) as db:
        return db.execute(statement).fetchall()


def _certificates(stack) -> dict[str, list]:
    found: dict[str, list] = {}
    for certificate in read_certificates(stack.audit.engine):
        found.setdefault(certificate.category, []).append(certificate)
    return found


def test_every_dag_of_the_repository_runs_on_the_scheduler_and_certifies(topology):
    stack = topology
    dag_ids = {f"retention__{r.rule.category}": r.rule.category for r in load_rules(ROOT / "retention_rules")}
    assert len(dag_ids) == 7
    for dag_id in dag_ids:
        stack.wait_for_dag(dag_id)
    assert stack.import_errors() == []
    _sql(stack.sessions, FREEZE)  # a target that fails mid-purge (a trigger refuses the DELETE)

    for dag_id in dag_ids:
        stack.unpause(dag_id)  # catchup is off: the scheduler runs the latest interval at once
    finished = {dag_id: stack.wait_for_first_run(dag_id, timeout=600) for dag_id in dag_ids}
    states = {dag_id: run["state"] for dag_id, run in finished.items()}
    assert states == {d: "failed" if c == FROZEN else "success" for d, c in dag_ids.items()}, states

    certificates = _certificates(stack)
    assert {c: len(v) for c, v in certificates.items()} == {c: 1 for c in dag_ids.values()}  # one per run
    assert {c: v[0].status for c, v in certificates.items()} == {
        c: "partial" if c == FROZEN else "complete" for c in dag_ids.values()}
    frozen_run = finished[f"retention__{FROZEN}"]["dag_run_id"]
    assert "sessions are frozen for a migration" in stack.task_log(f"retention__{FROZEN}", frozen_run, "purge")
    assert "run partial: certificate seq" in stack.task_log(f"retention__{FROZEN}", frozen_run, "certify")

    # The failure is not left to sit: once the target is writable the next runs finish the job,
    # and two triggered runs of one category wait for each other.
    _sql(stack.sessions, "DROP TRIGGER frozen")
    dag_id = f"retention__{FROZEN}"
    runs = [stack.trigger(dag_id), stack.trigger(dag_id)]
    assert [stack.wait_for_run(dag_id, r, timeout=600) for r in runs] == ["success", "success"]
    first, second = (next(x for x in stack.runs(dag_id) if x["dag_run_id"] == r) for r in runs)
    assert second["start_date"] >= first["end_date"], (first, second)  # max_active_runs=1: serialized
    assert [c.status for c in _certificates(stack)[FROZEN]] == ["partial", "complete", "complete"]
    cutoff = load_rules(ROOT / "retention_rules", category=FROZEN)[0].rule.cutoff(datetime.now(timezone.utc))
    assert _sql(stack.sessions, f"SELECT count(*) FROM sessions WHERE last_seen_at < '{cutoff:%Y-%m-%d %H:%M:%S}'")[0][0] == 0

    verify = subprocess.run(
        [sys.executable, "-m", "retention.interfaces.cli", "verify", "--public-key", str(stack.public_key),
         "--checkpoint", str(stack.checkpoints)],
        env=stack.cli_env, capture_output=True, text=True, timeout=120)
    assert verify.returncode == 0, verify.stdout + verify.stderr
    assert "9 certificates verified" in verify.stdout
