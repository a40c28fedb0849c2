"""Gentle on production: batches pause while a real streaming replica is behind, the run still
completes once it catches up, and the certificate carries the pauses; past the lag-wait
budget the target ends partial, saying why. Optional upkeep (VACUUM, OPTIMIZE, ANALYZE) runs
after a large purge only.

The replicas are made on this machine (:mod:`replicas`): a PostgreSQL primary and its
``pg_basebackup`` replica, a MariaDB primary with its binary log and a replica of it. Lag is
made on demand: PostgreSQL's replay is paused on the replica while the primary writes;
MariaDB's replica SQL thread is stopped (``Seconds_Behind_Master`` NULL: over the limit).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from datetime import datetime, timedelta, timezone

import pytest
import sqlalchemy as sa
from sqlalchemy.engine import make_url

from retention.clock import parse_utc
from retention.connections import from_environment
from retention.errors import RuleError
from retention.evidence.audit import open_audit, purge_batches, purge_targets
from retention.evidence.chain import read_certificates
from retention.rules.loader import load_rule_file

from conftest import Database, connect, write_rule
from replicas import Pair, mariadb_pair, pg_pair
from sqlpurge import ids, insert_customers, make_customers, runner

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, 12, 0, tzinfo=UTC)
OLD = AS_OF - timedelta(days=3 * 365)
ROWS = 1500
MAX_BATCH = 100


@pytest.fixture(scope="session")
def pg_replicas() -> Iterator[Pair]:
    with pg_pair() as pair:
        yield pair


@pytest.fixture(scope="session")
def maria_replicas() -> Iterator[Pair]:
    with mariadb_pair() as pair:
        yield pair


@pytest.fixture
def pg_primary_db(pg_replicas) -> Iterator[Database]:
    """A fresh database on the replicated PostgreSQL primary."""
    name = f"lag_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(pg_replicas.primary.url, isolation_level="AUTOCOMMIT")
    with admin.connect() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    db = Database("postgresql", make_url(pg_replicas.primary.url).set(database=name))
    yield db
    db.engine.dispose()
    with admin.connect() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    admin.dispose()


@pytest.fixture
def maria_primary_db(maria_replicas) -> Iterator[Database]:
    """A fresh database on the MariaDB primary (replicated to the replica)."""
    name = f"lag_{uuid.uuid4().hex[:10]}"
    admin = sa.create_engine(maria_replicas.primary.url)
    with admin.begin() as conn:
        conn.execute(sa.text(f"CREATE DATABASE {name}"))
    db = Database("mariadb", make_url(maria_replicas.primary.url).set(database=name))
    yield db
    db.engine.dispose()
    _replica_sql(maria_replicas, "START SLAVE")  # whatever a test left stopped
    with admin.begin() as conn:
        conn.execute(sa.text(f"DROP DATABASE IF EXISTS {name}"))
    admin.dispose()


def _customers(db: Database) -> None:
    make_customers(db)
    insert_customers(db, [(i, "closed", OLD + timedelta(minutes=i)) for i in range(1, ROWS + 1)]
                     + [(ROWS + 1, "closed", AS_OF - timedelta(days=1))])


def _rule(tmp_path, **target):
    spec = {"max_batch_rows": MAX_BATCH, **target}
    return load_rule_file(write_rule(tmp_path / "rules", targets=[spec]))


def _batch_times(run_id: str) -> list[datetime]:
    with open_audit(from_environment).connect() as conn:
        stamps = conn.execute(sa.select(purge_batches.c.recorded_at).where(
            purge_batches.c.run_id == run_id, purge_batches.c.state == "done")).scalars().all()
    return [parse_utc(s) for s in stamps]


def _purging(audit: Database, run_id: str) -> bool:
    """Whether the run's target is being purged (read without touching the schema another process makes)."""
    try:
        with audit.engine.connect() as conn:
            state = conn.execute(sa.select(purge_targets.c.state).where(purge_targets.c.run_id == run_id)).scalar()
    except sa.exc.OperationalError:  # no journal yet
        return False
    return state == "running"


def _pg_lag(pair: Pair) -> float:
    engine = sa.create_engine(pair.primary.url)
    try:
        with engine.connect() as conn:
            return float(conn.execute(sa.text(
                "SELECT COALESCE(MAX(EXTRACT(EPOCH FROM replay_lag)), 0) FROM pg_stat_replication")).scalar_one())
    finally:
        engine.dispose()


