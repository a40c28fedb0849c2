"""What every kind of target shares: its batch ledger, its survey and its outcome.

A target records each batch *pending* (with a descriptor it can later read back to tell
whether the batch happened) before the irreversible step, and *done* after. The
journal stores descriptors as opaque text; only the target kind that wrote one reads it.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Protocol, TypeVar

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
    stopped: str | None = None
    """Why the purge stopped with expired records left (a limit reached), if it did."""


@dataclass(frozen=True)
class RecordLimit:
    """The most records one target may purge in a run, across its attempts and walkers."""

    records: int
    describe: str
    """The limit as a person reads it, e.g. ``max_records 80`` or ``max_fraction 50% of 1,000 records``."""


class RecordBudget:
    """What is left of a :class:`RecordLimit`, reserved batch by batch.

    A batch reserves the records it may purge before it starts and settles what it
    really purged after, so parallel batches together never pass the limit.
    """

    def __init__(self, limit: RecordLimit | None, used: int):
        self.limit = limit
        self.used = used
        self._reserved = 0
        self._cond = threading.Condition()

    def reserve(self, wanted: int, *, wait: bool = True) -> int:
        """Up to ``wanted`` records this batch may purge; 0 once the limit is reached.

        While other batches hold reservations that may come back, waits for them (``wait``
        False: a caller holding a reservation of its own, which would wait for itself, is
        told 0 instead).
        """
        if self.limit is None:
            return wanted
        with self._cond:
            while True:
                free = self.limit.records - self.used - self._reserved
                if free > 0:
                    granted = min(wanted, free)
                    self._reserved += granted
                    return granted
                if self._reserved == 0 or not wait:
                    return 0
                self._cond.wait()

    def settle(self, granted: int, purged: int) -> None:
        """A batch that reserved ``granted`` records purged ``purged`` of them."""
        if self.limit is None:
            return
        with self._cond:
            self._reserved -= granted
            self.used += purged
            self._cond.notify_all()

    @property
    def reached(self) -> bool:
        """Whether nothing more may be purged."""
        return self.limit is not None and self.used >= self.limit.records

    def stopped(self, remaining: int) -> str:
        """Why a purge stopped with ``remaining`` expired records left."""
        assert self.limit is not None
        return (f"stopped at its blast-radius limit ({self.limit.describe}) after {self.used:,} records; "
                f"{remaining:,} expired records left untouched. If this many is intended, approve it "
                "with --approve-over-limit on a new run")


@dataclass(frozen=True)
class PendingBatch:
    """A batch recorded before its irreversible step, not yet known to have happened."""

    batch_no: int
    descriptor: str
    rows: int


class BatchLedger(Protocol):
    """Where one target's batches are journaled (see :mod:`retention.run.journal`)."""

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

    def deleted(self) -> int:
        """Records purged by this target's done batches, across every attempt of the run."""

    def note(self, kind: str, data: dict[str, Any]) -> None:
        """Journal something the run saw besides batches (a pause on replica lag, upkeep run after
        the purge): it purges nothing, and the certificate reports it."""


Span = TypeVar("Span")
"""What a batch covered, in its kind's terms: a SQL range, an S3 batch's journaled objects."""


@dataclass(frozen=True)
class BatchResult(Generic[Span]):
    """What one batch did, for every kind of target: what it covered, the target's records
    it purged, rows per table, and how long it took (for SQL, how long it held a write
    transaction open: what batch sizing aims at); and what it could not purge."""

    batch: Span
    rows: int
    tables: dict[str, int]
    seconds: float
    bytes: int | None = None
    """Bytes purged, where the kind counts them (S3)."""
    held: int = 0
    """Records the batch left alone because a hold (or S3 Object Lock) protects them."""
    failed: int = 0
    """Records that could not be purged (and are left for a later run)."""
    errors: dict[str, int] = field(default_factory=dict)
    """Why records failed: error code to how many."""
