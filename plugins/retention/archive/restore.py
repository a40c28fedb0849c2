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

import hashlib
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import MetaData, Table, insert
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from retention.archive.codec import TableShape, decode_rows
from retention.archive.manifest import Manifest, RowsObject, manifest_bytes
from retention.archive.store import head_or_none
from retention.aws import s3_error_code
from retention.errors import ConfigError, TerminalError

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from retention.evidence.chain import Certificate
    from retention.evidence.signing import PublicKeys

log = logging.getLogger(__name__)

CHUNK_ROWS = 5000
_TABLE = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}(?:\.[A-Za-z_][A-Za-z0-9_]{0,62})?")
KEEP_BODIES = 256 * 1024 * 1024  # compressed bytes kept between checking and loading; beyond, read again


@dataclass(frozen=True)
class RestoreResult:
    """Rows put back, per table."""

    tables: dict[str, int]


def certified_manifest(engine: Engine, location: str | None, s3_client_for: Callable[[], Any], *,
                       seq: int | None = None, keys: PublicKeys | None = None) -> tuple[Manifest, Certificate]:
    """The manifest at ``location`` (or, with only ``seq``, the one certificate ``seq``
    records) and the certificate that records it, found in the audit database ``engine``.

    A manifest is only as good as the certificate that records its SHA-256: without one
    (a hand-written manifest, or one rewritten after a tampered object), or with one whose
    hash differs, TerminalError, before anything is read from the archive or written.
    With ``keys`` (:class:`retention.evidence.signing.PublicKeys`) the certificate's signature must hold too.
    """
    from botocore.exceptions import BotoCoreError, ClientError

    from retention.evidence.chain import read_certificates

    certificate: Certificate | None = None
    if seq is not None:
        certificate = next(iter(read_certificates(engine, seq=seq)), None)
        # A seq that names no archive run is a mistake in the command (ConfigError), found before
        # anything (S3 included) is asked for.
        if certificate is None:
            raise ConfigError(f"no certificate with seq {seq}; `retention certificates` lists them")
        recorded = certificate.data.get("archive") or {}
        if not recorded.get("manifest"):
            raise ConfigError(f"certificate seq {seq} records no archive manifest "
                                f"(run {certificate.run_id} of {certificate.category} is not an archive run)")
        location = location or recorded["manifest"]
    if not location:
        raise ConfigError("say what to restore: MANIFEST (s3://bucket/key or a file), or --seq N of its certificate")
    try:
        body = manifest_bytes(location, s3_client_for)
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
    manifest = Manifest.parse(body, location)
    for field_name, named in (("category", manifest.category), ("run_id", manifest.run_id)):
        if named != certificate.data.get(field_name):
            raise TerminalError(f"manifest {location} names {field_name} {named!r}, but "
                                f"certificate seq {certificate.seq} is of {certificate.data.get(field_name)!r}")
    return manifest, certificate


def certified_tables(certificate: Certificate) -> set[str]:
    """The tables a certificate's SQL targets name (each target's table and its children)."""
    names: set[str] = set()
    for target in certificate.data.get("targets", []):
        if target.get("kind") != "sql":
            continue
        names.add(str(target.get("location", "")).partition(":")[2])
        names.update(target.get("tables") or {})
    names.discard("")
    return names


def restore(manifest: Manifest, client: Any, engine: Engine, *, certificate: Certificate,
            table: str | None = None) -> RestoreResult:
    """Insert every archived row of ``manifest`` (recorded by ``certificate``) into ``engine``'s database.

    Nothing is inserted until every object has been read and matched its manifest entry
    (size and SHA-256). Then each batch (the target's rows and its children's) is loaded
    in one transaction, parents first, so a failure leaves no parent without its children.
    Only tables the certificate's targets name are written; names are never formatted into
    SQL. ``table`` renames the manifest's first (parent) table; children keep their names.
    """
    if not manifest.tables:
        raise TerminalError("the manifest lists no table rows; S3 objects restore with --into s3://BUCKET[/PREFIX]")
    _check_tables(manifest, certificate)
    parent = min(manifest.tables, key=lambda t: t.depth).name
    renames = {parent: table} if table else {}
    bodies = _checked_bodies(manifest, client)
    loader = _BatchLoader(manifest, client, engine, _reflect(manifest, engine, renames), renames, bodies)
    batches: dict[tuple[str, str, str], list[RowsObject]] = {}
    for obj in manifest.objects:
        batches.setdefault(obj.batch, []).append(obj)
    for batch in sorted(batches):
        loader.load(batches[batch])
    return RestoreResult(loader.counts)