def _pause_pg_replay(pair: Pair, over: float) -> None:
    """Pause replay on the replica and write on the primary until its replay lag is past ``over``."""
    replica = sa.create_engine(pair.replica.url, isolation_level="AUTOCOMMIT")
    primary = sa.create_engine(pair.primary.url, isolation_level="AUTOCOMMIT")
    try:
        with replica.connect() as conn:
            conn.execute(sa.text("SELECT pg_wal_replay_pause()"))
        with primary.connect() as conn:
            conn.execute(sa.text("CREATE TABLE IF NOT EXISTS lag_scratch (at timestamptz)"))
            deadline = time.monotonic() + 30
            while _pg_lag(pair) <= over:
                assert time.monotonic() < deadline, "the paused replica's replay lag never grew"
                conn.execute(sa.text("INSERT INTO lag_scratch VALUES (now())"))
                time.sleep(0.2)
    finally:
        replica.dispose()
        primary.dispose()


def _resume_pg_replay(pair: Pair) -> None:
    replica = sa.create_engine(pair.replica.url, isolation_level="AUTOCOMMIT")
    try:
        with replica.connect() as conn:
            conn.execute(sa.text("SELECT pg_wal_replay_resume()"))
    finally:
        replica.dispose()


def _replica_sql(pair: Pair, statement: str) -> None:
    replica = sa.create_engine(pair.replica.url, isolation_level="AUTOCOMMIT")
    try:
        with replica.connect() as conn:
            conn.execute(sa.text(statement))
    finally:
        replica.dispose()


def _cli(rules, run_id: str, *, failpoints: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if failpoints:
        env["RETENTION_FAILPOINTS"] = failpoints
    return subprocess.run([sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rules),
                           "--as-of", AS_OF.isoformat(), "--run-id", run_id], capture_output=True, text=True,
                          env=env, timeout=120)


class _Later:
    """Runs ``action`` after ``delay`` seconds in a thread; ``at`` is when it finished."""

    def __init__(self, delay: float, action):
        self.at: datetime | None = None
        self._action = action
        self._timer = threading.Timer(delay, self._run)
        self._timer.start()

    def _run(self) -> None:
        self._action()
        self.at = datetime.now(UTC)

    def join(self) -> datetime:
        self._timer.join()
        assert self.at is not None
        return self.at


def _maria_connections(monkeypatch, db: Database, pair: Pair, **extra) -> None:
    url = db.url
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", json.dumps({
        "conn_type": "mysql", "host": url.host, "port": url.port, "login": url.username,
        "password": url.password, "schema": url.database, "extra": {"replica_conn_ids": ["crm_replica"], **extra}}))
    monkeypatch.setenv("AIRFLOW_CONN_CRM_REPLICA", pair.replica.uri)


# -- PostgreSQL --------------------------------------------------------------------------


def test_pg_batches_pause_while_the_replica_is_behind_and_the_run_completes(
        pg_replicas, pg_primary_db, monkeypatch, audit_db, keys, tmp_path):
    db = pg_primary_db
    connect(monkeypatch, "crm_db", db)
    _customers(db)
    _pause_pg_replay(pg_replicas, over=1.5)
    resume = _Later(2.5, lambda: _resume_pg_replay(pg_replicas))
    try:
        certificate = runner().run(_rule(tmp_path, max_replica_lag=1), run_id="r1", as_of=AS_OF)
    finally:
        resumed_at = resume.join()

    assert certificate.status == "complete"
    assert ids(db) == {ROWS + 1}
    (target,) = certificate.data["targets"]
    assert target["deleted"] == ROWS
    assert target["lag_pauses"]["count"] >= 1
    assert target["lag_pauses"]["seconds"] >= 1.0
    times = _batch_times("r1")
    assert len(times) >= ROWS // MAX_BATCH
    # No batch committed while the replica was paused: every one is journaled done after it resumed.
    assert min(times) >= resumed_at


def test_pg_a_user_that_cannot_see_the_replicas_lag_stops_with_advice(
        pg_replicas, pg_primary_db, monkeypatch, audit_db, keys, tmp_path):
    db = pg_primary_db
    _customers(db)
    with _crm_as_a_role_without_pg_monitor(db, monkeypatch):
        certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)
        assert certificate.status == "failed"
        assert "cannot read the replicas' lag in pg_stat_replication: GRANT pg_monitor TO it" in (
            certificate.data["targets"][0]["error"])
        assert len(ids(db)) == ROWS + 1  # nothing was purged blind


