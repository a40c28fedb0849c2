"""The keyset walk: a purge drives the table's action over its expired rows in short,
journaled batches (:func:`purge`).

Batches walk the expired rows in ``(age_column, key...)`` order. Each batch is a closed
key range: its upper bound is found by an index walk (``OFFSET n-1 LIMIT 1``), then the
action (``DELETE ... WHERE expired AND range``, or archive, or anonymize) runs in one short
transaction. Before that transaction commits, the batch (range and row count) is recorded
as *pending* in the journal; after it commits, as *done*. A crash in between leaves a
pending batch whose range tells, by counting what is still there, whether the batch
committed (:mod:`retention.targets.sql.settle`). So a rerun neither loses nor
double-counts a batch, whatever moment the crash hit.

With ``workers`` > 1 the expired rows are shared out by age between parallel walkers.
Rows another transaction locks are passed over and come back to; holds are read for
every batch; the blast-radius limit is reserved batch by batch.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from typing import TYPE_CHECKING, Any

from sqlalchemy import and_, select, true
from sqlalchemy.exc import DBAPIError

from retention.retry import attempts, is_transient
from retention.targets.base import PurgeOutcome, RecordBudget
from retention.targets.sql.batch import Batch, BatchOverCap, BatchSizer
from retention.targets.sql.descriptors import BatchRange, Bound
from retention.targets.sql.partitions import drop_expired_partitions
from retention.targets.sql.settle import settle_after_error, settle_pending
from retention.targets.sql.upkeep import upkeep_after

if TYPE_CHECKING:
    from datetime import datetime

    from sqlalchemy.engine import Connection
    from sqlalchemy.sql.elements import ColumnElement

    from retention.targets.base import BatchLedger, BatchResult, Progress, RecordLimit
    from retention.targets.sql.table import SqlTable

log = logging.getLogger(__name__)


def purge(
    table: SqlTable, cutoff: datetime, ledger: BatchLedger, *, progress: Progress | None = None,
    limit: RecordLimit | None = None,
) -> PurgeOutcome:
    """Purge every expired row of ``table`` in committed batches, settling first whatever a
    crash left pending.

    Returns the rows purged by this call (batches of earlier attempts are already in the
    ledger) and the expired rows still present when it stopped. No batch takes the run's
    total (earlier attempts included) past ``limit``.
    """
    expired = table.expired(cutoff)
    settle_pending(table, expired, ledger)
    # Counted after settling: a batch an earlier attempt left pending counts against the limit.
    budget = RecordBudget(limit, ledger.deleted() if limit is not None else 0)
    walker = Walker(table, ledger, expired, budget, progress)
    # Partitions wholly before the cutoff go as units first; the walk takes the rest.
    drop_expired_partitions(table, cutoff, ledger, budget, walker.done.add)
    outcome = walker.run()
    upkeep_after(table, walker.done.rows, ledger)  # optional VACUUM/OPTIMIZE; never fails the purge
    return outcome


class Walker:
    """The walkers of one purge of one table: what they share (the expired rows, the
    ledger, the blast-radius budget, the lock-wait budget, the tally) and the walk itself."""

    def __init__(self, table: SqlTable, ledger: BatchLedger, expired: ColumnElement[bool], budget: RecordBudget,
                 progress: Progress | None):
        self.table = table
        self.ledger = ledger
        self.expired = expired
        self.budget = budget
        self.locks = _LockWait(table.target.lock_wait_budget)
        self.done = _Tally(progress)
        self.name = table.target.name

    def run(self) -> PurgeOutcome:
        """Walk the expired rows (again, for rows that expired behind the walk) until none
        is left, a hold pauses the target, the limit is reached or locked rows are given up."""
        table = self.table
        remaining = 0
        for _ in range(table.passes):
            shares = self._shares() if table.target.workers > 1 else [BatchRange(None, None)]
            if len(shares) == 1:
                self._walk(shares[0], self._sizer())
            else:
                with ThreadPoolExecutor(len(shares), thread_name_prefix=f"walk-{self.name}") as pool:
                    walks = [pool.submit(self._walk, share, self._sizer()) for share in shares]
                    for walk in walks:
                        walk.result()
            remaining = self._count(table.unheld(self.expired, table.current_holds()))
            if remaining == 0 or self.budget.reached or self.locks.gave_up or self._lagging():
                break
            # Rows that became expired behind the walk (inserted with an old age while
            # it ran): walk again rather than leave them.
            log.info("%s: %d expired rows appeared behind the walk; walking again", self.name, remaining)
        held_condition = table.held(table.current_holds())
        held = 0 if held_condition is None else self._count(and_(self.expired, held_condition))
        honoured = tuple(sorted(table.holds.honoured)) if table.holds else ()
        failures: tuple[str, ...] = ()
        stopped = None
        throttle = table.throttle
        if remaining and throttle is not None and throttle.gave_up:
            failures = (throttle.reason,)
        elif remaining and self.locks.gave_up:
            failures = (f"locked by other transactions beyond the lock-wait budget of {self.locks.budget:g}s; "
                        "the next run takes them",)
        elif remaining and self.budget.reached:
            stopped = self.budget.stopped(remaining)
        return PurgeOutcome(self.done.rows, remaining, held=held, holds=honoured, failures=failures, stopped=stopped)

    def _lagging(self) -> bool:
        return self.table.throttle is not None and self.table.throttle.gave_up

    def _count(self, condition: ColumnElement[bool]) -> int:
        return self.table.with_retries(lambda conn: self.table.count(conn, condition))

    def _sizer(self) -> BatchSizer:
        return BatchSizer(self.table.target.max_batch_rows, target_seconds=self.table.action.batch_seconds)

    def _shares(self) -> list[BatchRange]:
        """Split the expired rows into ``workers`` age ranges of about equal size.

        Each share is a closed range of the age alone, so shares never overlap and every
        row belongs to exactly one; a worker's batches never cross its share's end.
        """
        table, expired = self.table, self.expired
        workers = table.target.workers
        age = table.walk_columns()[0]

        def bounds(conn: Connection) -> list[Any]:
            total = table.count(conn, expired)
            if total < workers * 10_000:  # not worth the threads
                return []
            found: list[Any] = []
            for i in range(1, workers):
                row = conn.execute(select(age).where(expired).order_by(age).offset(total * i // workers).limit(1)).first()
                if row is not None and (not found or row[0] > found[-1]):
                    found.append(row[0])
            return found

        cuts = table.with_retries(bounds)
        edges = [None, *[(cut,) for cut in cuts], None]
        return [BatchRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def _walk(self, share: BatchRange, sizer: BatchSizer) -> int:
        """Purge the expired rows of one share, batch after batch; return how many went.

        A batch whose rows another transaction locks waits at most the lock timeout,
        rolls back and is passed over; the walk goes on, then comes back to what it
        passed over in smaller batches until that is purged or the lock-wait budget is
        spent.
        """
        work = [(share, sizer)]
        deleted = 0
        wait = 0.5
        while True:
            locked: list[tuple[BatchRange, int]] = []
            before = deleted
            for span, span_sizer in work:
                rows, stop = self._walk_range(span, span_sizer, locked)
                deleted += rows
                if stop:
                    return deleted
            if not locked:
                return deleted
            if self.locks.left() <= 0:
                self.locks.gave_up = True
                log.warning("%s: %d ranges still locked by other transactions after the lock-wait budget of "
                            "%gs; leaving them", self.name, len(locked), self.locks.budget)
                return deleted
            if deleted == before:  # nothing came free this round: give the other transactions time
                time.sleep(min(wait, self.locks.left()))
                wait = min(wait * 2, 15.0)
            log.info("%s: coming back to %d locked ranges", self.name, len(locked))
            # Much smaller batches: the rows around the locked ones go, and a range soon
            # holds only what is locked (each further try at it costs one lock timeout).
            work = [(span, BatchSizer(max(1, size // 64), start=max(1, size // 64),
                                      target_seconds=sizer.target_seconds)) for span, size in locked]

    def _walk_range(self, span: BatchRange, sizer: BatchSizer,
                    locked: list[tuple[BatchRange, int]]) -> tuple[int, bool]:
        """Purge one range batch after batch; ranges found locked are added to ``locked``.

        Returns the rows purged and whether the walk must stop (paused by a hold, or at
        the blast-radius limit).
        """
        lower: Bound | None = span.lower
        ceiling = span.upper
        deleted = 0
        while True:
            started = time.perf_counter()
            outcome = self._batch(sizer, lower, ceiling)
            if outcome is None:
                return deleted, True
            batch, result = outcome
            if result is None:  # locked: passed over, to come back to
                assert batch.span is not None
                locked.append((batch.span, batch.size))
                upper = batch.span.upper
            else:
                deleted += result.rows
                if result.rows:
                    log.debug("%s: batch %d: %d rows in %.3fs", self.name, batch.number, result.rows,
                              time.perf_counter() - started)
                    self.done.add(result.rows, result.seconds)
                sizer.observe(result.rows, result.seconds)
                upper = result.batch.upper
            if upper is None or upper == ceiling:
                return deleted, False
            lower = upper

    def _batch(self, sizer: BatchSizer, lower: Bound | None,
               ceiling: Bound | None) -> tuple[Batch, BatchResult | None] | None:
        """Run the next batch after ``lower``, retrying (through the one retry policy, with the
        table's delays) what retrying can help: transient database errors.

        Returns the batch and its result, the batch and None when its rows were locked
        (it rolled back and is settled), or None when the walk must stop.
        """
        for attempt in attempts(_transient, delays=self.table.retry_delays, what=self.name):
            with attempt:
                return self._attempt(sizer, lower, ceiling)
        raise AssertionError("unreachable: attempts() returns or raises")

    def _attempt(self, sizer: BatchSizer, lower: Bound | None,
                 ceiling: Bound | None) -> tuple[Batch, BatchResult | None] | None:
        """One try at the next batch; a batch that took more rows than its cap is cut
        smaller and tried again at once, any other failure is settled and raised."""
        table, ledger, budget = self.table, self.ledger, self.budget
        while True:
            # Holds are read for every batch (and every retry): one placed after the
            # plan still protects its rows.
            holds = table.current_holds()
            held = table.held(holds)
            if held is not None and held.compare(true()):
                log.warning("%s: paused by %s", self.name, "; ".join(h.describe() for h in holds if h.whole))
                return None
            # Replica lag is read before every batch (and every retry), as holds are.
            if table.throttle is not None and not table.throttle.wait(ledger):
                return None
            granted = budget.reserve(2 * sizer.size - 1)
            if granted == 0:
                log.warning("%s: blast-radius limit reached (%s); stopping", self.name,
                            budget.limit.describe if budget.limit is not None else "no limit")
                return None
            batch_expired = table.unheld(self.expired, holds)
            batch = Batch(
                number=ledger.next_batch_no(),
                window=and_(batch_expired, table.in_range(BatchRange(lower, ceiling))),
                expired=batch_expired, lower=lower, ceiling=ceiling,
                size=min(sizer.size, granted), cap=granted if budget.limit is not None else None,
                holds=tuple(h.id for h in holds), ledger=ledger,
            )
            try:
                with table.connect() as conn:
                    result = table.action.apply(table, conn, batch)
            except BatchOverCap as exc:
                # Rows arrived in the range after it was cut: smaller, and exact, next time.
                budget.settle(granted, 0)
                settle_after_error(table, self.expired, ledger)
                log.info("%s: %s; cutting it smaller", self.name, exc)
                sizer.size = max(1, batch.size // 2)
                continue
            except DBAPIError as exc:
                budget.settle(granted, 0)
                if is_lock_timeout(exc) and batch.span is not None:
                    # The batch rolled back; settle it (never move on with a batch pending).
                    settle_pending(table, self.expired, ledger)
                    self.locks.hit()
                    log.info("%s: batch %d: rows locked by another transaction (%s); passing over them for now",
                             self.name, batch.number, _short(exc))
                    return batch, None
                settle_after_error(table, self.expired, ledger)
                raise
            except BaseException:
                budget.settle(granted, 0)
                settle_after_error(table, self.expired, ledger)
                raise
            budget.settle(granted, result.rows)
            return batch, result


def _transient(exc: BaseException) -> bool:
    return isinstance(exc, DBAPIError) and is_transient(exc)


class _LockWait:
    """How long the walkers of one purge have been coming back to rows other transactions lock."""

    def __init__(self, budget: float):
        self.budget = budget
        self.gave_up = False
        self._since: float | None = None
        self._lock = threading.Lock()

    def hit(self) -> None:
        """A batch found its rows locked (the budget runs from the first time)."""
        with self._lock:
            if self._since is None:
                self._since = time.monotonic()

    def left(self) -> float:
        """Seconds of the budget left."""
        if self._since is None:
            return self.budget
        return max(0.0, self.budget - (time.monotonic() - self._since))


class _Tally:
    """Rows purged so far by every walker of a purge, reported as each batch lands."""

    def __init__(self, progress: Progress | None):
        self.rows = 0
        self._progress = progress
        self._lock = threading.Lock()

    def add(self, rows: int, seconds: float) -> None:
        with self._lock:
            self.rows += rows
            if self._progress is not None:
                self._progress(self.rows, rows, seconds)


_LOCK_TIMEOUT_PG = {"55P03"}
_LOCK_TIMEOUT_MYSQL = {1205}


def is_lock_timeout(exc: DBAPIError) -> bool:
    """Whether a statement gave up waiting for a row lock another transaction holds."""
    orig = exc.orig
    code = getattr(orig, "pgcode", None)
    if code is not None:
        return code in _LOCK_TIMEOUT_PG
    args = tuple(getattr(orig, "args", ()))
    return bool(args) and isinstance(args[0], int) and args[0] in _LOCK_TIMEOUT_MYSQL


def _short(exc: DBAPIError) -> str:
    return str(exc.orig).strip().splitlines()[0][:200]
