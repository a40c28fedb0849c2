"""Where checkpoints are kept: a directory or an S3 prefix, each written once per seq.

A store is outside the audit database's owners' control (a bucket with Object Lock,
another team's share), which is what makes a checkpoint worth having. Where it is is
``RETENTION_CHECKPOINTS``: a directory, or ``s3://bucket/prefix`` read and written through
the AWS connection ``RETENTION_CHECKPOINTS_CONN`` (default ``aws_default``). One file per
certificate, ``<seq>.checkpoint``, never overwritten: a second, different checkpoint for
the same seq means the chain was rewritten, and the write fails saying so.
"""

from __future__ import annotations

import base64
import hashlib
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Protocol

from retention import failpoints
from retention.aws import TRANSIENT_CODES, s3_error_code
from retention.errors import ConfigError, TransientError
from retention.evidence.checkpoints import CHECKPOINTS_ENV, SUFFIX, CheckpointError, log_identity
from retention.evidence.notes import note_text
from retention.evidence.signing import read_local_file

CHECKPOINTS_CONN_ENV = "RETENTION_CHECKPOINTS_CONN"
STALE_TEMP_S = 600  # a checkpoint's temporary file older than this was left by a killed writer
CHECKPOINT_LIMIT = 64 << 10  # a signed note is a few hundred bytes; past this a file is not one
READERS = 8  # parallel GETs when reading checkpoints from S3 (boto3's default pool holds 10)


class CheckpointStore(Protocol):
    """Where checkpoints are kept: written once per seq, read all together."""

    location: str

    def put(self, name: str, note: bytes) -> None:
        """Create ``name``; if it exists with the same signed text, nothing; if different, CheckpointError."""

    def notes(self) -> Iterator[tuple[str, bytes]]:
        """Every checkpoint note: (where it is, its bytes)."""

    def check_writable(self) -> None:
        """ConfigError unless checkpoints can be written here (checked before a run purges)."""


def open_store(location: str, s3_client: Callable[[str], object], conn_id: str = "aws_default") -> CheckpointStore:
    """A store for ``location`` (a directory or ``s3://bucket/prefix``)."""
    if location.startswith("s3://"):
        return S3Store(location, s3_client(conn_id))
    return DirectoryStore(location)


def configured_store(s3_client: Callable[[str], object],
                     environ: Mapping[str, str] | None = None) -> CheckpointStore | None:
    """The store ``RETENTION_CHECKPOINTS`` names, checked writable; None when checkpoints are off.

    Checked before anything is purged: a run that could not leave its checkpoint must not start.
    """
    environ = os.environ if environ is None else environ
    location = environ.get(CHECKPOINTS_ENV)
    if not location:
        return None
    log_identity(environ=environ)  # a malformed one must stop the run before it purges
    store = open_store(location, s3_client, environ.get(CHECKPOINTS_CONN_ENV) or "aws_default")
    store.check_writable()
    return store