@contextmanager
def _crm_as_a_role_without_pg_monitor(db: Database, monkeypatch) -> Iterator[None]:
    """crm_db as a login role that may purge customers but not read pg_stat_replication's lag."""
    role = f"lag_{uuid.uuid4().hex[:8]}"
    db.execute(f"CREATE ROLE {role} LOGIN")
    db.execute(f"GRANT ALL ON customers TO {role}")
    try:
        url = db.url
        monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", f"postgres://{role}@{url.host}:{url.port}/{url.database}")
        yield
    finally:
        db.engine.dispose()
        db.execute(f"DROP OWNED BY {role}")
        db.execute(f"DROP ROLE {role}")


def test_pg_partition_drops_wait_for_the_replica_too(pg_replicas, pg_primary_db, monkeypatch, audit_db, keys,
                                                     tmp_path):
    db = pg_primary_db
    connect(monkeypatch, "crm_db", db)
    db.execute("CREATE TABLE events (id BIGINT NOT NULL, created_at TIMESTAMPTZ NOT NULL, PRIMARY KEY (id, created_at)) "
               "PARTITION BY RANGE (created_at)")
    db.execute("CREATE INDEX events_created_at ON events (created_at)")
    for year in (2021, 2022):
        db.execute(f"CREATE TABLE events_{year} PARTITION OF events FOR VALUES FROM ('{year}-01-01 00:00+00') "
                   f"TO ('{year + 1}-01-01 00:00+00')")
    db.execute("CREATE TABLE events_later PARTITION OF events FOR VALUES FROM ('2023-01-01 00:00+00') TO (MAXVALUE)")
    db.execute("INSERT INTO events SELECT i, timestamptz '2021-01-01 00:00+00' + i * interval '1 day' "
               "FROM generate_series(1, 800) i")  # 2021 and 2022 wholly expired, then into 2023
    _pause_pg_replay(pg_replicas, over=1.5)
    resume = _Later(2.0, lambda: _resume_pg_replay(pg_replicas))
    try:
        certificate = runner().run(_rule(tmp_path, table="events", key="[id, created_at]", age_column="created_at",
                                         max_replica_lag=1), run_id="r1", as_of=AS_OF)
    finally:
        resumed_at = resume.join()

    assert certificate.status == "complete"
    (target,) = certificate.data["targets"]
    assert set(target["partitions"]) == {"public.events_2021", "public.events_2022"}
    assert target["lag_pauses"]["count"] >= 1
    assert min(_batch_times("r1")) >= resumed_at  # the drops, too, waited


# -- MariaDB -----------------------------------------------------------------------------


def test_mariadb_batches_pause_while_replication_is_stopped_and_the_run_completes(
        maria_replicas, maria_primary_db, monkeypatch, audit_db, keys, tmp_path):
    db = maria_primary_db
    _maria_connections(monkeypatch, db, maria_replicas)
    _customers(db)
    _replica_sql(maria_replicas, "STOP SLAVE SQL_THREAD")  # Seconds_Behind_Master: NULL
    resume = _Later(2.0, lambda: _replica_sql(maria_replicas, "START SLAVE SQL_THREAD"))
    try:
        certificate = runner().run(_rule(tmp_path, max_replica_lag=1), run_id="r1", as_of=AS_OF)
    finally:
        resumed_at = resume.join()

    assert certificate.status == "complete"
    assert ids(db) == {ROWS + 1}
    (target,) = certificate.data["targets"]
    assert target["lag_pauses"]["count"] >= 1
    assert target["lag_pauses"]["seconds"] >= 1.0
    assert min(_batch_times("r1")) >= resumed_at


