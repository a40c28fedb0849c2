"""Restore: put an archive back, proving it is usable.

Only a manifest a certificate records is trusted: its SHA-256 must be the one the
certificate (found by ``--seq``, or by that hash) holds, else nothing is restored.

Table rows: check every object's size and SHA-256 against the manifest before writing
anything, decode rows with the column codecs the manifest records, and insert each batch
(the target's rows first, then its children's, so foreign keys hold) in one transaction,
only into tables the certificate's targets name.

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
import re
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import MetaData, Table, insert
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from retention.archive.codec import TableShape, decode_rows
from retention.archive.store import MANIFEST_TYPE
from retention.aws import s3_error_code
from retention.errors import ConfigError, TerminalError

log = logging.getLogger(__name__)

CHUNK_ROWS = 5000
CODECS = frozenset({"plain", "datetime", "date", "time", "interval", "decimal", "bytes", "uuid"})


@dataclass(frozen=True)
class RestoreResult:
    """Rows put back, per table."""

    tables: dict[str, int]


def read_manifest(location: str, s3_client_for: Callable[[], Any], *, sha256: str | None = None) -> dict[str, Any]:
    """A manifest from ``s3://bucket/key`` or a local file path; with ``sha256`` (what the
    certificate recorded), TerminalError unless the manifest's bytes hash to it."""
    body = _manifest_bytes(location, s3_client_for)
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise TerminalError(f"manifest {location} is not the one the certificate records (SHA-256 differs)")
    return _parse_manifest(body, location)