class DirectoryStore:
    """Checkpoints as files in a directory (a mounted share, a WORM volume, a git checkout)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.location = str(self.path)

    def put(self, name: str, note: bytes) -> None:
        """Create ``name`` in the directory; CheckpointError if it holds a different checkpoint."""
        self.check_writable()
        self._sweep()
        target = self.path / name
        # Written whole to a temporary file, then linked into place: link never replaces,
        # and a crash leaves no half-written checkpoint under the real name.
        with tempfile.NamedTemporaryFile(dir=self.path, prefix=f".{name}.", delete=False) as handle:
            handle.write(note)
            handle.flush()
            os.fsync(handle.fileno())
        failpoints.hit("checkpoint.before_link")
        try:
            os.chmod(handle.name, 0o644)
            os.link(handle.name, target)
        except FileExistsError:
            # What is there is read as any checkpoint is: bounded, and a planted FIFO refused, never waited on.
            _same_or_fail(str(target), read_local_file(target, what="checkpoint", limit=CHECKPOINT_LIMIT), note)
        finally:
            os.unlink(handle.name)

    def check_writable(self) -> None:
        """ConfigError unless the directory exists (or can be made) and is writable."""
        try:
            self.path.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise ConfigError(f"checkpoints: cannot create directory {self.path}: {exc.strerror}") from None
        if not os.access(self.path, os.W_OK | os.X_OK):
            raise ConfigError(f"checkpoints: directory {self.path} is not writable")

    def _sweep(self) -> None:
        """Remove temporary files a killed writer left (a live one's exists for milliseconds)."""
        for stale in self.path.glob(f".*{SUFFIX}.*"):
            try:
                if time.time() - stale.stat().st_mtime > STALE_TEMP_S:
                    stale.unlink()
            except FileNotFoundError:
                pass

    def notes(self) -> Iterator[tuple[str, bytes]]:
        """Every ``*.checkpoint`` in the directory by name, or the one file the location names."""
        if self.path.is_file():
            yield str(self.path), read_local_file(self.path, what="checkpoint", limit=CHECKPOINT_LIMIT)
            return
        if not self.path.is_dir():
            raise ConfigError(f"checkpoints: {self.path} is neither a file nor a directory")
        for path in sorted(self.path.glob(f"*{SUFFIX}")):  # an entry planted there (/dev/zero, a directory) is named
            yield str(path), read_local_file(path, what="checkpoint", limit=CHECKPOINT_LIMIT)


class S3Store:
    """Checkpoints as objects under an S3 prefix; with Object Lock, nobody can remove them."""

    def __init__(self, url: str, client: Any) -> None:
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"checkpoints: {url} names no bucket")
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self.location = url

    def check_writable(self) -> None:
        """ConfigError unless the bucket can be used; TransientError when it cannot be reached."""
        from botocore.exceptions import BotoCoreError, ClientError

        try:
            self.client.head_bucket(Bucket=self.bucket)
        except ClientError as exc:
            code = s3_error_code(exc)
            raise ConfigError(f"checkpoints: bucket {self.bucket} cannot be used ({code})") from None
        except BotoCoreError as exc:
            raise TransientError(f"checkpoints: bucket {self.bucket} cannot be reached: {exc}") from exc

    def _key(self, name: str) -> str:
        return f"{self.prefix}/{name}" if self.prefix else name

    def put(self, name: str, note: bytes) -> None:
        """Create the object create-only (If-None-Match); CheckpointError if a different one is there."""
        from botocore.exceptions import BotoCoreError, ClientError

        key = self._key(name)
        digest = base64.b64encode(hashlib.sha256(note).digest()).decode()
        try:
            self.client.put_object(Bucket=self.bucket, Key=key, Body=note, IfNoneMatch="*",
                                   ChecksumSHA256=digest, ContentType="text/plain; charset=utf-8")
        except ClientError as exc:
            code = s3_error_code(exc)
            if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
                error = TransientError if code in TRANSIENT_CODES else CheckpointError
                raise error(f"checkpoint s3://{self.bucket}/{key} could not be written: {exc}") from exc
            existing = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
            _same_or_fail(f"s3://{self.bucket}/{key}", existing, note)
        except BotoCoreError as exc:
            raise TransientError(f"checkpoint s3://{self.bucket}/{key} could not be written: {exc}") from exc

    def notes(self) -> Iterator[tuple[str, bytes]]:
        """Every ``*.checkpoint`` object under the prefix, fetched a page at a time in parallel."""
        prefix = f"{self.prefix}/" if self.prefix else ""

        def fetch(key: str) -> tuple[str, bytes]:
            return f"s3://{self.bucket}/{key}", self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()

        # A year of nightly runs is thousands of small objects: fetch a page's worth at once.
        with ThreadPoolExecutor(READERS, thread_name_prefix="checkpoints") as pool:
            for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
                keys = [item["Key"] for item in page.get("Contents", []) if item["Key"].endswith(SUFFIX)]
                yield from pool.map(fetch, keys)


def _same_or_fail(where: str, existing: bytes, note: bytes) -> None:
    # The texts, not the bytes: a retried certify after a key rotation signs the same text anew.
    if note_text(existing) != note_text(note):
        raise CheckpointError(
            f"checkpoint {where} already exists and differs from the chain now: the certificate "
            "chain was rewritten after that checkpoint was signed (or the audit database was "
            "replaced); run `retention verify --checkpoint` and investigate before certifying more"
        )
