"""Runs: start (fix as_of, count), purge each target, certify. Airflow calls the three
steps as separate tasks; ``retention run`` calls them in one process.

Every step reads and writes the run journal, so a step can be retried or resumed in
another process: the journal, not memory, says what was done. A run that another run
finds uncertified (its worker died before certifying) is settled and certified first,
so every run gets exactly one certificate.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.exc import DBAPIError

from retention import __version__, failpoints
from retention.archive.store import build_manifest
from retention.clock import utc_iso
from retention.connections import ConnectionResolver
from retention.connections import from_environment as environment_connection
from retention.errors import (
    ConfigError,
    InvalidAsOf,
    OverLimit,
    PurgeFailed,
    RuleError,
    TerminalError,
    TransientError,
)
from retention.evidence.chain import Certificate
from retention.evidence.checkpoints import CheckpointStore, publish
from retention.holds import HoldRegistry, HoldView
from retention.identity import who
from retention.plan.builder import PlanFailed, PurgePlan, build_plan
from retention.retry import describe_error, is_retryable
from retention.rules.models import TARGET_ADAPTER, RuleFile, Target
from retention.run.certify import certify
from retention.run.journal import RunJournal, RunRecord, TargetRecord
from retention.run.locks import DEFAULT_TTL, CategoryBusy, RunLock
from retention.targets import RunContext, Targets
from retention.targets.base import RecordLimit
from retention.targets.sql.descriptors import BatchDescriptor

if TYPE_CHECKING:
    from retention.evidence.signing import Signer

log = logging.getLogger(__name__)

TargetProgress = Callable[[str, int, int | None, int, float], None]
"""(target, rows deleted so far, rows matched, last batch rows, last batch seconds)."""

CLOCK_SKEW = timedelta(minutes=5)
"""How far a run's as_of may be ahead of this machine's clock (clocks of hosts drift)."""

EARLIEST_AS_OF = datetime(1970, 1, 1, tzinfo=timezone.utc)
"""No retention run measures from before this: an earlier as_of is a typo."""


def check_as_of(as_of: datetime, now: datetime) -> None:
    """Refuse an ``as_of`` that is not a plausible "now": a future one would purge records
    still inside their retention period; one before 1970 is a typo."""
    if as_of.tzinfo is None:
        raise InvalidAsOf(f"as_of {as_of.isoformat()} has no time zone; give one, e.g. 2026-06-01T00:00:00Z")
    if as_of > now + CLOCK_SKEW:
        raise InvalidAsOf(
            f"as_of {utc_iso(as_of)} is later than this machine's clock ({utc_iso(now)}, allowing "
            f"{CLOCK_SKEW.seconds // 60} min of skew): it would purge records still inside their retention "
            "period. Nothing was touched. Run without --as-of (in Airflow: without a future logical date); "
            "`retention plan --as-of` shows what a future date would purge"
        )
    if as_of < EARLIEST_AS_OF:
        raise InvalidAsOf(f"as_of {as_of.date().isoformat()} is before 1970: not a real run date; "
                          "check the year. Nothing was touched")


class RunAlreadyCertified(TerminalError):
    """A run id that already has a certificate was started again; nothing was touched."""


@dataclass
class Runner:
    """Carries out runs against one audit journal, with one set of target connections."""

    journal: RunJournal
    targets: Targets
    signer: Signer
    code_version: str = field(default_factory=lambda: f"retention {__version__}")
    lease_ttl: timedelta = DEFAULT_TTL
    checkpoints: CheckpointStore | None = None
    clock: Callable[[], datetime] | None = None
    """What time it is (default: the journal's clock); a run's as_of may not be after it."""
    owned: tuple[Any, ...] = field(default=(), repr=False)
    """What :meth:`from_environment` opened for this runner, closed by :meth:`close`."""

    @classmethod
    def from_environment(
        cls,
        *,
        audit: str | None = None,
        connections: ConnectionResolver | None = None,
        s3_client: Callable[[str], Any] | None = None,
        signer: Signer | None = None,
        checkpoints: CheckpointStore | None | Literal["configured"] = "configured",
        clock: Callable[[], datetime] | None = None,
    ) -> Runner:
        """The one way a Runner is built (CLI, Airflow, tests): the audit journal on connection
        ``audit`` (default ``retention_audit``), targets on ``connections`` (default: the
        environment's ``RETENTION_CONN_*``), S3 clients from ``s3_client(conn_id)`` when given
        (Airflow: the Amazon provider's hook), the signer from ``RETENTION_SIGNING_KEY`` and the
        checkpoint store ``RETENTION_CHECKPOINTS`` names unless given.

        The signer is loaded first: a run that could not be certified must not touch anything.
        Use it as a context manager (or call :meth:`close`) to release its engines.
        """
        from retention.evidence.audit import DEFAULT_AUDIT_CONNECTION, open_audit
        from retention.evidence.checkpoints import configured_store
        from retention.evidence.signing import Signer

        resolve = connections if connections is not None else environment_connection
        signer = signer if signer is not None else Signer.from_environment()
        engine = open_audit(resolve, audit or DEFAULT_AUDIT_CONNECTION)
        targets = Targets(resolve) if s3_client is None else _ClientTargets(resolve, s3_client)
        if checkpoints == "configured":
            checkpoints = configured_store(targets.s3_client)
        return cls(RunJournal(engine, clock=clock), targets, signer,
                   checkpoints=checkpoints, clock=clock, owned=(targets, engine))

    def close(self) -> None:
        """Close the target connections and the audit engine :meth:`from_environment` opened."""
        targets, engine = self.owned or (None, None)
        if targets is not None:
            targets.close()
        if engine is not None:
            engine.dispose()

    def __enter__(self) -> Runner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- start -----------------------------------------------------------------------

    def start(
        self, rule_file: RuleFile, *, run_id: str, as_of: datetime, approval: str | None = None,
        wait: float = 0.0,
    ) -> tuple[RunRecord, PurgePlan]:
        """Take the category's lease, open the run (idempotent) and count what it will purge.

        Earlier runs of the category that never got a certificate are settled and
        certified first. A target that does not match its table, or that would purge
        more than its blast-radius limit without ``approval``, fails the whole run
        before anything is touched. Another run holding the lease raises CategoryBusy
        (after ``wait`` seconds).
        """
        check_as_of(as_of, (self.clock or self.journal.now)())  # before anything is touched, even the lease
        category = rule_file.rule.category
        self.refuse_certified(category, run_id)
        self._check_audit_apart(rule_file)
        if self.checkpoints is not None:
            self.checkpoints.check_writable()  # a run that could not leave its checkpoint must not start
        self._lock(category, run_id).acquire(wait=wait)
        self.journal.scrub_certified()  # runs certified by versions that kept record keys
        for stale in self.journal.uncertified_runs(category):
            if stale.run_id != run_id:
                self.settle_interrupted(stale)
        run = self.journal.open_run(rule_file, run_id=run_id, as_of=as_of, code_version=self.code_version)
        _check_same_rule(run, rule_file)
        context = _context(rule_file, run)
        for position, target in enumerate(rule_file.rule.targets):
            self.journal.plan_target(
                run, position=position, name=target.name, kind=target.kind, location=target.location,
                definition={"target": target.model_dump(mode="json"), "context": context.to_dict()},
            )
        failpoints.hit("run.opened")
        try:
            plan = build_plan(rule_file, run.as_of, self.targets, run_id=run.run_id,
                              holds=HoldRegistry(self.journal.engine))
        except RuleError as exc:
            for target in rule_file.rule.targets:
                self.journal.update_target(run, target.name, state="failed", error="rule does not match the database")
            raise exc
        except PlanFailed as exc:
            # Recorded by class and code: the certificate must say the plan failed, not that nothing was due.
            for target in rule_file.rule.targets:
                error = (f"plan failed: {exc.cause}" if exc.target in (None, target.name)
                         else f"plan failed: not counted ({exc.target} could not be read)")
                self.journal.update_target(run, target.name, state="failed", error=error[:500])
            raise
        except ConfigError as exc:  # a connection or key the plan needed is missing
            for target in rule_file.rule.targets:
                self.journal.update_target(run, target.name, state="failed",
                                           error=f"plan failed: {describe_error(exc)}"[:500])
            raise
        records = {t.target: t for t in self.journal.targets(run)}
        for target_plan in plan.targets:
            if records[target_plan.name].matched is None:
                # A retried plan that now gets through clears what the failed attempt recorded.
                reset = {"state": "planned", "error": None} if records[target_plan.name].state == "failed" else {}
                self.journal.update_target(run, target_plan.name, matched=target_plan.matched, total=target_plan.total,
                                           **reset)
        run = self._check_limits(rule_file, run, plan, approval)
        failpoints.hit("run.planned")
        return run, plan

    def _check_limits(self, rule_file: RuleFile, run: RunRecord, plan: PurgePlan, approval: str | None) -> RunRecord:
        """Stop a run that would purge more than a target's limit, unless a person approved it."""
        over = {}
        for index, (target, target_plan) in enumerate(zip(rule_file.rule.targets, plan.targets)):
            share = target_plan.matched / target_plan.total if target_plan.total else 0.0
            if share > target.max_fraction or (target.max_records and target_plan.matched > target.max_records):
                over[target.name] = {"matched": target_plan.matched, "total": target_plan.total,
                                     "max_fraction": target.max_fraction, "max_records": target.max_records,
                                     "line": rule_file.document.line_of(("targets", index))}
        if not over:
            return run
        if approval:
            log.warning("%s: over its limit, approved: %s", run.category, approval)
            if run.approval is None:
                return self.journal.record_approval(run, {"reason": approval, "by": who(), "targets": over})
            return run
        lines = []
        for name, numbers in over.items():
            limit = f"max_fraction {numbers['max_fraction']:.0%}"
            if numbers["max_records"]:
                limit += f", max_records {numbers['max_records']:,}"
            share = numbers["matched"] / numbers["total"] if numbers["total"] else 0
            lines.append(f"{run.category}.{name} would purge {numbers['matched']:,} of {numbers['total']:,} "
                         f"({share:.1%}), over its limit ({limit}; {rule_file.path}:{numbers['line']})")
            self.journal.update_target(run, name, state="failed", error="over its blast-radius limit; not approved")
        for target in rule_file.rule.targets:
            if target.name not in over:
                self.journal.update_target(run, target.name, state="failed", error="run stopped: another target is over its limit")
        raise OverLimit(
            "; ".join(lines) + ". Nothing was touched. If this is intended, run again with "
            "--approve-over-limit 'REASON' (or the DAG param approve_over_limit); the reason goes into the certificate"
        )

    @staticmethod
    def _record_limit(target: Target, record: TargetRecord | None, run: RunRecord) -> RecordLimit | None:
        """The most records a purge of ``target`` may take in this run, checked at every batch:
        its max_records and max_fraction of the size counted at plan, or, when a person
        approved more, exactly the number approved."""
        limits = []
        if target.max_records:
            limits.append((target.max_records, f"max_records {target.max_records:,}"))
        total = record.total if record is not None else None
        if total is not None and target.max_fraction < 1:  # 1: any share of the table may go
            # The same test as the plan's (matched / total > max_fraction), without float dust.
            allowed = math.floor(total * target.max_fraction + 1e-9)
            limits.append((allowed, f"max_fraction {target.max_fraction:.0%} of the {total:,} records "
                                    f"counted at plan: {allowed:,}"))
        elif target.max_fraction < 1:
            log.warning("%s.%s: the table size at plan was not journaled; only max_records is enforced",
                        run.category, target.name)
        if not limits:
            return None
        records, describe = min(limits)
        approved = ((run.approval or {}).get("targets") or {}).get(target.name)
        if approved and int(approved.get("matched") or 0) > records:
            # An approval covers the numbers it approved, not whatever turns up later.
            matched = int(approved["matched"])
            return RecordLimit(matched, f"{describe}, approved up to {matched:,}")
        return RecordLimit(records, describe)

    # -- purge -----------------------------------------------------------------------

    def purge(
        self,
        rule_file: RuleFile,
        run: RunRecord,
        target_name: str,
        *,
        progress: TargetProgress | None = None,
    ) -> TargetRecord:
        """Purge one target of a started run; resume whatever an earlier attempt left.

        Raises :class:`PurgeFailed` (or the underlying error) when expired records remain.
        """
        run = self._current(run)
        if run.state == "certified":
            raise TerminalError(
                f"run {run.run_id} of {run.category} is already certified; start a new run"
            )
        _check_same_rule(run, rule_file)
        target = rule_file.rule.target(target_name)
        records = {t.target: t for t in self.journal.targets(run)}
        matched = records[target_name].matched if target_name in records else None
        lock = self._lock(run.category, run.run_id)
        lock.beat()  # still ours? (another run may have taken over a lease thought dead)
        self.journal.update_target(run, target_name, state="running", started_at=self.journal.now(), error=None)
        ledger = self.journal.ledger(run, target_name)
        holds = HoldView(HoldRegistry(self.journal.engine), run.category, target_name, run.as_of)
        table = self.targets.open(target, _context(rule_file, run), holds=holds)

        def report(deleted: int, rows: int, seconds: float) -> None:
            if progress is not None:
                progress(target_name, deleted, matched, rows, seconds)

        limit = self._record_limit(target, records.get(target_name), run)
        failpoints.hit("purge.started")
        try:
            with lock.heartbeat():
                outcome = table.purge(run.cutoff, ledger, progress=report, limit=limit)
        except BaseException as exc:
            self.journal.update_target(
                run, target_name, state="failed", error=describe_error(exc), finished_at=self.journal.now()
            )
            if isinstance(exc, DBAPIError):
                # Tell Airflow (and people) whether another attempt can help.
                kind = TransientError if is_retryable(exc) else TerminalError
                raise kind(f"{run.category}.{target_name}: {describe_error(exc)}: {exc.orig}") from exc
            raise
        failpoints.hit("purge.finished")
        if outcome.remaining:
            if outcome.stopped:
                message = outcome.stopped
            elif outcome.failures:
                message = f"{outcome.remaining} records could not be purged ({', '.join(outcome.failures)})"
            else:
                message = f"{outcome.remaining} expired records remain after the purge"
            self.journal.update_target(
                run, target_name, state="failed", remaining=outcome.remaining, held=outcome.held,
                holds=json.dumps(outcome.holds), error=message, finished_at=self.journal.now(),
            )
            raise PurgeFailed(f"{run.category}.{target_name}: {message}")
        self.journal.update_target(
            run, target_name, state="complete", remaining=0, held=outcome.held, holds=json.dumps(outcome.holds),
            finished_at=self.journal.now(),
        )
        return {t.target: t for t in self.journal.targets(run)}[target_name]

    # -- certify ---------------------------------------------------------------------

    def certify(self, run: RunRecord) -> Certificate:
        """Settle any batch left pending, write the archive manifest, append the run's one certificate."""
        run = self._current(run)
        extra = None
        if run.state != "certified":
            self._settle_pending(run)
            extra = self._manifest(run)
        failpoints.hit("certify.before_append")
        certificate = certify(self.journal, run, self.signer, extra=extra)
        failpoints.hit("certify.after_append")
        self._lock(run.category, run.run_id).release()
        self._publish_checkpoint(certificate)
        return certificate

    def _publish_checkpoint(self, certificate: Certificate) -> None:
        """Sign the chain's head at this certificate into the checkpoint store, if there is one.

        Idempotent (a rerun of certify writes the same bytes); a failure fails the step, and
        its retry publishes what is missing.
        """
        if self.checkpoints is None:
            return
        name = publish(self.checkpoints, self.signer, certificate.seq, certificate.entry_hash)
        log.info("checkpoint of seq %d written to %s/%s", certificate.seq, self.checkpoints.location, name)

    def _lock(self, category: str, run_id: str) -> RunLock:
        return RunLock(self.journal.engine, category, run_id, ttl=self.lease_ttl)

    def refuse_certified(self, category: str, run_id: str) -> None:
        """RunAlreadyCertified if ``run_id`` of ``category`` has a certificate (checked before anything)."""
        existing = self.journal.get_run(category, run_id)
        if existing is not None and existing.state == "certified":
            raise RunAlreadyCertified(
                f"run id {run_id} was certified as seq {existing.certificate_seq} ({category}); nothing was "
                "touched. A certified run is never started again: give a new --run-id, or none to get a fresh one"
            )

    def _manifest(self, run: RunRecord, *, settling: bool = False) -> dict[str, Any] | None:
        """For an archive run: write the manifest of every verified object; its location and
        SHA-256 go into the certificate.

        A manifest that cannot be written is recorded as such (``archive_error``, and the run
        is never complete), so an unreachable bucket cannot keep a run from its certificate:
        at once when settling an earlier run, and for this run's certify when retrying cannot help.
        """
        records = self.journal.targets(run)
        contexts = [_definition(r.definition)[1] for r in records]
        archive = next((c.archive for c in contexts if c is not None and c.archive is not None), None)
        if archive is None:
            return None
        sql_objects: list[dict[str, Any]] = []
        s3_objects: list[dict[str, Any]] = []
        for record in records:
            for descriptor in self.journal.ledger(run, record.target).descriptors():
                data = json.loads(descriptor)
                for obj in data.get("archived", []):
                    s3_objects.append({"target": record.target, **obj})
                for obj in BatchDescriptor.decode(descriptor).archived_objects() if record.kind == "sql" else []:
                    sql_objects.append({"target": record.target, **obj})
        body = build_manifest(
            {"category": run.category, "run_id": run.run_id, "rule": {"path": run.rule_path, "sha256": run.rule_sha256},
             "as_of": utc_iso(run.as_of), "cutoff": utc_iso(run.cutoff), "connection": archive.connection,
             "bucket": archive.bucket, "format": archive.format,
             **({"sse": archive.sse_manifest} if archive.sse else {})},
            sql_objects, s3_objects,
        )
        where = f"s3://{archive.bucket}/"
        try:
            store = self.targets.archive_store(archive)
            key = store.manifest_key(run.category, run.run_id)
            where += key
            stored = store.put_verified(key, body, table="manifest", rows=0, content_type="application/json")
        except Exception as exc:
            if not settling and is_retryable(exc):
                raise TransientError(f"{run.category}: the archive manifest {where} could not be written "
                                     f"({describe_error(exc)}); certify again") from exc
            log.error("%s: run %s: the archive manifest %s could not be written (%s); certifying without it",
                      run.category, run.run_id, where, describe_error(exc))
            return {"archive_error": f"{where} could not be written: {describe_error(exc)}"[:500]}
        return {"archive": {"manifest": f"s3://{archive.bucket}/{key}", "sha256": stored.sha256,
                            "objects": len(sql_objects) + sum(1 for o in s3_objects if o.get("key"))}}

    def settle_interrupted(self, run: RunRecord) -> Certificate:
        """Certify a run whose worker died: unfinished targets are recorded as failed."""
        log.warning("run %s of %s was never certified; settling and certifying it now", run.run_id, run.category)
        self._settle_pending(run)
        for record in self.journal.targets(run):
            if record.state in ("planned", "running"):
                self.journal.update_target(
                    run, record.target, state="failed",
                    error="interrupted" if record.state == "running" else "not run",
                )
        certificate = certify(self.journal, run, self.signer, extra=self._manifest(run, settling=True))
        self._publish_checkpoint(certificate)
        return certificate

    def _check_audit_apart(self, rule_file: RuleFile) -> None:
        audit = self.journal.engine.url
        if audit.get_backend_name() != "sqlite":
            return
        for target in rule_file.rule.targets:
            if target.kind == "sql" and self.targets.sql_engine(target.connection).url == audit:
                raise ConfigError(
                    f"target {target.name} is in the audit database's SQLite file {audit.database}; "
                    "SQLite allows one writer and the journal writes while a batch is open: "
                    "keep the audit database in a file of its own"
                )

    def _settle_pending(self, run: RunRecord) -> None:
        for record in self.journal.targets(run):
            if not record.unconfirmed:
                continue
            target, context = _definition(record.definition)
            holds = HoldView(HoldRegistry(self.journal.engine), run.category, record.target, run.as_of)
            try:
                self.targets.open(target, context, holds=holds).reconcile(
                    run.cutoff, self.journal.ledger(run, record.target))
            except Exception:
                # The certificate will show these rows as unconfirmed rather than claim them.
                log.warning("could not settle pending batches of %s.%s", run.category, record.target, exc_info=True)

    def _current(self, run: RunRecord) -> RunRecord:
        current = self.journal.get_run(run.category, run.run_id)
        if current is None:
            raise TerminalError(f"run {run.run_id} of {run.category} was never started")
        return current

    # -- all at once -----------------------------------------------------------------

    def run(
        self,
        rule_file: RuleFile,
        *,
        run_id: str,
        as_of: datetime,
        progress: TargetProgress | None = None,
        approval: str | None = None,
        wait: float = 0.0,
    ) -> Certificate:
        """Start, purge every target (one failing does not stop the others), certify."""
        try:
            run, _plan = self.start(rule_file, run_id=run_id, as_of=as_of, approval=approval, wait=wait)
        except (CategoryBusy, RunAlreadyCertified):
            raise  # another run owns the category, or this one was certified: nothing to certify now
        except Exception:
            # Nothing was purged, but the night's run still gets its (failed) certificate.
            opened = self.journal.get_run(rule_file.rule.category, run_id)
            if opened is not None:
                self.certify(opened)
            raise
        for target in rule_file.rule.targets:
            try:
                self.purge(rule_file, run, target.name, progress=progress)
            except Exception as exc:
                # The other targets still run; the certificate marks this one failed.
                log.error("%s.%s failed: %s", run.category, target.name, exc)
                log.debug("traceback", exc_info=True)
        return self.certify(run)


class _ClientTargets(Targets):
    """Targets whose S3 clients come from a factory (Airflow's Amazon provider hook)."""

    def __init__(self, connections: ConnectionResolver, s3_client: Callable[[str], Any]):
        super().__init__(connections)
        self._factory = s3_client

    def s3_client(self, conn_id: str, *, concurrency: int = 8) -> Any:
        """The (cached) S3 client the factory gives for ``conn_id``."""
        if conn_id not in self._s3:
            self._s3[conn_id] = self._factory(conn_id)
        return self._s3[conn_id]


def _context(rule_file: RuleFile, run: RunRecord) -> RunContext:
    rule = rule_file.rule
    return RunContext(rule.action, rule.category, run.run_id, run.as_of, rule.archive)


def _definition(definition: dict) -> tuple[Target, RunContext | None]:
    """A target (and its run context) as journaled when the run started."""
    if "target" not in definition:  # journaled before actions existed: a delete
        return TARGET_ADAPTER.validate_python(definition), None
    return TARGET_ADAPTER.validate_python(definition["target"]), RunContext.from_dict(definition["context"])


def _check_same_rule(run: RunRecord, rule_file: RuleFile) -> None:
    if run.rule_sha256 != rule_file.sha256:
        raise TerminalError(
            f"{rule_file.path} changed since run {run.run_id} started (sha256 {run.rule_sha256[:12]}… → "
            f"{rule_file.sha256[:12]}…); a run executes one version of its rule: start a new run"
        )
