"""Executing an erasure request: the plan's steps, journaled, then one certificate in the chain.

Per target the rule's action is applied to the subject's records: delete (children
first, in one transaction), archive (erasure deletes: copying a subject's records into
an archive would keep them), or anonymize where the rule keeps the row. Holds win: the
holds in force are read again inside each target's transaction. A step is journaled
``pending`` with the records it will take before its transaction commits and ``done``
after, so a worker killed anywhere is resumed by the next run: a pending step whose
records are gone was committed (its planned counts stand), one whose records remain is
done again. Each attempt at a request ends in exactly one certificate.
"""

from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, delete, func, insert, select, update

from retention import failpoints
from retention.clock import utc_iso
from retention.evidence.audit import erasure_steps
from retention.evidence.chain import append_certificate, read_certificates
from retention.evidence.payload import ERASURE_CATEGORY, ErasureCertificatePayload, ErasureOutcome
from retention.identity import who
from retention.plan.erasure import build_erasure_plan, erasable, subject_condition
from retention.rules.models import SqlTarget

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.erasure_requests import ErasureRegistry, ErasureRequest, SubjectKey
    from retention.evidence.chain import Certificate
    from retention.evidence.signing import Signer
    from retention.holds import HoldRegistry
    from retention.plan.erasure import ErasureStep
    from retention.rules.models import RuleFile, S3Target
    from retention.rules.subjects import SubjectsFile
    from retention.targets import Targets

log = logging.getLogger(__name__)

_DONE = {"erase": "erased", "anonymize": "anonymized"}


@dataclass(frozen=True)
class ErasureResult:
    """A request after a run: its state and the certificate of the attempt (None: nothing was run)."""

    request: ErasureRequest
    certificate: Certificate | None


def held_reasons(certificate: Certificate) -> list[str]:
    """The targets where a legal hold kept some of the subject's records (the hold beats the
    erasure: the law working, not a failure), one phrase each."""
    reasons = []
    for entry in certificate.data.get("targets", []):
        if entry.get("holds"):
            cases = ", ".join(hold["case"] for hold in entry["holds"])
            reasons.append(f"{entry['name']}: {entry.get('held', 0)} record(s) retained under legal hold {cases}")
    return reasons


def failed_reasons(certificate: Certificate) -> list[str]:
    """The targets the erasure did not finish (refused by its guard, or failed): failures someone
    must look at, one phrase each."""
    reasons = []
    for entry in certificate.data.get("targets", []):
        outcome = entry.get("outcome")
        if outcome in ("refused", "failed"):
            error = str(entry.get("error") or "")
            detail = error if error.startswith(f"{outcome}:") else f"{outcome}" + (f": {error}" if error else "")
            reasons.append(f"{entry['name']}: {detail}")
    return reasons


