"""Purge certificates: signed, hash-chained evidence of what each run did.

A certificate's payload is canonical JSON (RFC 8785), stored as the exact signed text.
It carries its ``seq`` and the previous entry's hash, so anyone holding the public key
can check, without trusting the database, that no certificate was forged, edited,
removed from the middle or reordered. Appends are serialized (an advisory lock on
PostgreSQL, unique ``seq`` and ``prev_hash`` everywhere), so the chain cannot fork. A
removed tail shows only against signed checkpoints kept elsewhere (``checkpoints.py``).

This module appends, finds, reads and counts; the payload is :mod:`retention.evidence.payload`,
checking the chain is :mod:`retention.evidence.verify`.
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import LargeBinary, cast, func, insert, select, text, type_coerce
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import NullType

from retention import retry
from retention.evidence.audit import CHAIN_LOCK_KEY, purge_certificates
from retention.evidence.payload import GENESIS_HASH, PAYLOAD_TYPE, PAYLOAD_VERSION, canonical, entry_hash

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from retention.evidence.payload import CertificatePayload, ErasureCertificatePayload
    from retention.evidence.signing import Signer

__all__ = ["GENESIS_HASH", "PAYLOAD_TYPE", "PAYLOAD_VERSION", "Certificate", "append_certificate", "canonical",
           "count_certificates", "entry_hash", "find_certificate", "read_certificates"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Certificate:
    """One row of ``purge_certificates``."""

    seq: int
    category: str
    run_id: str
    status: str
    issued_at: datetime
    payload: str
    signature: str
    key_id: str
    prev_hash: str
    entry_hash: str
    data: dict[str, Any] = field(compare=False, repr=False, default_factory=dict)
    problem: str | None = field(default=None, compare=False)
    """Why the row cannot be read as a certificate (planted, or edited by hand); None when it can."""

    @property
    def label(self) -> str:
        """The row, named for a person: its seq as stored, category and run."""
        seq = self.seq if isinstance(self.seq, int) else _quoted(self.seq)
        return f"seq {seq} (category {_shown(self.category)}, run {_shown(self.run_id)})"

    @property
    def deleted(self) -> int:
        """Records purged (deleted, or anonymized) by the run, over all targets."""
        totals = self.data.get("totals", {})
        return int(totals.get("deleted", 0)) + int(totals.get("anonymized", 0))


def append_certificate(
    engine: Engine,
    signer: Signer,
    *,
    category: str,
    run_id: str,
    build: Callable[[int, str], CertificatePayload | ErasureCertificatePayload],
    on_append: Callable[[Connection, int], None],
    attempts: int = 5,
) -> Certificate:
    """Append one run's certificate to the chain, once; return it.

    ``build(seq, prev_hash)`` makes the payload for the head found under the chain lock;
    ``on_append(conn, seq)`` runs in the same transaction as the insert (the journal's
    "certified" mark), so both commit together. Idempotent: a run that already has a
    certificate gets that one back. An append that raced another writer (unique seq or
    run) re-reads the head, through the one retry policy.
    """
    retrying = retry.attempts(lambda exc: isinstance(exc, IntegrityError), delays=(0,) * (attempts - 1),
                              what=f"certificate append for run {run_id} raced another writer")
    try:
        for attempt in retrying:
            with attempt:
                existing = find_certificate(engine, category, run_id)
                if existing is not None:
                    return existing
                return _append(engine, signer, category, run_id, build, on_append)
    except IntegrityError:
        pass
    raise RuntimeError(f"could not append a certificate after {attempts} attempts")


def _append(
    engine: Engine, signer: Signer, category: str, run_id: str,
    build: Callable[[int, str], CertificatePayload | ErasureCertificatePayload], on_append: Callable[[Connection, int], None],
) -> Certificate:
    with engine.begin() as conn:
        if engine.dialect.name == "postgresql":
            conn.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK_KEY})
        head = conn.execute(
            select(purge_certificates.c.seq, purge_certificates.c.entry_hash)
            .order_by(purge_certificates.c.seq.desc())
            .limit(1)
        ).first()
        seq = head.seq + 1 if head else 1
        prev_hash = head.entry_hash if head else GENESIS_HASH
        built = build(seq, prev_hash)
        payload = built.to_dict()
        body = canonical(payload)
        row = {
            "seq": seq,
            "category": category,
            "run_id": run_id,
            "status": payload["status"],
            "issued_at": built.issued_at,
            "payload": body.decode("utf-8"),
            "signature": signer.sign(body),
            "key_id": signer.key_id,
            "prev_hash": prev_hash,
            "entry_hash": entry_hash(body),
        }
        conn.execute(insert(purge_certificates).values(**row))
        on_append(conn, seq)
    return Certificate(**row, data=payload)


def find_certificate(engine: Engine, category: str, run_id: str) -> Certificate | None:
    """The certificate of one run, or None."""
    with engine.connect() as conn:
        row = conn.execute(
            _raw_select(engine).where(
                purge_certificates.c.category == category, purge_certificates.c.run_id == run_id
            )
        ).mappings().first()
    return _certificate(row) if row else None


def read_certificates(
    engine: Engine, *, category: str | None = None, seq: int | None = None, newest_first: bool = False,
    limit: int | None = None, since: datetime | None = None, until: datetime | None = None,
) -> Iterator[Certificate]:
    """Certificates in seq order, streamed; ``since``/``until`` bound ``issued_at`` (until excluded)."""
    query = _raw_select(engine)
    if category:
        query = query.where(purge_certificates.c.category == category)
    if seq is not None:
        query = query.where(purge_certificates.c.seq == seq)
    # SQLite and MySQL store issued_at as naive UTC; compare like with like.
    naive = engine.dialect.name != "postgresql"
    if since is not None:
        query = query.where(purge_certificates.c.issued_at >= _stored(since, naive))
    if until is not None:
        query = query.where(purge_certificates.c.issued_at < _stored(until, naive))
    order = purge_certificates.c.seq.desc() if newest_first else purge_certificates.c.seq
    query = query.order_by(order)
    if limit:
        query = query.limit(limit)
    with engine.connect() as conn:
        for row in conn.execution_options(yield_per=500).execute(query).mappings():
            yield _certificate(row)


def _raw_select(engine: Engine):
    """Every column, so that a planted value cannot stop the stream: issued_at as the driver
    hands it; on SQLite, which keeps any type (and any bytes as TEXT) anywhere, every column
    as its bytes and storage class, decoded by :func:`_sqlite_value`."""
    if engine.dialect.name == "sqlite":
        columns = []
        for c in purge_certificates.c:
            columns += [cast(c, LargeBinary).label(c.name), func.typeof(c).label(f"{c.name}{_TYPE_SUFFIX}")]
        return select(*columns)
    return select(*(type_coerce(c, NullType()).label(c.name) if c.name == "issued_at" else c
                    for c in purge_certificates.c))


_TYPE_SUFFIX = "__storage_class"


class _Undecodable(bytes):
    """TEXT that is not UTF-8."""


def _sqlite_value(raw: bytes | None, storage_class: str) -> Any:
    if raw is None or storage_class == "null":
        return None
    if storage_class == "text":
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            return _Undecodable(raw)
    if storage_class == "integer":
        return int(raw)
    if storage_class == "real":
        return float(raw)
    return bytes(raw)  # blob


_PLAIN = re.compile(r"[A-Za-z0-9_.:/+=-]{1,80}")
_TEXT_COLUMNS = ("category", "run_id", "status", "signature", "key_id", "prev_hash", "entry_hash")


def _certificate(row) -> Certificate:
    """The row as a Certificate; one that cannot be read says why in ``problem``, and never raises.

    SQLite keeps any type in any column, and a superuser can write anything anywhere.
    """
    if f"seq{_TYPE_SUFFIX}" in row:
        row = {c.name: _sqlite_value(row[c.name], row[f"{c.name}{_TYPE_SUFFIX}"]) for c in purge_certificates.c}
    problem = None
    seq, payload, issued_at = row["seq"], row["payload"], row["issued_at"]
    if isinstance(issued_at, str):  # SQLite: ISO text
        try:
            issued_at = datetime.fromisoformat(issued_at)
        except ValueError:
            issued_at, problem = None, f"its issued_at {_shown(row['issued_at'])} is not a timestamp"
    elif not isinstance(issued_at, datetime):
        issued_at, problem = None, f"its issued_at {_shown(row['issued_at'])} is not a timestamp"
    for column in reversed(_TEXT_COLUMNS):
        if not isinstance(row[column], str):
            problem = f"its {column} {_shown(row[column])} is not text"
    data: Any = {}
    if isinstance(payload, _Undecodable):
        problem = "its payload is not UTF-8 text"
    elif not isinstance(payload, str):
        problem = "its payload is binary data, not the signed JSON text"
    else:
        try:
            data = json.loads(payload)
        except RecursionError:
            data, problem = {}, "its payload is JSON nested too deep to be a certificate"
        except ValueError:
            data, problem = {}, "its payload is not JSON"
        if not isinstance(data, dict):
            data, problem = {}, "its payload is JSON, but not an object"
    if not isinstance(seq, int) or isinstance(seq, bool):
        problem = f"its seq {_quoted(seq)} is not a whole number"
    return Certificate(
        seq=seq, category=row["category"], run_id=row["run_id"], status=row["status"],
        issued_at=issued_at, payload=payload, signature=row["signature"],
        key_id=row["key_id"], prev_hash=row["prev_hash"], entry_hash=row["entry_hash"], data=data,
        problem=problem,
    )


def _shown(value: Any) -> str:
    """A stored value, safe and short enough to print: plain text as is, anything else as repr."""
    if isinstance(value, str) and _PLAIN.fullmatch(value):
        return value
    return _quoted(value)


def _quoted(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 40 else f"{text[:37]}…"


def _stored(moment: datetime, naive: bool) -> datetime:
    moment = moment.astimezone(timezone.utc)
    return moment.replace(tzinfo=None) if naive else moment


def count_certificates(engine: Engine) -> int:
    """How many certificates the chain holds."""
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(purge_certificates)).scalar_one()
