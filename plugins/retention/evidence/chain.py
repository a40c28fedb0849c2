"""Purge certificates: signed, hash-chained evidence of what each run did.

A certificate's payload is canonical JSON (RFC 8785), stored as the exact signed text.
It carries its ``seq`` and the previous entry's hash, so anyone holding the public key
can check, without trusting the database, that no certificate was forged, edited,
removed from the middle or reordered. Appends are serialized (an advisory lock on
PostgreSQL, unique ``seq`` and ``prev_hash`` everywhere), so the chain cannot fork. A
removed tail shows only against signed checkpoints kept elsewhere (``checkpoints.py``).
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

import rfc8785
from sqlalchemy import LargeBinary, cast, func, insert, select, text, type_coerce
from sqlalchemy.exc import IntegrityError
from sqlalchemy.types import NullType

from retention.clock import utc_iso
from retention.evidence.audit import CHAIN_LOCK_KEY, purge_certificates
from retention.identity import who
from retention.run.journal import RunJournal, RunRecord, TargetRecord

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.evidence.checkpoints import Checkpoint
    from retention.evidence.signing import PublicKeys, Signer

log = logging.getLogger(__name__)

GENESIS_HASH = "0" * 64
PAYLOAD_TYPE = "retention/purge-certificate"
PAYLOAD_VERSION = 1


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


def canonical(payload: dict[str, Any]) -> bytes:
    """RFC 8785 canonical JSON: the exact bytes that are hashed and signed."""
    return rfc8785.dumps(payload)


def entry_hash(payload_bytes: bytes) -> str:
    """Hex SHA-256 of the payload bytes; the next certificate's ``prev_hash``."""
    return hashlib.sha256(payload_bytes).hexdigest()


def target_status(record: TargetRecord) -> str:
    """complete, or failed: a target that never finished did not purge everything."""
    return "complete" if record.state == "complete" else "failed"


def run_status(records: list[TargetRecord]) -> str:
    """complete when every target is; partial when something was purged; else failed."""
    if records and all(target_status(r) == "complete" for r in records):
        return "complete"
    if any(r.deleted for r in records):
        return "partial"
    return "failed"


