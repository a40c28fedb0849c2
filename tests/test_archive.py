"""Archive, then delete: round trips, failures that delete nothing, children, foreign keys."""

from __future__ import annotations

import gzip
import json
import os
import subprocess
import sys
import threading
from datetime import date, datetime, timedelta, timezone
from decimal import Decimal

import boto3
import pytest
import sqlalchemy as sa
from moto import mock_aws

from retention import failpoints
from retention.archive.store import ArchiveStore
from retention.connections import from_environment
from retention.errors import RuleError
from retention.evidence.audit import open_audit
from retention.evidence.chain import find_certificate
from retention.evidence.signing import Signer
from retention.failpoints import InjectedFault
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file
from retention.run.journal import RunJournal
from retention.run.runner import Runner
from retention.targets import Targets

from conftest import connect, write_rule

UTC = timezone.utc
AS_OF = datetime(2026, 6, 15, tzinfo=UTC)
CUTOFF = datetime(2016, 6, 15, tzinfo=UTC)  # P10Y
ARCHIVE = "retention-archive"

TIMESTAMP = {"postgresql": "TIMESTAMPTZ", "mariadb": "DATETIME(6)", "sqlite": "TIMESTAMP"}
BLOB = {"postgresql": "BYTEA", "mariadb": "BLOB", "sqlite": "BLOB"}


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


def create_shop(db, *, foreign_key: bool = True) -> None:
    ts, blob = TIMESTAMP[db.backend], BLOB[db.backend]
    db.execute(
        f"CREATE TABLE orders (id INTEGER PRIMARY KEY, customer_email VARCHAR(100) NOT NULL, "
        f"total NUMERIC(10, 2) NOT NULL, paid BOOLEAN NOT NULL, placed_at {ts} NOT NULL, "
        f"ship_date DATE, notes TEXT, receipt {blob})"
    )
    db.execute("CREATE INDEX orders_placed_at ON orders (placed_at)")
    reference = "REFERENCES orders (id)" if foreign_key else ""
    db.execute(
        f"CREATE TABLE order_items (id INTEGER PRIMARY KEY, order_id INTEGER NOT NULL {reference}, "
        f"sku VARCHAR(20) NOT NULL, qty INTEGER NOT NULL, price NUMERIC(10, 2) NOT NULL)"
    )
    db.execute("CREATE INDEX order_items_order_id ON order_items (order_id)")


def fill_shop(db, orders: int = 40, expired_every: int = 3) -> set[int]:
    """Orders 1..n, every third expired, two items each; returns the expired order ids."""
    expired = set()
    order_rows, item_rows = [], []
    for i in range(1, orders + 1):
        old = i % expired_every == 0
        placed = (CUTOFF - timedelta(days=i, microseconds=1001 * i)) if old else (CUTOFF + timedelta(days=i))
        if old:
            expired.add(i)
        order_rows.append({
            "id": i, "customer_email": f"buyer{i}@example.com", "total": Decimal(f"{i}.{i % 100:02d}"),
            "paid": i % 2 == 0, "placed_at": placed if db.backend == "postgresql" else placed.replace(tzinfo=None),
            "ship_date": date(2015, 1, 1) + timedelta(days=i) if i % 5 else None,
            "notes": None if i % 4 else f"note «{i}» with unicode ✓", "receipt": bytes([i % 256, 0, 255]) if i % 3 else None,
        })
        for j in (1, 2):
            item_rows.append({"id": i * 10 + j, "order_id": i, "sku": f"SKU-{i}-{j}", "qty": j,
                              "price": Decimal("9.99") * j})
    meta = sa.MetaData()
    with db.engine.begin() as conn:
        conn.execute(sa.Table("orders", meta, autoload_with=conn).insert(), order_rows)
        conn.execute(sa.Table("order_items", meta, autoload_with=conn).insert(), item_rows)
    return expired


def snapshot(db, table: str) -> dict[int, dict]:
    with db.engine.connect() as conn:
        t = sa.Table(table, sa.MetaData(), autoload_with=conn)
        return {row["id"]: dict(row) for row in conn.execute(sa.select(t)).mappings()}


