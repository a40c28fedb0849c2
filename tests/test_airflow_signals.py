"""What a purge tells the platform (issue #12 item 5): metrics, asset events, the pager line, the pool guard.

The metrics test runs a DAG with dag.test() while Airflow's metrics interface exports to
an OTLP/HTTP receiver this test listens on. (StatsD would be the same ``stats`` calls over
UDP, but the ``statsd`` client package is not installed here, and Airflow then falls back
to sending nothing; OpenTelemetry's exporter is installed.)
"""

from __future__ import annotations

import json
import threading
import time
from datetime import datetime, timedelta, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from test_airflow_dags import airflow_db, rule_dag  # noqa: F401  (airflow_db is a fixture)

from conftest import connect, write_rule
from sqlpurge import ids, insert_customers, make_customers

pytestmark = pytest.mark.airflow

UTC = timezone.utc
LOGICAL = datetime(2026, 6, 15, 3, 0, tzinfo=UTC)
CUTOFF = datetime(2024, 6, 15, 3, 0, tzinfo=UTC)  # P2Y before LOGICAL
FREEZE_ORDERS = """
CREATE FUNCTION frozen() RETURNS trigger AS $$
BEGIN
  IF OLD.id < 20 THEN RAISE EXCEPTION 'orders are frozen for a migration'; END IF;
  RETURN OLD;
END $$ LANGUAGE plpgsql;
CREATE TRIGGER frozen BEFORE DELETE ON orders FOR EACH ROW EXECUTE FUNCTION frozen();
"""


class _Receiver(BaseHTTPRequestHandler):
    def do_POST(self):  # noqa: N802 (http.server's name)
        from opentelemetry.proto.collector.metrics.v1.metrics_service_pb2 import ExportMetricsServiceRequest

        body = self.rfile.read(int(self.headers["Content-Length"]))
        request = ExportMetricsServiceRequest.FromString(body)
        for resource in request.resource_metrics:
            for scope in resource.scope_metrics:
                for metric in scope.metrics:
                    for point in metric.gauge.data_points:
                        tags = {a.key: a.value.string_value for a in point.attributes}
                        value = point.as_double if point.HasField("as_double") else point.as_int
                        self.server.received[metric.name] = (value, tags)
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture
def metrics(monkeypatch):
    """Airflow's [metrics] pointed at an OTLP/HTTP receiver here; yields what it received, by name."""
    from airflow.sdk.configuration import conf
    from airflow.sdk.observability import stats
    from airflow.sdk.observability.metrics.stats_utils import get_stats_factory

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Receiver)
    server.received = {}
    threading.Thread(target=server.serve_forever, daemon=True).start()
    settings = {"OTEL_ON": "True", "OTEL_HOST": "127.0.0.1", "OTEL_PORT": str(server.server_address[1]),
                "OTEL_PREFIX": "airflow", "OTEL_INTERVAL_MILLISECONDS": "200"}
    for key, value in settings.items():
        monkeypatch.setenv(f"AIRFLOW__METRICS__{key}", value)

    def initialize():  # what the task runner does when a task process starts
        stats.initialize(factory=get_stats_factory(), export_legacy_names=conf.getboolean("metrics", "legacy_names_on"))

    initialize()
    try:
        yield server.received
    finally:
        from opentelemetry import metrics as otel

        otel.get_meter_provider().shutdown()  # its exporter thread would go on sending to a closed port
        for key in settings:
            monkeypatch.delenv(f"AIRFLOW__METRICS__{key}")
        initialize()
        server.shutdown()


def _wait_for(received: dict, names: list[str], timeout: float = 20) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline and not all(n in received for n in names):
        time.sleep(0.1)
    return {n: received.get(n) for n in names}


def _shop(pg_db, monkeypatch, tmp_path, request):
    """customers (all expired, id 2 held) and orders (its 19 newest rows frozen) on crm_db."""
    from retention.interfaces.cli import main

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", request.getfixturevalue("mysql_db").airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    make_customers(pg_db, table="orders")
    insert_customers(pg_db, [(i, "closed", datetime(2019, 1, 1, tzinfo=UTC)) for i in range(1, 51)])
    insert_customers(pg_db, [(i, "closed", CUTOFF - timedelta(days=i)) for i in range(1, 51)], table="orders")
    rules = tmp_path / "rules"
    write_rule(rules, targets=[{"max_batch_rows": 10}, {"name": "orders", "table": "orders", "max_batch_rows": 10}])
    assert main(["hold", "add", "--category", "customer_accounts", "--match", '{"id": 2}', "--case", "C-2",
                 "--reason", "dispute", "--rules", str(rules)]) == 0
    return rules


