"""Runs: start (fix as_of, count), purge each target, certify. Airflow calls the three
steps as separate tasks; ``retention run`` calls them in one process.

Every step reads and writes the run journal, so a step can be retried or resumed in
another process: the journal, not memory, says what was done. A run that another run
finds uncertified (its worker died before certifying) is settled and certified first
(:mod:`retention.run.settle`), so every run gets exactly one certificate.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, Any, Literal

from sqlalchemy.exc import DBAPIError

from retention import __version__, failpoints
from retention.connections import ConnectionResolver
from retention.connections import from_environment as environment_connection
from retention.errors import (
    ConfigError,
    PurgeFailed,
    RetentionError,
    RuleError,
    TerminalError,
    TransientError,
)
from retention.evidence.chain import Certificate
from retention.evidence.checkpoints import publish
from retention.evidence.stores import CheckpointStore
from retention.holds import HoldRegistry, HoldView
from retention.plan.builder import PlanFailed, build_plan, plan_target_shards
from retention.plan.limits import approval_record, over_limits, record_limit, refusal
from retention.plan.model import PlannedTarget, PurgePlan
from retention.retry import describe_error, is_retryable
from retention.rules.models import RuleFile
from retention.run.asof import check_as_of
from retention.run.certify import certify
from retention.run.journal import RunJournal, RunRecord, TargetRecord
from retention.run.locks import DEFAULT_TTL, CategoryBusy, RunLock
from retention.run.settle import Settlement
from retention.run.shards import ShardWork, journal_shards, shard_records
from retention.targets import RunContext, Targets
from retention.targets.sql.shards import MAX_SHARDS

if TYPE_CHECKING:
    from retention.evidence.signing import Signer
    from retention.targets.base import PurgeOutcome

log = logging.getLogger(__name__)

TargetProgress = Callable[[str, int, int | None, int, float], None]
"""(target, rows deleted so far, rows matched, last batch rows, last batch seconds)."""

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
        from retention.evidence.signing import Signer
        from retention.evidence.stores import configured_store

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
        wait: float = 0.0, max_shards: int = MAX_SHARDS,
    ) -> tuple[RunRecord, PurgePlan]:
        """Take the category's lease, open the run (idempotent) and count what it will purge.

        Earlier runs of the category that never got a certificate are settled and
        certified first. A target that does not match its table, or that would purge
        more than its blast-radius limit without ``approval``, fails the whole run
        before anything is touched. Another run holding the lease raises CategoryBusy
        (after ``wait`` seconds). A target whose rule sets ``shard_rows`` is cut into at
        most ``max_shards`` shards, journaled with the run.
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
                self._publish_checkpoint(self._settlement.settle_interrupted(stale))
        run = self.journal.open_run(rule_file, run_id=run_id, as_of=as_of, code_version=self.code_version)
        _check_same_rule(run, rule_file)
        context = _context(rule_file, run)
        for position, target in enumerate(rule_file.rule.targets):
            self.journal.plan_target(run, PlannedTarget(target, context, position))
        failpoints.hit("run.opened")
        try:
            plan = build_plan(rule_file, run.as_of, self.targets, run_id=run.run_id,
                              holds=HoldRegistry(self.journal.engine))
        except (RuleError, PlanFailed, ConfigError) as exc:
            self._record_plan_failure(run, rule_file, exc)
            raise
        records = {t.target: t for t in self.journal.targets(run)}
        for target_plan in plan.targets:
            if records[target_plan.name].matched is None:
                # A retried plan that now gets through clears what the failed attempt recorded.
                reset = {"state": "planned", "error": None} if records[target_plan.name].state == "failed" else {}
                self.journal.update_target(run, target_plan.name, matched=target_plan.matched, total=target_plan.total,
                                           **reset)
        run = self._check_limits(rule_file, run, plan, approval)
        self._plan_shards(rule_file, run, max_shards)
        failpoints.hit("run.planned")
        return run, plan

    def _plan_shards(self, rule_file: RuleFile, run: RunRecord, max_shards: int) -> None:
        """Cut every target whose rule asks for it into shards (once: a retried plan keeps them)."""
        context = _context(rule_file, run)
        for target in rule_file.rule.targets:
            if target.kind == "sql" and target.shard_rows and not shard_records(self.journal, run, target.name):
                shards = plan_target_shards(target, run.cutoff, context, self.targets, max_shards=max_shards)
                journal_shards(self.journal, run, target.name, shards)
                log.info("%s.%s: %d shards of about %s rows", run.category, target.name, len(shards),
                         f"{shards[0].rows:,}")

    def _record_plan_failure(self, run: RunRecord, rule_file: RuleFile, exc: RetentionError) -> None:
        """Fail every target with why the plan failed: the certificate must say so, not that nothing was due."""
        for target in rule_file.rule.targets:
            if isinstance(exc, RuleError):
                error = "rule does not match the database"
            elif isinstance(exc, PlanFailed):  # by class and code, never the data
                error = (f"plan failed: {exc.cause}" if exc.target in (None, target.name)
                         else f"plan failed: not counted ({exc.target} could not be read)")
            else:  # a ConfigError: a connection or key the plan needed is missing
                error = f"plan failed: {describe_error(exc)}"
            self.journal.update_target(run, target.name, state="failed", error=error[:500])

    def _check_limits(self, rule_file: RuleFile, run: RunRecord, plan: PurgePlan, approval: str | None) -> RunRecord:
        """Stop a run that would purge more than a target's limit, unless a person approved it."""
        over = over_limits(rule_file, plan)
        if not over:
            return run
        if approval:
            log.warning("%s: over its limit, approved: %s", run.category, approval)
            if run.approval is None:
                return self.journal.record_approval(run, approval_record(approval, over))
            return run
        for name in over:
            self.journal.update_target(run, name, state="failed", error="over its blast-radius limit; not approved")
        for target in rule_file.rule.targets:
            if target.name not in over:
                self.journal.update_target(run, target.name, state="failed", error="run stopped: another target is over its limit")
        raise refusal(run.category, rule_file, over)

    # -- purge -----------------------------------------------------------------------

    def purge(
        self,
        rule_file: RuleFile,
        run: RunRecord,
        target_name: str,
        *,
        shard: int | None = None,
        progress: TargetProgress | None = None,
    ) -> TargetRecord:
        """Purge one target of a started run, or with ``shard`` one shard of it (its index);
        resume whatever an earlier attempt left. A sharded target purged whole has its
        shards purged in turn.

        Raises :class:`PurgeFailed` (or the underlying error) when expired records remain.
        """
        run = self._current(run)
        if run.state == "certified":
            raise TerminalError(
                f"run {run.run_id} of {run.category} is already certified; start a new run"
            )
        _check_same_rule(run, rule_file)  # a run executes one version of its rule, the one it planned
        records = {t.target: t for t in self.journal.targets(run)}
        if target_name not in records:
            raise TerminalError(f"{run.category}.{target_name} is not a target run {run.run_id} planned; "
                                "nothing was touched. Purge one of its targets, or start a new run")
        record = records[target_name]
        shards = [s.shard for s in shard_records(self.journal, run, target_name)]
        if shards and shard is None:
            return self._purge_shards_in_turn(rule_file, run, target_name, len(shards), progress)
        if shard is not None and not 0 <= shard < len(shards):
            raise TerminalError(f"{run.category}.{target_name} has no shard {shard} in run {run.run_id} "
                                f"({len(shards)} planned); nothing was touched")
        work = ShardWork(self.journal, run, target_name, shards[shard]) if shard is not None else None
        planned, matched = record.planned, record.matched
        lock = self._lock(run.category, run.run_id)
        lock.beat()  # still ours? (another run may have taken over a lease thought dead)
        # A shard's start keeps the target's first start: its other shards began it.
        started = {} if work is not None and record.started_at else {"started_at": self.journal.now()}
        self.journal.update_target(run, target_name, state="running", error=None, **started)
        ledger = work.ledger if work is not None else self.journal.ledger(run, target_name)
        holds = HoldView(HoldRegistry(self.journal.engine), run.category, target_name, run.as_of)
        table = self.targets.open(planned.target, planned.context, holds=holds)

        def report(deleted: int, rows: int, seconds: float) -> None:
            if progress is not None:
                progress(target_name, deleted, matched, rows, seconds)

        limit = record_limit(planned.target, record.total, run.approval, category=run.category)
        failpoints.hit("purge.started")
        try:
            with lock.heartbeat():
                if work is not None:
                    outcome = work.purge(table, limit, report)
                else:
                    outcome = table.purge(run.cutoff, ledger, progress=report, limit=limit)
        except BaseException as exc:
            if work is not None:
                work.failed(describe_error(exc))
            else:
                self.journal.update_target(
                    run, target_name, state="failed", error=describe_error(exc), finished_at=self.journal.now()
                )
            if isinstance(exc, DBAPIError):
                # Tell Airflow (and people) whether another attempt can help.
                kind = TransientError if is_retryable(exc) else TerminalError
                raise kind(f"{run.category}.{target_name}: {describe_error(exc)}: {exc.orig}") from exc
            raise
        failpoints.hit("purge.finished")
        self._record_outcome(run, target_name, work, outcome)
        return {t.target: t for t in self.journal.targets(run)}[target_name]

    def _record_outcome(self, run: RunRecord, target_name: str, work: ShardWork | None, outcome: PurgeOutcome) -> None:
        """Journal what a purge did (a shard's in its own record, then summed); PurgeFailed if records remain."""
        message = _why_remaining(outcome)
        if work is not None:
            work.finished(outcome, message)
        else:
            self.journal.update_target(
                run, target_name, state="complete" if message is None else "failed", remaining=outcome.remaining,
                held=outcome.held, holds=json.dumps(outcome.holds), error=message, finished_at=self.journal.now(),
            )
        if message is not None:
            where = f" shard {work.shard.name}" if work is not None else ""
            raise PurgeFailed(f"{run.category}.{target_name}{where}: {message}")

    def _purge_shards_in_turn(self, rule_file: RuleFile, run: RunRecord, target_name: str, count: int,
                              progress: TargetProgress | None) -> TargetRecord:
        """Purge every shard of a target in this process (``retention run``; Airflow maps a task
        per shard): one failing does not stop the others; the first failure is raised after."""
        failure: Exception | None = None
        for index in range(count):
            try:
                self.purge(rule_file, run, target_name, shard=index, progress=progress)
            except Exception as exc:
                failure = failure or exc
        if failure is not None:
            raise failure
        return {t.target: t for t in self.journal.targets(run)}[target_name]

    # -- certify ---------------------------------------------------------------------

    def certify(self, run: RunRecord) -> Certificate:
        """Settle any batch left pending, write the archive manifest, append the run's one certificate."""
        run = self._current(run)
        extra = None
        if run.state != "certified":
            settlement = self._settlement
            settlement.settle_pending(run)
            extra = settlement.manifest(run)
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

    @property
    def _settlement(self) -> Settlement:
        return Settlement(self.journal, self.targets, self.signer)

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


def _why_remaining(outcome: PurgeOutcome) -> str | None:
    """Why a purge left expired records (None: it left none)."""
    if not outcome.remaining:
        return None
    if outcome.stopped:
        return outcome.stopped
    if outcome.failures:
        return f"{outcome.remaining} records could not be purged ({', '.join(outcome.failures)})"
    return f"{outcome.remaining} expired records remain after the purge"


def _context(rule_file: RuleFile, run: RunRecord) -> RunContext:
    rule = rule_file.rule
    return RunContext(rule.action, rule.category, run.run_id, run.as_of, rule.archive)


def _check_same_rule(run: RunRecord, rule_file: RuleFile) -> None:
    if run.rule_sha256 != rule_file.sha256:
        raise TerminalError(
            f"{rule_file.path} changed since run {run.run_id} started (sha256 {run.rule_sha256[:12]}… → "
            f"{rule_file.sha256[:12]}…); a run executes one version of its rule: start a new run"
        )
