"""Shards of a large SQL target: its expired rows cut into consecutive ranges of the walk
order (:func:`plan_shards`), each purged on its own (:func:`purge_shard`), so the tasks of
several workers share one table.

A shard is a :class:`~retention.targets.sql.descriptors.BatchRange` of ``(age, key...)``,
the order every batch walks: the first is open below, the last open above, and each
bound is a row of the expired set found by the same index walk that cuts batches. So
the shards never overlap and every row, including one that expires behind the plan,
belongs to exactly one of them.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_

from retention.targets.sql.batch import upper_bound
from retention.targets.sql.descriptors import BatchDescriptor, BatchRange
from retention.targets.sql.settle import settle_pending
from retention.targets.sql.walk import Walker

if TYPE_CHECKING:
    from collections.abc import Callable
    from datetime import datetime

    from sqlalchemy.engine import Connection

    from retention.targets.base import BatchLedger, Progress, PurgeOutcome, RecordBudget
    from retention.targets.sql.table import SqlTable

MAX_SHARDS = 256
"""The most shards one target is cut into, whatever its size: each is a task to schedule."""


@dataclass(frozen=True)
class Shard:
    """One range of a target's expired rows, purged by one task."""

    index: int
    """0 for the first range in walk order."""
    count: int
    """How many shards the target was cut into."""
    span: BatchRange
    rows: int
    """Expired rows in the range when it was planned (what a task can expect to purge)."""

    @property
    def name(self) -> str:
        """How logs and task names show the shard: ``3/8``."""
        return f"{self.index + 1}/{self.count}"

    def clamp(self, span: BatchRange) -> BatchRange:
        """``span`` (a batch of this shard) with its open ends closed at the shard's own.

        A shard's walk starts and ends open, so its first and last batch would read as
        reaching into the neighbouring shards; journaled clamped, a batch a crash left
        pending is judged by this shard's rows alone.
        """
        return BatchRange(self.span.lower if span.lower is None else span.lower,
                          self.span.upper if span.upper is None else span.upper)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form; the bounds typed as batch descriptors keep them."""
        return {"index": self.index, "count": self.count, "rows": self.rows,
                "span": json.loads(BatchDescriptor(self.span).encode())}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Shard:
        """Inverse of :meth:`to_dict`."""
        span = BatchDescriptor.decode(json.dumps(data["span"])).span
        return cls(int(data["index"]), int(data["count"]), span, int(data["rows"]))


def plan_shards(table: SqlTable, cutoff: datetime, *, shard_rows: int, max_shards: int = MAX_SHARDS) -> tuple[Shard, ...]:
    """Cut the rows of ``table`` expired at ``cutoff`` into shards of about ``shard_rows``
    (at most ``max_shards``, at least one, also when nothing has expired).

    Each bound is found by a keyset query on the walk order from the previous one (on
    PostgreSQL the age index alone), so planning reads each expired index entry once.
    """
    if max_shards < 1:
        raise ValueError(f"max_shards must be at least 1, not {max_shards}")
    expired = table.expired(cutoff)

    def cut(conn: Connection) -> tuple[int, list[Any]]:
        total = table.count(conn, expired)
        count = max(1, min(max_shards, -(-total // shard_rows)))
        step = max(1, -(-total // count))
        bounds: list[Any] = []
        lower = None
        for _ in range(count - 1):
            window = and_(expired, table.in_range(BatchRange(lower, None)))
            bound = upper_bound(table, conn, window, step)
            if bound is None:  # fewer rows than a step are left: the last shard takes them
                break
            bounds.append(bound)
            lower = bound
        conn.rollback()
        return total, bounds

    total, bounds = table.with_retries(cut)
    edges = [None, *bounds, None]
    count = len(edges) - 1
    step = -(-total // count) if total else 0
    return tuple(
        Shard(i, count, BatchRange(edges[i], edges[i + 1]), step if i < count - 1 else max(0, total - step * i))
        for i in range(count)
    )


def purge_shard(
    table: SqlTable, cutoff: datetime, ledger: BatchLedger, shard: Shard, *,
    budget: Callable[[], RecordBudget], progress: Progress | None = None,
) -> PurgeOutcome:
    """Purge the expired rows of one shard as a target's purge does (settling first what an
    earlier attempt at this shard left pending); ``ledger`` is the shard's own.

    ``budget`` is called after settling, so a batch a crash left counts against the limit.
    The outcome's ``remaining`` is what is left of this shard's range.
    """
    expired = and_(table.expired(cutoff), table.in_range(shard.span))
    settle_pending(table, expired, ledger)
    return Walker(table, ledger, expired, budget(), progress).run()
