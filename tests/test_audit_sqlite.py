"""A SQLite audit database: commits go through a write-ahead log, each one synced."""

from __future__ import annotations

import json

from retention.connections import from_environment
from retention.evidence.audit import open_audit


def test_a_sqlite_audit_commits_through_a_synced_write_ahead_log(tmp_path, monkeypatch):
    monkeypatch.setenv("AIRFLOW_CONN_RETENTION_AUDIT",
                       json.dumps({"conn_type": "sqlite", "host": str(tmp_path / "audit.db")}))
    engine = open_audit(from_environment)
    try:
        with engine.connect() as conn:
            assert conn.exec_driver_sql("PRAGMA journal_mode").scalar() == "wal"
            assert conn.exec_driver_sql("PRAGMA synchronous").scalar() == 2  # FULL: durable at every commit
    finally:
        engine.dispose()
    reader = open_audit(from_environment, create=False)  # a reader (verify, report) opens it as before
    try:
        with reader.connect() as conn:
            assert conn.exec_driver_sql("SELECT count(*) FROM purge_certificates").scalar() == 0
    finally:
        reader.dispose()
