"""Archive safety (issue #9 items 1, 17, 19): collision-free create-only archive writes,
restores that trust only what a certificate records, and server-side encryption."""

# ruff: noqa: F811  (the aws fixture comes from test_archive and is named in test signatures)
from __future__ import annotations

import gzip
import hashlib
import json
import os

import pytest
import sqlalchemy as sa
from botocore.exceptions import ClientError

from retention import failpoints
from retention.archive.store import ArchiveExists, ArchiveFailed, ArchiveStore
from retention.connections import from_environment
from retention.errors import RuleError, TerminalError
from retention.evidence.audit import open_audit
from retention.evidence.chain import find_certificate
from retention.failpoints import InjectedFault
from retention.interfaces.cli import main
from retention.rules.loader import load_rule_file
from retention.rules.models import ArchiveSpec

from conftest import connect, write_rule
from test_archive import (  # noqa: F401  (aws is a fixture)
    ARCHIVE,
    AS_OF,
    CUTOFF,
    RECEIPTS,
    archive_receipts,
    archive_rule,
    aws,
    create_shop,
    fill_shop,
    make_runner,
    snapshot,
)


def _manifest_of(client, certificate) -> tuple[str, dict]:
    key = certificate.data["archive"]["manifest"][len(f"s3://{ARCHIVE}/"):]
    return key, json.loads(client.get_object(Bucket=ARCHIVE, Key=key)["Body"].read())


def _archived_ids(client, manifest) -> list[int]:
    ids = []
    for obj in manifest["objects"]:
        if obj["table"] == "orders":
            body = client.get_object(Bucket=ARCHIVE, Key=obj["key"])["Body"].read()
            ids += [json.loads(line)["id"] for line in gzip.decompress(body).splitlines()]
    return sorted(ids)


@pytest.fixture
def pg_shop(pg_db, monkeypatch, aws, audit_db, keys):
    connect(monkeypatch, "shop_db", pg_db)
    create_shop(pg_db)
    return pg_db


def _add_expired_orders(db, first_id: int, count: int = 3) -> set[int]:
    from datetime import timedelta

    with db.engine.begin() as conn:
        for i in range(first_id, first_id + count):
            conn.execute(sa.text(
                "INSERT INTO orders (id, customer_email, total, paid, placed_at) VALUES (:i, :e, 1, true, :p)"),
                {"i": i, "e": f"late{i}@example.com", "p": CUTOFF - timedelta(days=i)})
    return set(range(first_id, first_id + count))


# -- item 1: archive objects never overwrite each other ------------------------------------


def test_item01_runs_whose_ids_differ_only_in_punctuation_keep_separate_archives(pg_shop, aws, tmp_path, keys):
    first_expired = fill_shop(pg_shop, orders=12)
    rule_file = archive_rule(tmp_path)
    first = make_runner().run(rule_file, run_id="x 1", as_of=AS_OF)
    second_expired = _add_expired_orders(pg_shop, 1000)
    second = make_runner().run(rule_file, run_id="x_1", as_of=AS_OF)

    assert first.status == second.status == "complete"
    first_key, first_manifest = _manifest_of(aws, first)
    second_key, second_manifest = _manifest_of(aws, second)
    assert first_key != second_key
    assert {o["key"] for o in first_manifest["objects"]}.isdisjoint(o["key"] for o in second_manifest["objects"])
    assert _archived_ids(aws, first_manifest) == sorted(first_expired)
    assert _archived_ids(aws, second_manifest) == sorted(second_expired)
    assert main(["verify", "--public-key", str(keys[1]), "--archives"]) == 0


