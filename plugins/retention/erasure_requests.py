"""Erasure requests: a data subject asks to be forgotten (GDPR Art. 17), and we keep count.

A request names a subject by one identity (``email=ana@example.com``). The audit database
never holds an identity in clear: each is kept as an HMAC-SHA256 of ``type=value`` under
the project's hash key (``RETENTION_HASH_KEY``, the key the anonymize action hashes with),
and so is every identity it resolved to when it was filed (the customer numbers behind
the email). Executing a request finds the subject's records by HMAC-ing the values the
stores hold and comparing, so the plain identity is needed only while the request is
filed. A request moves ``pending`` → ``in_progress`` → ``done`` | ``partial`` (or is
``denied``); it is never deleted, and every transition is an event in an append-only history.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, select, update

from retention.clock import utc_iso
from retention.errors import ConfigError, TerminalError
from retention.evidence.audit import erasure_request_events, erasure_requests
from retention.evidence.receipt import identity_hmac
from retention.identity import check_typed_text, who

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

HASH_KEY_ENV = "RETENTION_HASH_KEY"
"""The same variable the anonymize action reads: one key, so a hashed column and a request's
HMAC of the same email agree."""
MIN_HASH_KEY_BYTES = 16

STATES = ("pending", "in_progress", "done", "partial", "denied")
_NEXT = {"pending": {"in_progress", "denied"}, "in_progress": {"done", "partial", "pending"},
         "partial": {"in_progress", "denied"}, "done": {"in_progress"}, "denied": set()}
"""Allowed transitions. ``done`` → ``in_progress`` is a replay after a restore brought records back."""


class SubjectKey:
    """HMACs of identities under the hash key; holds the key, never logs or returns it."""

    def __init__(self, key: bytes):
        if len(key) < MIN_HASH_KEY_BYTES:
            raise ConfigError(f"{HASH_KEY_ENV} is shorter than {MIN_HASH_KEY_BYTES} bytes")
        self._key = key

    @classmethod
    def from_environment(cls, environ: Mapping[str, str] | None = None) -> SubjectKey:
        """The key from ``RETENTION_HASH_KEY``; ConfigError with advice when it is missing."""
        text = (os.environ if environ is None else environ).get(HASH_KEY_ENV)
        if not text:
            raise ConfigError(f"{HASH_KEY_ENV} is not set: erasure requests keep identities only as HMACs "
                              f"under it (at least {MIN_HASH_KEY_BYTES} bytes; the key the anonymize rules use)")
        return cls(text.encode("utf-8"))

    @property
    def key_id(self) -> str:
        """A public fingerprint of the key, as the anonymize action computes it."""
        return hmac.new(self._key, b"retention key id", hashlib.sha256).hexdigest()[:16]

    def digest(self, identity_type: str, value: Any) -> str:
        """The HMAC of one identity: hex SHA-256 over ``type=normalised value``."""
        return identity_hmac(self._key, identity_type, value)


@dataclass(frozen=True)
class ErasureRequest:
    """One request, as filed and as far as it has got."""

    request_id: str
    subject_type: str
    subject_hmac: str
    identities: tuple[tuple[str, str], ...]
    """(identity type, HMAC) of the subject and of everything it resolved to."""
    key_id: str
    reason: str
    received_at: str
    due: date
    filed_by: str
    state: str
    updated_at: str
    certificate_seq: int | None = None

    def overdue(self, today: date) -> bool:
        """Past its due date and not answered (done or denied)."""
        return self.state not in ("done", "denied") and self.due < today

    def hmacs(self, identity_type: str) -> set[str]:
        """The HMACs of one identity type this request erases."""
        return {digest for kind, digest in self.identities if kind == identity_type}


class ErasureRegistry:
    """The erasure requests of one audit database."""

    def __init__(self, engine: Engine, *, clock=None):
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(timezone.utc))

    def today(self) -> date:
        """The clock's day in UTC: what due dates are judged by."""
        return self._clock().astimezone(timezone.utc).date()

    def file(self, *, request_id: str, subject_type: str, subject_hmac: str,
             identities: Iterable[tuple[str, str]], key_id: str, reason: str, due: date,
             by: str | None = None, detail: Mapping[str, Any] | None = None) -> ErasureRequest:
        """Record a new request, pending; ConfigError if its id is taken."""
        if not request_id.strip() or len(request_id) > 100:
            raise ConfigError("a request id is 1 to 100 characters, e.g. DSR-2026-0042")
        check_typed_text("request id", request_id, an_id=True)
        check_typed_text("reason", reason)
        taken = self._filed_as(request_id)
        if taken is not None:
            also = "" if taken == request_id else f" as {taken} (ids that differ only in case are one id)"
            raise ConfigError(f"request {request_id} is already filed{also}; give each request its own id")
        by = by or who()
        for name, value in {"reason": reason, "subject_type": subject_type, "filed_by": by}.items():
            limit = getattr(erasure_requests.c[name].type, "length", None)  # PostgreSQL and MariaDB refuse more, SQLite keeps it
            if limit is not None and len(value) > limit:
                raise ConfigError(f"the request's {name.replace('_', ' ')} is {len(value)} characters; "
                                  f"it may be at most {limit}")
        now = utc_iso(self._clock())
        pairs = sorted(set(identities) | {(subject_type, subject_hmac)})
        values = {"request_id": request_id, "subject_type": subject_type, "subject_hmac": subject_hmac,
                  "identities": json.dumps(pairs), "key_id": key_id, "reason": reason, "received_at": now,
                  "due": due.isoformat(), "filed_by": by, "state": "pending", "updated_at": now}
        with self.engine.begin() as conn:
            conn.execute(insert(erasure_requests).values(**values))
            conn.execute(insert(erasure_request_events).values(
                request_id=request_id, event="pending", at=now, by=by,
                detail=json.dumps({"filed": {k: v for k, v in values.items() if k != "identities"},
                                   "identities": len(pairs), **(detail or {})}, sort_keys=True)))
        return self.get(request_id)

    def transition(self, request_id: str, state: str, *, detail: Mapping[str, Any] | None = None,
                   certificate_seq: int | None = None, by: str | None = None) -> ErasureRequest:
        """Move a request to ``state`` (only along the allowed transitions), recording the event."""
        request = self.get(request_id)
        if state not in _NEXT[request.state]:
            raise ConfigError(f"request {request_id} is {request.state}; it cannot become {state}")
        by = by or who()
        now = utc_iso(self._clock())
        values: dict[str, Any] = {"state": state, "updated_at": now}
        if certificate_seq is not None:
            values["certificate_seq"] = certificate_seq
        with self.engine.begin() as conn:
            moved = conn.execute(update(erasure_requests).where(
                erasure_requests.c.request_id == request_id, erasure_requests.c.state == request.state,
            ).values(**values)).rowcount
            if moved != 1:  # another worker moved it first
                raise ConfigError(f"request {request_id} changed state while this worker was moving it")
            conn.execute(insert(erasure_request_events).values(
                request_id=request_id, event=state, at=now, by=by, detail=json.dumps(dict(detail or {}), sort_keys=True)))
        return self.get(request_id)

    def find_one(self, request_id: str) -> ErasureRequest | None:
        """The request with exactly this id, or None (MariaDB's collation would match 'dsr-1' to 'DSR-1')."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(erasure_requests).where(erasure_requests.c.request_id == request_id)).mappings()
            row = next((r for r in rows if r["request_id"] == request_id), None)
        return _request(row) if row is not None else None

    def _filed_as(self, request_id: str) -> str | None:
        """The id of a filed request that is ``request_id`` but for case, or None: one id on every backend."""
        wanted = request_id.casefold()
        with self.engine.connect() as conn:
            return next((filed for filed in conn.execute(select(erasure_requests.c.request_id)).scalars()
                         if filed.casefold() == wanted), None)

    def get(self, request_id: str) -> ErasureRequest:
        """The request with this id; ConfigError when there is none."""
        request = self.find_one(request_id)
        if request is None:
            raise ConfigError(f"there is no erasure request {request_id!r}; `retention erase list` shows them")
        return request

    def find(self, *, state: str | None = None, overdue: bool = False) -> list[ErasureRequest]:
        """Requests in the order they were received, optionally of one state or only the overdue ones."""
        query = select(erasure_requests).order_by(erasure_requests.c.received_at, erasure_requests.c.request_id)
        if state is not None:
            query = query.where(erasure_requests.c.state == state)
        with self.engine.connect() as conn:
            requests = [_request(r) for r in conn.execute(query).mappings()]
        today = self.today()
        return [r for r in requests if r.overdue(today)] if overdue else requests

    def history(self, request_id: str) -> list[dict[str, Any]]:
        """Every event of a request, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(erasure_request_events).where(
                erasure_request_events.c.request_id == request_id).order_by(erasure_request_events.c.id)).mappings()
            return [dict(r) for r in rows]

    def erased_identities(self) -> dict[str, set[str]]:
        """Tombstones: per identity type, the HMACs of every subject erased (done or partial)."""
        found: dict[str, set[str]] = {}
        for request in self.find():
            if request.state in ("done", "partial"):
                for kind, digest in request.identities:
                    found.setdefault(kind, set()).add(digest)
        return found


def _request(row: Any) -> ErasureRequest:
    """The row as a request; TerminalError naming it and the column when it was edited past reading."""
    column = "identities"
    try:
        identities = tuple((str(kind), str(digest)) for kind, digest in json.loads(row["identities"]))
        column = "due"
        due = date.fromisoformat(row["due"])
        column = "state"
        if row["state"] not in STATES:
            raise ValueError(row["state"])
    except (TypeError, ValueError):  # JSONDecodeError is a ValueError; a wrong shape fails to unpack
        raise TerminalError(f"erasure request {row['request_id']!r} in the audit database is unreadable: its {column} "
                            f"is not what retention writes (edited outside it?); `retention verify` and the request's "
                            "history say more") from None
    return ErasureRequest(
        request_id=row["request_id"], subject_type=row["subject_type"], subject_hmac=row["subject_hmac"],
        identities=identities,
        key_id=row["key_id"], reason=row["reason"], received_at=row["received_at"],
        due=due, filed_by=row["filed_by"], state=row["state"],
        updated_at=row["updated_at"], certificate_seq=row["certificate_seq"],
    )
