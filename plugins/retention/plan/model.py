"""The plan as a value: what a rule would purge (:class:`PurgePlan`).

A :class:`PurgePlan` can be printed, compared and serialised: ``retention plan`` shows it
to the engineer reviewing a rule change, and the run starts from the same numbers.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from retention.clock import utc_iso


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