def test_pauses_are_journaled_and_survive_a_crash_into_the_certificate(
        maria_replicas, maria_primary_db, monkeypatch, audit_db, keys, tmp_path):
    db = maria_primary_db
    _maria_connections(monkeypatch, db, maria_replicas)
    _customers(db)
    rules = _rule(tmp_path, max_replica_lag=1).path.parent
    _replica_sql(maria_replicas, "STOP SLAVE SQL_THREAD")

    def resume_once_purging() -> None:
        # The CLI takes a while to start: resume 1.5 s after its purge began (and paused).
        deadline = time.monotonic() + 60
        while not _purging(audit_db, "killed") and time.monotonic() < deadline:
            time.sleep(0.1)
        time.sleep(1.5)
        _replica_sql(maria_replicas, "START SLAVE SQL_THREAD")

    resume = _Later(0, resume_once_purging)
    try:
        killed = _cli(rules, "killed", failpoints="sql.before_commit=3:kill")  # after the pause, mid-walk
    finally:
        resume.join()
    assert killed.returncode == -9, killed.stderr
    finished = _cli(rules, "next")
    assert finished.returncode == 0, finished.stderr

    certificates = {c.run_id: c.data for c in read_certificates(open_audit(from_environment))}
    killed_target = certificates["killed"]["targets"][0]
    assert killed_target["lag_pauses"]["count"] == 1
    assert killed_target["lag_pauses"]["seconds"] >= 1.0
    assert "lag_pauses" not in certificates["next"]["targets"][0]  # caught up: no pause
    assert ids(db) == {ROWS + 1}


def test_mariadb_lag_past_the_wait_budget_ends_the_target_partial_with_the_reason(
        maria_replicas, maria_primary_db, monkeypatch, audit_db, keys, tmp_path):
    db = maria_primary_db
    _maria_connections(monkeypatch, db, maria_replicas)
    _customers(db)
    _replica_sql(maria_replicas, "STOP SLAVE SQL_THREAD")
    started = time.monotonic()
    certificate = runner().run(_rule(tmp_path, max_replica_lag=1, lag_wait_budget=1.5), run_id="r1", as_of=AS_OF)

    assert time.monotonic() - started < 30  # never stuck
    assert certificate.status != "complete"
    (target,) = certificate.data["targets"]
    assert target["status"] == "failed"
    assert "replica lag over the limit of 1s beyond the lag-wait budget of 1.5s" in target["error"]
    assert target["lag_pauses"]["count"] == 1
    assert target["lag_pauses"]["seconds"] >= 1.5
    assert len(ids(db)) == ROWS + 1

    # Once the replica catches up, the next run purges what this one left.
    _replica_sql(maria_replicas, "START SLAVE SQL_THREAD")
    again = runner().run(_rule(tmp_path, max_replica_lag=1), run_id="r2", as_of=AS_OF)
    assert again.status == "complete"
    assert ids(db) == {ROWS + 1}


def test_mariadb_a_replica_user_without_the_privilege_stops_with_advice(
        maria_replicas, maria_primary_db, monkeypatch, audit_db, keys, tmp_path):
    db = maria_primary_db
    _maria_connections(monkeypatch, db, maria_replicas)
    _customers(db)
    weak = f"weak{uuid.uuid4().hex[:6]}"
    _replica_sql(maria_replicas, f"CREATE USER '{weak}'@'%' IDENTIFIED BY 'weakpw'")
    try:
        monkeypatch.setenv("AIRFLOW_CONN_CRM_REPLICA", f"mysql://{weak}:weakpw@127.0.0.1:{maria_replicas.replica.port}")
        certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)
    finally:
        _replica_sql(maria_replicas, f"DROP USER '{weak}'@'%'")
    assert certificate.status == "failed"
    error = certificate.data["targets"][0]["error"]
    assert "connection crm_replica (in replica_conn_ids) refuses its login or SHOW REPLICA STATUS" in error
    assert "weakpw" not in error
    assert len(ids(db)) == ROWS + 1


def test_mariadb_the_connection_extra_sets_the_limit_and_the_rule_beats_it(
        maria_replicas, maria_primary_db, monkeypatch, audit_db, keys, tmp_path):
    """Replication running and caught up (lag 0): no pause, and the certificate says nothing of lag."""
    db = maria_primary_db
    _maria_connections(monkeypatch, db, maria_replicas, max_replica_lag=5)
    _customers(db)
    with runner().targets as targets:
        assert targets.open(_rule(tmp_path).rule.target("customers")).throttle.limit == 5
        assert targets.open(_rule(tmp_path, max_replica_lag=2).rule.target("customers")).throttle.limit == 2
    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)
    assert certificate.status == "complete"
    (target,) = certificate.data["targets"]
    assert "lag_pauses" not in target and "maintenance" not in target


# -- configuration -------------------------------------------------------------------------