def certified_manifest(engine, location: str | None, s3_client_for: Callable[[], Any], *, seq: int | None = None,
                       keys=None) -> tuple[dict[str, Any], Any]:
    """The manifest at ``location`` (or, with only ``seq``, the one certificate ``seq``
    records) and the certificate that records it, found in the audit database ``engine``.

    A manifest is only as good as the certificate that records its SHA-256: without one
    (a hand-written manifest, or one rewritten after a tampered object), or with one whose
    hash differs, TerminalError, before anything is read from the archive or written.
    With ``keys`` (:class:`retention.evidence.signing.PublicKeys`) the certificate's signature must hold too.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from retention.evidence.chain import read_certificates

    certificate = None
    if seq is not None:
        certificate = next(iter(read_certificates(engine, seq=seq)), None)
        if certificate is None:
            raise TerminalError(f"no certificate with seq {seq}; `retention certificates` lists them")
        recorded = certificate.data.get("archive") or {}
        if not recorded.get("manifest"):
            raise TerminalError(f"certificate seq {seq} records no archive manifest "
                                f"(run {certificate.run_id} of {certificate.category} is not an archive run)")
        location = location or recorded["manifest"]
    if not location:
        raise ConfigError("say what to restore: MANIFEST (s3://bucket/key or a file), or --seq N of its certificate")
    try:
        body = _manifest_bytes(location, s3_client_for)
    except ClientError as exc:
        raise TerminalError(f"cannot read manifest {location} ({s3_error_code(exc)})") from None
    except BotoCoreError as exc:  # no endpoint, no credentials: S3 never answered
        raise TerminalError(f"cannot read manifest {location} ({type(exc).__name__})") from None
    digest = hashlib.sha256(body).hexdigest()
    if certificate is not None:
        if certificate.data["archive"].get("sha256") != digest:
            raise TerminalError(f"manifest {location} is not the one certificate seq {seq} records "
                                "(SHA-256 differs): it was changed after the run; nothing was restored")
    else:
        certificate = next((c for c in read_certificates(engine)
                            if (c.data.get("archive") or {}).get("sha256") == digest), None)
        if certificate is None:
            raise TerminalError(f"manifest {location}: no certificate records it (none holds its SHA-256 "
                                f"{digest[:16]}…); only a manifest a certificate records is restored: "
                                "give the run's own manifest, or --seq N")
    if keys is not None:
        from retention.evidence.signing import SignatureRejected

        try:
            keys.verify(certificate.key_id, certificate.signature, certificate.payload.encode("utf-8"))
        except SignatureRejected as problem:
            raise TerminalError(f"certificate seq {certificate.seq}: {problem}; nothing was restored") from None
    manifest = _parse_manifest(body, location)
    for field_name in ("category", "run_id"):
        if manifest.get(field_name) != certificate.data.get(field_name):
            raise TerminalError(f"manifest {location} names {field_name} {manifest.get(field_name)!r}, but "
                                f"certificate seq {certificate.seq} is of {certificate.data.get(field_name)!r}")
    return manifest, certificate


def _manifest_bytes(location: str, s3_client_for: Callable[[], Any]) -> bytes:
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        return s3_client_for().get_object(Bucket=bucket, Key=key)["Body"].read()
    try:
        with open(location, "rb") as handle:
            return handle.read()
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {location}: {exc.strerror}") from None


def _parse_manifest(body: bytes, location: str) -> dict[str, Any]:
    try:
        manifest = json.loads(body)
    except ValueError:
        raise ConfigError(f"{location} is not a retention archive manifest (not JSON)") from None
    if not isinstance(manifest, dict) or manifest.get("type") != MANIFEST_TYPE:
        raise ConfigError(f"{location} is not a retention archive manifest")
    return manifest


_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(?:\.[A-Za-z_][A-Za-z0-9_]{0,62})?")
KEEP_BODIES = 256 * 1024 * 1024  # compressed bytes kept between checking and loading; beyond, read again


def certified_tables(certificate) -> set[str]:
    """The tables a certificate's SQL targets name (each target's table and its children)."""
    names: set[str] = set()
    for target in certificate.data.get("targets", []):
        if target.get("kind") != "sql":
            continue
        names.add(str(target.get("location", "")).partition(":")[2])
        names.update(target.get("tables") or {})
    names.discard("")
    return names


def restore(manifest: dict[str, Any], client: Any, engine, *, certificate, table: str | None = None) -> RestoreResult:
    """Insert every archived row of ``manifest`` (recorded by ``certificate``) into ``engine``'s database.

    Nothing is inserted until every object has been read and matched its manifest entry
    (size and SHA-256). Then each batch (the target's rows and its children's) is loaded
    in one transaction, parents first, so a failure leaves no parent without its children.
    Only tables the certificate's targets name are written; names are never formatted into
    SQL. ``table`` renames the manifest's first (parent) table; children keep their names.
    """
    tables = manifest.get("tables") or {}
    if not tables:
        raise TerminalError("the manifest lists no table rows; S3 objects restore with --into s3://BUCKET[/PREFIX]")
    allowed = certified_tables(certificate)
    shapes: dict[str, TableShape] = {}
    depth: dict[str, int] = {}
    for name, info in tables.items():
        if not isinstance(name, str) or not _TABLE.fullmatch(name):
            raise TerminalError(f"the manifest names table {name!r}, which is not a plain table name; nothing was restored")
        if name not in allowed:
            raise TerminalError(f"the manifest names table {name!r}, which certificate seq {certificate.seq} does not "
                                f"(it names {', '.join(sorted(allowed)) or 'none'}); nothing was restored")
        columns = info.get("columns") or []
        if not all(isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and c[1] in CODECS for c in columns):
            raise TerminalError(f"the manifest's columns of {name} are malformed; nothing was restored")
        shapes[name] = TableShape(name, tuple(tuple(c) for c in columns))
        depth[name] = int(info.get("depth", 0))
    parent = min(depth, key=depth.get)
    renames = {parent: table} if table else {}
    objects = manifest.get("objects") or []
    for obj in objects:
        if obj.get("table") not in shapes:
            raise TerminalError(f"archive object {obj.get('key')} is of table {obj.get('table')!r}, which the "
                                "manifest's tables do not list; nothing was restored")
    # 1. Every object, checked (and decoded) before a single row is written.
    bodies: dict[str, bytes] = {}
    kept = 0
    for obj in objects:
        body = _checked_body(client, manifest["bucket"], obj)
        decode_rows(shapes[obj["table"]], body, obj["format"])
        if kept + len(body) <= KEEP_BODIES:
            bodies[obj["key"]] = body
            kept += len(body)
    # 2. The tables exist and hold every archived column.
    metadata = MetaData()
    reflected: dict[str, Table] = {}
    for name, shape in shapes.items():
        into = renames.get(name, name)
        schema, _, bare = into.rpartition(".")
        try:
            reflected[name] = Table(bare, metadata, schema=schema or None, autoload_with=engine)
        except NoSuchTableError:
            raise TerminalError(f"table {into} does not exist in the database restored into; create it "
                                "(with the archived columns) first; nothing was restored") from None
        missing = [c for c, _codec in shape.columns if c not in reflected[name].c]
        if missing:
            raise TerminalError(f"table {into} has no column {', '.join(missing)}, which the archive holds; "
                                "nothing was restored")
    # 3. One transaction per batch: parents before children, so foreign keys hold.
    counts: dict[str, int] = {}
    batches: dict[tuple, list[dict[str, Any]]] = {}
    for obj in objects:
        batches.setdefault(_batch_of(obj), []).append(obj)
    done = 0
    for batch_key in sorted(batches):
        members = sorted(batches[batch_key], key=lambda o: (depth[o["table"]], o["key"]))
        loaded: dict[str, int] = {}
        try:
            with engine.begin() as conn:
                for obj in members:
                    body = bodies.pop(obj["key"], None) or _checked_body(client, manifest["bucket"], obj)
                    rows = decode_rows(shapes[obj["table"]], body, obj["format"])
                    for start in range(0, len(rows), CHUNK_ROWS):
                        conn.execute(insert(reflected[obj["table"]]), rows[start : start + CHUNK_ROWS])
                    name = renames.get(obj["table"], obj["table"])
                    loaded[name] = loaded.get(name, 0) + len(rows)
        except DBAPIError as exc:
            code = getattr(exc.orig, "pgcode", None) or (exc.orig.args[0] if getattr(exc.orig, "args", None) else "")
            raise TerminalError(
                f"restoring the batch of {members[0]['key']} failed ({type(exc.orig).__name__} {code}); none of "
                f"its rows were written; {done} batches before it were restored (rerunning restores them again)"
            ) from None
        done += 1
        for name, n in loaded.items():
            counts[name] = counts.get(name, 0) + n
        log.info("restored batch %s: %s", members[0]["key"], loaded)
    return RestoreResult(counts)


def _checked_body(client: Any, bucket: str, obj: dict[str, Any]) -> bytes:
    body = client.get_object(Bucket=bucket, Key=obj["key"])["Body"].read()
    digest = hashlib.sha256(body).hexdigest()
    if digest != obj.get("sha256") or len(body) != obj.get("bytes"):
        raise TerminalError(f"archive object {obj['key']} does not match its manifest (sha256 {digest}); "
                            "nothing was restored from it")
    return body


def _batch_of(obj: dict[str, Any]) -> tuple:
    """The batch an object belongs to: its target, and its key without the table part
    (``…/orders/000007.order_items.jsonl.gz`` is batch ``…/orders/000007``)."""
    folder, _, name = obj["key"].rpartition("/")
    return (str(obj.get("target") or ""), folder, name.partition(".")[0])


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
