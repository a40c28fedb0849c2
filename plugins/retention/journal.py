"""The run journal: what each run set out to do and what each batch did.

A run is opened once (its ``as_of`` and cutoff are fixed then), every target's matched
count and state are kept, and every batch is recorded *pending* before its transaction
commits and *done* after. Certificates are built from the journal, not from task return
values, so a crashed or retried task never loses or double-counts work.
"""

from __future__ import annotations

import base64
import json
import uuid
from dataclasses import dataclass
from datetime import date, datetime, timezone
from decimal import Decimal
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from retention.audit import purge_batches, purge_runs, purge_targets
from retention.targets.sql import BatchRange, PendingBatch

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from retention.rules import RuleFile


def utc_iso(moment: datetime) -> str:
    """``2026-11-30T14:24:30.356191Z``: the one timestamp format of journal and certificates."""
    if moment.tzinfo is None:
        raise ValueError("timestamps must carry a time zone")
    return moment.astimezone(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def parse_utc(text: str) -> datetime:
    """Inverse of :func:`utc_iso`."""
    return datetime.strptime(text, "%Y-%m-%dT%H:%M:%S.%fZ").replace(tzinfo=timezone.utc)


@dataclass(frozen=True)
class RunRecord:
    """One run of one category, as opened in the journal."""

    category: str
    run_id: str
    rule_path: str
    rule_sha256: str
    code_version: str
    action: str
    as_of: datetime
    cutoff: datetime
    started_at: datetime
    state: str
    certificate_seq: int | None


@dataclass(frozen=True)
class TargetRecord:
    """One target of a run, with the rows its done batches deleted."""

    target: str
    position: int
    kind: str
    location: str
    definition: dict[str, Any]
    state: str
    matched: int | None
    remaining: int | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    deleted: int
    unconfirmed: int


class RunJournal:
    """Reads and writes the journal tables of one audit database."""

    def __init__(self, engine: Engine, *, clock=None):
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(timezone.utc))

    def now(self) -> datetime:
        """Wall-clock time for journal stamps (never used to decide what expires)."""
        return self._clock()

    # -- runs ----------------------------------------------------------------------

    def open_run(
        self, rule_file: RuleFile, *, run_id: str, as_of: datetime, code_version: str
    ) -> RunRecord:
        """Record the start of a run, or return it unchanged if it was opened before.

        Reopening keeps the first ``as_of``: a retried task must not move the cutoff.
        """
        rule = rule_file.rule
        existing = self.get_run(rule.category, run_id)
        if existing is not None:
            return existing
        values = {
            "category": rule.category,
            "run_id": run_id,
            "rule_path": rule_file.display_path,
            "rule_sha256": rule_file.sha256,
            "code_version": code_version,
            "action": rule.action,
            "as_of": utc_iso(as_of),
            "cutoff": utc_iso(rule.cutoff(as_of)),
            "started_at": utc_iso(self.now()),
            "state": "running",
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(purge_runs).values(**values))
        except IntegrityError:
            pass  # opened concurrently by another attempt; theirs stands
        record = self.get_run(rule.category, run_id)
        assert record is not None
        return record

    def get_run(self, category: str, run_id: str) -> RunRecord | None:
        """The run, or None if it was never opened."""
        with self.engine.connect() as conn:
            row = conn.execute(
                select(purge_runs).where(purge_runs.c.category == category, purge_runs.c.run_id == run_id)
            ).mappings().first()
        return _run(row) if row else None

    def uncertified_runs(self, category: str) -> list[RunRecord]:
        """Runs of ``category`` opened but never certified, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(purge_runs)
                .where(purge_runs.c.category == category, purge_runs.c.state == "running")
                .order_by(purge_runs.c.started_at)
            ).mappings().all()
        return [_run(r) for r in rows]

    def mark_certified(self, conn: Connection, run: RunRecord, seq: int) -> None:
        """Close the run inside the transaction that appends its certificate."""
        conn.execute(
            update(purge_runs)
            .where(purge_runs.c.category == run.category, purge_runs.c.run_id == run.run_id)
            .values(state="certified", certificate_seq=seq)
        )

    # -- targets -------------------------------------------------------------------

    def plan_target(
        self, run: RunRecord, *, position: int, name: str, kind: str, location: str,
        definition: dict[str, Any],
    ) -> None:
        """Register a target of the run (idempotent)."""
        values = {
            "category": run.category, "run_id": run.run_id, "target": name, "position": position,
            "kind": kind, "location": location, "definition": json.dumps(definition, sort_keys=True),
            "state": "planned",
        }
        try:
            with self.engine.begin() as conn:
                conn.execute(insert(purge_targets).values(**values))
        except IntegrityError:
            pass

    def update_target(self, run: RunRecord, name: str, **values: Any) -> None:
        """Set fields of a target's record (state, matched, remaining, error, times)."""
        for stamp in ("started_at", "finished_at"):
            if isinstance(values.get(stamp), datetime):
                values[stamp] = utc_iso(values[stamp])
        with self.engine.begin() as conn:
            conn.execute(
                update(purge_targets)
                .where(*_target_key(run, name))
                .values(**values)
            )

    def targets(self, run: RunRecord) -> list[TargetRecord]:
        """The run's targets in rule order, with rows deleted by done batches."""
        with self.engine.connect() as conn:
            totals = {
                (row.target, row.state): int(row.rows)
                for row in conn.execute(
                    select(
                        purge_batches.c.target,
                        purge_batches.c.state,
                        func.coalesce(
                            func.sum(purge_batches.c.rows_done), func.sum(purge_batches.c.rows_planned)
                        ).label("rows"),
                    )
                    .where(purge_batches.c.category == run.category, purge_batches.c.run_id == run.run_id)
                    .group_by(purge_batches.c.target, purge_batches.c.state)
                )
            }
            rows = conn.execute(
                select(purge_targets)
                .where(purge_targets.c.category == run.category, purge_targets.c.run_id == run.run_id)
                .order_by(purge_targets.c.position)
            ).mappings().all()
        return [
            TargetRecord(
                target=r["target"], position=r["position"], kind=r["kind"], location=r["location"],
                definition=json.loads(r["definition"]), state=r["state"], matched=r["matched"],
                remaining=r["remaining"], error=r["error"],
                started_at=parse_utc(r["started_at"]) if r["started_at"] else None,
                finished_at=parse_utc(r["finished_at"]) if r["finished_at"] else None,
                deleted=totals.get((r["target"], "done"), 0),
                unconfirmed=totals.get((r["target"], "pending"), 0),
            )
            for r in rows
        ]

    def ledger(self, run: RunRecord, target: str) -> JournalLedger:
        """The batch ledger of one target of one run."""
        return JournalLedger(self, run, target)


