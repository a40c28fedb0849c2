"""The certificate payload as a typed value: what a run was asked to do and what each target did.

Built from plain values (``run/`` converts its journal records into them), so the evidence
layer knows nothing of the journal. :meth:`CertificatePayload.to_dict` gives exactly the
body today's chains hold: the canonical bytes for the same inputs are byte for byte the
same, which ``tests/test_evidence_split.py`` pins against certificates made before the split.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

import rfc8785

from retention.clock import utc_iso

GENESIS_HASH = "0" * 64
PAYLOAD_TYPE = "retention/purge-certificate"
PAYLOAD_VERSION = 1


def canonical(payload: Mapping[str, Any]) -> bytes:
    """RFC 8785 canonical JSON: the exact bytes that are hashed and signed."""
    return rfc8785.dumps(payload)


def entry_hash(payload_bytes: bytes) -> str:
    """Hex SHA-256 of the payload bytes; the next certificate's ``prev_hash``."""
    return hashlib.sha256(payload_bytes).hexdigest()


@dataclass(frozen=True)
class RunFacts:
    """What the run was asked to do: its rule, action and dates (no personal data)."""

    category: str
    run_id: str
    rule_path: str
    rule_sha256: str
    code_version: str
    action: str
    as_of: datetime
    cutoff: datetime
    started_at: datetime
    approval: dict[str, Any] | None = None


@dataclass(frozen=True)
class TargetOutcome:
    """What one target did: its journal state and counts, as plain values."""

    name: str
    kind: str
    location: str
    state: str
    matched: int | None
    remaining: int | None
    error: str | None
    deleted: int
    unconfirmed: int
    finished_at: datetime | None = None
    held: int | None = None
    bytes: int | None = None
    tables: Mapping[str, int] | None = None
    holds: tuple[int, ...] = ()
    partitions: Mapping[str, int] | None = None
    """Partitions dropped whole, with the rows each held when counted before its drop."""
    lag_pauses: Mapping[str, Any] | None = None
    """How often and how long batches paused on replica lag (``count``, ``seconds``)."""
    upkeep: Mapping[str, Any] | None = None
    """The upkeep run after the purge (``statement``, ``status``, ``error``), if any ran."""

    @property
    def status(self) -> str:
        """complete, or failed: a target that never finished did not purge everything."""
        return "complete" if self.state == "complete" else "failed"

    def entry(self, action: str) -> dict[str, Any]:
        """The target's section of the payload."""
        status = self.status
        if status == "complete":
            failed = 0
        elif self.remaining is not None:
            failed = self.remaining
        else:
            failed = max((self.matched or 0) - self.deleted, 0)
        error = self.error
        if status != "complete" and not error:
            error = "interrupted" if self.state == "running" else "not run"
        entry: dict[str, Any] = {
            "name": self.name,
            "kind": self.kind,
            "location": self.location,
            "status": status,
            "matched": self.matched if self.matched is not None else 0,
            "deleted": self.deleted,
            "held": self.held or 0,
            "failed": failed,
            "unconfirmed": self.unconfirmed,
            "error": error,
        }
        if action == "anonymize":  # rows stay: say what happened to them
            entry["anonymized"], entry["deleted"] = entry["deleted"], 0
        elif action == "archive":
            entry["archived"] = entry["deleted"]
        if self.bytes is not None:
            entry["bytes"] = self.bytes
        if self.tables:
            entry["tables"] = dict(sorted(self.tables.items()))
        if self.holds:
            entry["holds"] = list(self.holds)
        if self.partitions:
            entry["partitions"] = dict(sorted(self.partitions.items()))
        if self.lag_pauses:
            entry["lag_pauses"] = dict(self.lag_pauses)
        if self.upkeep:
            entry["maintenance"] = dict(self.upkeep)
        if self.matched is None:
            # The plan never counted this target: "matched": 0 stays a number for older readers,
            # and this says it is not a count (nothing is known to have been due, or not).
            entry["counted"] = False
        return entry


def run_status(targets: Sequence[TargetOutcome]) -> str:
    """complete when every target is; partial when something was purged; else failed."""
    if targets and all(t.status == "complete" for t in targets):
        return "complete"
    if any(t.deleted for t in targets):
        return "partial"
    return "failed"


