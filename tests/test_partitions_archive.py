"""Whole partitions archived on PostgreSQL and MariaDB: an archive run streams every partition
before the cutoff to verified archive objects and only then drops it; the boundary partition
(and a partition a hold keeps a row of) goes by batches; restore brings every row back; a
crash between upload and drop settles on the next run without losing or duplicating a row."""

from __future__ import annotations

import gzip
import json
import uuid

import boto3
import pytest
import sqlalchemy as sa
from moto import mock_aws

from retention.connections import from_environment
from retention.evidence.audit import open_audit, purge_batches
from retention.holds import HoldRegistry
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file
from test_partitions import (
    AS_OF,
    CUSTOMERS,
    DAYS,
    OLD_MONTHS,
    _create_mariadb,
    _create_pg,
    _expired,
    _fill,
    _name,
    _partitions,
    killed_then_finished,
)

from conftest import connect, write_rule
from sqlpurge import ids, runner

ARCHIVE = "partarchive-archive"
PER_PARTITION = len(DAYS) * len(CUSTOMERS)  # 9 rows: with max_batch_rows 4, three objects each


@pytest.fixture
def aws(monkeypatch):
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):
        monkeypatch.setenv(name, "testing")
    monkeypatch.setenv("AIRFLOW_CONN_AWS_DEFAULT", json.dumps(
        {"conn_type": "aws", "login": "testing", "password": "testing", "extra": {"region_name": "us-east-1"}}))
    with mock_aws():
        client = boto3.client("s3", region_name="us-east-1")
        client.create_bucket(Bucket=ARCHIVE)
        yield client


def _create(db, scheme: str) -> None:
    if db.backend == "postgresql":
        _create_pg(db)
    else:
        _create_mariadb(db, scheme=scheme or "columns")


@pytest.fixture(params=["postgresql", "mariadb", "mariadb-to_days"])
def shop(request, monkeypatch, audit_db, keys):
    """The events table of test_partitions (partitioned by month), reachable as shop_db; its rows."""
    backend, _, scheme = request.param.partition("-")
    db = request.getfixturevalue("pg_db" if backend == "postgresql" else "mysql_db")
    connect(monkeypatch, "shop_db", db)
    _create(db, scheme)
    return db, _fill(db), scheme


def _rule(tmp_path, bucket: str = ARCHIVE, batch: int = 4, fmt: str = "jsonl.gz", extra: str = ""):
    text = (
        "category: customer_accounts\ndescription: Events kept two years\nowner: test-team\n"
        "legal_basis: Tests\nretain_for: P2Y\naction: archive\n"
        f"archive:\n  connection: aws_default\n  bucket: {bucket}\n  prefix: events/\n  format: {fmt}\n"
        "targets:\n  - name: events\n    kind: sql\n    connection: shop_db\n    table: events\n"
        f"    key: [id, created_at]\n    age_column: created_at\n    max_fraction: 1.0\n    max_batch_rows: {batch}\n{extra}"
    )
    return load_rule_file(write_rule(tmp_path / "rules", text=text))


def _archived(client, bucket: str, certificate_data: dict) -> list[dict]:
    """Every row object the run's manifest lists (checked against its SHA-256), with its rows read back."""
    if "archive" not in certificate_data:
        return []
    manifest_bucket, key = certificate_data["archive"]["manifest"][5:].split("/", 1)
    manifest = json.loads(client.get_object(Bucket=manifest_bucket, Key=key)["Body"].read())
    objects = []
    for obj in manifest["objects"]:
        body = client.get_object(Bucket=bucket, Key=obj["key"])["Body"].read()
        rows = [json.loads(line) for line in gzip.decompress(body).splitlines()]
        assert len(rows) == obj["rows"]
        objects.append({**obj, "ids": [row["id"] for row in rows]})
    return objects


def _partition_batches(run_id: str) -> dict[str, int]:
    """Done batches of ``run_id`` that the journal says archived a whole partition: name -> rows."""
    with open_audit(from_environment).connect() as conn:
        found = conn.execute(sa.select(purge_batches.c.bounds, purge_batches.c.rows_done).where(
            purge_batches.c.run_id == run_id, purge_batches.c.state == "done")).all()
    return {json.loads(bounds)["partition"]: rows for bounds, rows in found if '"partition"' in bounds}