class JournalLedger:
    """:class:`retention.targets.sql.BatchLedger` kept in the audit database."""

    def __init__(self, journal: RunJournal, run: RunRecord, target: str):
        self.journal = journal
        self.run = run
        self.target = target
        self._next: int | None = None

    def _key(self):
        return _batch_key(self.run, self.target)

    def next_batch_no(self) -> int:
        """A batch number not used before by this target in this run."""
        if self._next is None:
            with self.journal.engine.connect() as conn:
                top = conn.execute(select(func.max(purge_batches.c.batch_no)).where(*self._key())).scalar()
            self._next = (top or 0) + 1
        number = self._next
        self._next += 1
        return number

    def pending(self, batch_no: int, batch: BatchRange, rows: int) -> None:
        """Record a batch whose transaction is about to commit."""
        with self.journal.engine.begin() as conn:
            conn.execute(
                insert(purge_batches).values(
                    category=self.run.category, run_id=self.run.run_id, target=self.target,
                    batch_no=batch_no, state="pending", bounds=encode_bounds(batch),
                    rows_planned=rows, recorded_at=utc_iso(self.journal.now()),
                )
            )

    def done(self, batch_no: int) -> None:
        """The batch's transaction committed; its planned rows are gone."""
        self._settle(batch_no, "done", None)

    def resolve(self, batch_no: int, rows_deleted: int) -> None:
        """Settle a pending batch after the fact: ``rows_deleted`` did go (0 voids it)."""
        self._settle(batch_no, "done" if rows_deleted else "void", rows_deleted)

    def _settle(self, batch_no: int, state: str, rows: int | None) -> None:
        with self.journal.engine.begin() as conn:
            conn.execute(
                update(purge_batches)
                .where(*self._key(), purge_batches.c.batch_no == batch_no, purge_batches.c.state == "pending")
                .values(
                    state=state,
                    rows_done=purge_batches.c.rows_planned if rows is None else rows,
                    recorded_at=utc_iso(self.journal.now()),
                )
            )

    def unresolved(self) -> list[PendingBatch]:
        """Batches recorded pending and never settled."""
        with self.journal.engine.connect() as conn:
            rows = conn.execute(
                select(purge_batches.c.batch_no, purge_batches.c.bounds, purge_batches.c.rows_planned)
                .where(*self._key(), purge_batches.c.state == "pending")
                .order_by(purge_batches.c.batch_no)
            ).all()
        return [PendingBatch(r.batch_no, decode_bounds(r.bounds), r.rows_planned) for r in rows]

    def deleted(self) -> int:
        """Rows deleted by this target's done batches, across every attempt of the run."""
        with self.journal.engine.connect() as conn:
            return int(
                conn.execute(
                    select(func.coalesce(func.sum(purge_batches.c.rows_done), 0)).where(
                        *self._key(), purge_batches.c.state == "done"
                    )
                ).scalar_one()
            )


