"""The archive manifest as a typed value: manifests today's runs write parse and serialize
back to the same bytes (their SHA-256 is in certificates), and anything else is refused."""

from __future__ import annotations

import hashlib
import json

import pytest

from retention.archive.manifest import MalformedManifest, Manifest, build_manifest, read_manifest
from retention.errors import ConfigError, TerminalError

# Written by build_manifest before the manifest was typed (retention at 60a579b), from the
# records the journal holds: a row archive under SSE-KMS, a table and its child, two batches.
ROWS_MANIFEST = (
    b'{"as_of":"2026-06-15T00:00:00Z","bucket":"retention-archive","category":"shop","connection":"aws_default",'
    b'"cutoff":"2016-06-15T00:00:00Z","format":"jsonl.gz","objects":[{"bytes":310,"depth":0,"format":"jsonl.gz",'
    b'"key":"archive/shop/run=r%201/orders/000001.orders.jsonl.gz","rows":4,'
    b'"sha256":"aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa","sse":"aws:kms",'
    b'"storage_class":"STANDARD","table":"orders","target":"orders"},{"bytes":402,"depth":1,"format":"jsonl.gz",'
    b'"key":"archive/shop/run=r%201/orders/000001.order_items.jsonl.gz","rows":8,'
    b'"sha256":"bbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbbb","sse":"aws:kms",'
    b'"storage_class":"STANDARD","table":"order_items","target":"orders"},{"bytes":190,"depth":0,'
    b'"format":"jsonl.gz","key":"archive/shop/run=r%201/orders/000002.orders.jsonl.gz","rows":1,'
    b'"sha256":"cccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccccc","sse":"aws:kms",'
    b'"storage_class":"STANDARD","table":"orders","target":"orders"}],"rule":{"path":"rules/shop.yaml",'
    b'"sha256":"5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f"},"run_id":"r 1","s3_objects":[],'
    b'"sse":{"algorithm":"aws:kms","kms_key_id":"alias/retention"},"tables":{"order_items":{"columns":[["id",'
    b'"plain"],["order_id","plain"],["price","decimal"],["receipt","bytes"]],"depth":1,"rows":8},'
    b'"orders":{"columns":[["id","plain"],["customer_email","plain"],["total","decimal"],["placed_at",'
    b'"datetime"]],"depth":0,"rows":5}},"totals":{"bytes":902,"objects":3,"rows":13},'
    b'"type":"retention/archive-manifest","version":1}'
)

# Copies of S3 objects: a versioned one, one of an unversioned bucket (version_id and
# sha256 recorded as null), one settled after a crash (no version_id, no sse), and an
# object of which nothing was kept.
OBJECTS_MANIFEST = (
    b'{"as_of":"2026-06-15T00:00:00Z","bucket":"retention-archive","category":"receipts",'
    b'"connection":"aws_default","cutoff":"2019-06-15T00:00:00Z","format":"jsonl.gz","objects":[],'
    b'"rule":{"path":"rules/shop.yaml",'
    b'"sha256":"5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f5e1f"},"run_id":"r2",'
    b'"s3_objects":[{"bucket":"retail-receipts","bytes":2048,"etag":"\\"9e107d9d372bb6826bd81d3542a419d6\\"",'
    b'"key":"archive/receipts/run=r2/receipts/retail-receipts/r/2011/a.pdf",'
    b'"sha256":"n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=","source":"r/2011/a.pdf","sse":"AES256",'
    b'"storage_class":"GLACIER","target":"receipts","verified":"size+md5",'
    b'"version_id":"3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY"},{"bucket":"retail-receipts","bytes":17,'
    b'"etag":"\\"e4d909c290d0fb1ca068ffaddf22cbd0\\"",'
    b'"key":"archive/receipts/run=r2/receipts/retail-receipts/r/2011/b.pdf","sha256":null,"source":"r/2011/b.pdf",'
    b'"sse":"AES256","storage_class":"GLACIER","target":"receipts","verified":"size+md5","version_id":null},'
    b'{"bucket":"retail-receipts","bytes":5,"etag":"\\"5d41402abc4b2a76b9719d911017c592\\"",'
    b'"key":"archive/receipts/run=r2/receipts/retail-receipts/r/2011/c.pdf",'
    b'"sha256":"LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=","source":"r/2011/c.pdf","storage_class":"GLACIER",'
    b'"target":"receipts","verified":"settled"},{"key":null,"note":"only delete markers: nothing to keep",'
    b'"source":"r/2011/d.pdf","target":"receipts"}],"sse":{"algorithm":"AES256"},"tables":{},'
    b'"totals":{"bytes":2070,"objects":3,"rows":0},"type":"retention/archive-manifest","version":1}'
)

RULE = {"path": "rules/shop.yaml", "sha256": "5e1f" * 16}
ORDERS = [["id", "plain"], ["customer_email", "plain"], ["total", "decimal"], ["placed_at", "datetime"]]
ITEMS = [["id", "plain"], ["order_id", "plain"], ["price", "decimal"], ["receipt", "bytes"]]


