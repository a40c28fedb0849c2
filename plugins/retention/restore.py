"""Restore: put an archive back, proving it is usable.

Table rows: read a run's manifest, check every object's SHA-256 against it, decode rows
with the column codecs the manifest records, and insert them (the target's table first,
then its children, so foreign keys hold) in chunked transactions.

S3 objects: copy each archived object back, server-side, to a bucket the caller names
(never silently over another object), and check the copy against the manifest. Objects
archived to GLACIER or DEEP_ARCHIVE must be thawed first: the first call asks S3 to, and
a later call, once S3 has, copies them.
"""

from __future__ import annotations

import base64
import hashlib
import json
import logging
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import MetaData, Table, insert

from retention.archive import MANIFEST_TYPE, TableShape, decode_rows
from retention.connections import s3_error_code
from retention.errors import ConfigError, TerminalError

log = logging.getLogger(__name__)

CHUNK_ROWS = 5000


@dataclass(frozen=True)
class RestoreResult:
    """Rows put back, per table."""

    tables: dict[str, int]


def read_manifest(location: str, s3_client_for: Callable[[], Any], *, sha256: str | None = None) -> dict[str, Any]:
    """A manifest from ``s3://bucket/key`` or a local file path; with ``sha256`` (what the
    certificate recorded), TerminalError unless the manifest's bytes hash to it."""
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        body = s3_client_for().get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        try:
            with open(location, "rb") as handle:
                body = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read manifest {location}: {exc.strerror}") from None
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise TerminalError(f"manifest {location} is not the one the certificate records (SHA-256 differs)")
    manifest = json.loads(body)
    if manifest.get("type") != MANIFEST_TYPE:
        raise ConfigError(f"{location} is not a retention archive manifest")
    return manifest


def restore(manifest: dict[str, Any], client: Any, engine, *, table: str | None = None) -> RestoreResult:
    """Insert every archived row of ``manifest`` into ``engine``'s database.

    ``table`` renames the manifest's first (parent) table; children keep their names.
    """
    depth = {name: info.get("depth", 0) for name, info in manifest["tables"].items()}
    if not depth:
        raise TerminalError("the manifest lists no table rows; S3 objects restore with --into s3://BUCKET[/PREFIX]")
    parent = min(depth, key=depth.get)
    renames = {parent: table} if table else {}
    shapes = {name: TableShape(name, tuple(tuple(c) for c in info["columns"]))
              for name, info in manifest["tables"].items()}
    metadata = MetaData()
    reflected: dict[str, Table] = {}
    counts: dict[str, int] = {}
    # Parents before children, so foreign keys hold at every insert.
    order = sorted(manifest["objects"], key=lambda o: (depth[o["table"]], o["key"]))
    for obj in order:
        body = client.get_object(Bucket=manifest["bucket"], Key=obj["key"])["Body"].read()
        digest = hashlib.sha256(body).hexdigest()
        if digest != obj["sha256"] or len(body) != obj["bytes"]:
            raise TerminalError(f"archive object {obj['key']} does not match its manifest (sha256 {digest})")
        rows = decode_rows(shapes[obj["table"]], body, obj["format"])
        name = renames.get(obj["table"], obj["table"])
        if name not in reflected:
            schema, _, bare = name.rpartition(".")
            reflected[name] = Table(bare, metadata, schema=schema or None, autoload_with=engine)
        target = reflected[name]
        for start in range(0, len(rows), CHUNK_ROWS):
            with engine.begin() as conn:
                conn.execute(insert(target), rows[start : start + CHUNK_ROWS])
        counts[name] = counts.get(name, 0) + len(rows)
        log.info("restored %d rows of %s from %s", len(rows), name, obj["key"])
    return RestoreResult(counts)


# -- S3 objects ---------------------------------------------------------------------------

THAWED_CLASSES = frozenset({"GLACIER", "DEEP_ARCHIVE"})  # must be restored before a copy; GLACIER_IR need not
THAW_DAYS = 7


@dataclass
class ObjectRestoreResult:
    """What a restore of archived S3 objects did, object by object."""

    restored: list[str]  # copied back now, and checked
    present: list[str]  # already at the destination, the same object (a rerun)
    thawing: list[str]  # in a thawed-before-read class: S3 is restoring it; call again later
    conflicts: list[str]  # another object already sits at the destination: left alone

    @property
    def complete(self) -> bool:
        """True when every archived object is back."""
        return not self.thawing and not self.conflicts