def test_item01_keys_of_distinct_run_ids_never_collide():
    store = ArchiveStore(ArchiveSpec(connection="aws_default", bucket=ARCHIVE, prefix="orders"), client=None)
    run_ids = ["x 1", "x_1", "x/1", "x%201", "x%1", "X_1", ".", "..", "x.1", "x:1", "x+1", "x\u00e91", "x_e91"]
    for make in (lambda r: store.key_for("orders", r, "orders", 1, "orders"),
                 lambda r: store.key_for_object("orders", r, "receipts", "b", "k"),
                 lambda r: store.manifest_key("orders", r)):
        keys = [make(r) for r in run_ids]
        assert len(set(keys)) == len(run_ids)
        for key in keys:  # one run id is one key segment: no "/", "." or ".." of its own
            segments = key.split("/")
            assert "." not in segments and ".." not in segments
    # A legacy key (run id sanitized to [A-Za-z0-9_.-]) is never a new key.
    assert "/x_1/" not in store.key_for("orders", "x_1", "orders", 1, "orders")


def test_item01_an_existing_archive_object_is_an_error_never_replaced(pg_shop, aws, tmp_path):
    expired = fill_shop(pg_shop, orders=12)
    before = snapshot(pg_shop, "orders")
    rule_file = archive_rule(tmp_path)
    store = ArchiveStore(rule_file.rule.archive, aws)
    # The batch's second object (children go first): its first, order_items, is written and must go again.
    squatted = store.key_for("orders", "r1", "orders", 1, "orders")
    aws.put_object(Bucket=ARCHIVE, Key=squatted, Body=b"someone else's object")

    certificate = make_runner().run(rule_file, run_id="r1", as_of=AS_OF)

    assert certificate.status == "failed"
    assert aws.get_object(Bucket=ARCHIVE, Key=squatted)["Body"].read() == b"someone else's object"
    assert snapshot(pg_shop, "orders") == before  # nothing of the batch was deleted
    listed = {o["Key"] for o in aws.list_objects_v2(Bucket=ARCHIVE)["Contents"]}
    assert listed == {squatted, store.manifest_key("orders", "r1")}  # no debris of ours; theirs kept
    assert expired


def test_item01_a_multipart_upload_never_replaces_an_object(aws, monkeypatch):
    monkeypatch.setattr("retention.archive.store.PART_SIZE", 5 * 1024 * 1024)
    store = ArchiveStore(ArchiveSpec(connection="aws_default", bucket=ARCHIVE), aws)
    body = os.urandom(6 * 1024 * 1024)
    stored = store.put_verified("a/multi", body, table="t", rows=1)
    assert stored.sha256 == hashlib.sha256(body).hexdigest()
    assert store.put_verified("a/multi", body, table="t", rows=1).sha256 == stored.sha256  # same bytes: ok

    with pytest.raises(ArchiveFailed, match="already exists and differs"):
        store.put_verified("a/multi", os.urandom(6 * 1024 * 1024), table="t", rows=1)
    assert aws.get_object(Bucket=ARCHIVE, Key="a/multi")["Body"].read() == body
    assert not aws.list_multipart_uploads(Bucket=ARCHIVE).get("Uploads")  # the refused upload was aborted


def test_item01_a_retried_certify_accepts_its_own_manifest_and_refuses_another(pg_shop, aws, tmp_path, monkeypatch):
    fill_shop(pg_shop, orders=12)
    rule_file = archive_rule(tmp_path)
    runner = make_runner()
    run, _ = runner.start(rule_file, run_id="r1", as_of=AS_OF)
    runner.purge(rule_file, run, "orders")
    monkeypatch.setenv("RETENTION_FAILPOINTS", "certify.before_append=1:raise")
    with pytest.raises(InjectedFault):
        runner.certify(run)  # the manifest is written, the certificate is not
    monkeypatch.delenv("RETENTION_FAILPOINTS")
    failpoints.reset()
    certificate = runner.certify(run)  # the retry finds the same bytes: fine
    assert certificate.status == "complete"
    key, manifest = _manifest_of(aws, certificate)
    assert hashlib.sha256(aws.get_object(Bucket=ARCHIVE, Key=key)["Body"].read()).hexdigest() == \
        certificate.data["archive"]["sha256"]

    # Another run's manifest already where this one's goes: refused, and left as it was.
    store = ArchiveStore(rule_file.rule.archive, aws)
    with pytest.raises(ArchiveFailed, match="already exists and differs"):
        store.put_verified(key, b"{}", table="manifest", rows=0)
    assert json.loads(aws.get_object(Bucket=ARCHIVE, Key=key)["Body"].read()) == manifest


