"""Issue #10, evidence/ and archive/: the split changes no byte of evidence.

``tests/data/pinned_certificates.json`` holds certificates produced by the code before the
split (``build_payload`` in the old ``evidence/chain.py``) from the fixed inputs below, signed
with a fixed Ed25519 key; the typed payload must reproduce them byte for byte, and they verify.
"""

from __future__ import annotations

import base64
import json
from datetime import datetime, timezone
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey

from retention.evidence.payload import CertificatePayload, RunFacts, TargetOutcome, canonical, entry_hash
from retention.evidence.signing import PublicKeys, SignatureRejected, Signer, key_id

PINNED = json.loads((Path(__file__).parent / "data" / "pinned_certificates.json").read_text())


def T(*parts: int) -> datetime:
    return datetime(*parts, tzinfo=timezone.utc)


def _run(action: str, approval: dict | None = None) -> RunFacts:
    return RunFacts(
        category="customer_accounts", run_id="manual__2026-01-02", rule_path="retention_rules/customer_accounts.yaml",
        rule_sha256="ab" * 32, code_version="1.2.3", action=action, as_of=T(2026, 1, 2, 3, 4, 5),
        cutoff=T(2024, 1, 2, 3, 4, 5), started_at=T(2026, 1, 2, 3, 5, 0), approval=approval,
    )


def _target(name: str, **changes) -> TargetOutcome:
    values = dict(name=name, kind="sql", location="postgresql://db/app#public.accounts", state="complete",
                  matched=10, remaining=None, error=None, finished_at=T(2026, 1, 2, 3, 6, 7, 123456), deleted=10,
                  unconfirmed=0)
    values.update(changes)
    return TargetOutcome(**values)


CASES = {
    "delete_partial": (_run("delete", {"by": "alice", "ticket": "OPS-1"}), [
        _target("accounts", held=2, holds=(3, 1), tables={"b": 2, "a": 8}),
        _target("sessions", state="failed", matched=None, deleted=4, finished_at=None),
        _target("logs", state="running", matched=7, remaining=5, deleted=2, finished_at=None),
    ], {}, "alice@host"),
    "anonymize_complete": (_run("anonymize"), [_target("contacts", matched=5, deleted=5, holds=(2,))], {}, ""),
    "archive_complete": (_run("archive"), [
        _target("receipts", kind="s3", location="s3://bucket/receipts/", matched=3, deleted=3, bytes=4096),
    ], {"archive": {"manifest": "s3://arch/m.json", "sha256": "cd" * 32}}, "worker-1"),
    "archive_error": (_run("archive"), [_target("receipts", matched=3, deleted=3)],
                      {"archive_error": "manifest could not be written"}, ""),
}


@pytest.mark.parametrize("name", list(CASES))
def test_item1_certificate_payload_is_byte_identical_to_the_pinned_certificate(name):
    pinned = PINNED["cases"][name]
    run, targets, extra, issued_by = CASES[name]
    payload = CertificatePayload(
        run=run, targets=tuple(targets), seq=pinned["seq"], prev_hash=pinned["prev_hash"],
        issued_at=T(2026, 1, 2, 4, 0, 0, 500), key_id=PINNED["key_id"], issued_by=issued_by, extra=extra,
    )
    body = payload.canonical()
    assert body == pinned["payload"].encode("utf-8")
    assert entry_hash(body) == pinned["entry_hash"]
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert Signer(private, key_id(private.public_key())).sign(body) == pinned["signature"]


def test_item1_pinned_certificates_verify_and_link():
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    assert base64.b64encode(private.public_key().public_bytes_raw()).decode() == PINNED["public_key"]
    keys = PublicKeys({PINNED["key_id"]: private.public_key()})
    prev = "0" * 64
    for pinned in PINNED["cases"].values():
        body = pinned["payload"].encode("utf-8")
        keys.verify(PINNED["key_id"], pinned["signature"], body, seq=pinned["seq"])
        data = json.loads(body)
        assert canonical(data) == body and data["prev_hash"] == prev == pinned["prev_hash"]
        prev = entry_hash(body)


def test_item2_public_keys_verify_raises_a_typed_error_naming_why():
    pinned = PINNED["cases"]["delete_partial"]
    private = Ed25519PrivateKey.from_private_bytes(bytes(range(32)))
    keys = PublicKeys({PINNED["key_id"]: private.public_key()})
    assert keys.verify(PINNED["key_id"], pinned["signature"], pinned["payload"].encode()) is None
    with pytest.raises(SignatureRejected, match="does not match the payload"):
        keys.verify(PINNED["key_id"], pinned["signature"], pinned["payload"].encode() + b" ")
    with pytest.raises(SignatureRejected, match="not one of the trusted"):
        keys.verify("ff" * 32, pinned["signature"], pinned["payload"].encode())


def test_item6_ensure_schema_looks_again_through_the_retry_policy_when_another_worker_raced(monkeypatch):
    from sqlalchemy.exc import DBAPIError

    from retention.evidence import audit

    calls = []

    def create(engine):
        calls.append(engine)
        if len(calls) == 1:
            raise DBAPIError("CREATE TABLE", {}, Exception("table purge_runs already exists"))

    monkeypatch.setattr(audit, "_create_schema", create)
    monkeypatch.setattr(audit.retry.time, "sleep", lambda seconds: None)
    audit.ensure_schema("engine")
    assert calls == ["engine", "engine"]
    calls.clear()
    monkeypatch.setattr(audit, "_create_schema", lambda engine: (_ for _ in ()).throw(
        DBAPIError("CREATE TABLE", {}, Exception("permission denied"))))
    with pytest.raises(DBAPIError):  # not a race: raised at once, as before
        audit.ensure_schema("engine")