def test_purge_tasks_send_purged_held_failed_and_lag_through_airflow_metrics(
    airflow_db, metrics, pg_db, monkeypatch, keys, tmp_path, request  # noqa: F811
):
    from airflow.utils.state import DagRunState

    rules = _shop(pg_db, monkeypatch, tmp_path, request)
    pg_db.execute(FREEZE_ORDERS)
    dag = rule_dag(rules, "retention__customer_accounts", monkeypatch)

    dag_run = dag.test(logical_date=LOGICAL)

    assert dag_run.state == DagRunState.FAILED
    left = ids(pg_db, "orders") - {2}
    assert 0 < len(left) < 49 and min(left) == 1  # the purge walked oldest first; the frozen rows stopped it
    names = [f"airflow.retention.{m}.customer_accounts.{t}" for t in ("customers", "orders")
             for m in ("purged", "held", "failed", "lag_seconds")]
    got = _wait_for(metrics, names)
    assert {n: v and v[0] for n, v in got.items()} == {
        "airflow.retention.purged.customer_accounts.customers": 49,
        "airflow.retention.held.customer_accounts.customers": 1,
        "airflow.retention.failed.customer_accounts.customers": 0,
        "airflow.retention.lag_seconds.customer_accounts.customers": 0,
        "airflow.retention.purged.customer_accounts.orders": 49 - len(left),
        "airflow.retention.held.customer_accounts.orders": 0,  # the walk stopped before it met id 2
        "airflow.retention.failed.customer_accounts.orders": len(left),
        # the oldest row left expired max(left) days before the run's cutoff
        "airflow.retention.lag_seconds.customer_accounts.orders": timedelta(days=max(left)).total_seconds(),
    }
    assert got["airflow.retention.failed.customer_accounts.orders"][1] == {
        "category": "customer_accounts", "target": "orders"}


def test_a_failed_run_pages_in_one_line_with_category_targets_and_seq(
    airflow_db, pg_db, monkeypatch, keys, tmp_path, request, capfd  # noqa: F811
):
    from retention.evidence.chain import read_certificates
    from retention.interfaces.airflow_signals import pager_line

    rules = _shop(pg_db, monkeypatch, tmp_path, request)
    pg_db.execute(FREEZE_ORDERS)
    dag = rule_dag(rules, "retention__customer_accounts", monkeypatch)

    dag.test(logical_date=LOGICAL)

    audit = request.getfixturevalue("mysql_db")
    [certificate] = list(read_certificates(audit.engine))
    line = pager_line(certificate)
    assert line == (f"retention customer_accounts: run partial: certificate seq {certificate.seq}; "
                    "orders failed: RaiseException (code P0001)")
    assert line in capfd.readouterr().out  # the certify task failed with it


def test_the_pager_line_is_one_line_without_secrets_and_truncated():
    from retention.connections import ConnectionSpec
    from retention.evidence.chain import Certificate
    from retention.interfaces.airflow_signals import PAGER_REASON_CHARS, pager_line

    ConnectionSpec.from_uri("crm_db", "postgres://purger:s3cr3t-pw@db:5432/crm")  # the process now knows it
    targets = [
        {"name": "customers", "status": "complete", "error": None},
        {"name": "orders", "status": "failed", "error": "OperationalError: could not connect with s3cr3t-pw\nretry"},
        {"name": "archive", "status": "failed", "error": "ConfigError: bad url postgres://u:hunter22@h/x " + "x" * 300},
        {"name": "carts", "status": "failed", "error": None},
    ]
    certificate = Certificate(seq=7, category="shop", run_id="r", status="failed", issued_at=datetime.now(UTC),
                              payload="", signature="", key_id="", prev_hash="", entry_hash="",
                              data={"targets": targets})

    line = pager_line(certificate)

    assert line.startswith("retention shop: run failed: certificate seq 7; orders failed: OperationalError")
    assert "\n" not in line and "s3cr3t-pw" not in line and "hunter22" not in line
    assert "customers" not in line and "carts failed: not run" in line
    reasons = line.split("; ")[1:]
    assert all(len(r.split(" failed: ", 1)[1]) <= PAGER_REASON_CHARS for r in reasons)


def test_a_dag_run_emits_one_asset_event_per_target(airflow_db, pg_db, monkeypatch, keys, tmp_path):  # noqa: F811
    from airflow.models.asset import AssetEvent
    from airflow.utils.session import create_session
    from airflow.utils.state import DagRunState
    from sqlalchemy import select

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    connect(monkeypatch, "shop_db", pg_db)  # a second connection: a second mapped purge task
    for table in ("customers", "orders", "invoices"):
        make_customers(pg_db, table=table)
        insert_customers(pg_db, [(i, "closed", datetime(2019, 1, 1, tzinfo=UTC)) for i in range(1, 4)], table=table)
    write_rule(tmp_path / "rules", targets=[{}, {"name": "orders", "table": "orders"},
                                            {"name": "invoices", "table": "public.invoices", "connection": "shop_db"}])
    dag = rule_dag(tmp_path / "rules", "retention__customer_accounts", monkeypatch)

    dag_run = dag.test(logical_date=LOGICAL)

    assert dag_run.state == DagRunState.SUCCESS
    with create_session() as session:
        events = session.scalars(select(AssetEvent).where(AssetEvent.source_run_id == dag_run.run_id)).all()
        found = {e.uri: (e.source_task_id, e.extra) for e in events}
    assert len(events) == 3
    extra = {"category": "customer_accounts", "run_id": dag_run.run_id, "purged": 3, "held": 0}
    assert found == {
        "retention://crm_db/customers": ("purge__crm_db", {**extra, "target": "customers"}),
        "retention://crm_db/orders": ("purge__crm_db", {**extra, "target": "orders"}),
        "retention://shop_db/public.invoices": ("purge__shop_db", {**extra, "target": "invoices"}),
    }


