"""The run journal: what each run set out to do and what each batch did.

A run is opened once (its ``as_of`` and cutoff are fixed then), every target's matched
count and state are kept, and every batch is recorded *pending* before its transaction
commits and *done* after. Certificates are built from the journal, not from task return
values, so a crashed or retried task never loses or double-counts work.
"""

from __future__ import annotations

import json
import threading
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from retention.clock import parse_utc, utc_iso
from retention.evidence.audit import purge_batches, purge_runs, purge_targets
from retention.plan.model import PlannedTarget
from retention.targets.base import PendingBatch

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection, Engine

    from retention.rules.models import RuleFile


SCRUBBED_BOUNDS = '{"scrubbed": true}'
"""What a certified run's batches keep of their bounds: nothing that names a record (nor a shard's range)."""


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
    approval: dict[str, Any] | None = None


@dataclass(frozen=True)
class TargetRecord:
    """One target of a run, with the rows its done batches deleted."""

    target: str
    position: int
    kind: str
    location: str
    planned: PlannedTarget
    """The target as the run planned it (what its purge and its settlement carry out)."""
    state: str
    matched: int | None
    remaining: int | None
    error: str | None
    started_at: datetime | None
    finished_at: datetime | None
    deleted: int
    unconfirmed: int
    held: int | None = None
    bytes: int | None = None
    tables: dict[str, int] | None = None
    holds: tuple[int, ...] = ()
    total: int | None = None
    """Records the target held when the run was planned (None: journaled before this was kept)."""


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

    def record_approval(self, run: RunRecord, approval: dict[str, Any]) -> RunRecord:
        """Keep why a run over its limit was allowed (it goes into the certificate)."""
        with self.engine.begin() as conn:
            conn.execute(
                update(purge_runs)
                .where(purge_runs.c.category == run.category, purge_runs.c.run_id == run.run_id)
                .values(approval=json.dumps(approval, sort_keys=True))
            )
        record = self.get_run(run.category, run.run_id)
        assert record is not None
        return record

    def mark_certified(self, conn: Connection, run: RunRecord, seq: int) -> None:
        """Close the run inside the transaction that appends its certificate."""
        conn.execute(
            update(purge_runs)
            .where(purge_runs.c.category == run.category, purge_runs.c.run_id == run.run_id)
            .values(state="certified", certificate_seq=seq)
        )

    def scrub(self, conn: Connection, run: RunRecord) -> None:
        """Forget what identifies the purged records: every batch's bounds (age and key values of
        rows, S3 keys of objects), inside the transaction that certifies the run.

        Only crash settlement and the archive manifest read bounds, both before the run is
        certified; the certificate and the manifest keep the counts and the archive's objects.
        """
        conn.execute(
            update(purge_batches)
            .where(purge_batches.c.category == run.category, purge_batches.c.run_id == run.run_id)
            .values(bounds=SCRUBBED_BOUNDS)
        )
        conn.execute(
            update(purge_runs)
            .where(purge_runs.c.category == run.category, purge_runs.c.run_id == run.run_id)
            .values(scrubbed_at=utc_iso(self.now()))
        )

    def scrub_certified(self) -> int:
        """Scrub runs certified by versions that kept their bounds; how many were scrubbed."""
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(purge_runs).where(purge_runs.c.state == "certified", purge_runs.c.scrubbed_at.is_(None))
            ).mappings().all()
        for row in rows:
            with self.engine.begin() as conn:
                self.scrub(conn, _run(row))
        return len(rows)

    # -- targets -------------------------------------------------------------------

    def plan_target(self, run: RunRecord, planned: PlannedTarget) -> None:
        """Register a target of the run as planned (idempotent: the first plan stands)."""
        values = {
            "category": run.category, "run_id": run.run_id, "target": planned.name, "position": planned.position,
            "kind": planned.kind, "location": planned.location, "definition": planned.to_json(),
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
                (row.target, row.state): (int(row.rows), row.bytes)
                for row in conn.execute(
                    select(
                        purge_batches.c.target,
                        purge_batches.c.state,
                        func.coalesce(
                            func.sum(purge_batches.c.rows_done), func.sum(purge_batches.c.rows_planned)
                        ).label("rows"),
                        func.sum(purge_batches.c.bytes_done).label("bytes"),
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
            per_table: dict[str, dict[str, int]] = {}
            for target, counts in conn.execute(
                select(purge_batches.c.target, purge_batches.c.tables_done).where(
                    purge_batches.c.category == run.category, purge_batches.c.run_id == run.run_id,
                    purge_batches.c.state == "done", purge_batches.c.tables_done.is_not(None),
                )
            ):
                sums = per_table.setdefault(target, {})
                for table, n in json.loads(counts).items():
                    sums[table] = sums.get(table, 0) + n
        return [
            TargetRecord(
                target=r["target"], position=r["position"], kind=r["kind"], location=r["location"],
                planned=PlannedTarget.from_json(r["definition"], position=r["position"]),
                state=r["state"], matched=r["matched"],
                remaining=r["remaining"], error=r["error"],
                started_at=parse_utc(r["started_at"]) if r["started_at"] else None,
                finished_at=parse_utc(r["finished_at"]) if r["finished_at"] else None,
                deleted=totals.get((r["target"], "done"), (0, None))[0],
                unconfirmed=totals.get((r["target"], "pending"), (0, None))[0],
                held=r["held"],
                bytes=_bytes(r["kind"], totals.get((r["target"], "done"), (0, None))[1]),
                tables=per_table.get(r["target"]),
                holds=tuple(json.loads(r["holds"])) if r["holds"] else (),
                total=r["total"],
            )
            for r in rows
        ]

    def ledger(self, run: RunRecord, target: str) -> JournalLedger:
        """The batch ledger of one target of one run."""
        return JournalLedger(self, run, target)


class JournalLedger:
    """:class:`retention.targets.sql.table.BatchLedger` kept in the audit database."""

    def __init__(self, journal: RunJournal, run: RunRecord, target: str):
        self.journal = journal
        self.run = run
        self.target = target
        self._next: int | None = None
        self._lock = threading.Lock()  # S3 targets journal from several threads

    def _key(self):
        return _batch_key(self.run, self.target)

    def next_batch_no(self) -> int:
        """A batch number not used before by this target in this run."""
        with self._lock:
            if self._next is None:
                with self.journal.engine.connect() as conn:
                    top = conn.execute(select(func.max(purge_batches.c.batch_no)).where(*self._key())).scalar()
                self._next = (top or 0) + 1
            number = self._next
            self._next += 1
            return number

    def pending(self, batch_no: int, descriptor: str, rows: int) -> None:
        """Record a batch whose irreversible step is about to happen."""
        with self.journal.engine.begin() as conn:
            conn.execute(
                insert(purge_batches).values(
                    category=self.run.category, run_id=self.run.run_id, target=self.target,
                    batch_no=batch_no, state="pending", bounds=descriptor,
                    rows_planned=rows, recorded_at=utc_iso(self.journal.now()),
                )
            )

    def update_pending(self, batch_no: int, rows: int, descriptor: str | None = None) -> None:
        """Correct a pending batch once its row count is known (still before it commits)."""
        values: dict[str, Any] = {"rows_planned": rows, "recorded_at": utc_iso(self.journal.now())}
        self._update_pending(batch_no, values, descriptor)

    def done(
        self, batch_no: int, *, rows: int | None = None, bytes_: int | None = None,
        tables: dict[str, int] | None = None, descriptor: str | None = None,
    ) -> None:
        """The batch happened: ``rows`` records (default: as planned) and ``bytes_`` went."""
        self._settle(batch_no, "done", rows, bytes_, tables, descriptor)

    def resolve(
        self, batch_no: int, rows_deleted: int, *, bytes_: int | None = None,
        tables: dict[str, int] | None = None, descriptor: str | None = None,
    ) -> None:
        """Settle a pending batch after the fact: ``rows_deleted`` did go (0 voids it)."""
        self._settle(batch_no, "done" if rows_deleted else "void", rows_deleted, bytes_, tables, descriptor)

    def _settle(self, batch_no: int, state: str, rows: int | None, bytes_: int | None,
                tables: dict[str, int] | None, descriptor: str | None) -> None:
        values: dict[str, Any] = {
            "state": state,
            "rows_done": purge_batches.c.rows_planned if rows is None else rows,
            "bytes_done": bytes_,
            "tables_done": json.dumps(tables, sort_keys=True) if tables is not None else None,
            "recorded_at": utc_iso(self.journal.now()),
        }
        self._update_pending(batch_no, values, descriptor)

    def _update_pending(self, batch_no: int, values: dict[str, Any], descriptor: str | None) -> None:
        """Write ``values`` (and the descriptor, when given) into the batch while it is still pending."""
        if descriptor is not None:
            values["bounds"] = descriptor
        with self.journal.engine.begin() as conn:
            conn.execute(
                update(purge_batches)
                .where(*self._key(), purge_batches.c.batch_no == batch_no, purge_batches.c.state == "pending")
                .values(**values)
            )

    def unresolved(self) -> list[PendingBatch]:
        """Batches recorded pending and never settled."""
        with self.journal.engine.connect() as conn:
            rows = conn.execute(
                select(purge_batches.c.batch_no, purge_batches.c.bounds, purge_batches.c.rows_planned)
                .where(*self._key(), purge_batches.c.state == "pending")
                .order_by(purge_batches.c.batch_no)
            ).all()
        return [PendingBatch(r.batch_no, r.bounds, r.rows_planned) for r in rows]

    def descriptors(self) -> list[str]:
        """Descriptors of the done batches, in batch order (e.g. their archive objects)."""
        with self.journal.engine.connect() as conn:
            return list(conn.execute(
                select(purge_batches.c.bounds)
                .where(*self._key(), purge_batches.c.state == "done")
                .order_by(purge_batches.c.batch_no)
            ).scalars())

    def note(self, kind: str, data: dict[str, Any]) -> None:
        """Journal something the run saw besides batches: a row of its own state (``kind``) that
        no count of batches includes; its data is kept with the bounds (scrubbed when certified)."""
        with self.journal.engine.begin() as conn:
            conn.execute(insert(purge_batches).values(
                category=self.run.category, run_id=self.run.run_id, target=self.target,
                batch_no=self.next_batch_no(), state=kind, bounds=json.dumps(data, sort_keys=True),
                rows_planned=0, rows_done=0, recorded_at=utc_iso(self.journal.now())))

    def notes(self, *kinds: str) -> dict[str, list[dict[str, Any]]]:
        """The data of the target's notes of each of ``kinds``, in the order they were journaled
        (one read for all of them)."""
        found: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        with self.journal.engine.connect() as conn:
            rows = conn.execute(
                select(purge_batches.c.state, purge_batches.c.bounds)
                .where(*self._key(), purge_batches.c.state.in_(kinds))
                .order_by(purge_batches.c.batch_no)
            ).all()
        for kind, bounds in rows:
            data = json.loads(bounds)
            if isinstance(data, dict) and "scrubbed" not in data:
                found[kind].append(data)
        return found

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
        approval=json.loads(row["approval"]) if row["approval"] else None,
    )


def _bytes(kind: str, total: int | None) -> int | None:
    # Bytes are counted where a target knows them (objects); tables report rows only.
    return int(total or 0) if kind == "s3" else None


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