def erase_request(request_id: str, *, rules: list[RuleFile], registry: ErasureRegistry, holds: HoldRegistry,
                  targets: Targets, key: SubjectKey, signer: Signer, replay: bool = False) -> ErasureResult:
    """Erase one request's subject everywhere the rules reach, certify it, and close the request.

    A request already done or denied is left as it is (``replay``: a done one is erased
    again, after a restore); an interrupted one is resumed."""
    request = registry.get(request_id)
    if request.state == "denied" or (request.state == "done" and not replay):
        return ErasureResult(request, None)
    attempts = sum(1 for event in registry.history(request_id) if event["event"] == "in_progress")
    if request.state != "in_progress":
        attempts += 1
        request = registry.transition(request_id, "in_progress", detail={"attempt": attempts, "replay": replay})
    failpoints.hit("erase.started")
    plan = build_erasure_plan(request, rules, targets, key, holds=holds)
    journal = _StepJournal(registry.engine, request_id, attempts)
    by_key = {(r.rule.category, t.name): (r, t) for r in rules for t in r.rule.targets}
    outcomes = []
    for step in plan.steps:
        _, target = by_key[(step.category, step.target)]
        outcomes.append(_run_step(step, target, journal, holds, targets))
    failpoints.hit("erase.before_certificate")
    now = datetime.now(timezone.utc)

    def build(seq: int, prev_hash: str) -> ErasureCertificatePayload:
        return ErasureCertificatePayload(
            request_id=request.request_id, attempt=attempts, subject_type=request.subject_type,
            subject_hmac=request.subject_hmac, hash_key_id=request.key_id, reason=request.reason,
            received_at=request.received_at, due=request.due.isoformat(), targets=tuple(outcomes), seq=seq,
            prev_hash=prev_hash, issued_at=now, key_id=signer.key_id, issued_by=who())

    certificate = append_certificate(registry.engine, signer, category=ERASURE_CATEGORY,
                                     run_id=f"{request_id}#{attempts}", build=build, on_append=lambda conn, seq: None)
    failpoints.hit("erase.after_certificate")
    request = registry.transition(request_id, certificate.status, certificate_seq=certificate.seq, detail={
        "certificate": certificate.seq, "attempt": attempts,
        "outcomes": {o.outcome: sum(1 for p in outcomes if p.outcome == o.outcome) for o in outcomes}})
    return ErasureResult(request, certificate)


def _run_step(step: ErasureStep, target: SqlTarget | S3Target, journal: _StepJournal, holds: HoldRegistry,
              targets: Targets) -> ErasureOutcome:
    """One target: what it did, journaled; resumed from the journal after a crash."""
    recorded = journal.get(step.key)
    if recorded is not None and recorded[0] == "done":
        return recorded[1]
    if step.outcome not in _DONE or step.matched == 0:
        if recorded is not None:  # pending, and nothing left: the crashed attempt committed
            journal.done(step.key, recorded[1])
            return recorded[1]
        outcome = ErasureOutcome(step.category, step.target, step.kind, step.location, step.action,
                                 "retained" if step.outcome in _DONE else step.outcome, held=step.held,
                                 holds=step.holds, reason=step.reason)
        journal.done(step.key, outcome)
        return outcome
    planned = ErasureOutcome(step.category, step.target, step.kind, step.location, step.action,
                             _DONE[step.outcome], count=step.matched, held=step.held, holds=step.holds)
    journal.pending(step.key, planned)
    if isinstance(target, SqlTarget):
        outcome = _erase_rows(step, target, planned, holds, targets)
    else:
        outcome = _erase_objects(step, target, planned, holds, targets)
    failpoints.hit("erase.after_commit")
    journal.done(step.key, outcome)
    return outcome


def _erase_rows(step: ErasureStep, target: SqlTarget, planned: ErasureOutcome, holds: HoldRegistry,
                targets: Targets) -> ErasureOutcome:
    """Delete (children first) or anonymize the subject's unheld rows, in one transaction."""
    from retention.targets.sql.table import SqlTable

    table = SqlTable(target, targets.sql_engine(target.connection))
    with table.connect() as conn, conn.begin():
        in_force = holds.in_force(step.category, step.target)  # a hold placed since the plan still wins
        condition = erasable(table, step.records, in_force, step.action)
        if step.action == "anonymize":
            counts = {table.family.name: _anonymize(table, conn, condition)}
        else:
            counts = {member.name: conn.execute(delete(member.table).where(where)).rowcount
                      for member, where in table.family_conditions(condition)}
        held_condition = table.held(in_force)
        held = 0 if held_condition is None else int(conn.execute(select(func.count()).select_from(table.table).where(
            and_(subject_condition(table, step.records), held_condition))).scalar_one())
        failpoints.hit("erase.before_commit")
    return ErasureOutcome(**{**asdict(planned), "count": counts[table.family.name], "held": held,
                             "holds": planned.holds if held else (), "tables": counts if len(counts) > 1 else None})


