"""Blast-radius limits: whether a plan would purge more of a target than its rule allows
(``max_fraction`` of the table, ``max_records``), what an approval of more covers, and how
many records a purge may take at most.

These functions decide; the runner records what they decide in the journal.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from retention.errors import OverLimit
from retention.identity import who
from retention.targets.base import RecordLimit

if TYPE_CHECKING:
    from retention.plan.model import PurgePlan
    from retention.rules.models import RuleFile, Target

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Excess:
    """A target whose plan is over its limit: the numbers a refusal names and an approval keeps."""

    matched: int
    total: int
    max_fraction: float
    max_records: int | None
    line: int | None
    """The target's line in its rule file."""

    @property
    def share(self) -> float:
        """The fraction of the target the plan would purge."""
        return self.matched / self.total if self.total else 0.0

    def to_dict(self) -> dict[str, Any]:
        """The form an approval keeps (in the journal, and so in the certificate)."""
        return {"matched": self.matched, "total": self.total, "max_fraction": self.max_fraction,
                "max_records": self.max_records, "line": self.line}


def over_limits(rule_file: RuleFile, plan: PurgePlan) -> dict[str, Excess]:
    """The targets (by name, in rule order) that ``plan`` would purge more of than ``rule_file`` allows."""
    over = {}
    for index, (target, target_plan) in enumerate(zip(rule_file.rule.targets, plan.targets)):
        share = target_plan.matched / target_plan.total if target_plan.total else 0.0
        if share > target.max_fraction or (target.max_records and target_plan.matched > target.max_records):
            over[target.name] = Excess(target_plan.matched, target_plan.total, target.max_fraction,
                                       target.max_records, rule_file.document.line_of(("targets", index)))
    return over


def approval_record(reason: str, over: dict[str, Excess]) -> dict[str, Any]:
    """What the journal keeps of a person's approval of ``over`` (it goes into the certificate)."""
    return {"reason": reason, "by": who(), "targets": {name: excess.to_dict() for name, excess in over.items()}}


def refusal(category: str, rule_file: RuleFile, over: dict[str, Excess]) -> OverLimit:
    """The error that stops a run over its limits, naming each target and how to approve it."""
    lines = []
    for name, excess in over.items():
        limit = f"max_fraction {excess.max_fraction:.0%}"
        if excess.max_records:
            limit += f", max_records {excess.max_records:,}"
        lines.append(f"{category}.{name} would purge {excess.matched:,} of {excess.total:,} "
                     f"({excess.share:.1%}), over its limit ({limit}; {rule_file.path}:{excess.line})")
    return OverLimit(
        "; ".join(lines) + ". Nothing was touched. If this is intended, run again with "
        "--approve-over-limit 'REASON' (or the DAG param approve_over_limit); the reason goes into the certificate"
    )


def record_limit(
    target: Target, total: int | None, approved: dict[str, Any] | None, *, category: str,
) -> RecordLimit | None:
    """The most records a purge of ``target`` may take in its run, checked at every batch:
    its max_records and max_fraction of the ``total`` counted at plan, or, when the run's
    ``approved`` approval covers more, exactly the number approved."""
    limits = []
    if target.max_records:
        limits.append((target.max_records, f"max_records {target.max_records:,}"))
    if total is not None and target.max_fraction < 1:  # 1: any share of the table may go
        # The same test as the plan's (matched / total > max_fraction), without float dust.
        allowed = math.floor(total * target.max_fraction + 1e-9)
        limits.append((allowed, f"max_fraction {target.max_fraction:.0%} of the {total:,} records "
                                f"counted at plan: {allowed:,}"))
    elif target.max_fraction < 1:
        log.warning("%s.%s: the table size at plan was not journaled; only max_records is enforced",
                    category, target.name)
    if not limits:
        return None
    records, describe = min(limits)
    approved_here = ((approved or {}).get("targets") or {}).get(target.name)
    if approved_here and int(approved_here.get("matched") or 0) > records:
        # An approval covers the numbers it approved, not whatever turns up later.
        matched = int(approved_here["matched"])
        return RecordLimit(matched, f"{describe}, approved up to {matched:,}")
    return RecordLimit(records, describe)
