"""Ed25519 keys: the private one signs certificates, public ones verify them.

The private key is a PEM file named by ``RETENTION_SIGNING_KEY``; it never enters the
database or a rule. A key id is the SHA-256 of the raw 32-byte public key, so a
verifier can tell which key signed what without trusting anything else.
"""

from __future__ import annotations

import base64
import hashlib
import math
import os
import stat
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

from retention.errors import ConfigError

SIGNING_KEY_ENV = "RETENTION_SIGNING_KEY"
PUBLIC_KEY_LIMIT, KEYRING_LIMIT = 64 << 10, 4 << 20
"""The most a PEM public key or a keyring file may hold: a file past it is not one (or /dev/zero)."""


def key_id(public_key: Ed25519PublicKey) -> str:
    """Hex SHA-256 of the raw public key."""
    return hashlib.sha256(public_key.public_bytes_raw()).hexdigest()


@dataclass(frozen=True)
class Signer:
    """Signs certificate payloads with one Ed25519 private key."""

    private_key: Ed25519PrivateKey
    key_id: str

    @classmethod
    def from_pem_file(cls, path: str | Path) -> Signer:
        """Load an unencrypted PKCS#8 PEM Ed25519 private key."""
        path = Path(path)
        try:
            key = serialization.load_pem_private_key(_read_private(path), password=None)
        except FileNotFoundError:
            raise ConfigError(f"signing key {path} does not exist (make one with `retention keygen`)") from None
        except IsADirectoryError:
            raise ConfigError(f"signing key {path} is a directory, not a PEM file") from None
        except PermissionError:
            raise ConfigError(f"signing key {path} cannot be read by this user") from None
        except (ValueError, TypeError) as exc:
            raise ConfigError(f"signing key {path} is not an unencrypted PEM private key: {exc}") from None
        if not isinstance(key, Ed25519PrivateKey):
            raise ConfigError(f"signing key {path} is not an Ed25519 key")
        return cls(key, key_id(key.public_key()))

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> Signer:
        """The signer named by ``RETENTION_SIGNING_KEY``."""
        environ = os.environ if environ is None else environ
        path = environ.get(SIGNING_KEY_ENV)
        if not path:
            raise ConfigError(
                f"{SIGNING_KEY_ENV} is not set: point it at an Ed25519 private key PEM "
                "(`retention keygen --out DIR` makes one); runs are refused before anything "
                "is purged, since they could not be certified"
            )
        return cls.from_pem_file(path)

    def sign(self, data: bytes) -> str:
        """Base64 Ed25519 signature of ``data``."""
        return base64.b64encode(self.private_key.sign(data)).decode("ascii")


def _read_private(path: Path) -> bytes:
    """The key file's bytes, refused (as ssh does) when its group or others may read or write it.

    The mode is read from the open file, so a file swapped in between cannot slip past.
    """
    from retention.localfiles import NotARegularFile, open_regular

    try:
        handle = open_regular(path)  # never blocks on a FIFO
    except NotARegularFile:  # /dev/zero, a FIFO: not a key, and no chmod would make it one
        raise ConfigError(f"signing key {path} is not a regular file; point {SIGNING_KEY_ENV} at the PEM "
                          "`retention keygen` wrote") from None
    with handle:
        mode = os.fstat(handle.fileno()).st_mode
        if os.name == "posix" and mode & 0o077:
            raise ConfigError(
                f"signing key {path} is accessible to others (mode {stat.S_IMODE(mode):04o}): anyone who can "
                f"read it can forge certificates; run `chmod 600 {path}` (and rotate the key if others "
                "may have copied it)"
            )
        return handle.read()


class SignatureRejected(Exception):
    """A signature that does not hold, or a key the keyring does not let sign that seq; the message says which."""