@dataclass(frozen=True)
class CertificatePayload:
    """One certificate's body, before it is made canonical and signed.

    ``extra`` adds sections of particular actions (the archive manifest's location and hash).
    """

    run: RunFacts
    targets: tuple[TargetOutcome, ...]
    seq: int
    prev_hash: str
    issued_at: datetime
    key_id: str
    issued_by: str = ""
    extra: Mapping[str, Any] = field(default_factory=dict)

    @property
    def status(self) -> str:
        """complete, partial or failed, as the certificate states it."""
        status = run_status(self.targets)
        if status == "complete" and self.extra.get("archive_error"):
            # Everything was purged, but the evidence of what was archived could not be written.
            status = "partial" if any(t.deleted for t in self.targets) else "failed"
        return status

    def to_dict(self) -> dict[str, Any]:
        """The payload as the chain stores it (the JSON object that is signed)."""
        run, action = self.run, self.run.action
        entries = [t.entry(action) for t in self.targets]
        finished = [t.finished_at for t in self.targets if t.finished_at is not None]
        uncounted = sum(1 for e in entries if e.get("counted") is False)
        return dict(self.extra) | {
            "type": PAYLOAD_TYPE,
            "version": PAYLOAD_VERSION,
            "seq": self.seq,
            "prev_hash": self.prev_hash,
            "issued_at": utc_iso(self.issued_at),
            "key_id": self.key_id,
            **({"issued_by": self.issued_by} if self.issued_by else {}),
            "category": run.category,
            "run_id": run.run_id,
            "rule": {"path": run.rule_path, "sha256": run.rule_sha256},
            "code_version": run.code_version,
            "action": action,
            "as_of": utc_iso(run.as_of),
            "cutoff": utc_iso(run.cutoff),
            "started_at": utc_iso(run.started_at),
            "finished_at": utc_iso(max(finished)) if finished else utc_iso(self.issued_at),
            "status": self.status,
            "holds": sorted({h for t in self.targets for h in t.holds}),
            **({"approval": run.approval} if run.approval else {}),
            "targets": entries,
            "totals": {
                "matched": sum(e["matched"] for e in entries),
                "deleted": sum(e["deleted"] for e in entries),
                "held": sum(e["held"] for e in entries),
                "failed": sum(e["failed"] for e in entries),
                **({"anonymized": sum(e["anonymized"] for e in entries)} if action == "anonymize" else {}),
                **({"archived": sum(e["archived"] for e in entries)} if action == "archive" else {}),
                **({"uncounted": uncounted} if uncounted else {}),
            },
        }

    def canonical(self) -> bytes:
        """The bytes that are hashed and signed."""
        return canonical(self.to_dict())


ERASURE_PAYLOAD_TYPE = "retention/erasure-certificate"
ERASURE_CATEGORY = "_erasure"
"""The category column of erasure certificates: no rule can be named so (categories start with a letter)."""


@dataclass(frozen=True)
class ErasureOutcome:
    """What erasing the subject did to one rule target: counts and reasons, no identity."""

    category: str
    target: str
    kind: str
    location: str
    action: str
    outcome: str
    """erased | anonymized | retained | not_found | refused | undeclared | failed."""
    count: int = 0
    """Records erased (deleted or archived then deleted) or anonymized."""
    held: int = 0
    holds: tuple[tuple[int, str], ...] = ()
    """(hold id, case id) of the holds that retained some of the subject's records."""
    reason: str = ""
    tables: Mapping[str, int] | None = None

    def entry(self) -> dict[str, Any]:
        """The target's section of an erasure certificate."""
        failed = self.outcome in ("refused", "failed")
        entry: dict[str, Any] = {
            "name": f"{self.category}/{self.target}", "category": self.category, "target": self.target,
            "kind": self.kind, "location": self.location, "action": self.action, "outcome": self.outcome,
            "status": "failed" if failed else "complete", "matched": self.count + self.held,
            "deleted": self.count if self.outcome == "erased" else 0,
            "anonymized": self.count if self.outcome == "anonymized" else 0,
            "held": self.held, "failed": 0, "error": self.reason if failed else None,
        }
        if self.holds:
            entry["holds"] = [{"id": hold_id, "case": case} for hold_id, case in self.holds]
        if self.reason and not failed:
            entry["reason"] = self.reason
        if self.tables:
            entry["tables"] = dict(sorted(self.tables.items()))
        return entry


@dataclass(frozen=True)
class ErasureCertificatePayload:
    """An erasure request's certificate: in the purge chain, with its own ``type``.

    The subject appears only as the HMAC of ``type=value`` under the hash key ``hash_key_id``
    names, so a receipt holder who knows the identity and the key can check it is theirs."""

    request_id: str
    attempt: int
    subject_type: str
    subject_hmac: str
    hash_key_id: str
    reason: str
    received_at: str
    due: str
    targets: tuple[ErasureOutcome, ...]
    seq: int
    prev_hash: str
    issued_at: datetime
    key_id: str
    issued_by: str = ""

    @property
    def run_id(self) -> str:
        """``REQUEST#ATTEMPT``: one certificate per attempt at a request."""
        return f"{self.request_id}#{self.attempt}"

    @property
    def status(self) -> str:
        """done when nothing was retained, refused or failed; else partial."""
        kept = {"refused", "failed"}
        if any(t.outcome in kept or t.holds for t in self.targets):
            return "partial"
        return "done"

    def to_dict(self) -> dict[str, Any]:
        """The payload as the chain stores it."""
        entries = [t.entry() for t in self.targets]
        return {
            "type": ERASURE_PAYLOAD_TYPE, "version": 1, "seq": self.seq, "prev_hash": self.prev_hash,
            "issued_at": utc_iso(self.issued_at), "key_id": self.key_id,
            **({"issued_by": self.issued_by} if self.issued_by else {}),
            "category": ERASURE_CATEGORY, "run_id": self.run_id, "request": self.request_id,
            "attempt": self.attempt, "action": "erase", "status": self.status,
            "subject": {"type": self.subject_type, "hmac": self.subject_hmac, "algorithm": "HMAC-SHA256",
                        "message": "type=value", "hash_key_id": self.hash_key_id},
            "reason": self.reason, "received_at": self.received_at, "due": self.due,
            "holds": sorted({hold_id for t in self.targets for hold_id, _ in t.holds}),
            "targets": entries,
            "totals": {"deleted": sum(e["deleted"] for e in entries),
                       "anonymized": sum(e["anonymized"] for e in entries),
                       "held": sum(e["held"] for e in entries), "matched": sum(e["matched"] for e in entries),
                       "failed": 0},
        }

    def canonical(self) -> bytes:
        """The bytes that are hashed and signed."""
        return canonical(self.to_dict())
