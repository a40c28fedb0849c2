"""What every kind of target shares: its batch ledger, its survey and its outcome.

A target records each batch *pending* (with a descriptor it can later read back to tell
whether the batch happened) before the irreversible step, and *done* after. The
journal stores descriptors as opaque text; only the target kind that wrote one reads it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Protocol

Progress = Callable[[int, int, float], None]
"""Called after each batch with (records purged so far by this call, batch records, batch seconds)."""


@dataclass
class Survey:
    """What a target holds and what would go (for plans)."""

    matched: int = 0
    total: int = 0
    bytes: int | None = None
    held: int = 0
    notes: list[str] = field(default_factory=list)


@dataclass(frozen=True)
class PurgeOutcome:
    """What one purge call did: records it purged, and expired records left when it stopped."""

    deleted: int
    remaining: int
    held: int = 0
    bytes: int | None = None
    failures: tuple[str, ...] = ()
    holds: tuple[int, ...] = ()
    """Ids of the legal holds honoured."""


@dataclass(frozen=True)
class PendingBatch:
    """A batch recorded before its irreversible step, not yet known to have happened."""

    batch_no: int
    descriptor: str
    rows: int


class BatchLedger(Protocol):
    """Where one target's batches are journaled (see :mod:`retention.journal`)."""

    def next_batch_no(self) -> int:
        """A batch number not used before by this target in this run."""

    def pending(self, batch_no: int, descriptor: str, rows: int) -> None:
        """Record a batch of ``rows`` records about to be purged."""

    def update_pending(self, batch_no: int, rows: int, descriptor: str | None = None) -> None:
        """Correct a pending batch once its row count is known (still before it commits)."""

    def done(
        self, batch_no: int, *, rows: int | None = None, bytes_: int | None = None,
        tables: dict[str, int] | None = None, descriptor: str | None = None,
    ) -> None:
        """The batch happened: ``rows`` records (default: as planned), ``bytes_`` and rows per
        table went; ``descriptor`` replaces the pending one (e.g. with verified archive objects)."""

    def resolve(
        self, batch_no: int, rows_deleted: int, *, bytes_: int | None = None,
        tables: dict[str, int] | None = None, descriptor: str | None = None,
    ) -> None:
        """Settle a pending batch after the fact (0 rows voids it)."""

    def unresolved(self) -> list[PendingBatch]:
        """Batches recorded pending and never settled."""
