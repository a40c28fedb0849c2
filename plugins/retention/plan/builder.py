"""Building a plan: what a rule would purge at a given instant, counted on the live targets
without changing anything, or why it could not be counted (:class:`PlanFailed`).

The plan itself is a value (:mod:`retention.plan.model`).
"""

from __future__ import annotations

import sys
from datetime import datetime

from sqlalchemy.exc import DBAPIError

from retention.errors import RetentionError, RuleError, RuleProblem, TargetError, TerminalError, TransientError
from retention.holds import HoldRegistry, HoldView
from retention.plan.model import PurgePlan, TargetPlan
from retention.rules.models import RuleFile, Target
from retention.targets import RunContext, Targets
from retention.targets.sql.shards import MAX_SHARDS, Shard, plan_shards


def _read_errors() -> tuple[type[BaseException], ...]:
    """What a database or bucket raises when reading it fails (a rule mismatch is a TargetError).

    botocore is not imported for rules with only SQL targets; a bucket could only have
    raised its errors if it is loaded.
    """
    botocore = sys.modules.get("botocore.exceptions")
    if botocore is None:
        return (DBAPIError,)
    return (DBAPIError, botocore.ClientError, botocore.BotoCoreError)


class PlanFailed(RetentionError):
    """A target, or the archive, could not be read while planning: its database or bucket
    failed, which says nothing about what is due. ``target`` is None for the archive;
    ``cause`` is the error's class and code (SQLSTATE, S3 code), never its data."""

    def __init__(self, message: str, *, target: str | None, cause: str):
        super().__init__(message)
        self.target = target
        self.cause = cause


class TransientPlanFailure(PlanFailed, TransientError):
    """A plan read another attempt may get through: a refused or dropped connection, a throttled bucket."""


class TerminalPlanFailure(PlanFailed, TerminalError):
    """A plan read that fails again until a person changes something (access, a database name)."""


def build_plan(
    rule_file: RuleFile, as_of: datetime, targets: Targets, *, run_id: str | None = None,
    holds: HoldRegistry | None = None,
) -> PurgePlan:
    """Count what ``rule_file`` would purge at ``as_of``; raise RuleError on a mismatch.

    Every target is checked against its live table first (columns, key, types), so a
    mismatch names the rule file and line before anything could be touched. With
    ``holds``, records under a legal hold are counted apart (and never as matched).
    """
    rule = rule_file.rule
    cutoff = rule.cutoff(as_of)
    plans = []
    problems = []
    opened = []
    context = RunContext(rule.action, rule.category, run_id or "plan", as_of, rule.archive)
    for index, target in enumerate(rule.targets):
        view = HoldView(holds, rule.category, target.name, as_of) if holds is not None else None
        handle = targets.open(target, context, holds=view)
        try:
            handle.check()
        except TargetError as exc:
            problems.append(rule_file.problem(target_field(index, exc.field), str(exc)))
            continue
        except _read_errors() as exc:
            raise plan_failure(rule.category, target.name, exc) from exc
        opened.append((target, handle))
    if rule.archive is not None:
        # A destination the run will write is checked like a source: before anything is touched.
        archive_problem = _check_archive(rule_file, targets)
        if archive_problem is not None:
            problems.append(archive_problem)
    if problems:
        raise RuleError(problems)
    for target, handle in opened:
        try:
            survey = handle.survey(cutoff)
        except _read_errors() as exc:
            raise plan_failure(rule.category, target.name, exc) from exc
        plans.append(
            TargetPlan(
                name=target.name,
                kind=target.kind,
                location=target.location,
                matched=survey.matched,
                total=survey.total,
                bytes=survey.bytes,
                held=survey.held,
                notes=tuple(survey.notes),
            )
        )
    return PurgePlan(
        category=rule.category,
        rule_path=rule_file.display_path,
        rule_sha256=rule_file.sha256,
        action=rule.action,
        retain_for=str(rule.retain_for),
        as_of=as_of,
        cutoff=cutoff,
        targets=tuple(plans),
    )


def plan_target_shards(target: Target, cutoff: datetime, context: RunContext, targets: Targets, *,
                       max_shards: int = MAX_SHARDS) -> tuple[Shard, ...]:
    """The shards a SQL ``target`` whose rule sets ``shard_rows`` is cut into for a run with
    ``context`` at ``cutoff``, by the walk order its batches follow."""
    from retention.targets.sql.table import SqlTable

    assert target.kind == "sql" and target.shard_rows, "only SQL targets with shard_rows are sharded"
    table = targets.open(target, context)
    assert isinstance(table, SqlTable)
    return plan_shards(table, cutoff, shard_rows=target.shard_rows, max_shards=max_shards)


def target_field(index: int, field: str | None) -> tuple[str | int, ...]:
    """The document path of a target's field (``where.status`` → targets[i].where.status)."""
    path: tuple[str | int, ...] = ("targets", index)
    if field:
        path += tuple(field.split("."))
    return path


def plan_failure(category: str, target: str | None, exc: BaseException) -> PlanFailed:
    """``exc`` (raised reading a target, or the archive when ``target`` is None) as a plan
    failure that says whether another attempt can help, as a purge's errors do."""
    from retention.retry import describe_error, is_retryable

    cause = describe_error(exc)
    kind = TransientPlanFailure if is_retryable(exc) else TerminalPlanFailure
    where = f"{category}.{target}" if target else f"{category} archive"
    detail = str(getattr(exc, "orig", None) or exc).strip().splitlines()
    advice = ("another attempt may get through" if kind is TransientPlanFailure
              else "fix the connection, the database or the access, then run again")
    return kind(f"{where}: plan failed: {cause}{': ' + detail[0][:200] if detail else ''}; nothing was touched; "
                f"{advice}", target=target, cause=cause)


def _check_archive(rule_file: RuleFile, targets: Targets) -> RuleProblem | None:
    """A problem at ``archive.bucket`` unless the archive bucket exists and lets the run in."""
    from botocore.exceptions import BotoCoreError, ClientError

    from retention.aws import s3_error_code

    spec = rule_file.rule.archive
    assert spec is not None
    try:
        targets.archive_store(spec).client.head_bucket(Bucket=spec.bucket)
    except ClientError as exc:
        code = s3_error_code(exc)
        if code in ("404", "NoSuchBucket"):
            return rule_file.problem(("archive", "bucket"), (
                f"archive bucket {spec.bucket!r} does not exist (404 NoSuchBucket, connection {spec.connection}); "
                "create it, or name the bucket archives go to"))
        if code in ("403", "AccessDenied"):
            return rule_file.problem(("archive", "bucket"), (
                f"archive bucket {spec.bucket!r} refuses connection {spec.connection} (403 AccessDenied); "
                "grant it s3:ListBucket, s3:GetObject and s3:PutObject on the bucket"))
        raise plan_failure(rule_file.rule.category, None, exc) from exc
    except BotoCoreError as exc:
        raise plan_failure(rule_file.rule.category, None, exc) from exc
    return None
