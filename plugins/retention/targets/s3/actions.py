"""What an S3 batch does to its objects: the base every action builds on, and the delete.

Every action journals the batch *pending* with the versions it is about to delete, and
*done* with what S3's response says went; a crash in between is settled by asking S3
(:mod:`retention.targets.s3.settle`).

- :class:`DeleteObjects` deletes every version and delete marker of each object with
  DeleteObjects, up to ``max_batch_keys`` versions a request, so nothing is left behind a
  new delete marker.
- :class:`~retention.targets.s3.archive.ArchiveObjects` first copies each object to the
  archive and checks the copy; an object whose copy fails is kept.
"""

from __future__ import annotations

import logging
import time
from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from retention import failpoints
from retention.aws import DENIED_CODES, TRANSIENT_CODES
from retention.retry import attempts
from retention.targets.base import BatchResult
from retention.targets.s3.descriptors import ObjectsDescriptor
from retention.targets.s3.settle import settle_pending

if TYPE_CHECKING:
    from retention.targets.base import BatchLedger, PendingBatch
    from retention.targets.s3.listing import S3Object
    from retention.targets.s3.objects import S3Objects

log = logging.getLogger(__name__)

KEY_ATTEMPTS = 5
KEY_DELAYS = tuple(min(0.1 * 2**attempt, 5.0) for attempt in range(1, KEY_ATTEMPTS))
"""Seconds before each new attempt at keys S3 refused transiently (SlowDown): 0.2, 0.4, 0.8, 1.6."""

Entry = tuple[str, str | None]
"""One version to delete: (key, version id)."""


@dataclass(frozen=True)
class ObjectBatch:
    """One batch as an action receives it: its number, the objects it is to purge (none of
    them held when the batch was made), where it is journaled, and how many objects of its
    share holds or Object Lock had already kept out of it."""

    number: int
    objects: list[S3Object]
    ledger: BatchLedger
    held: int = 0


@dataclass
class Tally:
    """Objects purged, held and failed, counted as a batch (or a whole purge) goes."""

    deleted: int = 0
    bytes: int = 0
    held: int = 0
    failed: int = 0
    errors: Counter[str] = field(default_factory=Counter)

    def add(self, result: BatchResult[ObjectsDescriptor]) -> None:
        """Count a finished batch in."""
        self.deleted += result.rows
        self.bytes += result.bytes or 0
        self.held += result.held
        self.failed += result.failed
        self.errors.update(result.errors)

    def result(self, batch: ObjectsDescriptor, seconds: float) -> BatchResult[ObjectsDescriptor]:
        """The batch's result, ``batch`` being what it journaled."""
        return BatchResult(batch, self.deleted, {}, seconds, bytes=self.bytes, held=self.held,
                           failed=self.failed, errors=dict(self.errors))


class S3Action:
    """What every S3 action shares; subclasses say what a batch does."""

    def apply(self, s3: S3Objects, batch: ObjectBatch) -> BatchResult[ObjectsDescriptor]:
        """Purge the batch's objects, journaled pending first and done after."""
        raise NotImplementedError

    def settle(self, s3: S3Objects, pending: PendingBatch, descriptor: ObjectsDescriptor, present: list[bool],
               ledger: BatchLedger) -> int:
        """Resolve a batch found pending, ``present`` saying which of its objects S3 still has;
        return how many went."""
        gone = [obj for obj, still_there in zip(descriptor.objects, present) if not still_there]
        ledger.resolve(pending.batch_no, len(gone), bytes_=sum(obj.size for obj in gone))
        return len(gone)

    def delete(self, s3: S3Objects, batch: ObjectBatch, objects: list[S3Object], tally: Tally) -> None:
        """Delete every version of ``objects`` (journaled pending already) and count each one
        deleted, held (locked after it was checked) or failed."""
        failpoints.hit("s3.before_delete")
        try:
            failed = _delete_versions(s3, objects)
            failpoints.hit("s3.after_delete")
        except BaseException:
            try:
                settle_pending(s3, batch.ledger)
            except Exception:  # the original error matters more; the next attempt settles it
                log.warning("%s: could not settle the interrupted batch now", s3.target.name, exc_info=True)
            raise
        for obj in objects:
            problems = {failed[(obj.key, v.version_id)] for v in obj.versions
                        if (obj.key, v.version_id) in failed}
            if not problems:
                tally.deleted += 1
                tally.bytes += obj.size
            elif problems & DENIED_CODES and s3.locked and s3.object_locked(obj):
                tally.held += 1  # locked between our check and the delete
            else:
                tally.failed += 1
                tally.errors.update(problems)


class DeleteObjects(S3Action):
    """Delete every version and delete marker of the batch's objects."""

    def apply(self, s3, batch):
        started = time.perf_counter()
        descriptor = ObjectsDescriptor.of(batch.objects)
        batch.ledger.pending(batch.number, descriptor.encode(), len(batch.objects))
        tally = Tally(held=batch.held)
        self.delete(s3, batch, batch.objects, tally)
        batch.ledger.done(batch.number, rows=tally.deleted, bytes_=tally.bytes)
        return tally.result(descriptor, time.perf_counter() - started)


class _RefusedTransiently(Exception):
    """DeleteObjects answered that some keys failed in a way another attempt may fix."""

    def __init__(self, codes: dict[Entry, str]):
        super().__init__(f"DeleteObjects refused {len(codes)} keys ({', '.join(sorted(set(codes.values())))})")
        self.codes = codes


def _delete_versions(s3: S3Objects, objects: list[S3Object]) -> dict[Entry, str]:
    """Delete every version of every object; return the versions that failed, with codes.

    Keys refused transiently are tried again (retry.attempts, :data:`KEY_DELAYS`); those
    still refused after the last attempt fail with the rest."""
    entries = [(obj.key, v.version_id) for obj in objects for v in obj.versions]
    failed: dict[Entry, str] = {}
    step = s3.target.max_batch_keys
    for start in range(0, len(entries), step):
        pending = entries[start : start + step]
        try:
            for attempt in attempts(lambda exc: isinstance(exc, _RefusedTransiently), delays=KEY_DELAYS,
                                    what=s3.target.name):
                with attempt:
                    errors = _delete_request(s3, pending)
                    failed.update(errors)
                    retry = {entry: code for entry, code in errors.items() if code in TRANSIENT_CODES}
                    if retry:
                        for entry in retry:
                            del failed[entry]
                        pending = list(retry)
                        raise _RefusedTransiently(retry)
        except _RefusedTransiently as refused:
            failed.update(refused.codes)  # refused on every attempt: failed, left for a later run
    return failed


def _delete_request(s3: S3Objects, entries: list[Entry]) -> dict[Entry, str]:
    objects = [{"Key": key, "VersionId": version} if version else {"Key": key} for key, version in entries]
    response = s3.client.delete_objects(Bucket=s3.target.bucket, Delete={"Objects": objects, "Quiet": True})
    return {(e["Key"], e.get("VersionId")): e.get("Code", "Unknown") for e in response.get("Errors", [])}