def _anonymize(table: Any, conn: Any, condition: Any) -> int:
    """Rewrite the rule's personal columns of the rows in ``condition`` and set the marker."""
    from retention.targets.sql.anonymize import Anonymizer

    spec = table.target.anonymize
    anonymizer = Anonymizer.from_environment(required=any(s.kind == "hash" for s in spec.columns.values()))
    keys = [table.table.c[k] for k in table.target.key]
    columns = [table.table.c[c] for c in spec.columns]
    marker = table.table.c[spec.marker]
    moment = datetime.now(timezone.utc)
    stamp = moment if getattr(marker.type, "timezone", False) else moment.replace(tzinfo=None)
    rows = conn.execute(select(*keys, *columns).where(condition)).all()
    for row in rows:
        values = {c.name: anonymizer.apply(spec.columns[c.name], row[len(keys) + i]) for i, c in enumerate(columns)}
        conn.execute(update(table.table).where(*(k == row[i] for i, k in enumerate(keys)))
                     .values(**values, **{marker.name: stamp}))
    return len(rows)


def _erase_objects(step: ErasureStep, target: S3Target, planned: ErasureOutcome, holds: HoldRegistry,
                   targets: Targets) -> ErasureOutcome:
    """Delete every version of the subject's keys that no hold in force protects."""
    from retention.errors import TargetError

    client = targets.s3_client(target.connection, concurrency=target.concurrency)
    in_force = holds.in_force(step.category, step.target)
    keys = [k for k in step.records.keys
            if not any(h.whole or (h.prefix is not None and k.startswith(h.prefix)) for h in in_force)]
    erased = 0
    for start in range(0, len(keys), 1000):
        chunk = keys[start:start + 1000]
        versions = []
        for key in chunk:
            listed = client.list_object_versions(Bucket=target.bucket, Prefix=key)
            for item in listed.get("Versions", []) + listed.get("DeleteMarkers", []):
                if item["Key"] == key:
                    versions.append({"Key": key, "VersionId": item["VersionId"]})
        if not versions:
            continue
        response = client.delete_objects(Bucket=target.bucket, Delete={"Objects": versions, "Quiet": True})
        if response.get("Errors"):
            error = response["Errors"][0]
            raise TargetError(f"S3 refused to delete {len(response['Errors'])} version(s) under "
                              f"{target.location}: {error.get('Code')}")
        erased += len(chunk)
        failpoints.hit("erase.before_commit")
    held = step.held + (len(step.records.keys) - len(keys))
    return ErasureOutcome(**{**asdict(planned), "count": erased, "held": held})


class _StepJournal:
    """What each step of one attempt did or is doing, in the audit database."""

    def __init__(self, engine: Engine, request_id: str, attempt: int):
        self.engine, self.request_id, self.attempt = engine, request_id, attempt

    def _where(self, step: str) -> Any:
        return and_(erasure_steps.c.request_id == self.request_id, erasure_steps.c.attempt == self.attempt,
                    erasure_steps.c.step == step)

    def get(self, step: str) -> tuple[str, ErasureOutcome] | None:
        """(state, outcome) of a step, or None when it has not started."""
        with self.engine.connect() as conn:
            row = conn.execute(select(erasure_steps.c.state, erasure_steps.c.outcome).where(self._where(step))).first()
        if row is None:
            return None
        data = json.loads(row.outcome)
        data["holds"] = tuple(tuple(h) for h in data["holds"])
        return row.state, ErasureOutcome(**data)

    def pending(self, step: str, outcome: ErasureOutcome) -> None:
        """Record what the step is about to do, before its transaction commits."""
        self._write(step, "pending", outcome)

    def done(self, step: str, outcome: ErasureOutcome) -> None:
        """Record what the step did."""
        self._write(step, "done", outcome)

    def _write(self, step: str, state: str, outcome: ErasureOutcome) -> None:
        values = {"state": state, "outcome": json.dumps(asdict(outcome), sort_keys=True),
                  "recorded_at": utc_iso(datetime.now(timezone.utc))}
        with self.engine.begin() as conn:
            if conn.execute(update(erasure_steps).where(self._where(step)).values(**values)).rowcount == 0:
                conn.execute(insert(erasure_steps).values(request_id=self.request_id, attempt=self.attempt,
                                                          step=step, **values))


