"""Erasure receipts: an erasure certificate as a self-contained JSON a requester or auditor
checks offline.

A receipt carries the exact signed payload text, its Ed25519 signature, the signing key's
id (SHA-256 of the raw public key) and the entry hash that places it in the chain. Checking
it needs only the public key (obtained from the controller, not from the receipt), RFC 8785
and Ed25519: :func:`check_receipt` does exactly what the receipt's ``how_to_verify`` says,
so an auditor can redo it with stock ``cryptography`` and ``rfc8785``. Given the identity and
the hash key, it also checks that the certificate's subject HMAC is that identity's.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import rfc8785
from cryptography.exceptions import InvalidSignature

from retention.evidence.payload import ERASURE_PAYLOAD_TYPE

if TYPE_CHECKING:
    from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PublicKey

    from retention.evidence.chain import Certificate

RECEIPT_TYPE = "retention/erasure-receipt"
HOW_TO_VERIFY = (
    "1. key_id = hex SHA-256 of the raw 32-byte Ed25519 public key you hold; it must equal certificate.key_id. "
    "2. Verify the base64 certificate.signature over the UTF-8 bytes of certificate.payload with that key. "
    "3. certificate.payload must equal its own RFC 8785 canonical form, and entry_hash its hex SHA-256. "
    "4. To check the subject: hex HMAC-SHA256 under the hash key of 'TYPE=VALUE' (surrounding spaces removed; "
    "emails in lower case) must equal payload.subject.hmac, and TYPE payload.subject.type."
)


def normalise(identity_type: str, value: Any) -> str:
    """An identity as it is compared: text without surrounding spaces; emails in lower case."""
    text = str(value).strip()
    return text.lower() if identity_type == "email" else text


def identity_hmac(key: bytes, identity_type: str, value: Any) -> str:
    """HMAC-SHA256 (hex) of ``type=value``, the value normalised: what receipts are checked against."""
    message = f"{identity_type}={normalise(identity_type, value)}".encode()
    return hmac.new(key, message, hashlib.sha256).hexdigest()


def build_receipt(certificate: Certificate) -> dict[str, Any]:
    """The receipt of one erasure certificate."""
    data = certificate.data
    if data.get("type") != ERASURE_PAYLOAD_TYPE:
        raise ValueError(f"certificate {certificate.seq} is not an erasure certificate")
    return {
        "type": RECEIPT_TYPE, "version": 1, "request": data["request"], "status": data["status"],
        "certificate": {"seq": certificate.seq, "payload": certificate.payload, "signature": certificate.signature,
                        "key_id": certificate.key_id, "entry_hash": certificate.entry_hash,
                        "prev_hash": certificate.prev_hash},
        "signature_algorithm": "Ed25519", "how_to_verify": HOW_TO_VERIFY,
    }


@dataclass
class ReceiptCheck:
    """What checking a receipt found: problems (none: it verifies) and the certificate's payload."""

    problems: list[str] = field(default_factory=list)
    payload: dict[str, Any] = field(default_factory=dict)
    subject_checked: bool = False

    @property
    def ok(self) -> bool:
        """True when nothing is wrong."""
        return not self.problems


def check_receipt(receipt: Any, public_key: Ed25519PublicKey, *, identity: tuple[str, str] | None = None,
                  hash_key: bytes | None = None) -> ReceiptCheck:
    """Check a receipt against a public key (and, given both, an identity and the hash key)."""
    check = ReceiptCheck()
    certificate = receipt.get("certificate") if isinstance(receipt, dict) else None
    if not isinstance(certificate, dict) or receipt.get("type") != RECEIPT_TYPE:
        check.problems.append("not an erasure receipt")
        return check
    body = str(certificate.get("payload", "")).encode("utf-8")
    held_id = hashlib.sha256(public_key.public_bytes_raw()).hexdigest()
    if certificate.get("key_id") != held_id:
        check.problems.append(f"signed by key {str(certificate.get('key_id'))[:16]}…, not by the key given "
                              f"({held_id[:16]}…)")
        return check
    try:
        public_key.verify(base64.b64decode(str(certificate.get("signature", ""))), body)
    except (InvalidSignature, ValueError):
        check.problems.append("the signature does not verify: the payload was changed, or signed by another key")
        return check
    try:
        payload = json.loads(body)
    except ValueError:
        check.problems.append("the payload is not JSON")
        return check
    if not isinstance(payload, dict):
        check.problems.append("the payload is not a JSON object")
        return check
    check.payload = payload
    if rfc8785.dumps(payload) != body:
        check.problems.append("the payload is not in RFC 8785 canonical form")
    if certificate.get("entry_hash") != hashlib.sha256(body).hexdigest():
        check.problems.append("entry_hash is not the SHA-256 of the payload")
    if payload.get("type") != ERASURE_PAYLOAD_TYPE or payload.get("request") != receipt.get("request"):
        check.problems.append("the signed payload is not the erasure certificate of this receipt's request")
    check.problems.extend(_unsigned_contradictions(receipt, certificate, payload))
    if identity is not None and hash_key is not None:
        kind, value = identity
        subject = payload.get("subject") or {}
        check.subject_checked = True
        if subject.get("type") != kind or not hmac.compare_digest(
                str(subject.get("hmac", "")), identity_hmac(hash_key, kind, value)):
            check.problems.append(f"the certificate's subject is not {kind} {value!r} under this hash key")
    return check


def _unsigned_contradictions(receipt: dict[str, Any], certificate: dict[str, Any], payload: dict[str, Any]) -> list[str]:
    """The receipt's unsigned copies of signed fields that say otherwise: a reader trusts them at a glance."""
    copies = {"status": receipt.get("status"), "seq": certificate.get("seq"), "prev_hash": certificate.get("prev_hash")}
    return [f"the receipt says {name} {value!r}, but the signed payload says {payload.get(name)!r}"
            for name, value in copies.items() if value != payload.get(name)]
