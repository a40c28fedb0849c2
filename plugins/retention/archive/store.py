"""The archive store: archive objects written to S3 create-only, verified, read and removed.

Bodies are uploaded with SHA-256 checksums (multipart above 8 MiB, each part checksummed)
and verified by reading back what S3 stored (size and checksum) before anything is
deleted; S3 objects are copied in server-side. :mod:`retention.archive.codec` makes the
bodies, :mod:`retention.archive.manifest` lists what a run stored.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import logging
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from retention.aws import s3_error_code
from retention.errors import TransientError

if TYPE_CHECKING:
    from retention.rules.models import ArchiveSpec

log = logging.getLogger(__name__)

PART_SIZE = 8 * 1024 * 1024  # boto3's default; S3 allows 10,000 parts an object
COPY_LIMIT = 5 * 1024**3  # CopyObject's limit; larger objects are copied in parts
COPY_PART_SIZE = 512 * 1024 * 1024  # 5 TiB objects in ≤ 10,000 parts


class ArchiveFailed(TransientError):
    """An archive object could not be written or did not verify; nothing was deleted."""


class ArchiveExists(ArchiveFailed):
    """Another object already holds an archive key: it is left alone, never replaced."""

    def __init__(self, message: str, key: str):
        super().__init__(message)
        self.key = key


@dataclass(frozen=True)
class ArchivedObject:
    """One verified archive object."""

    key: str
    table: str
    rows: int
    bytes: int
    sha256: str  # hex, of the whole object
    format: str
    storage_class: str
    columns: tuple[tuple[str, str], ...] = ()  # (name, codec) of the table, for restore
    depth: int = 0  # 0: the target's table, 1: a child, 2: a grandchild (restore goes in this order)
    sse: str | None = None  # the server-side encryption S3 reported, when archive.sse asked for one

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (``sse`` only when set, so unencrypted manifests keep their shape)."""
        data = asdict(self)
        if data["sse"] is None:
            del data["sse"]
        return data


