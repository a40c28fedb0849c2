"""The archive action for S3: never lets an object go before its archive copy is made and
checked. Each object's newest version is copied server-side, create-only, into the
archive and compared with the source (size, and MD5 where the ETags are plain); an object
whose copy fails is kept, its copy removed. The verified copies are journaled with the
batch for the run's manifest.
"""

from __future__ import annotations

import logging
import time
from typing import TYPE_CHECKING, Any

from botocore.exceptions import ClientError

from retention.archive.store import ArchiveExists, ArchiveFailed
from retention.aws import s3_error_code
from retention.targets.s3.actions import S3Action, Tally
from retention.targets.s3.descriptors import ObjectsDescriptor

if TYPE_CHECKING:
    from retention.archive.store import ArchiveStore
    from retention.targets.base import BatchLedger, PendingBatch
    from retention.targets.s3.descriptors import JournaledObject
    from retention.targets.s3.listing import S3Object, Version
    from retention.targets.s3.objects import S3Objects

log = logging.getLogger(__name__)


class ArchiveObjects(S3Action):
    """Copy each object to the archive and check the copy, then delete it like DeleteObjects."""

    def __init__(self, store: ArchiveStore, *, category: str, run_id: str):
        self.store = store
        self.category = category
        self.run_id = run_id

    def apply(self, s3, batch):
        started = time.perf_counter()
        descriptor = ObjectsDescriptor.of(batch.objects)
        batch.ledger.pending(batch.number, descriptor.encode(), len(batch.objects))
        tally = Tally(held=batch.held)
        archived, failures = self._archive(s3, batch.objects)
        for obj in batch.objects:
            if obj.key in failures:
                tally.failed += 1
                tally.errors[failures[obj.key]] += 1
        kept = [obj for obj in batch.objects if obj.key not in failures]
        self.delete(s3, batch, kept, tally)
        if archived:
            # What went, with its copies, replaces the pending descriptor (the manifest reads it).
            descriptor = ObjectsDescriptor.of(kept, [archived[obj.key] for obj in kept if obj.key in archived])
            batch.ledger.done(batch.number, rows=tally.deleted, bytes_=tally.bytes, descriptor=descriptor.encode())
        else:
            batch.ledger.done(batch.number, rows=tally.deleted, bytes_=tally.bytes)
        return tally.result(descriptor, time.perf_counter() - started)

    def settle(self, s3: S3Objects, pending: PendingBatch, descriptor: ObjectsDescriptor, present: list[bool],
               ledger: BatchLedger) -> int:
        """As a delete settles; besides, copies of objects still in place are debris (removed),
        and copies of objects that went are looked up for the manifest."""
        gone = [obj for obj, still_there in zip(descriptor.objects, present) if not still_there]
        settled = ObjectsDescriptor(tuple(gone), tuple(self._settle_copies(s3, descriptor, present)))
        ledger.resolve(pending.batch_no, len(gone), bytes_=sum(obj.size for obj in gone),
                       descriptor=settled.encode())
        return len(gone)

    def _archive(self, s3: S3Objects, objects: list[S3Object]) -> tuple[dict[str, dict[str, Any]], dict[str, str]]:
        """Copy each object's newest version to the archive, server-side, and check the copy.

        Returns the verified copies by source key, and the keys that could not be archived
        (with an error code): those are not deleted.
        """
        archived: dict[str, dict[str, Any]] = {}
        failures: dict[str, str] = {}
        for obj in objects:
            live = [v for v in obj.versions if not v.delete_marker]
            if not live:
                archived[obj.key] = {"source": obj.key, "key": None, "note": "only delete markers: nothing to keep"}
                continue
            version = max(live, key=lambda v: v.last_modified)
            try:
                archived[obj.key] = self._copy_verified(s3, obj.key, version)
            except (ClientError, ArchiveFailed) as exc:
                code = s3_error_code(exc) if isinstance(exc, ClientError) else \
                    "ArchiveKeyTaken" if isinstance(exc, ArchiveExists) else "ArchiveNotVerified"
                log.warning("%s: could not archive %s (%s); it is kept", s3.target.name, obj.key, code)
                failures[obj.key] = code
        return archived, failures

    def _copy_verified(self, s3: S3Objects, key: str, version: Version) -> dict[str, Any]:
        """The manifest entry of a checked archive copy of ``version``; ArchiveFailed (the copy
        removed) when it does not match the source."""
        dest = self._dest(s3, key)
        source = {"Bucket": s3.target.bucket, "Key": key}
        if version.version_id:
            source["VersionId"] = version.version_id
        head = self.store.copy_in(s3.client, source, dest, size=version.size)  # create-only
        checked = "size"
        problem = self.store.encryption_problem(dest, head)
        if head.get("ContentLength") != version.size:
            problem = f"archive copy of {key} has {head.get('ContentLength')} bytes, not {version.size}"
        # Under SSE-KMS an ETag is not the MD5 of the data: there the size (and S3's checksum) must do.
        plain_etags = head.get("ServerSideEncryption") != "aws:kms" and version.etag and \
            "-" not in version.etag and "-" not in (head.get("ETag") or "-")
        if problem is None and plain_etags:
            if head["ETag"] != version.etag:
                problem = f"archive copy of {key} differs from the source (ETag)"
            checked = "size+md5"
        if problem:
            self.store.remove([dest])  # our copy, and not a good one: no debris
            raise ArchiveFailed(problem)
        copy = {"bucket": s3.target.bucket, "source": key, "version_id": version.version_id, "key": dest,
                "bytes": version.size, "etag": version.etag,
                "sha256": head.get("ChecksumSHA256"), "storage_class": head.get("StorageClass") or "STANDARD",
                "verified": checked}
        if self.store.spec.sse:
            copy["sse"] = head.get("ServerSideEncryption")
        return copy

    def _settle_copies(self, s3: S3Objects, descriptor: ObjectsDescriptor, present: list[bool]) -> list[dict[str, Any]]:
        """The manifest entries of a settled batch's objects that went; copies of objects
        still in place are removed."""
        archived: list[dict[str, Any]] = []
        debris: list[str] = []
        for obj, still_there in zip(descriptor.objects, present):
            if still_there:
                debris.append(self._dest(s3, obj.key))
                continue
            found = self._settled_copy(s3, obj)
            if found is None:
                archived.append({"source": obj.key, "key": None, "note": "gone; no archive copy (only markers?)"})
                continue
            dest, head = found
            archived.append({"bucket": s3.target.bucket, "source": obj.key, "key": dest, "bytes": head["ContentLength"],
                             "etag": head.get("ETag"), "sha256": head.get("ChecksumSHA256"),
                             "storage_class": head.get("StorageClass") or "STANDARD", "verified": "settled"})
        if debris:
            self.store.remove(debris)
        return archived

    def _settled_copy(self, s3: S3Objects, obj: JournaledObject) -> tuple[str, dict[str, Any]] | None:
        """Where the archive copy of an object that went is, and its HEAD; None if there is none."""
        bucket = self.store.spec.bucket
        dest = self._dest(s3, obj.key)
        try:
            return dest, self.store.client.head_object(Bucket=bucket, Key=dest, ChecksumMode="ENABLED")
        except ClientError:
            pass
        # A batch journaled before the run= key scheme: its copy sits at the old key. Taken
        # only when its size is one the batch journaled (that key may be another run's).
        dest = self.store.legacy_key_for_object(self.category, self.run_id, s3.target.name, s3.target.bucket, obj.key)
        try:
            head = self.store.client.head_object(Bucket=bucket, Key=dest, ChecksumMode="ENABLED")
        except ClientError:
            return None
        if head["ContentLength"] not in {version.size for version in obj.versions if version.size}:
            return None
        return dest, head

    def _dest(self, s3: S3Objects, key: str) -> str:
        return self.store.key_for_object(self.category, self.run_id, s3.target.name, s3.target.bucket, key)
