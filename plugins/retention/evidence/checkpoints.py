"""Signed checkpoints: the chain's head, signed and kept outside the audit database.

The hash chain shows a certificate that was edited, forged, reordered or removed from the
middle, but not a removed tail: delete the newest rows and what is left is a valid,
shorter chain. So after every certificate, the run also writes a checkpoint saying "the
chain held N certificates and the N-th hashed to H", signed with the certificate key, to
a store the audit database's owners do not control (:mod:`retention.evidence.stores`).
``retention verify --checkpoint`` then catches a chain that is shorter than a checkpoint
says, or that was rewritten before it.

The text is a C2SP signed note (:mod:`retention.evidence.notes`), the envelope Certificate
Transparency logs and Sigstore publish their checkpoints in::

    retention/purge-certificates
    7
    <base64 of the 32-byte SHA-256 entry hash of certificate 7>

    — retention/purge-certificates <base64 of key hash (4 bytes) + Ed25519 signature>

Its third line is the chain head, not a Merkle root: verification recomputes the whole
chain anyway, so a Merkle tree's short proofs would buy nothing here.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING

from retention.errors import ConfigError, TerminalError
from retention.evidence.notes import open_note, sign_note

if TYPE_CHECKING:
    from retention.evidence.signing import PublicKeys, Signer
    from retention.evidence.stores import CheckpointStore

CHECKPOINTS_ENV = "RETENTION_CHECKPOINTS"  # where checkpoints go; read by stores.configured_store
ORIGIN = "retention/purge-certificates"
LOG_ID_ENV = "RETENTION_LOG_ID"
_LOG_ID = re.compile(r"[A-Za-z0-9._~:/-]{1,255}")
SUFFIX = ".checkpoint"


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