def test_item01_archive_copies_of_s3_objects_never_replace_an_object(aws, audit_db, keys, tmp_path):
    spec = ArchiveSpec(connection="aws_default", bucket=ARCHIVE, prefix="receipts/", storage_class="GLACIER")
    squatted = ArchiveStore(spec, aws).key_for_object("receipts", "r1", "receipts", "retail-receipts",
                                                      "r/2010/01/01/a.pdf")
    aws.put_object(Bucket=ARCHIVE, Key=squatted, Body=b"not the receipt")

    certificate = archive_receipts(aws, tmp_path)

    assert certificate.status == "partial"
    assert certificate.data["targets"][0]["error"].endswith("(ArchiveKeyTaken x1)")
    assert aws.get_object(Bucket=ARCHIVE, Key=squatted)["Body"].read() == b"not the receipt"
    left = {o["Key"] for o in aws.list_objects_v2(Bucket="retail-receipts")["Contents"]}
    assert left == {"r/2010/01/01/a.pdf", "r/2025/01/01/new.pdf"}  # kept: its archive copy could not be made
    _key, manifest = _manifest_of(aws, certificate)
    assert [c["source"] for c in manifest["s3_objects"]] == ["r/2011/02/02/b.pdf"]


def test_item01_large_copies_are_create_only_too(aws, monkeypatch):
    """Objects over CopyObject's limit are copied in parts; the completing request is
    conditional, so even a key taken after the check is not overwritten."""
    monkeypatch.setattr("retention.archive.store.COPY_LIMIT", 1024)
    monkeypatch.setattr("retention.archive.store.COPY_PART_SIZE", 5 * 1024 * 1024)
    aws.create_bucket(Bucket="big-source")
    body = os.urandom(6 * 1024 * 1024)
    aws.put_object(Bucket="big-source", Key="big", Body=body)
    store = ArchiveStore(ArchiveSpec(connection="aws_default", bucket=ARCHIVE, sse="AES256"), aws)

    head = store.copy_in(aws, {"Bucket": "big-source", "Key": "big"}, "copies/big", size=len(body))
    assert head["ContentLength"] == len(body) and head["ServerSideEncryption"] == "AES256"
    assert aws.get_object(Bucket=ARCHIVE, Key="copies/big")["Body"].read() == body

    with pytest.raises(ArchiveExists):  # caught by the check before copying
        store.copy_in(aws, {"Bucket": "big-source", "Key": "big"}, "copies/big", size=len(body))
    aws.put_object(Bucket=ARCHIVE, Key="copies/taken", Body=b"theirs")
    monkeypatch.setattr("retention.archive.store.head_or_none", lambda *args: None)  # taken after the check
    with pytest.raises(ArchiveExists):
        store.copy_in(aws, {"Bucket": "big-source", "Key": "big"}, "copies/taken", size=len(body))
    assert aws.get_object(Bucket=ARCHIVE, Key="copies/taken")["Body"].read() == b"theirs"
    assert not aws.list_multipart_uploads(Bucket=ARCHIVE).get("Uploads")


# -- item 17: restore trusts only a manifest a certificate records ---------------------------


def _archived_run(pg_shop, tmp_path, **target):
    fill_shop(pg_shop, orders=30)
    before = snapshot(pg_shop, "orders"), snapshot(pg_shop, "order_items")
    certificate = make_runner().run(archive_rule(tmp_path, max_batch_rows=4, **target), run_id="r1", as_of=AS_OF)
    assert certificate.status == "complete"
    return certificate, before


@pytest.fixture
def fresh(new_database, monkeypatch):
    db = new_database("postgresql")
    create_shop(db, foreign_key=False)
    connect(monkeypatch, "restored_db", db)
    return db