def archive_rule(tmp_path, children: bool = True, fmt: str = "jsonl.gz", **target):
    child = "    children:\n      - {table: order_items, foreign_key: [order_id]}\n" if children else ""
    extra = "".join(f"    {k}: {v}\n" for k, v in target.items())
    text = (
        "category: orders\ndescription: Orders kept ten years for tax law\nowner: shop\n"
        "legal_basis: Tax law, ten years\nretain_for: P10Y\naction: archive\n"
        f"archive:\n  connection: aws_default\n  bucket: {ARCHIVE}\n  prefix: orders/\n  format: {fmt}\n"
        "  storage_class: GLACIER\n"
        "targets:\n  - name: orders\n    kind: sql\n    connection: shop_db\n    table: orders\n    key: [id]\n"
        "    age_column: placed_at\n    max_fraction: 1.0\n" + child + extra
    )
    return load_rule_file(write_rule(tmp_path / "rules", "orders", text=text))


def make_runner(targets: Targets | None = None) -> Runner:
    return Runner(RunJournal(open_audit(from_environment)), targets or Targets(from_environment),
                  Signer.from_environment())


@pytest.fixture(params=["postgresql", "mariadb"])
def shop(request, monkeypatch, aws, audit_db, keys):
    db = request.getfixturevalue({"postgresql": "pg_db", "mariadb": "mysql_db"}[request.param])
    connect(monkeypatch, "shop_db", db)
    create_shop(db)
    return db


def test_archive_round_trip_restores_every_column_of_every_row(shop, aws, tmp_path, new_database, monkeypatch):
    expired = fill_shop(shop)
    orders_before, items_before = snapshot(shop, "orders"), snapshot(shop, "order_items")

    certificate = make_runner().run(archive_rule(tmp_path, max_batch_rows=5), run_id="r1", as_of=AS_OF)

    assert certificate.status == "complete"
    assert set(snapshot(shop, "orders")) == set(orders_before) - expired
    assert {i["order_id"] for i in snapshot(shop, "order_items").values()} == set(orders_before) - expired
    target = certificate.data["targets"][0]
    assert target["tables"] == {"order_items": 2 * len(expired), "orders": len(expired)}
    manifest_url = certificate.data["archive"]["manifest"]
    bucket, key = manifest_url[5:].split("/", 1)
    body = aws.get_object(Bucket=bucket, Key=key)["Body"].read()
    import hashlib

    assert hashlib.sha256(body).hexdigest() == certificate.data["archive"]["sha256"]
    manifest = json.loads(body)
    assert manifest["totals"]["rows"] == 3 * len(expired)
    # Rows stay readable for a restore; storage_class applies to copies of S3 objects.
    assert all(aws.head_object(Bucket=ARCHIVE, Key=o["key"]).get("StorageClass", "STANDARD") == "STANDARD"
               for o in manifest["objects"])

    # Restore into an empty copy of the schema and compare every column of every row.
    fresh = new_database(shop.backend)
    create_shop(fresh)
    connect(monkeypatch, "restored_db", fresh)
    assert main(["restore", manifest_url, "--into", "restored_db"]) == 0
    restored_orders, restored_items = snapshot(fresh, "orders"), snapshot(fresh, "order_items")
    assert restored_orders == {i: orders_before[i] for i in expired}
    assert restored_items == {k: v for k, v in items_before.items() if v["order_id"] in expired}