def _cli_run(tmp_path) -> subprocess.CompletedProcess:
    write_rule(tmp_path / "rules", targets=[{}])
    return _cli(tmp_path / "rules", "r1")


@pytest.mark.parametrize(("extra", "message"), [
    ({"replica_conn_ids": "crm_replica"}, "connection crm_db: extra replica_conn_ids must be a list"),
    ({"replica_conn_ids": [""]}, "connection crm_db: extra replica_conn_ids must be a list"),
    ({"replica_conn_ids": ["nowhere"]}, "connection 'nowhere' is not defined"),
    ({"max_replica_lag": "ten"}, "connection crm_db: extra max_replica_lag must be a number"),
    ({"max_replica_lag": 0}, "connection crm_db: extra max_replica_lag must be a number"),
])
def test_a_bad_connection_extra_is_refused_naming_the_connection_and_field(
        extra, message, monkeypatch, audit_db, keys, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", json.dumps({
        "conn_type": "mysql", "host": "127.0.0.1", "port": 1, "login": "u", "password": "s3cret-pw",
        "schema": "x", "extra": extra}))
    result = _cli_run(tmp_path)
    assert result.returncode != 0
    assert message in result.stderr
    assert "s3cret-pw" not in result.stderr + result.stdout
    assert "Traceback" not in result.stderr


def test_replica_conn_ids_on_a_postgres_connection_is_refused(pg_db, monkeypatch, audit_db, keys, tmp_path):
    monkeypatch.setenv("AIRFLOW_CONN_CRM_DB", json.dumps({
        "conn_type": "postgres", "host": pg_db.url.host, "port": pg_db.url.port, "login": pg_db.url.username,
        "schema": pg_db.url.database, "extra": {"replica_conn_ids": ["x"]}}))
    make_customers(pg_db)
    result = _cli_run(tmp_path)
    assert result.returncode != 0
    assert "replica_conn_ids is read for MariaDB/MySQL only" in result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("field", ["max_replica_lag: 0", "lag_wait_budget: -1", "maintenance: {after_rows: 0}",
                                   "maintenance: {after_row: 5}"])
def test_bad_rule_fields_are_refused_by_name(field, tmp_path):
    name, _, value = field.partition(": ")
    with pytest.raises(RuleError, match=name):
        load_rule_file(write_rule(tmp_path / "rules", targets=[{name: value}]))


# -- upkeep ----------------------------------------------------------------------------------


def _last_vacuum(db: Database):
    engine = sa.create_engine(db.url)
    try:
        with engine.connect() as conn:
            return conn.execute(sa.text(
                "SELECT last_vacuum, last_analyze FROM pg_stat_user_tables WHERE relname = 'customers'")).one()
    finally:
        engine.dispose()


