"""Checking an archive in place (``retention verify --archives``): every object its
manifest lists is still in the archive bucket, unchanged, without restoring anything."""

from __future__ import annotations

import base64
import hashlib
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from retention.archive.manifest import Manifest, ObjectCopy, RowsObject
from retention.archive.store import head_or_none

CHECK_READERS = 8


@dataclass
class ArchiveCheck:
    """What checking one run's archive found."""

    objects: int = 0
    bytes: int = 0
    problems: list[str] = field(default_factory=list)


def check_archive(manifest: Manifest, client: Any) -> ArchiveCheck:
    """Every object the manifest lists is still in the archive bucket, unchanged.

    Row archives: by the whole-object SHA-256 S3 keeps, or, where it keeps none (a
    multipart upload, or an object replaced without one), by reading the object and
    hashing it. Copies of S3 objects (possibly in GLACIER, so never read): by size and the
    checksum S3 reported when the copy was made.
    """
    bucket = manifest.bucket
    entries: list[RowsObject | ObjectCopy] = [*manifest.objects, *manifest.copies]
    result = ArchiveCheck()

    def check(entry: RowsObject | ObjectCopy) -> str | None:
        assert entry.key is not None  # copies are the objects the archive holds
        where = f"s3://{bucket}/{entry.key}"
        head = head_or_none(client, bucket, entry.key, checksum=True)
        if head is None:
            return f"{where} is missing"
        if head.get("ContentLength") != entry.bytes:
            return f"{where} differs from the manifest (size {head.get('ContentLength')}, not {entry.bytes})"
        stored = head.get("ChecksumSHA256") or ""
        if isinstance(entry, RowsObject):
            if stored and "-" not in stored:
                same = stored == _b64(entry.sha256)
            else:
                body = client.get_object(Bucket=bucket, Key=entry.key)["Body"].read()
                same = hashlib.sha256(body).hexdigest() == entry.sha256
        elif entry.sha256:
            same = stored == entry.sha256
        else:  # recorded without a checksum: the ETag, where it is a plain MD5
            same = entry.same_as(head) is not False
        return None if same else f"{where} differs from the manifest (SHA-256)"

    with ThreadPoolExecutor(CHECK_READERS, thread_name_prefix="archive-check") as pool:
        for entry, problem in zip(entries, pool.map(check, entries)):
            result.objects += 1
            result.bytes += entry.bytes or 0
            if problem:
                result.problems.append(problem)
    return result


def _b64(hex_digest: str) -> str:
    return base64.b64encode(bytes.fromhex(hex_digest)).decode("ascii")