def test_asset_uris_are_well_formed_for_sql_and_s3(tmp_path):
    from airflow.sdk import Asset

    from retention.interfaces.airflow_signals import asset_uri
    from retention.rules.loader import load_rule_file

    path = write_rule(tmp_path, "exports", text=(
        "category: exports\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P1Y\naction: delete\ntargets:\n"
        "  - {name: files, kind: s3, connection: aws_default, bucket: exp-bucket, prefix: 'raw data/2024/'}\n"
        "  - {name: bare, kind: s3, connection: aws_default, bucket: exp-bucket}\n"
        "  - {name: rows, kind: sql, connection: crm.db, table: app.customers, key: [id], age_column: at}\n"
    ))
    targets = load_rule_file(path).rule.targets

    uris = [asset_uri(t) for t in targets]

    assert uris == ["retention://aws_default/exp-bucket/raw%20data/2024", "retention://aws_default/exp-bucket",
                    "retention://crm.db/app.customers"]
    assert [Asset(u).uri for u in uris] == uris  # Airflow keeps them as they are


def test_a_missing_pool_fails_the_plan_naming_sync_pools(
    airflow_db, pg_db, monkeypatch, keys, tmp_path, capfd  # noqa: F811
):
    from airflow.utils.state import DagRunState

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(1, "closed", datetime(2019, 1, 1, tzinfo=UTC))])
    write_rule(tmp_path / "rules")
    dag = rule_dag(tmp_path / "rules", "retention__customer_accounts", monkeypatch, pools_synced=False)
    # sync-pools ran for other rules, before this rule's connection existed
    monkeypatch.setenv("AIRFLOW_VAR_RETENTION_POOLS", json.dumps(["retention__shop_db"]))

    dag_run = dag.test(logical_date=LOGICAL)

    assert dag_run.state == DagRunState.FAILED
    assert ids(pg_db) == {1}  # nothing was touched
    states = {ti.task_id: ti.state for ti in dag_run.get_task_instances()}
    assert states["plan"] == "failed"
    assert not _has_table(pg_db, "purge_runs") or pg_db.rows("SELECT run_id FROM purge_runs") == []
    assert "pool retention__crm_db was not set by `retention airflow sync-pools`" in capfd.readouterr().out


def test_the_pool_guard_explains_itself():
    from retention.interfaces.pools import unsynced_advice, unsynced_pools

    assert unsynced_pools(["retention__crm_db", "retention__crm_db"], None) == ["retention__crm_db"]
    assert unsynced_pools(["retention__crm_db"], ["retention__crm_db"]) == []
    assert unsynced_pools(["retention__crm_db"], {"not": "a list"}) == ["retention__crm_db"]
    message = unsynced_advice("customer_accounts", ["retention__crm_db"], ["retention__shop_db"])
    assert message.startswith("retention customer_accounts: pool retention__crm_db was not set by "
                              "`retention airflow sync-pools`")
    assert "Variable retention_pools does not list it" in message and "\n" not in message
    assert "is not set" in unsynced_advice("c", ["retention__crm_db"], None)


def test_sync_pools_records_the_pools_so_the_plan_lets_the_purge_run(
    airflow_db, pg_db, monkeypatch, keys, tmp_path  # noqa: F811
):
    from airflow.models.pool import Pool
    from airflow.models.variable import Variable
    from airflow.utils.state import DagRunState

    from retention.interfaces.cli import main

    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT", pg_db.airflow_uri)
    connect(monkeypatch, "crm_db", pg_db)
    make_customers(pg_db)
    insert_customers(pg_db, [(1, "closed", datetime(2019, 1, 1, tzinfo=UTC))])
    write_rule(tmp_path / "rules")
    dag = rule_dag(tmp_path / "rules", "retention__customer_accounts", monkeypatch, pools_synced=False)
    try:
        assert main(["airflow", "sync-pools", "--rules", str(tmp_path / "rules")]) == 0
        assert Pool.get_pool("retention__crm_db") is not None
        assert json.loads(Variable.get("retention_pools")) == ["retention__crm_db"]

        dag_run = dag.test(logical_date=LOGICAL)
    finally:
        Variable.delete("retention_pools")  # the metadata database outlives this test

    assert dag_run.state == DagRunState.SUCCESS
    assert ids(pg_db) == set()


def _has_table(db, name: str) -> bool:
    import sqlalchemy as sa

    return sa.inspect(db.engine).has_table(name)