def test_verify_archives_finds_a_missing_object_or_a_replaced_manifest(pg_db, aws, monkeypatch, audit_db, keys,
                                                                         tmp_path, capsys):
    connect(monkeypatch, "shop_db", pg_db)
    create_shop(pg_db)
    fill_shop(pg_db)
    rows_run = make_runner().run(archive_rule(tmp_path, max_batch_rows=5), run_id="rows", as_of=AS_OF)
    objects_run = archive_receipts(aws, tmp_path)
    verify = ["verify", "--public-key", str(keys[1]), "--archives"]

    assert main(verify) == 0
    intact = capsys.readouterr().out
    rows_manifest = _manifest(aws, rows_run)
    first = rows_manifest["objects"][0]["key"]
    original = aws.get_object(Bucket=ARCHIVE, Key=first)["Body"].read()
    aws.put_object(Bucket=ARCHIVE, Key=first, Body=original[:-1] + bytes([original[-1] ^ 1]))  # same size
    assert main(verify) == 1
    edited = capsys.readouterr().err
    aws.put_object(Bucket=ARCHIVE, Key=first, Body=original, ChecksumAlgorithm="SHA256")
    copy = _manifest(aws, objects_run)["s3_objects"][0]["key"]
    aws.delete_object(Bucket=ARCHIVE, Key=copy)
    assert main(verify) == 1
    missing = capsys.readouterr().err
    aws.put_object(Bucket=ARCHIVE, Key=rows_run.data["archive"]["manifest"][len(f"s3://{ARCHIVE}/"):],
                   Body=json.dumps({**rows_manifest, "objects": rows_manifest["objects"][1:]}).encode())
    assert main(verify) == 1
    replaced = capsys.readouterr().err

    objects = len(rows_manifest["objects"]) + 2
    assert f"archives of 2 runs: every manifest is the one its certificate records; {objects} objects" in intact
    assert f"certificate seq {rows_run.seq}: archive: s3://{ARCHIVE}/{first} differs from the manifest" in edited
    assert f"certificate seq {objects_run.seq}: archive: s3://{ARCHIVE}/{copy} is missing" in missing
    assert f"certificate seq {rows_run.seq}: archive: manifest" in replaced
    assert "is not the one the certificate records" in replaced


def test_parquet_archives_restore_too(pg_db, aws, monkeypatch, audit_db, keys, tmp_path, new_database):
    pytest.importorskip("pyarrow")
    connect(monkeypatch, "shop_db", pg_db)
    create_shop(pg_db)
    expired = fill_shop(pg_db, orders=15)
    orders_before = snapshot(pg_db, "orders")

    certificate = make_runner().run(archive_rule(tmp_path, fmt="parquet"), run_id="r1", as_of=AS_OF)

    manifest = _manifest(aws, certificate)
    assert {o["format"] for o in manifest["objects"]} == {"parquet"}
    fresh = new_database("postgresql")
    create_shop(fresh)
    connect(monkeypatch, "restored_db", fresh)
    assert main(["restore", certificate.data["archive"]["manifest"], "--into", "restored_db"]) == 0
    assert snapshot(fresh, "orders") == {i: orders_before[i] for i in expired}


def test_an_upload_failure_deletes_nothing_of_that_batch_and_the_rerun_archives_each_row_once(
    shop, aws, tmp_path, monkeypatch
):
    expired = fill_shop(shop, orders=60)
    rule_file = archive_rule(tmp_path, max_batch_rows=4)
    targets = Targets(from_environment)
    real_put = ArchiveStore.put_verified
    calls = []

    def failing_put(self, key, body, **kwargs):
        calls.append(key)
        if len(calls) == 5:  # the 3rd batch's first object
            raise ConnectionError("upload dropped")
        return real_put(self, key, body, **kwargs)

    runner = make_runner(targets)
    run, _ = runner.start(rule_file, run_id="r1", as_of=AS_OF)
    with monkeypatch.context() as patch:
        patch.setattr(ArchiveStore, "put_verified", failing_put)
        with pytest.raises(ConnectionError):
            runner.purge(rule_file, run, "orders")
    done = runner.journal.ledger(run, "orders").deleted()
    left = set(snapshot(shop, "orders"))
    assert len(expired - left) == done  # exactly the archived batches went
    listed = {o["Key"] for o in aws.list_objects_v2(Bucket=ARCHIVE).get("Contents", [])}
    assert len(listed) == 2 * (len(calls) - 1) // 2  # the failed batch left no object behind

    runner.purge(rule_file, run, "orders")
    certificate = runner.certify(run)

    assert certificate.status == "complete"
    assert set(snapshot(shop, "orders")).isdisjoint(expired)
    manifest = _manifest(aws, certificate)
    archived_ids = []
    for obj in manifest["objects"]:
        if obj["table"] == "orders":


            body = aws.get_object(Bucket=ARCHIVE, Key=obj["key"])["Body"].read()
            archived_ids += [json.loads(line)["id"] for line in gzip.decompress(body).splitlines()]
    assert sorted(archived_ids) == sorted(expired)  # every expired order archived exactly once