def test_item17_restore_refuses_a_manifest_no_certificate_records(pg_shop, aws, tmp_path, fresh, capsys):
    certificate, _ = _archived_run(pg_shop, tmp_path)
    _key, manifest = _manifest_of(aws, certificate)
    # An attacker's row, in an object and a hand-written manifest that lists it correctly.
    shape = manifest["tables"]["orders"]["columns"]
    row = {name: None for name, _ in shape} | {"id": 666, "customer_email": "attacker@example.com", "total": "1",
                                                 "paid": True, "placed_at": "2015-01-01T00:00:00+00:00"}
    body = gzip.compress((json.dumps(row) + "\n").encode())
    aws.put_object(Bucket=ARCHIVE, Key="forged/000001.orders.jsonl.gz", Body=body)
    forged = {**manifest, "objects": [{"key": "forged/000001.orders.jsonl.gz", "table": "orders", "rows": 1,
                                       "bytes": len(body), "sha256": hashlib.sha256(body).hexdigest(),
                                       "format": "jsonl.gz", "storage_class": "STANDARD", "depth": 0}],
              "tables": {"orders": {**manifest["tables"]["orders"], "rows": 1}}}
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps(forged))
    aws.put_object(Bucket=ARCHIVE, Key="forged/manifest.json", Body=path.read_bytes())

    for location in (str(path), f"s3://{ARCHIVE}/forged/manifest.json"):
        assert main(["restore", location, "--into", "restored_db"]) != 0
        err = capsys.readouterr().err
        assert "no certificate records" in err and "Traceback" not in err
        assert len(err.strip().splitlines()) == 1
    assert main(["restore", str(path), "--seq", str(certificate.seq), "--into", "restored_db"]) != 0
    assert "not the one certificate seq" in capsys.readouterr().err
    assert snapshot(fresh, "orders") == {}


def test_item17_restore_refuses_a_tampered_object_with_a_recomputed_manifest(pg_shop, aws, tmp_path, fresh, capsys):
    certificate, _ = _archived_run(pg_shop, tmp_path)
    key, manifest = _manifest_of(aws, certificate)
    first = next(o for o in manifest["objects"] if o["table"] == "orders")
    lines = gzip.decompress(aws.get_object(Bucket=ARCHIVE, Key=first["key"])["Body"].read()).decode().splitlines()
    forged_row = {**json.loads(lines[0]), "customer_email": "forged@example.com"}
    body = gzip.compress(("\n".join([json.dumps(forged_row)] + lines[1:]) + "\n").encode())
    aws.put_object(Bucket=ARCHIVE, Key=first["key"], Body=body)
    first.update(bytes=len(body), sha256=hashlib.sha256(body).hexdigest())
    aws.put_object(Bucket=ARCHIVE, Key=key, Body=json.dumps(manifest).encode())

    assert main(["restore", certificate.data["archive"]["manifest"], "--into", "restored_db"]) != 0
    assert "no certificate records" in capsys.readouterr().err
    assert main(["restore", "--seq", str(certificate.seq), "--into", "restored_db"]) != 0
    assert "not the one certificate seq" in capsys.readouterr().err
    assert snapshot(fresh, "orders") == {}


def test_item17_every_object_is_checked_before_anything_is_inserted(pg_shop, aws, tmp_path, fresh, capsys):
    certificate, _ = _archived_run(pg_shop, tmp_path)
    _key, manifest = _manifest_of(aws, certificate)
    last = sorted(manifest["objects"], key=lambda o: (o["depth"], o["key"]))[-1]  # restored last
    original = aws.get_object(Bucket=ARCHIVE, Key=last["key"])["Body"].read()
    aws.put_object(Bucket=ARCHIVE, Key=last["key"], Body=original[:-1] + bytes([original[-1] ^ 1]))

    assert main(["restore", certificate.data["archive"]["manifest"], "--into", "restored_db"]) != 0
    err = capsys.readouterr().err
    assert last["key"] in err and "does not match" in err
    assert snapshot(fresh, "orders") == {} and snapshot(fresh, "order_items") == {}