def _rows_object(batch: int, table: str, rows: int, size: int, digest: str, depth: int, columns) -> dict:
    """A row object as the journal records it (the SQL archive action's ArchivedObject.to_dict)."""
    return {"target": "orders", "key": f"archive/shop/run=r%201/orders/{batch:06d}.{table}.jsonl.gz",
            "table": table, "rows": rows, "bytes": size, "sha256": digest * 64, "format": "jsonl.gz",
            "storage_class": "STANDARD", "columns": columns, "depth": depth, "sse": "aws:kms"}


def _copies() -> list[dict]:
    """Copies as the S3 target journals them (copied, copied from an unversioned bucket, settled, none)."""
    prefix = "archive/receipts/run=r2/receipts/retail-receipts/"
    return [
        {"target": "receipts", "bucket": "retail-receipts", "source": "r/2011/a.pdf",
         "version_id": "3HL4kqtJlcpXroDTDmJ+rmSpXd3dIbrHY", "key": prefix + "r/2011/a.pdf", "bytes": 2048,
         "etag": '"9e107d9d372bb6826bd81d3542a419d6"', "sha256": "n4bQgYhMfWWaL+qgxVrQFaO/TxsrC4Is0V1sFbDwCgg=",
         "storage_class": "GLACIER", "verified": "size+md5", "sse": "AES256"},
        {"target": "receipts", "bucket": "retail-receipts", "source": "r/2011/b.pdf", "version_id": None,
         "key": prefix + "r/2011/b.pdf", "bytes": 17, "etag": '"e4d909c290d0fb1ca068ffaddf22cbd0"', "sha256": None,
         "storage_class": "GLACIER", "verified": "size+md5", "sse": "AES256"},
        {"target": "receipts", "bucket": "retail-receipts", "source": "r/2011/c.pdf", "key": prefix + "r/2011/c.pdf",
         "bytes": 5, "etag": '"5d41402abc4b2a76b9719d911017c592"',
         "sha256": "LPJNul+wow4m6DsqxbninhsWHlwfp0JecwQzYpOLmCQ=", "storage_class": "GLACIER", "verified": "settled"},
        {"target": "receipts", "source": "r/2011/d.pdf", "key": None, "note": "only delete markers: nothing to keep"},
    ]


def _header(category: str, run_id: str, cutoff: str, sse: dict) -> dict:
    return {"category": category, "run_id": run_id, "rule": RULE, "as_of": "2026-06-15T00:00:00Z", "cutoff": cutoff,
            "connection": "aws_default", "bucket": "retention-archive", "format": "jsonl.gz", "sse": sse}


@pytest.mark.parametrize("body", [ROWS_MANIFEST, OBJECTS_MANIFEST], ids=["rows", "objects"])
def test_a_manifest_written_before_it_was_typed_parses_and_serializes_to_the_same_bytes(body):
    manifest = Manifest.parse(body, "s3://retention-archive/manifest.json")
    assert manifest.to_bytes() == body
    assert hashlib.sha256(manifest.to_bytes()).hexdigest() == hashlib.sha256(body).hexdigest()


def test_build_manifest_writes_the_bytes_it_wrote_before_for_the_same_records():
    rows = build_manifest(
        _header("shop", "r 1", "2016-06-15T00:00:00Z", {"algorithm": "aws:kms", "kms_key_id": "alias/retention"}),
        [_rows_object(1, "orders", 4, 310, "a", 0, ORDERS), _rows_object(1, "order_items", 8, 402, "b", 1, ITEMS),
         _rows_object(2, "orders", 1, 190, "c", 0, ORDERS)], [])
    objects = build_manifest(_header("receipts", "r2", "2019-06-15T00:00:00Z", {"algorithm": "AES256"}), [], _copies())
    assert rows == ROWS_MANIFEST
    assert objects == OBJECTS_MANIFEST


def test_a_parsed_manifest_reads_as_typed_values():
    rows = Manifest.parse(ROWS_MANIFEST, "rows")
    assert (rows.category, rows.run_id, rows.bucket, rows.rule.path) == ("shop", "r 1", "retention-archive",
                                                                        "rules/shop.yaml")
    assert rows.sse is not None and rows.sse.kms_key_id == "alias/retention"
    assert [(t.name, t.rows, t.depth) for t in rows.tables] == [("order_items", 8, 1), ("orders", 5, 0)]
    assert rows.tables[1].shape.columns == tuple(tuple(c) for c in ORDERS)
    assert [o.batch for o in rows.objects] == [("orders", "archive/shop/run=r%201/orders", "000001")] * 2 + \
        [("orders", "archive/shop/run=r%201/orders", "000002")]
    assert (rows.totals.objects, rows.totals.rows, rows.totals.bytes) == (3, 13, 902)

    objects = Manifest.parse(OBJECTS_MANIFEST, "objects")
    assert [c.source for c in objects.copies] == ["r/2011/a.pdf", "r/2011/b.pdf", "r/2011/c.pdf"]
    unversioned, settled = objects.copies[1], objects.copies[2]
    assert unversioned.version_id is None and "version_id" in unversioned.written_fields()
    assert settled.version_id is None and "version_id" not in settled.written_fields()
    assert objects.s3_objects[3].key is None and objects.s3_objects[3].note