def test_rows_changed_between_archive_and_delete_are_archived_again(mysql_db, aws, audit_db, keys, tmp_path,
                                                                    monkeypatch):
    """Two-phase archive (MariaDB, SQLite): a row edited after it was archived is not deleted
    with a stale copy; the batch is archived again."""
    shop = mysql_db
    connect(monkeypatch, "shop_db", shop)
    create_shop(shop)
    fill_shop(shop, orders=9)
    rule_file = archive_rule(tmp_path)
    real_put = ArchiveStore.put_verified
    changed = []

    def put_then_someone_edits(self, key, body, **kwargs):
        stored = real_put(self, key, body, **kwargs)
        if not changed and kwargs.get("table") == "orders":
            shop.execute("UPDATE orders SET notes = 'edited meanwhile' WHERE id = 3")
            changed.append(key)
        return stored

    monkeypatch.setattr(ArchiveStore, "put_verified", put_then_someone_edits)
    certificate = make_runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert certificate.status == "complete"
    manifest = _manifest(aws, certificate)
    keys = {o["key"] for o in manifest["objects"]}
    assert changed[0] not in keys  # the stale copy was removed, not listed
    listed = {o["Key"] for o in aws.list_objects_v2(Bucket=ARCHIVE)["Contents"]}
    assert changed[0] not in listed
    orders_obj = next(o for o in manifest["objects"] if o["table"] == "orders")
    lines = gzip.decompress(aws.get_object(Bucket=ARCHIVE, Key=orders_obj["key"])["Body"].read()).splitlines()
    assert {json.loads(line)["id"]: json.loads(line)["notes"] for line in lines}[3] == "edited meanwhile"


def test_on_postgresql_a_writer_waits_for_the_batch_and_finds_its_rows_gone(pg_db, aws, audit_db, keys, tmp_path,
                                                                            monkeypatch):
    """One-pass archive (PostgreSQL): the batch's rows are locked from the DELETE until the
    archive verified and the transaction committed; an UPDATE meanwhile waits, then finds
    nothing to update. What was archived is exactly what was deleted."""
    connect(monkeypatch, "shop_db", pg_db)
    create_shop(pg_db)
    fill_shop(pg_db, orders=9)
    real_put = ArchiveStore.put_verified
    updated = []

    def put_while_someone_edits(self, key, body, **kwargs):
        if not updated and kwargs.get("table") == "orders":
            def edit():
                with pg_db.engine.begin() as conn:
                    updated.append(conn.execute(
                        sa.text("UPDATE orders SET notes = 'edited meanwhile' WHERE id = 3")).rowcount)
            writer = threading.Thread(target=edit)
            writer.start()
            writer.join(timeout=1.0)
            assert writer.is_alive()  # it waits on the batch's row locks
            updated.append(writer)
        return real_put(self, key, body, **kwargs)

    monkeypatch.setattr(ArchiveStore, "put_verified", put_while_someone_edits)
    certificate = make_runner().run(archive_rule(tmp_path), run_id="r1", as_of=AS_OF)
    updated[0].join(timeout=30)

    assert certificate.status == "complete"
    assert updated[1:] == [0]  # the writer went on after the commit and found the row gone
    manifest = _manifest(aws, certificate)
    orders_obj = next(o for o in manifest["objects"] if o["table"] == "orders")
    lines = gzip.decompress(aws.get_object(Bucket=ARCHIVE, Key=orders_obj["key"])["Body"].read()).splitlines()
    assert {json.loads(line)["id"]: json.loads(line)["notes"] for line in lines}[3] is None


def test_children_go_first_in_the_same_transaction(shop, aws, tmp_path):
    expired = fill_shop(shop, orders=12)

    certificate = make_runner().run(archive_rule(tmp_path), run_id="r1", as_of=AS_OF)

    items = snapshot(shop, "order_items")
    assert all(i["order_id"] not in expired for i in items.values())
    assert len(items) == 2 * (12 - len(expired))
    assert certificate.data["targets"][0]["tables"]["order_items"] == 2 * len(expired)


