"""C2SP signed notes (https://c2sp.org/signed-note): a text, a blank line, signature lines.

The envelope Certificate Transparency logs and Sigstore publish their checkpoints in, and
the one :mod:`retention.evidence.checkpoints` signs the chain's head with::

    <text, each line newline-terminated>

    — <name> <base64 of key hash (4 bytes) + Ed25519 signature>

The bytes follow Go's ``golang.org/x/mod/sumdb/note`` exactly (a test pins its reference
vector), so any signed-note verifier can check a checkpoint.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from collections.abc import Iterable
from typing import TYPE_CHECKING

from cryptography.exceptions import InvalidSignature

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ED25519_ALGORITHM = b"\x01"  # the signed-note signature type of Ed25519


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


def note_text(note: bytes) -> bytes:
    """The signed part of ``note``, without its signature lines (all of it when it has none).

    Two notes of one text signed by different keys (a key rotation between tries) have the same.
    """
    text, separator, _signatures = note.rpartition(b"\n\n")
    return text if separator else note