def _events(db) -> dict[int, tuple]:
    return {r[0]: tuple(r[1:]) for r in db.rows("SELECT id, customer_id, created_at, note FROM events")}


def test_old_partitions_are_archived_whole_and_restore_brings_every_row_back(shop, aws, tmp_path, monkeypatch,
                                                                            new_database):
    db, rows, scheme = shop
    expired = _expired(rows)
    before = _events(db)
    names = _partitions(db, tmp_path)
    old = {_name(db.backend, m) for m in OLD_MONTHS}
    r = runner()
    rule_file = _rule(tmp_path)
    run, _ = r.start(rule_file, run_id="r1", as_of=AS_OF)
    # Read before certifying: certifying scrubs what the journal keeps of each batch.
    r.purge(rule_file, run, "events")
    assert _partition_batches("r1") == {name: PER_PARTITION for name in old}
    certificate = r.certify(run)

    assert ids(db, "events") == set(rows) - expired  # exactly the expired set
    assert certificate.status == "complete"
    (target,) = certificate.data["targets"]
    assert target["partitions"] == {name: PER_PARTITION for name in old}
    assert target["deleted"] == len(expired)
    # The boundary partition's expired rows (June 1st and 10th) went in batches of rows.
    assert target["deleted"] - sum(target["partitions"].values()) == 2 * len(CUSTOMERS)
    assert _partitions(db, tmp_path) == names - old
    objects = _archived(aws, ARCHIVE, certificate.data)
    archived = [i for obj in objects for i in obj["ids"]]
    assert sorted(archived) == sorted(expired)  # every expired row, each in exactly one object
    whole = [obj for obj in objects if "-" in obj["key"].rsplit("/", 1)[1].split(".")[0]]
    assert len(whole) == 3 * len(OLD_MONTHS)  # nine rows a partition, at most four an object
    assert {i for obj in whole for i in obj["ids"]} == {i for i in expired if rows[i][1].month in OLD_MONTHS}

    fresh = new_database(db.backend)
    _create(fresh, scheme)
    connect(monkeypatch, "restored_db", fresh)
    assert main(["restore", certificate.data["archive"]["manifest"], "--into", "restored_db"]) == 0
    assert _events(fresh) == {i: before[i] for i in expired}


def test_a_hold_inside_an_old_partition_keeps_that_partition_to_batches(shop, aws, tmp_path):
    db, rows, _scheme = shop
    march = next(i for i, (customer, at) in rows.items() if at.month == 3 and customer == 2)
    HoldRegistry(open_audit(from_environment)).add(
        category="customer_accounts", match={"id": march}, case_id="C-1", reason="dispute")

    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)

    expired = _expired(rows, keep=lambda i, _c: i == march)
    assert ids(db, "events") == set(rows) - expired
    (target,) = certificate.data["targets"]
    assert set(target["partitions"]) == {_name(db.backend, m) for m in OLD_MONTHS if m != 3}
    assert target["held"] == 1
    assert _name(db.backend, 3) in _partitions(db, tmp_path)
    assert sorted(i for obj in _archived(aws, ARCHIVE, certificate.data) for i in obj["ids"]) == sorted(expired)


# After the second object of a partition, after its objects verified (before the drop), between
# PostgreSQL's detach and drop (one transaction), and after the drop before the journal knew.
CRASHES = [(backend, point) for backend in ("postgresql", "mariadb", "mariadb-to_days")
           for point in ("archive.after_object=2", "archive.partition_uploaded=1", "archive.partition_uploaded=3",
                         "sql.partition_dropped=2")] + [("postgresql", "sql.partition_detached=2")]