def test_an_undeclared_foreign_key_is_reported_before_anything_is_touched(shop, aws, tmp_path):
    fill_shop(shop, orders=6)
    before = snapshot(shop, "orders")

    with pytest.raises(RuleError) as caught:
        make_runner().run(archive_rule(tmp_path, children=False), run_id="r1", as_of=AS_OF)

    (problem,) = caught.value.problems
    assert problem.field == "targets[0].children"
    assert "order_items(order_id) references orders through constraint" in problem.message
    assert snapshot(shop, "orders") == before
    listed = [o["Key"] for o in aws.list_objects_v2(Bucket=ARCHIVE).get("Contents", [])]
    assert all(key.endswith("/manifest.json") for key in listed)  # the failed run's (empty) manifest only


def test_delete_with_children_and_an_undeclared_reference(pg_db, monkeypatch, audit_db, keys, tmp_path):
    connect(monkeypatch, "shop_db", pg_db)
    create_shop(pg_db)
    expired = fill_shop(pg_db, orders=9)
    text = (archive_rule(tmp_path).path.read_text()
            .replace("action: archive", "action: delete").split("archive:\n")[0]
            + "targets:" + archive_rule(tmp_path).path.read_text().split("targets:")[1])
    rule_file = load_rule_file(write_rule(tmp_path / "delete_rules", "orders", text=text))

    certificate = make_runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert set(snapshot(pg_db, "orders")).isdisjoint(expired)
    assert certificate.data["targets"][0]["tables"] == {"order_items": 2 * len(expired), "orders": len(expired)}


RECEIPTS = {"r/2010/01/01/a.pdf": b"%PDF receipt a", "r/2011/02/02/b.pdf": b"%PDF receipt b, longer",
            "r/2025/01/01/new.pdf": b"%PDF receipt new"}


def archive_receipts(aws, tmp_path):
    """Archive the two expired receipts to GLACIER (and delete them); the certificate."""
    aws.create_bucket(Bucket="retail-receipts")
    for key, body in RECEIPTS.items():
        aws.put_object(Bucket="retail-receipts", Key=key, Body=body)
    text = (
        "category: receipts\ndescription: r\nowner: f\nlegal_basis: l\nretain_for: P10Y\naction: archive\n"
        f"archive: {{connection: aws_default, bucket: {ARCHIVE}, prefix: receipts/, storage_class: GLACIER}}\n"
        "targets:\n  - {name: receipts, kind: s3, connection: aws_default, bucket: retail-receipts, prefix: r/,\n"
        "     age_from: key_date, key_date_format: 'r/%Y/%m/%d/', max_fraction: 1.0}\n"
    )
    rule_file = load_rule_file(write_rule(tmp_path / "rules", "receipts", text=text))
    return make_runner().run(rule_file, run_id="r1", as_of=AS_OF)


def test_archived_s3_objects_are_verified_and_land_in_the_storage_class(aws, audit_db, keys, tmp_path):
    certificate = archive_receipts(aws, tmp_path)

    assert certificate.status == "complete"
    left = {o["Key"] for o in aws.list_objects_v2(Bucket="retail-receipts")["Contents"]}
    assert left == {"r/2025/01/01/new.pdf"}
    manifest = _manifest(aws, certificate)
    copies = manifest["s3_objects"]
    assert sorted(c["source"] for c in copies) == ["r/2010/01/01/a.pdf", "r/2011/02/02/b.pdf"]
    for copy in copies:
        head = aws.head_object(Bucket=ARCHIVE, Key=copy["key"])
        assert head["StorageClass"] == "GLACIER"
        assert copy["bucket"] == "retail-receipts"
        assert head["ContentLength"] == copy["bytes"] == len(RECEIPTS[copy["source"]])
        assert copy["verified"] == "size+md5"