def _check_tables(manifest: Manifest, certificate: Certificate) -> None:
    """TerminalError unless every table is a plain name the certificate names, and every object of one."""
    allowed = certified_tables(certificate)
    for archived in manifest.tables:
        name = archived.name
        if not _TABLE.fullmatch(name):
            raise TerminalError(f"the manifest names table {name!r}, which is not a plain table name; nothing was restored")
        if name not in allowed:
            raise TerminalError(f"the manifest names table {name!r}, which certificate seq {certificate.seq} does not "
                                f"(it names {', '.join(sorted(allowed)) or 'none'}); nothing was restored")
    names = {archived.name for archived in manifest.tables}
    for obj in manifest.objects:
        if obj.table not in names:
            raise TerminalError(f"archive object {obj.key} is of table {obj.table!r}, which the "
                                "manifest's tables do not list; nothing was restored")


def _checked_bodies(manifest: Manifest, client: Any) -> dict[str, bytes]:
    """Every object, checked against the manifest and decoded, before a single row is written;
    the bodies that fit in :data:`KEEP_BODIES`, by key (the rest are read again to load)."""
    shapes = {archived.name: archived.shape for archived in manifest.tables}
    bodies: dict[str, bytes] = {}
    kept = 0
    for obj in manifest.objects:
        body = _checked_body(client, manifest.bucket, obj)
        decode_rows(shapes[obj.table], body, obj.format)
        if kept + len(body) <= KEEP_BODIES:
            bodies[obj.key] = body
            kept += len(body)
    return bodies


def _reflect(manifest: Manifest, engine: Engine, renames: dict[str, str]) -> dict[str, Table]:
    """Each archived table (by its name in the manifest) as the database has it, holding every archived column."""
    metadata = MetaData()
    reflected: dict[str, Table] = {}
    for archived in manifest.tables:
        into = renames.get(archived.name, archived.name)
        schema, _, bare = into.rpartition(".")
        try:
            reflected[archived.name] = Table(bare, metadata, schema=schema or None, autoload_with=engine)
        except NoSuchTableError:
            raise TerminalError(f"table {into} does not exist in the database restored into; create it "
                                "(with the archived columns) first; nothing was restored") from None
        missing = [c for c, _codec in archived.columns if c not in reflected[archived.name].c]
        if missing:
            raise TerminalError(f"table {into} has no column {', '.join(missing)}, which the archive holds; "
                                "nothing was restored")
    return reflected