def _run(row) -> RunRecord:
    return RunRecord(
        category=row["category"], run_id=row["run_id"], rule_path=row["rule_path"],
        rule_sha256=row["rule_sha256"], code_version=row["code_version"], action=row["action"],
        as_of=parse_utc(row["as_of"]), cutoff=parse_utc(row["cutoff"]),
        started_at=parse_utc(row["started_at"]), state=row["state"],
        certificate_seq=row["certificate_seq"],
    )


def _target_key(run: RunRecord, target: str):
    return (
        purge_targets.c.category == run.category,
        purge_targets.c.run_id == run.run_id,
        purge_targets.c.target == target,
    )


def _batch_key(run: RunRecord, target: str):
    return (
        purge_batches.c.category == run.category,
        purge_batches.c.run_id == run.run_id,
        purge_batches.c.target == target,
    )


# -- bounds codec ----------------------------------------------------------------------
# Walk bounds hold key and age values of whatever type the table has; JSON alone would
# lose datetimes, decimals and UUIDs, so each value carries a tag.


def encode_bounds(batch: BatchRange) -> str:
    """JSON for a batch range, with typed values."""
    return json.dumps({"lower": _encode(batch.lower), "upper": _encode(batch.upper)}, sort_keys=True)


def decode_bounds(text: str) -> BatchRange:
    """Inverse of :func:`encode_bounds`."""
    data = json.loads(text)
    return BatchRange(_decode(data["lower"]), _decode(data["upper"]))


def _encode(bound):
    if bound is None:
        return None
    return [_encode_value(v) for v in bound]


def _encode_value(value: Any) -> Any:
    if isinstance(value, datetime):
        return {"datetime": value.isoformat()}
    if isinstance(value, date):
        return {"date": value.isoformat()}
    if isinstance(value, Decimal):
        return {"decimal": str(value)}
    if isinstance(value, uuid.UUID):
        return {"uuid": str(value)}
    if isinstance(value, (bytes, bytearray, memoryview)):
        return {"bytes": base64.b64encode(bytes(value)).decode()}
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return {"str": str(value)}


def _decode(bound):
    if bound is None:
        return None
    return tuple(_decode_value(v) for v in bound)


def _decode_value(value: Any) -> Any:
    if not isinstance(value, dict):
        return value
    (tag, text), = value.items()
    return {
        "datetime": datetime.fromisoformat,
        "date": date.fromisoformat,
        "decimal": Decimal,
        "uuid": uuid.UUID,
        "bytes": base64.b64decode,
        "str": str,
    }[tag](text)