def test_item17_a_batch_whose_children_fail_restores_none_of_its_parents(pg_shop, aws, tmp_path, fresh, capsys):
    certificate, (orders_before, items_before) = _archived_run(pg_shop, tmp_path)
    _key, manifest = _manifest_of(aws, certificate)
    expired = set(orders_before) - set(snapshot(pg_shop, "orders"))
    victim = max(expired)  # an order of the last batch; its item id is taken in the fresh database
    item_id = next(i for i, item in items_before.items() if item["order_id"] == victim)
    fresh.execute("INSERT INTO order_items (id, order_id, sku, qty, price) VALUES (:i, 0, 'x', 1, 1)", {"i": item_id})

    assert main(["restore", certificate.data["archive"]["manifest"], "--into", "restored_db"]) != 0
    assert "Traceback" not in capsys.readouterr().err
    restored = set(snapshot(fresh, "orders"))
    assert victim not in restored
    assert restored < expired
    # Whatever was restored came with all its items: no parent without its children.
    items = snapshot(fresh, "order_items")
    for order_id in restored:
        assert {i for i, v in items.items() if v["order_id"] == order_id} == \
            {i for i, v in items_before.items() if v["order_id"] == order_id}


def test_item17_restore_writes_only_tables_the_certificate_names(pg_shop, aws, tmp_path, fresh):
    from retention.archive.manifest import Manifest
    from retention.archive.restore import restore

    certificate, _ = _archived_run(pg_shop, tmp_path)
    _key, manifest = _manifest_of(aws, certificate)
    fresh.execute("CREATE TABLE accounts (id INTEGER PRIMARY KEY, customer_email VARCHAR(100))")
    renamed = json.dumps(manifest).replace('"order_items"', '"accounts"').encode()
    with pytest.raises(TerminalError, match="accounts"):
        restore(Manifest.parse(renamed, "renamed"), aws, fresh.engine, certificate=certificate)
    injected = json.dumps(manifest).replace('"order_items"', '"order_items; drop table orders"').encode()
    with pytest.raises(TerminalError, match="not a plain table name"):
        restore(Manifest.parse(injected, "injected"), aws, fresh.engine, certificate=certificate)
    assert snapshot(fresh, "orders") == {} and fresh.scalar("SELECT count(*) FROM accounts") == 0


def test_item17_restore_by_seq_puts_back_every_row(pg_shop, aws, tmp_path, fresh, monkeypatch, capsys):
    certificate, (orders_before, _items) = _archived_run(pg_shop, tmp_path)
    expired = set(orders_before) - set(snapshot(pg_shop, "orders"))
    assert main(["restore", "--seq", str(certificate.seq), "--into", "restored_db"]) == 0
    assert snapshot(fresh, "orders") == {i: orders_before[i] for i in expired}
    assert main(["restore", "--seq", "999", "--into", "restored_db"]) != 0
    assert "no certificate with seq 999" in capsys.readouterr().err


# -- item 19: archives encrypted with a chosen key ---------------------------------------------


SSE_RULE = """\
category: orders
description: d
owner: shop
legal_basis: l
retain_for: P10Y
action: archive
archive:
  connection: aws_default
  bucket: retention-archive
{sse}targets:
  - {{name: orders, kind: sql, connection: shop_db, table: orders, key: [id], age_column: placed_at}}
"""


@pytest.mark.parametrize("sse, line, field, message", [
    ("  sse: AES\n", 10, "archive.sse", "AES256 or aws:kms"),
    ("  sse: aws:kms\n", 7, "archive.kms_key_id", "aws:kms needs kms_key_id"),  # missing: the section's line
    ("  sse: AES256\n  kms_key_id: alias/archive\n", 11, "archive.kms_key_id", "only read with sse: aws:kms"),
    ("  kms_key_id: alias/archive\n", 10, "archive.kms_key_id", "only read with sse: aws:kms"),
    ("  sse: aws:kms\n  kms_key_id: 'x; rm -rf'\n", 11, "archive.kms_key_id", "not a KMS key"),
    ("  sse: aws:kms\n  kms_key_id: alias/archive\n  kms_keyid: x\n", 12, "archive.kms_keyid", "did you mean"),
])
def test_item19_archive_sse_is_validated_with_file_and_line(tmp_path, sse, line, field, message):
    path = write_rule(tmp_path / "rules", "orders", text=SSE_RULE.format(sse=sse))
    with pytest.raises(RuleError) as caught:
        load_rule_file(path)
    (problem,) = caught.value.problems
    assert (problem.line, problem.field) == (line, field)
    assert message in problem.message
    assert str(path) in str(problem)


