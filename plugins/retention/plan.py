"""Plans: what a rule would purge at a given instant, computed without changing anything.

A :class:`PurgePlan` is a value: it can be printed, compared and serialised. ``retention
plan`` shows it to the engineer reviewing a rule change; the run starts from the same
numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from retention.errors import RuleError, TargetError
from retention.holds import HoldRegistry, HoldView
from retention.journal import utc_iso
from retention.rules import RuleFile
from retention.targets import RunContext, Targets


@dataclass(frozen=True)
class TargetPlan:
    """One target's share of a plan."""

    name: str
    kind: str
    location: str
    matched: int
    total: int
    bytes: int | None = None
    held: int = 0
    notes: tuple[str, ...] = ()

    @property
    def unit(self) -> str:
        """What one record of this target is called: a row, or an S3 object."""
        return "object" if self.kind == "s3" else "row"


@dataclass(frozen=True)
class PurgePlan:
    """What one category's rule would purge as of one instant."""

    category: str
    rule_path: str
    rule_sha256: str
    action: str
    retain_for: str
    as_of: datetime
    cutoff: datetime
    targets: tuple[TargetPlan, ...]

    @property
    def matched(self) -> int:
        """Records the plan would purge, over all targets."""
        return sum(t.matched for t in self.targets)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form (timestamps as ISO 8601 UTC)."""
        data = asdict(self)
        data["as_of"] = utc_iso(self.as_of)
        data["cutoff"] = utc_iso(self.cutoff)
        data["matched"] = self.matched
        for target in data["targets"]:
            target["notes"] = list(target["notes"])
        return data


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
        opened.append((target, handle))
    if problems:
        raise RuleError(problems)
    for target, handle in opened:
        survey = handle.survey(cutoff)
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


def target_field(index: int, field: str | None) -> tuple[str | int, ...]:
    """The document path of a target's field (``where.status`` → targets[i].where.status)."""
    path: tuple[str | int, ...] = ("targets", index)
    if field:
        path += tuple(field.split("."))
    return path
