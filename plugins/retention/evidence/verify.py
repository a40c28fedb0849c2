"""Checking the certificate chain: every signature, the gap-free seq order, the hash links,
and (with signed checkpoints kept elsewhere) that no tail was removed."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING

from retention.clock import utc_iso
from retention.evidence.chain import Certificate, read_certificates
from retention.evidence.payload import GENESIS_HASH, canonical, entry_hash
from retention.evidence.signing import SignatureRejected

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.evidence.checkpoints import Checkpoint
    from retention.evidence.signing import PublicKeys


@dataclass(frozen=True)
class Verification:
    """The outcome of checking the whole chain."""

    checked: int
    head_seq: int | None
    head_hash: str | None
    bad_seq: int | None = None
    reason: str | None = None
    key_ids: frozenset[str] = frozenset()

    @property
    def ok(self) -> bool:
        """True when every signature, seq and link holds."""
        return self.reason is None


def verify_chain(
    engine: Engine, keys: PublicKeys, checkpoints: Mapping[int, Checkpoint] | None = None
) -> Verification:
    """Check every certificate's signature, the gap-free seq order and the hash chain.

    With ``checkpoints`` (signed heads kept outside the database, by size), the chain must
    also reach every checkpoint's size and hash to its head there: a removed tail or a
    history rewritten before a checkpoint fails. Stops at the first certificate that
    fails, naming its seq and why.
    """
    checkpoints = checkpoints or {}
    expected_seq = 1
    prev_hash = GENESIS_HASH
    checked = 0
    used_keys: set[str] = set()

    def failed(bad_seq: int, reason: str) -> Verification:
        return Verification(checked, expected_seq - 1 or None, prev_hash if checked else None,
                            bad_seq=bad_seq, reason=reason, key_ids=frozenset(used_keys))

    for cert in read_certificates(engine):
        if cert.problem is not None:
            bad = cert.seq if isinstance(cert.seq, int) and not isinstance(cert.seq, bool) else expected_seq
            return failed(bad, f"the row {cert.label} is unreadable: {cert.problem}; it was not written "
                               "by retention (planted or edited in the database)")
        reason = _check(cert, expected_seq, prev_hash, keys)
        if reason is not None:
            return failed(cert.seq, reason)
        checkpoint = checkpoints.get(cert.seq)
        if checkpoint is not None and checkpoint.head_hash != cert.entry_hash:
            return failed(cert.seq, f"differs from the signed checkpoint {checkpoint.source}: the chain "
                                    "was rewritten up to here after that checkpoint was signed")
        used_keys.add(cert.key_id)
        prev_hash = entry_hash(cert.payload.encode("utf-8"))
        expected_seq += 1
        checked += 1
    if checkpoints and max(checkpoints) >= expected_seq:
        furthest = checkpoints[max(checkpoints)]
        missing = f"{expected_seq}" if furthest.size == expected_seq else f"{expected_seq}–{furthest.size}"
        return failed(expected_seq, f"certificate {missing} is missing: the signed checkpoint {furthest.source} "
                                    f"says the chain reached seq {furthest.size} (the newest certificates were removed)")
    return Verification(
        checked, checked or None, prev_hash if checked else None, key_ids=frozenset(used_keys)
    )


def _check(cert: Certificate, expected_seq: int, prev_hash: str, keys: PublicKeys) -> str | None:
    if cert.seq != expected_seq:
        if cert.seq > expected_seq:
            missing = f"{expected_seq}" if cert.seq == expected_seq + 1 else f"{expected_seq}–{cert.seq - 1}"
            return f"certificate {missing} is missing: the chain jumps from {expected_seq - 1} to {cert.seq}"
        return f"seq {cert.seq} appears out of order (expected {expected_seq})"
    body = cert.payload.encode("utf-8")
    try:
        keys.verify(cert.key_id, cert.signature, body, seq=cert.seq)
    except SignatureRejected as problem:
        return str(problem)
    data = cert.data
    if not data:
        return "payload is not JSON"
    try:
        canonical_body = canonical(data)
    except (RecursionError, ValueError, TypeError):
        canonical_body = None
    if canonical_body != body:
        return "payload is not in canonical form (RFC 8785); it was not written by retention"
    if data.get("seq") != cert.seq:
        return f"row seq {cert.seq} holds the certificate signed as seq {data.get('seq')} (rows reordered)"
    if data.get("prev_hash") != prev_hash:
        return "prev_hash does not match the previous certificate (a certificate was removed, replaced or reordered)"
    if data.get("key_id") != cert.key_id:
        return "key_id column differs from the signed key_id"
    for column in ("category", "run_id", "status"):
        if data.get(column) != getattr(cert, column):
            return f"{column} column ({getattr(cert, column)!r}) differs from the signed payload ({data.get(column)!r})"
    if cert.prev_hash != prev_hash:
        return "prev_hash column differs from the signed payload"
    if utc_iso(_aware(cert.issued_at)) != data.get("issued_at"):
        return "issued_at column differs from the signed payload"
    if cert.entry_hash != entry_hash(body):
        return "entry_hash column is not the SHA-256 of the payload"
    return None


def _aware(moment: datetime) -> datetime:
    # SQLite and MySQL hand back naive datetimes; the column is written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)