def restore_objects(manifest: dict[str, Any], client: Any, into: str, *, thaw_days: int = THAW_DAYS,
                    thaw_tier: str = "Standard") -> ObjectRestoreResult:
    """Copy every S3 object the manifest archived back to ``into`` (``s3://bucket[/prefix]``),
    each at the prefix plus its original key. Safe to call again: what is back is skipped."""
    bucket, _, prefix = into.removeprefix("s3://").partition("/")
    if not into.startswith("s3://") or not bucket:
        raise ConfigError(f"--into {into}: S3 objects restore into s3://BUCKET[/PREFIX]")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    entries = [e for e in manifest.get("s3_objects", []) if e.get("key")]
    if not entries:
        raise TerminalError("the manifest lists no archived S3 objects; table rows restore with --into CONN")
    result = ObjectRestoreResult([], [], [], [])
    archive = manifest["bucket"]
    for entry in entries:
        dest = prefix + entry["source"]
        where = f"s3://{bucket}/{dest}"
        existing = _head(client, bucket, dest)
        if existing is not None:
            # Only an object known to be the same counts as back; anything else is left alone.
            (result.present if _same_object(existing, entry) else result.conflicts).append(where)
            continue
        head = client.head_object(Bucket=archive, Key=entry["key"])
        if head.get("StorageClass") in THAWED_CLASSES and 'ongoing-request="false"' not in (head.get("Restore") or ""):
            if not head.get("Restore"):
                client.restore_object(Bucket=archive, Key=entry["key"], RestoreRequest={
                    "Days": thaw_days, "GlacierJobParameters": {"Tier": thaw_tier}})
                log.info("asked S3 to thaw s3://%s/%s for %d days", archive, entry["key"], thaw_days)
            result.thawing.append(where)
            continue
        client.copy({"Bucket": archive, "Key": entry["key"]}, bucket, dest, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        copied = _head(client, bucket, dest)
        if copied is None or _same_object(copied, entry) is False:
            raise TerminalError(f"the restored copy {where} does not match the manifest (size or checksum)")
        result.restored.append(where)
    return result


def _head(client: Any, bucket: str, key: str) -> dict[str, Any] | None:
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except ClientError as exc:
        if s3_error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise


def _same_object(head: dict[str, Any], entry: dict[str, Any]) -> bool | None:
    """Whether the object at ``head`` is the archived one: compared by size, then whole-object
    SHA-256 or single-part ETag (MD5) where both sides know it; None when only the size agrees."""
    if head.get("ContentLength") != entry.get("bytes"):
        return False
    stored, recorded_sha = head.get("ChecksumSHA256") or "", entry.get("sha256") or ""
    if stored and recorded_sha and "-" not in stored + recorded_sha:  # "-N": per part, not the object's
        return stored == recorded_sha
    etag, recorded = head.get("ETag") or "", entry.get("etag") or ""
    if etag and recorded and "-" not in etag + recorded:
        return etag == recorded
    return None


# -- checking an archive in place -----------------------------------------------------------

CHECK_READERS = 8


@dataclass
class ArchiveCheck:
    """What checking one run's archive found."""

    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def check_archive(manifest: dict[str, Any], client: Any) -> ArchiveCheck:
    """Every object the manifest lists is still in the archive bucket, unchanged.

    Row archives: by the whole-object SHA-256 S3 keeps, or, where it keeps none (a
    multipart upload, or an object replaced without one), by reading the object and
    hashing it. Copies of S3 objects (possibly in GLACIER, so never read): by size and the
    checksum S3 reported when the copy was made.
    """
    bucket = manifest["bucket"]
    entries = [(e, True) for e in manifest.get("objects", [])]
    entries += [(e, False) for e in manifest.get("s3_objects", []) if e.get("key")]
    result = ArchiveCheck()

    def check(item: tuple[dict[str, Any], bool]) -> str | None:
        entry, rows = item
        where = f"s3://{bucket}/{entry['key']}"
        head = _head(client, bucket, entry["key"])
        if head is None:
            return f"{where} is missing"
        if head.get("ContentLength") != entry.get("bytes"):
            return f"{where} differs from the manifest (size {head.get('ContentLength')}, not {entry.get('bytes')})"
        stored = head.get("ChecksumSHA256") or ""
        if rows:
            if stored and "-" not in stored:
                same = stored == _b64(entry["sha256"])
            else:
                body = client.get_object(Bucket=bucket, Key=entry["key"])["Body"].read()
                same = hashlib.sha256(body).hexdigest() == entry["sha256"]
        elif entry.get("sha256"):
            same = stored == entry["sha256"]
        else:  # recorded without a checksum: the ETag, where it is a plain MD5
            same = _same_object(head, entry) is not False
        return None if same else f"{where} differs from the manifest (SHA-256)"

    with ThreadPoolExecutor(CHECK_READERS, thread_name_prefix="archive-check") as pool:
        for (entry, _rows), problem in zip(entries, pool.map(check, entries)):
            result.objects += 1
            result.bytes += entry.get("bytes") or 0
            if problem:
                result.problems.append(problem)
    return result


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")