@pytest.mark.parametrize(("after_rows", "ran"), [(ROWS // 2, True), (ROWS * 10, False)])
def test_pg_vacuum_analyze_runs_after_a_large_purge_only(after_rows, ran, pg_db, monkeypatch, audit_db, keys,
                                                         tmp_path):
    connect(monkeypatch, "crm_db", pg_db)
    _customers(pg_db)
    certificate = runner().run(_rule(tmp_path, maintenance=f"{{after_rows: {after_rows}}}"), run_id="r1",
                               as_of=AS_OF)
    assert certificate.status == "complete"
    (target,) = certificate.data["targets"]
    vacuumed, analyzed = _last_vacuum(pg_db)
    if ran:
        assert vacuumed is not None and analyzed is not None
        assert target["maintenance"] == {"statement": "VACUUM (ANALYZE)", "status": "done"}
    else:
        assert vacuumed is None
        assert "maintenance" not in target


def test_sqlite_analyze_runs_after_a_large_purge(sqlite_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "crm_db", sqlite_db)
    _customers(sqlite_db)
    certificate = runner().run(_rule(tmp_path, maintenance="{after_rows: 10}"), run_id="r1", as_of=AS_OF)
    assert certificate.status == "complete"
    assert certificate.data["targets"][0]["maintenance"] == {"statement": "ANALYZE", "status": "done"}
    assert sqlite_db.scalar("SELECT count(*) FROM sqlite_stat1 WHERE tbl = 'customers'") >= 1


def test_mariadb_optimize_table_runs_after_a_large_purge(mysql_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "crm_db", mysql_db)
    _customers(mysql_db)
    created = mysql_db.scalar("SELECT create_time FROM information_schema.tables WHERE table_schema = DATABASE() "
                              "AND table_name = 'customers'")
    time.sleep(1.1)  # create_time has whole seconds: OPTIMIZE (a rebuild for InnoDB) moves it on
    certificate = runner().run(_rule(tmp_path, maintenance="{after_rows: 10}"), run_id="r1", as_of=AS_OF)
    assert certificate.data["targets"][0]["maintenance"] == {"statement": "OPTIMIZE TABLE", "status": "done"}
    rebuilt = mysql_db.scalar("SELECT create_time FROM information_schema.tables WHERE table_schema = DATABASE() "
                              "AND table_name = 'customers'")
    assert rebuilt > created


def test_a_failed_upkeep_is_a_note_not_a_failed_purge(pg_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "crm_db", pg_db)
    _customers(pg_db)
    # Another session holds a lock VACUUM waits on past the lock timeout; the rows still go.
    blocker = pg_db.engine.connect()
    ready = threading.Event()
    release = threading.Event()

    def hold() -> None:
        with blocker.begin():
            blocker.execute(sa.text("LOCK TABLE customers IN SHARE UPDATE EXCLUSIVE MODE"))
            ready.set()
            release.wait(60)

    # The purge's deletes take ROW EXCLUSIVE, which SHARE UPDATE EXCLUSIVE does not block.
    thread = threading.Thread(target=hold)
    thread.start()
    ready.wait(10)
    try:
        certificate = runner().run(_rule(tmp_path, maintenance="{after_rows: 10}"), run_id="r1", as_of=AS_OF)
    finally:
        release.set()
        thread.join()
        blocker.close()
    assert certificate.status == "complete"
    assert ids(pg_db) == {ROWS + 1}
    upkeep = certificate.data["targets"][0]["maintenance"]
    assert upkeep["status"] == "failed" and upkeep["statement"] == "VACUUM (ANALYZE)"
    assert "55P03" in upkeep["error"]  # lock_not_available: a code, never data


# -- the plan (a rule PR's dry run) shows the lag it would pause on ----------------------


def _lag_notes(rule_file) -> list[str]:
    from retention.plan.builder import build_plan
    from retention.targets import Targets

    with Targets(from_environment) as targets:
        notes = build_plan(rule_file, AS_OF, targets).targets[0].notes
    return [n for n in notes if "replica lag" in n]


def test_pg_the_plan_shows_the_replicas_lag_now_and_the_limit(pg_replicas, pg_primary_db, monkeypatch, tmp_path):
    db = pg_primary_db
    connect(monkeypatch, "crm_db", db)
    _customers(db)
    (note,) = _lag_notes(_rule(tmp_path, max_replica_lag=7))
    assert note.startswith("replica lag now ") and "batches pause while it is over 7s" in note, note


def test_pg_the_plan_says_when_the_lag_cannot_be_read(pg_replicas, pg_primary_db, monkeypatch, tmp_path):
    db = pg_primary_db
    _customers(db)
    with _crm_as_a_role_without_pg_monitor(db, monkeypatch):
        (note,) = _lag_notes(_rule(tmp_path))
        assert "replica lag cannot be read" in note and "GRANT pg_monitor TO it" in note
        assert "the run would stop before its first batch" in note


def test_mariadb_the_plan_shows_a_stopped_replica_as_unknown_lag(maria_replicas, maria_primary_db, monkeypatch,
                                                                tmp_path):
    db = maria_primary_db
    _maria_connections(monkeypatch, db, maria_replicas)
    _customers(db)
    (note,) = _lag_notes(_rule(tmp_path))
    assert note.startswith("replica lag now ") and "over 10s" in note, note
    _replica_sql(maria_replicas, "STOP SLAVE")
    (note,) = _lag_notes(_rule(tmp_path))
    assert "unknown" in note and "crm_replica" in note and "batches would pause" in note, note


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_plans_say_nothing_of_replica_lag_where_there_is_no_replica(backend, sqlite_db, pg_db, monkeypatch,
                                                                    tmp_path):
    db = {"sqlite": sqlite_db, "postgresql": pg_db}[backend]  # this machine's PostgreSQL has no replica
    connect(monkeypatch, "crm_db", db)
    make_customers(db)
    assert _lag_notes(_rule(tmp_path)) == []