@dataclass(frozen=True)
class PublicKeys:
    """The public keys a verifier accepts, by key id; from a keyring, each for its seq range only."""

    by_id: Mapping[str, Ed25519PublicKey]
    ranges: Mapping[str, tuple[int, int | None]] = field(default_factory=dict)
    """Key id → (first seq it may sign, last seq or None while it is current); empty: any seq."""

    @classmethod
    def from_keyring(cls, path: str | Path) -> PublicKeys:
        """Load a keyring: one key a line, ``KEY FIRST_SEQ [LAST_SEQ]``, ``#`` starts a comment.

        KEY is the base64 of the raw 32-byte Ed25519 public key (``retention keygen`` prints the
        line). A key may sign seq FIRST_SEQ to LAST_SEQ; without LAST_SEQ it is the current key.
        Ranges may not overlap, so every seq has exactly one key that may sign it.
        """
        path = Path(path)
        try:
            text = read_local_file(path, what="keyring", limit=KEYRING_LIMIT).decode("utf-8-sig")
        except UnicodeDecodeError:
            raise ConfigError(f"keyring {path} cannot be read as UTF-8 text") from None
        keys: dict[str, Ed25519PublicKey] = {}
        ranges: dict[str, tuple[int, int | None]] = {}
        lines: dict[str, int] = {}
        for number, line in enumerate(text.splitlines(), 1):
            fields = line.split("#", 1)[0].split()
            if not fields:
                continue
            where = f"{path}:{number}"
            if len(fields) > 3:
                raise ConfigError(f"{where}: {len(fields)} fields where a keyring line has KEY FIRST_SEQ [LAST_SEQ]; "
                                  "put notes after a #")
            key = _raw_public_key(fields[0], where)
            if len(fields) < 2:
                raise ConfigError(f"{where}: first seq: missing; write the seq of the first certificate this key signs "
                                  "after the key")
            first = _keyring_seq(fields[1], where, "first seq")
            last = _keyring_seq(fields[2], where, "last seq") if len(fields) == 3 else None
            if last is not None and last < first:
                raise ConfigError(f"{where}: last seq: {last} is before the first seq {first}")
            kid = key_id(key)
            if kid in keys:
                raise ConfigError(f"{where}: key: already listed on line {lines[kid]}; give each key one range")
            for other, (other_first, other_last) in ranges.items():
                if first <= (other_last or math.inf) and other_first <= (last or math.inf):
                    span = f"seq {other_first}–{other_last}" if other_last is not None else f"seq {other_first} on"
                    raise ConfigError(
                        f"{where}: first seq: the range overlaps the key on line {lines[other]} ({span}); end that "
                        "key's range with its last seq (the seq before this key's first)"
                    )
            keys[kid], ranges[kid], lines[kid] = key, (first, last), number
        if not keys:
            raise ConfigError(f"{path}: no keys; each line is KEY FIRST_SEQ [LAST_SEQ] "
                              "(`retention keygen` prints one)")
        return cls(keys, ranges)

    @classmethod
    def from_pem_files(cls, paths: list[str | Path]) -> PublicKeys:
        """Load one or more PEM public keys (several while a key is being rotated)."""
        keys: dict[str, Ed25519PublicKey] = {}
        for path in paths:
            try:
                key = serialization.load_pem_public_key(read_local_file(path, what="public key", limit=PUBLIC_KEY_LIMIT))
            except ValueError as exc:
                raise ConfigError(f"public key {path} is not a PEM public key: {exc}") from None
            if not isinstance(key, Ed25519PublicKey):
                raise ConfigError(f"public key {path} is not an Ed25519 key")
            keys[key_id(key)] = key
        return cls(keys)

    def verify(self, key_id_: str, signature_b64: str, data: bytes, *, seq: int | None = None) -> None:
        """Return when the signature holds (and the keyring lets its key sign ``seq``); otherwise raise
        :class:`SignatureRejected`, whose message says why not."""
        key = self.by_id.get(key_id_)
        if key is None:
            raise SignatureRejected(f"signed by key {key_id_[:16]}…, which is not one of the trusted public keys")
        if seq is not None and key_id_ in self.ranges:
            first, last = self.ranges[key_id_]
            if seq < first:
                raise SignatureRejected(f"signed by key {key_id_[:16]}…, which the keyring lets sign only from seq {first} on: "
                        "a row appended with a key before it was due")
            if last is not None and seq > last:
                raise SignatureRejected(f"signed by key {key_id_[:16]}…, which the keyring retired after seq {last}: "
                        "a row appended with a retired key")
        try:
            signature = base64.b64decode(signature_b64, validate=True)
            key.verify(signature, data)
        except (InvalidSignature, ValueError):
            raise SignatureRejected("signature does not match the payload (payload edited or signature forged)") from None


def read_local_file(path: str | Path, *, what: str, limit: int) -> bytes:
    """The bytes of a file an operator names, read no further than ``limit``; ConfigError naming
    it when it is missing, a directory, not a regular file (a FIFO, /dev/zero), unreadable or larger."""
    from retention.localfiles import NotARegularFile, read_regular

    try:
        data = read_regular(path, limit)  # a FIFO is refused, never waited on
    except FileNotFoundError:
        raise ConfigError(f"{what} {path} does not exist") from None
    except IsADirectoryError:
        raise ConfigError(f"{what} {path} is a directory; give the file") from None
    except NotARegularFile:
        raise ConfigError(f"{what} {path} is not a regular file (a FIFO, device or socket); give the file") from None
    except OSError as exc:
        raise ConfigError(f"{what} {path} cannot be read ({exc.strerror or type(exc).__name__})") from None
    if len(data) > limit:
        raise ConfigError(f"{what} {path} is larger than {limit >> 10} KiB, more than any {what} holds; "
                          "check the path")
    return data


def keyring_line(public_key: Ed25519PublicKey, first: str = "FIRST_SEQ") -> str:
    """The keyring line of ``public_key``: its raw key in base64, then the first seq it signs."""
    return f"{base64.b64encode(public_key.public_bytes_raw()).decode('ascii')}  {first}"


def _raw_public_key(text: str, where: str) -> Ed25519PublicKey:
    try:
        raw = base64.b64decode(text, validate=True)
        if len(raw) != 32:
            raise ValueError
        return Ed25519PublicKey.from_public_bytes(raw)
    except ValueError:
        raise ConfigError(f"{where}: key: not the base64 of a 32-byte Ed25519 public key "
                          "(`retention keygen` prints the line to copy)") from None


def _keyring_seq(text: str, where: str, name: str) -> int:
    if not (text.isascii() and text.isdigit()) or int(text) < 1:
        raise ConfigError(f"{where}: {name}: {text[:20]!r} is not a seq (a whole number from 1)")
    return int(text)


def generate_keypair(out_dir: str | Path, *, name: str = "retention-signing") -> tuple[Path, Path]:
    """Write ``<name>.pem`` (private, mode 0600) and ``<name>.pub.pem`` into ``out_dir``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    private_path = out / f"{name}.pem"
    public_path = out / f"{name}.pub.pem"
    if private_path.exists():
        raise ConfigError(f"{private_path} already exists; refusing to overwrite a signing key")
    key = Ed25519PrivateKey.generate()
    private_pem = key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
    )
    fd = os.open(private_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "wb") as handle:
        handle.write(private_pem)
    public_path.write_bytes(
        key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )
    )
    return private_path, public_path
