"""Signed checkpoints: the chain's head, signed and kept outside the audit database.

The hash chain shows a certificate that was edited, forged, reordered or removed from the
middle, but not a removed tail: delete the newest rows and what is left is a valid,
shorter chain. So after every certificate, the run also writes a checkpoint saying "the
chain held N certificates and the N-th hashed to H", signed with the certificate key, to
a store the audit database's owners do not control (a bucket with Object Lock, another
team's share). ``retention verify --checkpoint`` then catches a chain that is shorter
than a checkpoint says, or that was rewritten before it.

The text is a C2SP signed note (https://c2sp.org/signed-note), the envelope Certificate
Transparency logs and Sigstore publish their checkpoints in::

    retention/purge-certificates
    7
    <base64 of the 32-byte SHA-256 entry hash of certificate 7>

    — retention/purge-certificates <base64 of key hash (4 bytes) + Ed25519 signature>

Its third line is the chain head, not a Merkle root: verification recomputes the whole
chain anyway, so a Merkle tree's short proofs would buy nothing here.

Where checkpoints go is ``RETENTION_CHECKPOINTS``: a directory, or ``s3://bucket/prefix``
read and written through the AWS connection ``RETENTION_CHECKPOINTS_CONN`` (default
``aws_default``). One file per certificate, ``<seq>.checkpoint``, never overwritten: a
second, different checkpoint for the same seq means the chain was rewritten, and the
write fails saying so.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import re
import tempfile
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from retention import failpoints
from retention.aws import TRANSIENT_CODES, s3_error_code
from retention.errors import ConfigError, TerminalError, TransientError
from retention.evidence.signing import PublicKeys, Signer

CHECKPOINTS_ENV = "RETENTION_CHECKPOINTS"
CHECKPOINTS_CONN_ENV = "RETENTION_CHECKPOINTS_CONN"
ORIGIN = "retention/purge-certificates"
LOG_ID_ENV = "RETENTION_LOG_ID"
_LOG_ID = re.compile(r"[A-Za-z0-9._~:/-]{1,255}")
SUFFIX = ".checkpoint"
STALE_TEMP_S = 600  # a checkpoint's temporary file older than this was left by a killed writer
READERS = 8  # parallel GETs when reading checkpoints from S3 (boto3's default pool holds 10)
ED25519_ALGORITHM = b"\x01"  # the signed-note signature type of Ed25519


class CheckpointError(TerminalError):
    """A checkpoint is malformed, unsigned, or contradicts another."""


class NoCheckpoints(CheckpointError):
    """A checkpoint location holds none: emptied, misnamed, or nothing was certified yet."""


@dataclass(frozen=True)
class Checkpoint:
    """A signed statement of the chain's size and head hash."""

    size: int
    head_hash: str  # hex, as in purge_certificates.entry_hash
    source: str = ""  # where it was read from, for messages
    origin: str = ORIGIN  # the log identity: which deployment's chain this is a checkpoint of

    def body(self) -> str:
        """The signed text: origin, size, head hash (base64), each line newline-terminated."""
        root = base64.b64encode(bytes.fromhex(self.head_hash)).decode("ascii")
        return f"{self.origin}\n{self.size}\n{root}\n"


def log_identity(value: str | None = None, environ: Mapping[str, str] | None = None) -> str:
    """The log identity checkpoints are signed under: ``value``, else ``RETENTION_LOG_ID``, else ORIGIN.

    Each deployment names its own (``example.com/retention/eu``), so a checkpoint of one chain
    can never pass for another's, even when both are signed with one key. Unset, it is the
    origin every checkpoint was written with before it could be configured.
    """
    environ = os.environ if environ is None else environ
    where = "--log-id" if value else LOG_ID_ENV
    value = value or environ.get(LOG_ID_ENV) or ORIGIN
    if not _LOG_ID.fullmatch(value):
        raise ConfigError(f"{where}: {value[:60]!r} is not a log identity: up to 255 letters, digits and . _ ~ : / -, "
                          "no spaces or '+' (e.g. example.com/retention/eu)")
    return value


def note_key_hash(name: str, public_key: Ed25519PublicKey) -> bytes:
    """The 4-byte key hash of a signed note: SHA-256(name, newline, type, key)[:4]."""
    return hashlib.sha256(name.encode() + b"\n" + ED25519_ALGORITHM + public_key.public_bytes_raw()).digest()[:4]


def sign_note(text: str, name: str, private_key: Ed25519PrivateKey) -> bytes:
    """A C2SP signed note: ``text`` (newline-terminated), a blank line, one signature line."""
    signature = note_key_hash(name, private_key.public_key()) + private_key.sign(text.encode())
    return f"{text}\n— {name} {base64.b64encode(signature).decode('ascii')}\n".encode()


def open_note(note: bytes, name: str, public_keys: Iterable[Ed25519PublicKey]) -> str | None:
    """The text of ``note`` if one of ``public_keys`` signed it as ``name``; else None."""
    try:
        decoded = note.decode("utf-8")
    except UnicodeDecodeError:
        return None
    body, separator, signatures = decoded.rpartition("\n\n")
    if not separator:
        return None
    text = body + "\n"
    public_keys = list(public_keys)  # tried again for every signature line
    for line in signatures.splitlines():
        signer, _, blob = line.removeprefix("— ").rpartition(" ")
        if not line.startswith("— ") or signer != name:
            continue
        try:
            raw = base64.b64decode(blob, validate=True)
        except binascii.Error:
            continue
        for public_key in public_keys:
            if raw[:4] != note_key_hash(name, public_key):
                continue
            try:
                public_key.verify(raw[4:], text.encode())
            except InvalidSignature:
                continue
            return text
    return None