@pytest.mark.parametrize(("shop", "point"), CRASHES, indirect=["shop"])
def test_a_crash_between_upload_and_drop_settles_on_the_next_run(shop, aws_server, tmp_path, point):
    db, rows, _scheme = shop
    bucket = f"partarchive-{uuid.uuid4().hex[:12]}"  # the moto server is shared by the session
    aws_server.create_bucket(Bucket=bucket)
    certificates = killed_then_finished(db, rows, _rule(tmp_path, bucket).path.parent, point, tmp_path)
    expired = _expired(rows)
    archived, keys = [], set()
    for run in ("killed", "next"):
        for obj in _archived(aws_server, bucket, certificates[run]):
            archived += obj["ids"]
            keys.add(obj["key"])
        keys.add(certificates[run]["archive"]["manifest"].split("/", 3)[3])
    assert sorted(archived) == sorted(expired)  # nothing lost, nothing archived twice
    listed = {o["Key"] for o in aws_server.list_objects_v2(Bucket=bucket).get("Contents", [])}
    assert listed == keys  # no debris of the killed attempt
    dropped = {**certificates["killed"]["targets"][0].get("partitions", {}),
               **certificates["next"]["targets"][0].get("partitions", {})}
    assert dropped == {_name(db.backend, m): PER_PARTITION for m in OLD_MONTHS}


def test_parquet_partitions_are_read_row_by_row_and_restore_too(pg_db, aws, monkeypatch, audit_db, keys, tmp_path,
                                                                 new_database):
    connect(monkeypatch, "shop_db", pg_db)
    _create_pg(pg_db)
    rows = _fill(pg_db)
    before = _events(pg_db)

    certificate = runner().run(_rule(tmp_path, fmt="parquet"), run_id="r1", as_of=AS_OF)

    expired = _expired(rows)
    assert ids(pg_db, "events") == set(rows) - expired
    assert certificate.data["targets"][0]["partitions"] == {_name("postgresql", m): PER_PARTITION for m in OLD_MONTHS}
    fresh = new_database("postgresql")
    _create_pg(fresh)
    connect(monkeypatch, "restored_db", fresh)
    assert main(["restore", certificate.data["archive"]["manifest"], "--into", "restored_db"]) == 0
    assert _events(fresh) == {i: before[i] for i in expired}


def test_an_upload_that_fails_midway_drops_nothing_and_leaves_no_object(shop, aws, tmp_path, monkeypatch):
    db, rows, _scheme = shop
    monkeypatch.setenv("RETENTION_FAILPOINTS", "archive.after_object=2:raise")  # January's second object

    failed = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)

    assert failed.status != "complete"
    assert ids(db, "events") == set(rows)  # January was the first: nothing went
    assert _name(db.backend, 1) in _partitions(db, tmp_path)
    assert aws.list_objects_v2(Bucket=ARCHIVE, Prefix="events/customer_accounts/run=r1/events/").get("KeyCount") == 0
    monkeypatch.delenv("RETENTION_FAILPOINTS")

    certificate = runner().run(_rule(tmp_path), run_id="r2", as_of=AS_OF)

    expired = _expired(rows)
    assert ids(db, "events") == set(rows) - expired
    assert sorted(i for obj in _archived(aws, ARCHIVE, certificate.data) for i in obj["ids"]) == sorted(expired)


def test_on_mariadb_a_partition_changed_while_archived_is_not_dropped_but_walked(mysql_db, aws, monkeypatch, audit_db,
                                                                                keys, tmp_path):
    from retention.targets.sql import partitions_archive

    connect(monkeypatch, "shop_db", mysql_db)
    _create_mariadb(mysql_db)
    rows = _fill(mysql_db)
    january = min(rows)
    verified = partitions_archive._PartitionArchive.verified

    def edited_meanwhile(self):
        if self.partition.name == "p2024_01":  # another session edits a row once its object is written
            mysql_db.execute("UPDATE events SET note = 'edited' WHERE id = :id", {"id": january})
        return verified(self)

    monkeypatch.setattr(partitions_archive._PartitionArchive, "verified", edited_meanwhile)

    certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)

    expired = _expired(rows)
    assert ids(mysql_db, "events") == set(rows) - expired
    (target,) = certificate.data["targets"]
    assert set(target["partitions"]) == {_name("mariadb", m) for m in OLD_MONTHS if m != 1}
    objects = _archived(aws, ARCHIVE, certificate.data)
    assert sorted(i for obj in objects for i in obj["ids"]) == sorted(expired)  # January's rows once, by batches
    listed = {o["Key"] for o in aws.list_objects_v2(Bucket=ARCHIVE, Prefix="events/customer_accounts/run=r1/events/")[
        "Contents"]}
    assert listed == {obj["key"] for obj in objects}  # the objects of the attempt that saw the edit are gone
    notes = {}
    for obj in objects:
        body = aws.get_object(Bucket=ARCHIVE, Key=obj["key"])["Body"].read()
        notes.update({r["id"]: r["note"] for r in map(json.loads, gzip.decompress(body).splitlines())})
    assert notes[january] == "edited"  # the archive holds the row as it was deleted


