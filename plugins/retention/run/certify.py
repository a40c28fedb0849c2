"""Certifying a run: the journal's records become the evidence layer's plain payload values,
appended to the chain together with the journal's "certified" mark."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from retention.evidence.chain import Certificate, append_certificate
from retention.evidence.payload import CertificatePayload, RunFacts, TargetOutcome
from retention.identity import who
from retention.targets.sql.lag import PAUSE_NOTE, lag_pauses
from retention.targets.sql.partitions import dropped_partitions
from retention.targets.sql.upkeep import UPKEEP_NOTE

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from retention.evidence.signing import Signer
    from retention.run.journal import JournalLedger, RunJournal, RunRecord, TargetRecord


def run_facts(run: RunRecord) -> RunFacts:
    """What the certificate says the run was asked to do."""
    return RunFacts(
        category=run.category, run_id=run.run_id, rule_path=run.rule_path, rule_sha256=run.rule_sha256,
        code_version=run.code_version, action=run.action, as_of=run.as_of, cutoff=run.cutoff,
        started_at=run.started_at, approval=run.approval,
    )


def target_outcome(record: TargetRecord, partitions: dict[str, int] | None = None,
                   ledger: JournalLedger | None = None) -> TargetOutcome:
    """What the certificate says one target did (``partitions``: those it dropped whole; ``ledger``:
    where its pauses on replica lag and its upkeep were journaled)."""
    notes = ledger.notes(PAUSE_NOTE, UPKEEP_NOTE) if ledger is not None else {}
    pauses = lag_pauses(notes.get(PAUSE_NOTE, []))
    upkeep = notes.get(UPKEEP_NOTE, [])
    return TargetOutcome(
        name=record.target, kind=record.kind, location=record.location, state=record.state,
        matched=record.matched, remaining=record.remaining, error=record.error, deleted=record.deleted,
        unconfirmed=record.unconfirmed, finished_at=record.finished_at, held=record.held, bytes=record.bytes,
        tables=record.tables, holds=tuple(record.holds), partitions=partitions,
        lag_pauses=pauses, upkeep=_last_upkeep(upkeep),
    )


def _last_upkeep(notes: list[dict[str, Any]]) -> dict[str, Any] | None:
    """The last upkeep a target's purges ran (a rerun may have run it again)."""
    if not notes:
        return None
    last = notes[-1]
    return {k: last[k] for k in ("statement", "status", "error") if last.get(k) is not None}


def certify(
    journal: RunJournal, run: RunRecord, signer: Signer, *, attempts: int = 5, extra: dict[str, Any] | None = None
) -> Certificate:
    """Append the run's certificate to the chain, once; return it.

    Idempotent: a run that already has a certificate gets that one back. The append and
    the journal's "certified" mark commit together.
    """
    facts = run_facts(run)
    outcomes = tuple(_outcome(journal, run, r) for r in journal.targets(run))
    issued_by = who()

    def build(seq: int, prev_hash: str) -> CertificatePayload:
        return CertificatePayload(
            run=facts, targets=outcomes, seq=seq, prev_hash=prev_hash, issued_at=journal.now(),
            key_id=signer.key_id, issued_by=issued_by, extra=extra or {},
        )

    def on_append(conn: Connection, seq: int) -> None:
        journal.mark_certified(conn, run, seq)
        journal.scrub(conn, run)  # the manifest was written from the bounds; now they only identify people

    return append_certificate(journal.engine, signer, category=run.category, run_id=run.run_id,
                              build=build, on_append=on_append, attempts=attempts)


def _outcome(journal: RunJournal, run: RunRecord, record: TargetRecord) -> TargetOutcome:
    if record.kind != "sql":
        return target_outcome(record)
    ledger = journal.ledger(run, record.target)
    return target_outcome(record, dropped_partitions(ledger.descriptors()), ledger)
