"""Kill the purge (SIGKILL) at every point that matters; the next run must leave things whole.

For each point: a run is killed there, a second run completes the work. Then every
expired record is either still present or archived in an object that a certified
manifest lists and that matches its checksum (never neither); no record is archived
twice; every run has exactly one certificate; and the chain verifies, against the
signed checkpoints too.
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import subprocess
import sys
from datetime import datetime, timezone

import pytest

from retention.connections import from_environment
from retention.evidence.audit import open_audit
from retention.evidence.chain import read_certificates
from retention.evidence.checkpoints import CHECKPOINTS_ENV, read_all
from retention.evidence.signing import PublicKeys
from retention.evidence.stores import DirectoryStore
from retention.evidence.verify import verify_chain

from conftest import connect, write_rule
from test_archive import create_shop, fill_shop, snapshot

UTC = timezone.utc
AS_OF = "2026-06-15T00:00:00Z"

SQL_POINTS = [
    "run.opened=1", "run.planned=1", "purge.started=1",
    "archive.before_upload=1", "archive.before_upload=3",
    "archive.after_object=1", "archive.after_object=2", "archive.after_object=5",
    "archive.before_commit=1", "archive.before_commit=3",
    "archive.after_commit=1", "archive.after_commit=2",
    "purge.finished=1", "certify.before_append=1", "certify.after_append=1", "checkpoint.before_link=1",
]
S3_POINTS = [
    "run.opened=1", "run.planned=1", "purge.started=1",
    "s3.before_delete=1", "s3.before_delete=2", "s3.after_delete=1", "s3.after_delete=3",
    "purge.finished=1", "certify.before_append=1", "certify.after_append=1",
]


def test_there_are_at_least_twenty_kill_points():
    assert len(set(SQL_POINTS)) + len(set(S3_POINTS)) >= 20


def _run(rules_dir, run_id: str, point: str | None = None) -> subprocess.CompletedProcess:
    env = dict(os.environ)
    if point:
        env["RETENTION_FAILPOINTS"] = f"{point}:kill"
    return subprocess.run(
        [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rules_dir), "--as-of", AS_OF,
         "--run-id", run_id],
        capture_output=True, text=True, env=env,
    )


@pytest.fixture
def checkpoints(tmp_path, monkeypatch):
    """Runs write their signed checkpoints here."""
    monkeypatch.setenv(CHECKPOINTS_ENV, str(tmp_path / "checkpoints"))
    return DirectoryStore(tmp_path / "checkpoints")


def _check_chain(keys, runs: list[str], category: str, checkpoints: DirectoryStore) -> list:
    engine = open_audit(from_environment)
    certificates = [c for c in read_certificates(engine) if c.category == category]
    assert sorted(c.run_id for c in certificates) == sorted(runs)  # exactly one per run
    public = PublicKeys.from_pem_files([keys[1]])
    signed = read_all([checkpoints], public)
    assert max(signed) == max(c.seq for c in certificates)  # the last run's checkpoint is written
    assert verify_chain(engine, public, signed).ok
    return certificates


def _manifest(client, certificate):
    bucket, key = certificate.data["archive"]["manifest"][5:].split("/", 1)
    return bucket, json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


@pytest.mark.parametrize("point", SQL_POINTS)
def test_postgresql_archive_and_delete_survives_a_kill(point, pg_db, aws_server, monkeypatch, audit_db, keys,
                                                       tmp_path, checkpoints):
    bucket = "archive-" + hashlib.sha1(f"{point}{tmp_path}".encode()).hexdigest()[:12]
    aws_server.create_bucket(Bucket=bucket)
    connect(monkeypatch, "shop_db", pg_db)
    create_shop(pg_db)
    expired = fill_shop(pg_db, orders=24)
    text = (
        "category: orders\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P10Y\naction: archive\n"
        f"archive: {{connection: aws_default, bucket: {bucket}, prefix: orders/}}\n"
        "targets:\n  - name: orders\n    kind: sql\n    connection: shop_db\n    table: orders\n    key: [id]\n"
        "    age_column: placed_at\n    max_fraction: 1.0\n    max_batch_rows: 3\n"
        "    children:\n      - {table: order_items, foreign_key: [order_id]}\n"
    )
    rules_dir = write_rule(tmp_path / "rules", "orders", text=text).parent

    killed = _run(rules_dir, "killed", point)
    assert killed.returncode == -9, killed.stderr
    finished = _run(rules_dir, "next")
    assert finished.returncode == 0, finished.stderr

    certificates = _check_chain(keys, ["killed", "next"], "orders", checkpoints)
    present = set(snapshot(pg_db, "orders"))
    items_present = {i["order_id"] for i in snapshot(pg_db, "order_items").values()}
    archived_orders, archived_items = [], []
    listed_in_manifests = set()
    for certificate in certificates:
        archive_bucket, manifest = _manifest(aws_server, certificate)
        for obj in manifest["objects"]:
            body = aws_server.get_object(Bucket=archive_bucket, Key=obj["key"])["Body"].read()
            assert hashlib.sha256(body).hexdigest() == obj["sha256"]  # archived and verified
            listed_in_manifests.add(obj["key"])
            lines = [json.loads(line) for line in gzip.decompress(body).splitlines()]
            if obj["table"] == "orders":
                archived_orders += [r["id"] for r in lines]
            else:
                archived_items += [r["order_id"] for r in lines]
    assert len(archived_orders) == len(set(archived_orders))  # none archived twice
    assert sorted(archived_orders) == sorted(expired - present)  # present, or archived: never neither
    assert present.isdisjoint(expired)  # and the second run finished the job
    assert sorted(archived_items) == sorted(i for i in expired for _ in (1, 2))
    assert items_present.isdisjoint(expired)
    data_objects = {o["Key"] for o in aws_server.list_objects_v2(Bucket=bucket).get("Contents", [])
                    if not o["Key"].endswith("manifest.json")}
    assert data_objects == listed_in_manifests  # nothing left behind by the killed run


@pytest.mark.parametrize("point", S3_POINTS)
def test_s3_archive_survives_a_kill(point, aws_server, audit_db, keys, tmp_path, checkpoints):
    suffix = hashlib.sha1(f"{point}{tmp_path}".encode()).hexdigest()[:12]
    source, archive = f"src-{suffix}", f"arc-{suffix}"
    aws_server.create_bucket(Bucket=source)
    aws_server.create_bucket(Bucket=archive)
    expired = {f"r/2010/01/{day:02d}/{n}.pdf" for day in range(1, 11) for n in range(3)}
    kept = {"r/2025/01/01/new.pdf"}
    for key in expired | kept:
        aws_server.put_object(Bucket=source, Key=key, Body=key.encode())
    text = (
        "category: receipts\ndescription: d\nowner: o\nlegal_basis: l\nretain_for: P7Y\naction: archive\n"
        f"archive: {{connection: aws_default, bucket: {archive}, prefix: receipts/, storage_class: GLACIER}}\n"
        f"targets:\n  - {{name: receipts, kind: s3, connection: aws_default, bucket: {source}, prefix: r/,\n"
        "     age_from: key_date, key_date_format: 'r/%Y/%m/%d/', max_fraction: 1.0,\n"
        "     concurrency: 1, max_batch_keys: 7}\n"
    )
    rules_dir = write_rule(tmp_path / "rules", "receipts", text=text).parent

    killed = _run(rules_dir, "killed", point)
    assert killed.returncode == -9, killed.stderr
    finished = _run(rules_dir, "next")
    assert finished.returncode == 0, finished.stderr

    certificates = _check_chain(keys, ["killed", "next"], "receipts", checkpoints)
    present = {o["Key"] for o in aws_server.list_objects_v2(Bucket=source).get("Contents", [])}
    copies = []
    for certificate in certificates:
        _, manifest = _manifest(aws_server, certificate)
        for copy in manifest["s3_objects"]:
            head = aws_server.head_object(Bucket=archive, Key=copy["key"])
            assert head["ContentLength"] == len(copy["source"].encode())  # the copy is there and whole
            copies.append(copy["source"])
    assert len(copies) == len(set(copies))  # none archived twice
    assert sorted(copies) == sorted(expired)  # each went, archived
    assert present == kept
    stored = {o["Key"] for o in aws_server.list_objects_v2(Bucket=archive).get("Contents", [])
              if not o["Key"].endswith("manifest.json")}
    assert len(stored) == len(expired)  # no stray copies


__all__ = ["datetime", "UTC"]
