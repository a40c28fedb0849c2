"""Settling S3 batches left pending by a crash: S3 is asked (by HEAD) which of the versions a
batch journaled still exist; the keys with none left went, and the batch is resolved with
exactly those. What else a settled batch needs (an archive's copies) is its action's part."""

from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING

from botocore.exceptions import ClientError

from retention.aws import DELETE_MARKER_CODES, NOT_FOUND_CODES, s3_error_code
from retention.targets.s3.descriptors import JournaledObject, ObjectsDescriptor

if TYPE_CHECKING:
    from retention.targets.base import BatchLedger
    from retention.targets.s3.objects import S3Objects

def settle_pending(s3: S3Objects, ledger: BatchLedger) -> int:
    """Resolve every batch of ``ledger`` still pending; return how many objects they removed."""
    confirmed = 0
    pending_batches = ledger.unresolved()
    if not pending_batches:
        return confirmed
    with ThreadPoolExecutor(s3.target.concurrency, thread_name_prefix="s3-settle") as pool:
        for pending in pending_batches:
            descriptor = ObjectsDescriptor.decode(pending.descriptor)
            present = list(pool.map(lambda obj: still_there(s3, obj), descriptor.objects))
            confirmed += s3.action.settle(s3, pending, descriptor, present, ledger)
    return confirmed


def still_there(s3: S3Objects, obj: JournaledObject) -> bool:
    """Whether any version of a journaled object is still in the bucket."""
    return any(version_exists(s3, obj.key, version.version_id) for version in obj.versions)


def version_exists(s3: S3Objects, key: str, version_id: str | None) -> bool:
    """Whether S3 still has this version of ``key`` (a delete marker counts)."""
    kwargs = {"Bucket": s3.target.bucket, "Key": key}
    if version_id:
        kwargs["VersionId"] = version_id
    try:
        s3.client.head_object(**kwargs)
    except ClientError as exc:
        code = s3_error_code(exc)
        if code in NOT_FOUND_CODES:
            return False
        if code in DELETE_MARKER_CODES:
            return True
        raise
    return True