def test_a_copy_matches_a_head_by_size_then_checksum_or_plain_etag():
    objects = Manifest.parse(OBJECTS_MANIFEST, "objects")
    copied, unversioned = objects.copies[0], objects.copies[1]
    assert copied.same_as({"ContentLength": 2048, "ChecksumSHA256": copied.sha256}) is True
    assert copied.same_as({"ContentLength": 2048, "ChecksumSHA256": "other="}) is False
    assert copied.same_as({"ContentLength": 2047, "ChecksumSHA256": copied.sha256}) is False
    assert unversioned.same_as({"ContentLength": 17, "ETag": unversioned.etag}) is True
    assert unversioned.same_as({"ContentLength": 17, "ETag": '"abc-2"'}) is None  # multipart: only the size agrees


def _edited(body: bytes, edit) -> bytes:
    data = json.loads(body)
    edit(data)
    return json.dumps(data).encode()


@pytest.mark.parametrize(("body", "message"), [
    (b"not json", "not a retention archive manifest (not JSON)"),
    (b"[]", "not a retention archive manifest"),
    (_edited(ROWS_MANIFEST, lambda d: d.update(type="retention/certificate")), "not a retention archive manifest"),
    (_edited(ROWS_MANIFEST, lambda d: d.update(version=2)), "version 2"),
    (_edited(ROWS_MANIFEST, lambda d: d.pop("bucket")), "manifest has no bucket"),
    (_edited(ROWS_MANIFEST, lambda d: d["objects"][1].update(bytes="402")), "manifest.objects[1].bytes is not a whole"),
    (_edited(ROWS_MANIFEST, lambda d: d["tables"]["orders"]["columns"].append(["x", "pickle"])),
     "manifest.tables.orders.columns is not a list of [column, codec]"),
    (_edited(OBJECTS_MANIFEST, lambda d: d["s3_objects"][0].update(restored_by="someone")),
     "manifest.s3_objects[0] has fields this version does not know: restored_by"),
])
def test_what_is_not_a_manifest_as_retention_writes_them_is_refused_naming_where(body, message):
    with pytest.raises(ConfigError) as refused:
        Manifest.parse(body, "s3://retention-archive/x/manifest.json")
    assert str(refused.value).startswith("s3://retention-archive/x/manifest.json ")
    assert message in str(refused.value)


def test_build_refuses_a_record_it_would_not_write_back():
    record = {**_rows_object(1, "orders", 4, 310, "a", 0, ORDERS), "compressed": True}
    with pytest.raises(MalformedManifest, match="objects\\[0\\] has fields this version does not know: compressed"):
        build_manifest(_header("shop", "r 1", "2016-06-15T00:00:00Z", {"algorithm": "AES256"}), [record], [])


def test_read_manifest_checks_the_sha256_the_certificate_recorded(tmp_path):
    path = tmp_path / "manifest.json"
    path.write_bytes(ROWS_MANIFEST)
    never = lambda: pytest.fail("a local file needs no S3 client")  # noqa: E731
    assert read_manifest(str(path), never, sha256=hashlib.sha256(ROWS_MANIFEST).hexdigest()).run_id == "r 1"
    with pytest.raises(TerminalError, match="SHA-256 differs"):
        read_manifest(str(path), never, sha256=hashlib.sha256(OBJECTS_MANIFEST).hexdigest())
    with pytest.raises(ConfigError, match="cannot read manifest"):
        read_manifest(str(tmp_path / "missing.json"), never)


def test_a_manifest_object_larger_than_any_manifest_is_refused_naming_its_key(aws_server, monkeypatch, tmp_path):
    # A crafted huge object at the manifest's key was read whole into memory.
    from retention.archive import manifest as manifest_module

    assert manifest_module.MANIFEST_LIMIT == 64 << 20  # generous: a run's manifest lists its objects, a few MiB
    monkeypatch.setattr(manifest_module, "MANIFEST_LIMIT", 1 << 20)  # a test-sized bound, the same code path
    aws_server.create_bucket(Bucket="crafted")
    aws_server.put_object(Bucket="crafted", Key="runs/r1/manifest.json", Body=ROWS_MANIFEST + b" " * (1 << 20))
    with pytest.raises(TerminalError, match=r"manifest s3://crafted/runs/r1/manifest.json is larger than 1 MiB"):
        read_manifest("s3://crafted/runs/r1/manifest.json", lambda: aws_server)
    aws_server.put_object(Bucket="crafted", Key="runs/r2/manifest.json", Body=ROWS_MANIFEST)
    assert read_manifest("s3://crafted/runs/r2/manifest.json", lambda: aws_server).run_id == "r 1"  # under it: read
    local = tmp_path / "manifest.json"
    local.write_bytes(ROWS_MANIFEST + b" " * (1 << 20))
    with pytest.raises(ConfigError, match=f"manifest {local} is larger than 1 MiB"):
        read_manifest(str(local), lambda: aws_server)