class ArchiveStore:
    """Writes, verifies and removes archive objects in one bucket."""

    def __init__(self, spec: ArchiveSpec, client: Any):
        self.spec = spec
        self.client = client

    def key_for(self, category: str, run_id: str, target: str, batch_no: int, table: str,
                part: int | None = None) -> str:
        """Where one batch's rows of one table go (``part``: one of the objects of a partition
        archived whole, ``000007-0001``); the same inputs give the same key."""
        ext = "jsonl.gz" if self.spec.format == "jsonl.gz" else "parquet"
        batch = f"{batch_no:06d}" if part is None else f"{batch_no:06d}-{part:04d}"
        return f"{self._run_prefix(category, run_id)}{target}/{batch}.{table}.{ext}"

    def key_for_object(self, category: str, run_id: str, target: str, bucket: str, key: str) -> str:
        """Where an archived S3 object goes: its source bucket and key under the run."""
        return f"{self._run_prefix(category, run_id)}{target}/{bucket}/{key}"

    def legacy_key_for_object(self, category: str, run_id: str, target: str, bucket: str, key: str) -> str:
        """Where the scheme before ``run=`` put an archived S3 object (only to settle a batch
        journaled by that code; its keys could collide, so nothing is written there)."""
        safe_run = "".join(ch if ch.isalnum() or ch in "-_." else "_" for ch in run_id)
        return f"{self.spec.prefix}{category}/{safe_run}/{target}/{bucket}/{key}"

    def manifest_key(self, category: str, run_id: str) -> str:
        """Where the run's manifest goes."""
        return f"{self._run_prefix(category, run_id)}manifest.json"

    def _run_prefix(self, category: str, run_id: str) -> str:
        """``prefix/category/run=<run id>/``: one run's objects, apart from every other run's.

        The run id is percent-encoded (every byte but letters, digits and ``-_.~``), which
        decodes back to the id, so two distinct ids never share a key: ``x 1`` is
        ``x%201``, ``x_1`` stays ``x_1``. ``run=`` keeps these keys apart from those of
        the earlier scheme (which mapped punctuation to ``_``); archives written under it
        are found through their manifests, which list their keys.
        """
        encoded = urllib.parse.quote(run_id, safe="-_.~")
        if encoded in (".", ".."):  # never a path segment some tool would resolve
            encoded = encoded.replace(".", "%2E")
        prefix = self.spec.prefix
        if prefix and not prefix.endswith("/"):
            prefix += "/"
        return f"{prefix}{category}/run={encoded}/"

    def put_verified(self, key: str, body: bytes, *, table: str, rows: int,
                     columns: tuple[tuple[str, str], ...] = (),
                     content_type: str = "application/octet-stream") -> ArchivedObject:
        """Upload ``body`` with SHA-256 checksums and check what S3 stored; ArchiveFailed if not equal.

        Create-only: the write carries ``If-None-Match: *``, so an object already at ``key``
        is never replaced. If it holds exactly these bytes (a retried write whose first
        answer was lost, a retried certify) it is taken as written; otherwise
        :class:`ArchiveExists`. Rows and manifests go to STANDARD storage, so `retention
        restore` can read them at once; ``storage_class`` is where copies of archived S3
        objects go. With ``archive.sse``, the object must come back encrypted as asked.
        """
        try:
            expected, whole = self._upload(key, body, content_type)
            ours = True
        except ArchiveExists:
            expected, whole = _expected_checksum(body), hashlib.sha256(body).hexdigest()
            ours = False
        head = self.client.head_object(Bucket=self.spec.bucket, Key=key, ChecksumMode="ENABLED")
        stored = (head.get("ChecksumSHA256") or "").split("-")[0]
        same = head.get("ContentLength") == len(body) and stored == expected
        if not ours and not same:
            raise ArchiveExists(
                f"archive object s3://{self.spec.bucket}/{key} already exists and differs from what this run "
                "writes; an archive object is never replaced: find out who wrote it before running again", key)
        problem = None
        if not same:
            problem = (f"archive object s3://{self.spec.bucket}/{key} did not verify "
                       f"(size {head.get('ContentLength')} vs {len(body)}, checksum {stored!r} vs {expected!r})")
        else:
            problem = self.encryption_problem(key, head)
        if problem:
            if ours:
                self.remove([key])  # what does not verify is not an archive: leave nothing behind
            raise ArchiveFailed(problem) if ours else ArchiveExists(problem, key)
        return ArchivedObject(
            key=key, table=table, rows=rows, bytes=len(body), sha256=whole,
            format=self.spec.format, storage_class=head.get("StorageClass") or "STANDARD", columns=columns,
            sse=head.get("ServerSideEncryption") if self.spec.sse else None,
        )

    def encryption_problem(self, key: str, head: dict[str, Any]) -> str | None:
        """Why the object ``head`` describes is not encrypted as ``archive.sse`` asks, or None."""
        if self.spec.sse is None:
            return None
        where = f"archive object s3://{self.spec.bucket}/{key}"
        algorithm = head.get("ServerSideEncryption")
        if algorithm != self.spec.sse:
            return f"{where} is not encrypted as archive.sse asks ({algorithm or 'no encryption'}, not {self.spec.sse})"
        if self.spec.sse == "aws:kms" and not _same_kms_key(self.spec.kms_key_id, head.get("SSEKMSKeyId") or ""):
            return (f"{where} is not encrypted as archive.sse asks (KMS key {head.get('SSEKMSKeyId')!r}, "
                    f"not {self.spec.kms_key_id!r})")
        return None

    def _upload(self, key: str, body: bytes, content_type: str) -> tuple[str, str]:
        """Upload, create-only; return the checksum S3 should report (composite for multipart,
        base64) and the SHA-256 of the whole body (hex). ArchiveExists if ``key`` is taken."""
        common = {"Bucket": self.spec.bucket, "Key": key}
        create = {"StorageClass": "STANDARD", "ContentType": content_type, **self.spec.sse_arguments()}
        if len(body) <= PART_SIZE:
            raw = hashlib.sha256(body).digest()
            digest = base64.b64encode(raw).decode("ascii")
            with self._create_only(key):
                self.client.put_object(Body=body, ChecksumAlgorithm="SHA256", ChecksumSHA256=digest,
                                       IfNoneMatch="*", **common, **create)
            return digest, raw.hex()
        upload = self.client.create_multipart_upload(ChecksumAlgorithm="SHA256", **common, **create)
        parts = []
        try:
            for number, start in enumerate(range(0, len(body), PART_SIZE), 1):
                chunk = body[start : start + PART_SIZE]
                digest = _b64sha256(chunk)
                response = self.client.upload_part(
                    Bucket=self.spec.bucket, Key=key, UploadId=upload["UploadId"], PartNumber=number,
                    Body=chunk, ChecksumAlgorithm="SHA256", ChecksumSHA256=digest,
                )
                parts.append({"ETag": response["ETag"], "PartNumber": number, "ChecksumSHA256": digest})
            with self._create_only(key):
                self.client.complete_multipart_upload(
                    UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}, IfNoneMatch="*", **common)
        except BaseException:
            self.client.abort_multipart_upload(Bucket=self.spec.bucket, Key=key, UploadId=upload["UploadId"])
            raise
        return _expected_checksum(body), hashlib.sha256(body).hexdigest()

    @contextlib.contextmanager
    def _create_only(self, key: str) -> Iterator[None]:
        """Turn S3's answer to a taken key (412 PreconditionFailed) into ArchiveExists."""
        from botocore.exceptions import ClientError

        try:
            yield
        except ClientError as exc:
            if s3_error_code(exc) in ("PreconditionFailed", "412"):
                raise ArchiveExists(f"archive object s3://{self.spec.bucket}/{key} already exists", key) from None
            raise

    def copy_in(self, source_client: Any, source: dict[str, str], key: str, *, size: int) -> dict[str, Any]:
        """Copy an S3 object into the archive at ``key``, server-side and create-only; the HEAD of the copy.

        Up to 5 GiB: one CopyObject with ``If-None-Match: *`` (honoured by AWS S3; moto
        5.2 ignores it on CopyObject, hence the HEAD before). Larger: a multipart copy
        whose CompleteMultipartUpload carries ``If-None-Match: *`` (honoured by both).
        ArchiveExists if the key is taken; the caller compares what was copied.
        """
        if head_or_none(self.client, self.spec.bucket, key) is not None:
            raise ArchiveExists(f"archive object s3://{self.spec.bucket}/{key} already exists", key)
        create = {"StorageClass": self.spec.storage_class, "ChecksumAlgorithm": "SHA256", **self.spec.sse_arguments()}
        if size <= COPY_LIMIT:
            with self._create_only(key):
                source_client.copy_object(CopySource=source, Bucket=self.spec.bucket, Key=key, IfNoneMatch="*",
                                          **create)
        else:
            self._multipart_copy(source_client, source, key, size, create)
        return self.client.head_object(Bucket=self.spec.bucket, Key=key, ChecksumMode="ENABLED")

    def _multipart_copy(self, source_client: Any, source: dict[str, str], key: str, size: int,
                        create: dict[str, str]) -> None:
        common = {"Bucket": self.spec.bucket, "Key": key}
        upload = source_client.create_multipart_upload(**common, **create)
        parts = []
        try:
            for number, start in enumerate(range(0, size, COPY_PART_SIZE), 1):
                end = min(start + COPY_PART_SIZE, size) - 1
                response = source_client.upload_part_copy(
                    UploadId=upload["UploadId"], PartNumber=number, CopySource=source,
                    CopySourceRange=f"bytes={start}-{end}", **common)["CopyPartResult"]
                part = {"ETag": response["ETag"], "PartNumber": number}
                if response.get("ChecksumSHA256"):
                    part["ChecksumSHA256"] = response["ChecksumSHA256"]
                parts.append(part)
            with self._create_only(key):
                source_client.complete_multipart_upload(
                    UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}, IfNoneMatch="*", **common)
        except BaseException:
            source_client.abort_multipart_upload(UploadId=upload["UploadId"], **common)
            raise

    def describe(self, key: str, *, table: str, rows: int,
                 columns: tuple[tuple[str, str], ...] = ()) -> ArchivedObject | None:
        """An existing object as the manifest records it (after a crash), or None if absent."""
        from botocore.exceptions import ClientError

        try:
            body = self.client.get_object(Bucket=self.spec.bucket, Key=key)["Body"].read()
            head = self.client.head_object(Bucket=self.spec.bucket, Key=key)
        except ClientError as exc:
            if s3_error_code(exc) in ("404", "NoSuchKey"):
                return None
            raise
        return ArchivedObject(key, table, rows, len(body), hashlib.sha256(body).hexdigest(),
                              self.spec.format, head.get("StorageClass") or "STANDARD", columns)

    def remove(self, keys: Iterable[str]) -> None:
        """Delete archive objects whose rows were not deleted (no debris after a failure)."""
        objects = [{"Key": k} for k in keys]
        for start in range(0, len(objects), 1000):
            self.client.delete_objects(Bucket=self.spec.bucket, Delete={"Objects": objects[start : start + 1000],
                                                                        "Quiet": True})

    def read(self, key: str) -> bytes:
        """An object's bytes."""
        return self.client.get_object(Bucket=self.spec.bucket, Key=key)["Body"].read()