def test_item19_rows_manifests_and_copies_are_stored_with_the_requested_encryption(pg_shop, aws, tmp_path,
                                                                                  audit_db, keys):
    kms = "arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab"
    fill_shop(pg_shop, orders=12)
    rule_file = archive_rule(tmp_path)
    path = rule_file.path
    path.write_text(path.read_text().replace("  storage_class: GLACIER\n",
                                             f"  storage_class: GLACIER\n  sse: aws:kms\n  kms_key_id: {kms}\n"))
    certificate = make_runner().run(load_rule_file(path), run_id="r1", as_of=AS_OF)

    assert certificate.status == "complete"
    key, manifest = _manifest_of(aws, certificate)
    assert manifest["sse"] == {"algorithm": "aws:kms", "kms_key_id": kms}
    for object_key in [key] + [o["key"] for o in manifest["objects"]]:
        head = aws.head_object(Bucket=ARCHIVE, Key=object_key)
        assert (head["ServerSideEncryption"], head["SSEKMSKeyId"]) == ("aws:kms", kms)
    assert all(o["sse"] == "aws:kms" for o in manifest["objects"])

    receipts = archive_receipts_with(aws, tmp_path, "sse: AES256")
    _key, receipts_manifest = _manifest_of(aws, receipts)
    assert receipts_manifest["sse"] == {"algorithm": "AES256"}
    assert len(receipts_manifest["s3_objects"]) == 2
    for copy in receipts_manifest["s3_objects"]:
        assert aws.head_object(Bucket=ARCHIVE, Key=copy["key"])["ServerSideEncryption"] == "AES256"
        assert copy["sse"] == "AES256"
    assert main(["verify", "--public-key", str(keys[1]), "--archives"]) == 0


def archive_receipts_with(aws, tmp_path, archive_extra: str):
    aws.create_bucket(Bucket="retail-receipts")
    for key, body in RECEIPTS.items():
        aws.put_object(Bucket="retail-receipts", Key=key, Body=body)
    text = (
        "category: receipts\ndescription: r\nowner: f\nlegal_basis: l\nretain_for: P10Y\naction: archive\n"
        f"archive: {{connection: aws_default, bucket: {ARCHIVE}, prefix: receipts/, storage_class: GLACIER, "
        f"{archive_extra}}}\n"
        "targets:\n  - {name: receipts, kind: s3, connection: aws_default, bucket: retail-receipts, prefix: r/,\n"
        "     age_from: key_date, key_date_format: 'r/%Y/%m/%d/', max_fraction: 1.0}\n"
    )
    rule_file = load_rule_file(write_rule(tmp_path / "receipt_rules", "receipts", text=text))
    return make_runner().run(rule_file, run_id="r1", as_of=AS_OF)


def test_item19_an_object_stored_without_the_requested_encryption_is_refused(aws):
    spec = ArchiveSpec(connection="aws_default", bucket=ARCHIVE, sse="AES256")
    store = ArchiveStore(spec, aws)

    def drop_encryption(params, **_kwargs):
        params.pop("ServerSideEncryption", None)

    aws.meta.events.register("provide-client-params.s3.PutObject", drop_encryption)
    try:
        with pytest.raises(ArchiveFailed, match="not encrypted as archive.sse asks"):
            store.put_verified("plain/object", b"rows", table="t", rows=1)
    finally:
        aws.meta.events.unregister("provide-client-params.s3.PutObject", drop_encryption)
    with pytest.raises(ClientError):
        aws.head_object(Bucket=ARCHIVE, Key="plain/object")  # not left behind


__all__ = ["find_certificate", "open_audit", "from_environment"]