class _BatchLoader:
    """Loads batches one transaction each, parents before children, so foreign keys hold."""

    def __init__(self, manifest: Manifest, client: Any, engine: Engine, reflected: dict[str, Table],
                 renames: dict[str, str], bodies: dict[str, bytes]):
        self.manifest, self.client, self.engine = manifest, client, engine
        self.reflected, self.renames, self.bodies = reflected, renames, bodies
        self.shapes: dict[str, TableShape] = {archived.name: archived.shape for archived in manifest.tables}
        self.depth = {archived.name: archived.depth for archived in manifest.tables}
        self.counts: dict[str, int] = {}
        self.done = 0

    def load(self, batch: Iterable[RowsObject]) -> None:
        """Insert one batch's rows in one transaction; TerminalError (nothing of it written) if the database refuses."""
        members = sorted(batch, key=lambda o: (self.depth[o.table], o.key))
        loaded: dict[str, int] = {}
        try:
            with self.engine.begin() as conn:
                for obj in members:
                    name = self.renames.get(obj.table, obj.table)
                    loaded[name] = loaded.get(name, 0) + self._insert(conn, obj)
        except DBAPIError as exc:
            orig = exc.orig
            code = getattr(orig, "pgcode", None) or (orig.args[0] if orig is not None and orig.args else "")
            raise TerminalError(
                f"restoring the batch of {members[0].key} failed ({type(orig).__name__} {code}); none of its "
                f"rows were written; {self.done} batches before it were restored (rerunning restores them again)"
            ) from None
        self.done += 1
        for name, n in loaded.items():
            self.counts[name] = self.counts.get(name, 0) + n
        log.info("restored batch %s: %s", members[0].key, loaded)

    def _insert(self, conn: Connection, obj: RowsObject) -> int:
        body = self.bodies.pop(obj.key, None) or _checked_body(self.client, self.manifest.bucket, obj)
        rows = decode_rows(self.shapes[obj.table], body, obj.format)
        for start in range(0, len(rows), CHUNK_ROWS):
            conn.execute(insert(self.reflected[obj.table]), rows[start : start + CHUNK_ROWS])
        return len(rows)


def _checked_body(client: Any, bucket: str, obj: RowsObject) -> bytes:
    body: bytes = client.get_object(Bucket=bucket, Key=obj.key)["Body"].read()
    digest = hashlib.sha256(body).hexdigest()
    if digest != obj.sha256 or len(body) != obj.bytes:
        raise TerminalError(f"archive object {obj.key} does not match its manifest (sha256 {digest}); "
                            "nothing was restored from it")
    return body


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


def restore_objects(manifest: Manifest, client: Any, into: str, *, thaw_days: int = THAW_DAYS,
                    thaw_tier: str = "Standard") -> ObjectRestoreResult:
    """Copy every S3 object the manifest archived back to ``into`` (``s3://bucket[/prefix]``),
    each at the prefix plus its original key. Safe to call again: what is back is skipped."""
    bucket, _, prefix = into.removeprefix("s3://").partition("/")
    if not into.startswith("s3://") or not bucket:
        raise ConfigError(f"--into {into}: S3 objects restore into s3://BUCKET[/PREFIX]")
    prefix = f"{prefix.strip('/')}/" if prefix.strip("/") else ""
    if not manifest.copies:
        raise TerminalError("the manifest lists no archived S3 objects; table rows restore with --into CONN")
    result = ObjectRestoreResult([], [], [], [])
    archive = manifest.bucket
    for copy in manifest.copies:
        assert copy.key is not None  # copies are the objects the archive holds
        dest = prefix + copy.source
        where = f"s3://{bucket}/{dest}"
        existing = head_or_none(client, bucket, dest, checksum=True)
        if existing is not None:
            # Only an object known to be the same counts as back; anything else is left alone.
            (result.present if copy.same_as(existing) else result.conflicts).append(where)
            continue
        head = client.head_object(Bucket=archive, Key=copy.key)
        if head.get("StorageClass") in THAWED_CLASSES and 'ongoing-request="false"' not in (head.get("Restore") or ""):
            if not head.get("Restore"):
                client.restore_object(Bucket=archive, Key=copy.key, RestoreRequest={
                    "Days": thaw_days, "GlacierJobParameters": {"Tier": thaw_tier}})
                log.info("asked S3 to thaw s3://%s/%s for %d days", archive, copy.key, thaw_days)
            result.thawing.append(where)
            continue
        client.copy({"Bucket": archive, "Key": copy.key}, bucket, dest, ExtraArgs={"ChecksumAlgorithm": "SHA256"})
        copied = head_or_none(client, bucket, dest, checksum=True)
        if copied is None or copy.same_as(copied) is False:
            raise TerminalError(f"the restored copy {where} does not match the manifest (size or checksum)")
        result.restored.append(where)
    return result