def _b64sha256(data: bytes) -> str:
    return base64.b64encode(hashlib.sha256(data).digest()).decode("ascii")


def _expected_checksum(body: bytes) -> str:
    """The ChecksumSHA256 S3 reports for ``body`` as :meth:`ArchiveStore._upload` writes it
    (the whole object's, or for a multipart upload the SHA-256 of the parts' digests)."""
    if len(body) <= PART_SIZE:
        return _b64sha256(body)
    digests = b"".join(hashlib.sha256(body[start : start + PART_SIZE]).digest()
                       for start in range(0, len(body), PART_SIZE))
    return base64.b64encode(hashlib.sha256(digests).digest()).decode("ascii")


def _same_kms_key(requested: str | None, reported: str) -> bool:
    """Whether S3's reported key (an ARN) is the key ``requested`` names. An alias cannot
    be resolved without KMS, so any key then counts (the manifest records which)."""
    if not requested or not reported:
        return False
    if requested == reported:
        return True
    if "alias/" in requested:
        return True
    return reported.endswith(f":key/{requested}")


def head_or_none(client: Any, bucket: str, key: str, *, checksum: bool = False) -> dict[str, Any] | None:
    """The HEAD of ``s3://bucket/key`` (with ``checksum``, its SHA-256 too), or None if there is no such object."""
    from botocore.exceptions import ClientError

    try:
        return client.head_object(Bucket=bucket, Key=key, **({"ChecksumMode": "ENABLED"} if checksum else {}))
    except ClientError as exc:
        if s3_error_code(exc) in ("404", "NoSuchKey", "NotFound"):
            return None
        raise