def build_payload(
    run: RunRecord,
    targets: list[TargetRecord],
    *,
    seq: int,
    prev_hash: str,
    issued_at: datetime,
    key_id: str,
    issued_by: str = "",
    extra: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """The certificate body: what was asked, what was done, no personal data.

    ``extra`` adds sections of particular actions (the archive manifest's location and hash).
    """
    entries = []
    for record in targets:
        status = target_status(record)
        if status == "complete":
            failed = 0
        elif record.remaining is not None:
            failed = record.remaining
        else:
            failed = max((record.matched or 0) - record.deleted, 0)
        error = record.error
        if status != "complete" and not error:
            error = "interrupted" if record.state == "running" else "not run"
        entry = {
            "name": record.target,
            "kind": record.kind,
            "location": record.location,
            "status": status,
            "matched": record.matched if record.matched is not None else 0,
            "deleted": record.deleted,
            "held": record.held or 0,
            "failed": failed,
            "unconfirmed": record.unconfirmed,
            "error": error,
        }
        if run.action == "anonymize":  # rows stay: say what happened to them
            entry["anonymized"], entry["deleted"] = entry["deleted"], 0
        elif run.action == "archive":
            entry["archived"] = entry["deleted"]
        if record.bytes is not None:
            entry["bytes"] = record.bytes
        if record.tables:
            entry["tables"] = dict(sorted(record.tables.items()))
        if record.holds:
            entry["holds"] = list(record.holds)
        if record.matched is None:
            # The plan never counted this target: "matched": 0 stays a number for older readers,
            # and this says it is not a count (nothing is known to have been due, or not).
            entry["counted"] = False
        entries.append(entry)
    finished = [r.finished_at for r in targets if r.finished_at is not None]
    status = run_status(targets)
    if status == "complete" and (extra or {}).get("archive_error"):
        # Everything was purged, but the evidence of what was archived could not be written.
        status = "partial" if any(r.deleted for r in targets) else "failed"
    uncounted = sum(1 for e in entries if e.get("counted") is False)
    return (extra or {}) | {
        "type": PAYLOAD_TYPE,
        "version": PAYLOAD_VERSION,
        "seq": seq,
        "prev_hash": prev_hash,
        "issued_at": utc_iso(issued_at),
        "key_id": key_id,
        **({"issued_by": issued_by} if issued_by else {}),
        "category": run.category,
        "run_id": run.run_id,
        "rule": {"path": run.rule_path, "sha256": run.rule_sha256},
        "code_version": run.code_version,
        "action": run.action,
        "as_of": utc_iso(run.as_of),
        "cutoff": utc_iso(run.cutoff),
        "started_at": utc_iso(run.started_at),
        "finished_at": utc_iso(max(finished)) if finished else utc_iso(issued_at),
        "status": status,
        "holds": sorted({h for r in targets for h in r.holds}),
        **({"approval": run.approval} if run.approval else {}),
        "targets": entries,
        "totals": {
            "matched": sum(e["matched"] for e in entries),
            "deleted": sum(e["deleted"] for e in entries),
            "held": sum(e["held"] for e in entries),
            "failed": sum(e["failed"] for e in entries),
            **({"anonymized": sum(e["anonymized"] for e in entries)} if run.action == "anonymize" else {}),
            **({"archived": sum(e["archived"] for e in entries)} if run.action == "archive" else {}),
            **({"uncounted": uncounted} if uncounted else {}),
        },
    }


def certify(
    journal: RunJournal, run: RunRecord, signer: Signer, *, attempts: int = 5, extra: dict[str, Any] | None = None
) -> Certificate:
    """Append the run's certificate to the chain, once; return it.

    Idempotent: a run that already has a certificate gets that one back. The append and
    the journal's "certified" mark commit together.
    """
    engine = journal.engine
    for attempt in range(1, attempts + 1):
        existing = find_certificate(engine, run.category, run.run_id)
        if existing is not None:
            return existing
        try:
            return _append(journal, run, signer, extra)
        except IntegrityError:
            # Another writer took this seq (or certified this run) first; re-read the head.
            log.info("certificate append raced another writer (attempt %d); retrying", attempt)
    raise RuntimeError(f"could not append a certificate after {attempts} attempts")


def _append(journal: RunJournal, run: RunRecord, signer: Signer, extra: dict[str, Any] | None) -> Certificate:
    engine = journal.engine
    targets = journal.targets(run)
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
        issued_at = journal.now()
        payload = build_payload(
            run, targets, seq=seq, prev_hash=prev_hash, issued_at=issued_at, key_id=signer.key_id,
            issued_by=who(), extra=extra,
        )
        body = canonical(payload)
        row = {
            "seq": seq,
            "category": run.category,
            "run_id": run.run_id,
            "status": payload["status"],
            "issued_at": issued_at,
            "payload": body.decode("utf-8"),
            "signature": signer.sign(body),
            "key_id": signer.key_id,
            "prev_hash": prev_hash,
            "entry_hash": entry_hash(body),
        }
        conn.execute(insert(purge_certificates).values(**row))
        journal.mark_certified(conn, run, seq)
        journal.scrub(conn, run)  # the manifest was written from the bounds; now they only identify people
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
    problem = keys.verify(cert.key_id, cert.signature, body, seq=cert.seq)
    if problem:
        return problem
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


def _stored(moment: datetime, naive: bool) -> datetime:
    moment = moment.astimezone(timezone.utc)
    return moment.replace(tzinfo=None) if naive else moment


def _aware(moment: datetime) -> datetime:
    # SQLite and MySQL hand back naive datetimes; the column is written in UTC.
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def count_certificates(engine: Engine) -> int:
    """How many certificates the chain holds."""
    with engine.connect() as conn:
        return conn.execute(select(func.count()).select_from(purge_certificates)).scalar_one()