def test_archived_s3_objects_restore_after_a_thaw_and_never_over_another_object(aws, audit_db, keys, tmp_path,
                                                                                  capsys):
    certificate = archive_receipts(aws, tmp_path)
    restore = ["restore", certificate.data["archive"]["manifest"], "--into", "s3://retail-receipts"]
    aws.put_object(Bucket="retail-receipts", Key="r/2011/02/02/b.pdf", Body=b"someone else's new file")

    assert main(["certificates", "--seq", str(certificate.seq)]) == 0
    assert f"archive    {certificate.data['archive']['manifest']} (2 objects" in capsys.readouterr().out

    thawing = main(restore)
    first = capsys.readouterr()
    assert thawing == 1 and "run the same command again later" in first.err
    assert "r/2011/02/02/b.pdf holds a different object" in first.err
    assert aws.get_object(Bucket="retail-receipts", Key="r/2011/02/02/b.pdf")["Body"].read() == b"someone else's new file"
    assert "r/2010/01/01/a.pdf" not in {o["Key"] for o in aws.list_objects_v2(Bucket="retail-receipts")["Contents"]}

    aws.delete_object(Bucket="retail-receipts", Key="r/2011/02/02/b.pdf")
    assert main(restore) == 1  # a.pdf thawed (moto thaws at once): copied back; b.pdf's thaw asked only now
    assert main(restore) == 0
    assert main(restore) == 0  # a rerun finds both back
    outputs = capsys.readouterr().out.split("OBJECTS")[1:]
    assert [_counts(o) for o in outputs] == [(1, 0, 1, 0), (1, 1, 0, 0), (0, 2, 0, 0)]

    for key in ("r/2010/01/01/a.pdf", "r/2011/02/02/b.pdf"):
        assert aws.get_object(Bucket="retail-receipts", Key=key)["Body"].read() == RECEIPTS[key]
    assert main(restore[:3] + ["s3://retail-receipts/elsewhere"]) == 0
    assert aws.get_object(Bucket="retail-receipts", Key="elsewhere/r/2010/01/01/a.pdf")["Body"].read() == \
        RECEIPTS["r/2010/01/01/a.pdf"]


def test_sigkill_after_upload_before_delete_leaves_no_debris_and_archives_once(
    pg_db, aws_server, monkeypatch, audit_db, keys, tmp_path
):
    """A worker killed between verified upload and the delete's commit: the next run removes
    the orphan objects, and every row ends up in exactly one listed archive object."""
    bucket = f"archive-{os.getpid()}"
    aws_server.create_bucket(Bucket=bucket)
    connect(monkeypatch, "shop_db", pg_db)
    create_shop(pg_db)
    expired = fill_shop(pg_db, orders=30)
    rule_path = archive_rule(tmp_path, max_batch_rows=3).path
    rule_path.write_text(rule_path.read_text().replace(ARCHIVE, bucket))
    command = [sys.executable, "-m", "retention.interfaces.cli", "run", "--rules", str(rule_path.parent), "--as-of",
               AS_OF.isoformat()]

    killed = subprocess.run(command + ["--run-id", "killed"], capture_output=True, text=True,
                            env={**os.environ, "RETENTION_FAILPOINTS": "archive.before_commit=2:kill"})
    assert killed.returncode == -9
    finished = subprocess.run(command + ["--run-id", "next"], capture_output=True, text=True)
    assert finished.returncode == 0, finished.stderr

    engine = open_audit(from_environment)
    archived_ids = []
    listed = {o["Key"] for o in aws_server.list_objects_v2(Bucket=bucket).get("Contents", [])}
    in_manifests = set()
    for run_id in ("killed", "next"):
        certificate = find_certificate(engine, "orders", run_id)
        manifest = _manifest(aws_server, certificate)
        in_manifests.add(certificate.data["archive"]["manifest"].split("/", 3)[3])
        for obj in manifest["objects"]:
            in_manifests.add(obj["key"])
            if obj["table"] == "orders":


                body = aws_server.get_object(Bucket=bucket, Key=obj["key"])["Body"].read()
                archived_ids += [json.loads(line)["id"] for line in gzip.decompress(body).splitlines()]
    assert sorted(archived_ids) == sorted(expired)
    assert listed == in_manifests  # no orphan object left by the killed batch
    assert set(snapshot(pg_db, "orders")).isdisjoint(expired)


def _counts(table: str) -> tuple[int, ...]:
    """restored, already back, thawing, conflicts, from `retention restore`'s table."""
    return tuple(int(line.split()[-1]) for line in table.splitlines()[2:6])


def _manifest(client, certificate) -> dict:
    bucket, key = certificate.data["archive"]["manifest"][5:].split("/", 1)
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


__all__ = ["failpoints", "InjectedFault"]