def sign(checkpoint: Checkpoint, signer: Signer) -> bytes:
    """The checkpoint as a note signed by ``signer`` under its origin (the log identity)."""
    return sign_note(checkpoint.body(), checkpoint.origin, signer.private_key)


def parse(note: bytes, keys: PublicKeys, source: str, origin: str = ORIGIN) -> Checkpoint:
    """The checkpoint of log ``origin`` in ``note`` if one of ``keys`` signed it; CheckpointError otherwise."""
    named = note.split(b"\n", 1)[0].decode("utf-8", "replace")
    if named != origin:
        raise CheckpointError(
            f"checkpoint {source}: is a checkpoint of log {named[:80]!r}, not of this deployment's log {origin!r} "
            f"({LOG_ID_ENV}, or --log-id): it belongs to another chain, or was written before the log identity "
            "was set (anchor the chain anew with `retention checkpoint` and move such files aside)"
        )
    text = open_note(note, origin, keys.by_id.values())
    if text is None:
        raise CheckpointError(f"checkpoint {source}: no valid signature by a trusted public key (forged or edited)")
    lines = text.split("\n")
    try:
        if lines[0] != origin:
            raise ValueError(lines[0])
        size, head = int(lines[1]), base64.b64decode(lines[2], validate=True)
    except (IndexError, ValueError, binascii.Error):
        raise CheckpointError(f"checkpoint {source}: signed, but not a checkpoint of {origin}") from None
    if size < 1 or len(head) != 32:
        raise CheckpointError(f"checkpoint {source}: signed, but its size or head hash is malformed")
    return Checkpoint(size, head.hex(), source, origin)


# -- stores -----------------------------------------------------------------------------


class CheckpointStore(Protocol):
    """Where checkpoints are kept: written once per seq, read all together."""

    location: str

    def put(self, name: str, note: bytes) -> None:
        """Create ``name``; if it exists with the same bytes, nothing; if different, CheckpointError."""

    def notes(self) -> Iterator[tuple[str, bytes]]:
        """Every checkpoint note: (where it is, its bytes)."""

    def check_writable(self) -> None:
        """ConfigError unless checkpoints can be written here (checked before a run purges)."""


class DirectoryStore:
    """Checkpoints as files in a directory (a mounted share, a WORM volume, a git checkout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.location = str(self.path)

    def put(self, name: str, note: bytes) -> None:
        self.path.mkdir(parents=True, exist_ok=True)
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
            _same_or_fail(str(target), target.read_bytes(), note)
        finally:
            os.unlink(handle.name)

    def check_writable(self) -> None:
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
        if self.path.is_file():
            yield str(self.path), self.path.read_bytes()
            return
        if not self.path.is_dir():
            raise ConfigError(f"checkpoints: {self.path} is neither a file nor a directory")
        for path in sorted(self.path.glob(f"*{SUFFIX}")):
            yield str(path), path.read_bytes()


class S3Store:
    """Checkpoints as objects under an S3 prefix; with Object Lock, nobody can remove them."""

    def __init__(self, url: str, client):
        bucket, _, prefix = url[len("s3://"):].partition("/")
        if not bucket:
            raise ConfigError(f"checkpoints: {url} names no bucket")
        self.bucket, self.prefix, self.client = bucket, prefix.strip("/"), client
        self.location = url

    def check_writable(self) -> None:
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
    if _note_text(existing) != _note_text(note):
        raise CheckpointError(
            f"checkpoint {where} already exists and differs from the chain now: the certificate "
            "chain was rewritten after that checkpoint was signed (or the audit database was "
            "replaced); run `retention verify --checkpoint` and investigate before certifying more"
        )


def _note_text(note: bytes) -> bytes:
    text, separator, _signatures = note.rpartition(b"\n\n")
    return text if separator else note


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


# -- write and read ----------------------------------------------------------------------


def publish(store: CheckpointStore, signer: Signer, seq: int, head_hash: str, origin: str | None = None) -> str:
    """Write the signed checkpoint of a chain whose certificate ``seq`` hashes to ``head_hash``.

    ``origin`` is the log identity (default: :func:`log_identity`).
    """
    name = f"{seq:012d}{SUFFIX}"
    store.put(name, sign(Checkpoint(seq, head_hash, origin=origin or log_identity()), signer))
    return name


def read_all(stores: Iterable[CheckpointStore], keys: PublicKeys, origin: str | None = None) -> dict[int, Checkpoint]:
    """Every checkpoint of log ``origin`` (default: :func:`log_identity`) in ``stores``, signature checked, by size.

    Raises CheckpointError for a note no trusted key signed, for one of another log, for two
    checkpoints that give one seq different heads, and for a store that holds none.
    """
    origin = origin or log_identity()
    found: dict[int, Checkpoint] = {}
    for store in stores:
        seen = False
        for source, note in store.notes():
            seen = True
            checkpoint = parse(note, keys, source, origin)
            other = found.get(checkpoint.size)
            if other is not None and other.head_hash != checkpoint.head_hash:
                raise CheckpointError(f"checkpoints {other.source} and {source} give seq {checkpoint.size} "
                                      "two different heads: the chain was rewritten")
            found[checkpoint.size] = checkpoint
        if not seen:
            raise NoCheckpoints(f"no checkpoints at {store.location}: they were removed, or runs were not "
                                f"given {CHECKPOINTS_ENV}")
    return found
