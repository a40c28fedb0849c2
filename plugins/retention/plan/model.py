"""The plan as a value: what a rule would purge (:class:`PurgePlan`), and what a run set out
to purge in each target (:class:`PlannedTarget`, kept in the run journal).

A :class:`PurgePlan` can be printed, compared and serialised: ``retention plan`` shows it
to the engineer reviewing a rule change, and the run starts from the same numbers. A
:class:`PlannedTarget` is what every later step of a run (its purges, the settlement of a
run whose worker died, the archive manifest) reads back, so a run carries out what it
planned and nothing the rule says afterwards.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from retention.clock import utc_iso
from retention.rules.models import TARGET_ADAPTER, Target
from retention.targets import RunContext


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


@dataclass(frozen=True)
class PlannedTarget:
    """One target as a run planned it: the target's rule and the run's context, journaled when
    the run starts so that any later process carries out exactly that."""

    target: Target
    context: RunContext | None
    """The action, archive and run the target is purged for; None in runs journaled before
    rules had actions, which only deleted."""
    position: int
    """The target's place in its rule (targets are purged and certified in this order)."""

    @property
    def name(self) -> str:
        """The target's name within its rule."""
        return self.target.name

    @property
    def kind(self) -> str:
        """``sql`` or ``s3``."""
        return self.target.kind

    @property
    def location(self) -> str:
        """Where the target's records live, without credentials."""
        return self.target.location

    def to_json(self) -> str:
        """The journal's ``definition`` text (byte for byte what every version has written)."""
        target = self.target.model_dump(mode="json")
        # Fields added since (sharding, subjects) are left out while unset, so a target that
        # uses none of them is journaled byte for byte as before they existed.
        for later in ("shard_rows", "subject", "subject_prefix", "max_replica_lag", "lag_wait_budget", "maintenance"):
            if later in target and target[later] is None:
                del target[later]
        if self.context is None:
            return json.dumps(target, sort_keys=True)
        return json.dumps({"target": target, "context": self.context.to_dict()}, sort_keys=True)

    @classmethod
    def from_json(cls, definition: str, *, position: int) -> PlannedTarget:
        """Inverse of :meth:`to_json`, for the target journaled at ``position``."""
        data = json.loads(definition)
        if "target" not in data:  # journaled before actions existed: the target alone, a delete
            return cls(TARGET_ADAPTER.validate_python(data), None, position)
        return cls(TARGET_ADAPTER.validate_python(data["target"]), RunContext.from_dict(data["context"]), position)