def test_on_mariadb_a_table_another_transaction_holds_is_archived_by_batches(mysql_db, aws, monkeypatch, audit_db,
                                                                             keys, tmp_path):
    connect(monkeypatch, "shop_db", mysql_db)
    _create_mariadb(mysql_db)
    rows = _fill(mysql_db)
    names = _partitions(mysql_db, tmp_path)

    with mysql_db.engine.connect() as reader:
        # An open transaction that read the table holds its metadata lock: the partitions are
        # archived, but none can be dropped; their objects go and the rows go by batches.
        reader.execute(sa.text("SELECT id FROM events WHERE created_at < '2024-02-01' LIMIT 1")).all()
        certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)
        reader.rollback()

    expired = _expired(rows)
    assert ids(mysql_db, "events") == set(rows) - expired
    assert certificate.status == "complete"
    assert "partitions" not in certificate.data["targets"][0]
    assert _partitions(mysql_db, tmp_path) == names
    objects = _archived(aws, ARCHIVE, certificate.data)
    assert sorted(i for obj in objects for i in obj["ids"]) == sorted(expired)
    listed = {o["Key"] for o in aws.list_objects_v2(Bucket=ARCHIVE, Prefix="events/customer_accounts/run=r1/events/")[
        "Contents"]}
    assert listed == {obj["key"] for obj in objects}


def test_copy_output_is_cut_into_objects_of_at_most_the_batch_rows_whatever_the_writes():
    from retention.targets.sql.partitions_archive import _Chunks

    objects = []
    chunks = _Chunks(4, lambda body, rows: objects.append((gzip.decompress(body), rows)))
    lines = [b'{"id":%d}\n' % i for i in range(1, 12)]
    for write in (lines[0], b"".join(lines[1:7]), lines[7], memoryview(b"".join(lines[8:]))):  # 1, 6, 1, 3 rows
        chunks.write(write)
    chunks.finish()

    assert [rows for _, rows in objects] == [4, 4, 3]
    assert b"".join(body for body, _ in objects) == b"".join(lines)
    assert all(body.count(b"\n") == rows for body, rows in objects)


def test_on_postgresql_an_open_writer_on_the_table_sends_every_partition_to_batches(pg_db, aws, monkeypatch, audit_db,
                                                                                  keys, tmp_path):
    connect(monkeypatch, "shop_db", pg_db)
    _create_pg(pg_db)
    rows = _fill(pg_db)
    names = _partitions(pg_db, tmp_path)
    july = next(i for i, (_customer, at) in rows.items() if at.month == 7)

    with pg_db.engine.connect() as writer:
        # An open transaction that wrote a row the run keeps holds the parent: the detach
        # that ends each partition's archive cannot get its lock within the lock timeout, so
        # each partition's objects are removed and its rows archived by batches instead.
        writer.execute(sa.text("UPDATE events SET note = 'busy' WHERE id = :id"), {"id": july})
        certificate = runner().run(_rule(tmp_path), run_id="r1", as_of=AS_OF)
        writer.rollback()

    expired = _expired(rows)
    assert certificate.status == "complete"
    assert ids(pg_db, "events") == set(rows) - expired
    assert "partitions" not in certificate.data["targets"][0]
    assert _partitions(pg_db, tmp_path) == names
    objects = _archived(aws, ARCHIVE, certificate.data)
    assert sorted(i for obj in objects for i in obj["ids"]) == sorted(expired)  # each once, by batches
    listed = {o["Key"] for o in aws.list_objects_v2(Bucket=ARCHIVE, Prefix="events/customer_accounts/run=r1/events/")[
        "Contents"]}
    assert listed == {obj["key"] for obj in objects}  # the attempts at whole partitions left nothing