def pending_requests(registry: ErasureRegistry, holds: HoldRegistry | None = None) -> list[str]:
    """Ids of the requests a run takes on: pending, interrupted (in progress) and, with ``holds``,
    partial ones that are due again (:func:`due_again`)."""
    due = []
    for request in registry.find():
        if request.state in ("pending", "in_progress") or (
                holds is not None and request.state == "partial" and due_again(registry, holds, request)):
            due.append(request.request_id)
    return due


def due_again(registry: ErasureRegistry, holds: HoldRegistry, request: ErasureRequest) -> bool:
    """Whether a partial request has work a new attempt could do: records its last attempt kept
    under legal holds none of which is in force any more (released, or lapsed). One refused by the
    erasure guard waits for a person (``erase run ID``); a target that fails raises, leaving the
    request in progress, which every run takes up again."""
    if request.certificate_seq is None:
        return False
    certificate = next(read_certificates(registry.engine, seq=request.certificate_seq), None)
    if certificate is None:
        return False
    entries = certificate.data.get("targets", [])
    if any(entry.get("outcome") in ("refused", "failed") for entry in entries):
        return False
    kept = sorted({int(hold["id"]) for entry in entries for hold in entry.get("holds") or ()})
    if not kept:
        return False
    now = holds.now()
    return not any(hold.in_force(now) for hold in holds.by_ids(kept))


def replayable_requests(registry: ErasureRegistry, since: date) -> list[str]:
    """Tombstones to replay: requests answered (done or partial) on or after ``since``, the day a
    restored backup or archive was taken; what they erased may be back."""
    return [r.request_id for r in registry.find()
            if r.state in ("done", "partial") and r.updated_at[:10] >= since.isoformat()]


def erased_records(rules: list[RuleFile], registry: ErasureRegistry, targets: Targets,
                   key: SubjectKey) -> dict[str, int]:
    """Per ``category/target``, the records of the rules' targets that belong to an erased subject
    (a tombstone: a done or partial request), e.g. rows a restore just loaded. Held records count too."""
    found: dict[str, int] = {}
    for request in registry.find():
        if request.state not in ("done", "partial"):
            continue
        for step in build_erasure_plan(request, rules, targets, key).steps:
            if step.matched:
                found[step.key] = found.get(step.key, 0) + step.matched
    return found


def file_erasure_request(registry: ErasureRegistry, subjects: SubjectsFile, *, subject: str, request_id: str,
                         reason: str, due: date | None, targets: Targets, key: SubjectKey) -> ErasureRequest:
    """File a request for ``subject`` (``TYPE=VALUE``): resolve it now, keep only HMACs, due by default
    ``due_within`` after today."""
    from retention.errors import ConfigError
    from retention.plan.erasure import resolve_identities

    identity_type, sep, value = subject.partition("=")
    if not sep or not value.strip() or not identity_type.strip():
        raise ConfigError("a subject is TYPE=VALUE, e.g. email=ana@example.com")
    received = registry.today()
    if not reason.strip():
        raise ConfigError("a request needs a reason, e.g. --reason consent-withdrawn")
    identities = resolve_identities(subjects, identity_type.strip(), value, targets, key)
    within = subjects.config.due_within
    if due is None:
        import pendulum

        later = pendulum.date(received.year, received.month, received.day).add(
            years=within.years, months=within.months, weeks=within.weeks, days=within.days)
        due = date(later.year, later.month, later.day)
    return registry.file(request_id=request_id, subject_type=identity_type.strip(), subject_hmac=identities[0][1],
                         identities=identities, key_id=key.key_id, reason=reason, due=due)
