"""The shards of a run's target in the journal: planned once, purged by tasks that may run
in different processes at once, summed back into the one target the certificate shows.

Each shard is journaled as a row of the target's batches with a negative number and a
state of its own (``shard``, ``shard_done``, ``shard_fail``): its range lives with the
batches' bounds, so certifying the run scrubs it with them, and the batch sums that make
the target's counts never include it. A shard's batches are the target's batches, numbered
apart (shard *i* of *n* takes ``i+1, i+1+n, …``), so every settlement that reads the
target's batches reads the shards' too.
"""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING, Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.exc import IntegrityError

from retention.clock import utc_iso
from retention.errors import TerminalError
from retention.evidence.audit import purge_batches, purge_targets
from retention.run.journal import JournalLedger
from retention.targets.base import RecordBudget
from retention.targets.sql.descriptors import BatchDescriptor
from retention.targets.sql.shards import Shard, purge_shard
from retention.targets.sql.table import SqlTable

if TYPE_CHECKING:
    from sqlalchemy.engine import Connection

    from retention.run.journal import RunJournal, RunRecord
    from retention.targets.base import Progress, PurgeOutcome, RecordLimit
    from retention.targets.s3.objects import S3Objects

SHARD_STATES = ("shard", "shard_done", "shard_fail")
"""A shard planned or under way, purged whole, or failed (with what it left in its outcome)."""


@dataclass(frozen=True)
class ShardRecord:
    """One shard of a run's target as the journal has it."""

    shard: Shard
    state: str
    outcome: dict[str, Any]
    """What its last purge left: ``remaining``, ``held``, ``holds`` and ``error``."""


def journal_shards(journal: RunJournal, run: RunRecord, target: str, shards: tuple[Shard, ...]) -> None:
    """Record the shards a target was cut into (idempotent: the first plan stands)."""
    now = utc_iso(journal.now())
    rows = [{"category": run.category, "run_id": run.run_id, "target": target, "batch_no": _marker(shard.index),
             "state": "shard", "bounds": _bounds(shard, {}), "rows_planned": shard.rows, "rows_done": 0,
             "recorded_at": now} for shard in shards]
    try:
        with journal.engine.begin() as conn:
            conn.execute(insert(purge_batches), rows)
    except IntegrityError:
        pass  # a retried plan: the shards journaled first stand


def shard_records(journal: RunJournal, run: RunRecord, target: str) -> list[ShardRecord]:
    """The target's shards in walk order (none: the target is purged whole)."""
    with journal.engine.connect() as conn:
        rows = conn.execute(
            select(purge_batches.c.state, purge_batches.c.bounds)
            .where(*_markers(run, target)).order_by(purge_batches.c.batch_no.desc())
        ).all()
    records = []
    for state, bounds in rows:
        data = json.loads(bounds)
        if "shard" not in data:
            continue  # scrubbed with the batches when the run was certified
        records.append(ShardRecord(Shard.from_dict(data["shard"]), state, data.get("outcome") or {}))
    return records


class ShardWork:
    """A purge of one shard: its batches (:class:`ShardLedger`), the target's record budget
    shared through the journal (:class:`SharedBudget`), its state, and the target's state
    summed over its shards once it ends."""

    def __init__(self, journal: RunJournal, run: RunRecord, target: str, shard: Shard):
        self.journal = journal
        self.run = run
        self.target = target
        self.shard = shard
        self.ledger = ShardLedger(journal, run, target, shard)

    def purge(self, table: SqlTable | S3Objects, limit: RecordLimit | None, progress: Progress | None) -> PurgeOutcome:
        """Mark the shard under way and purge its range."""
        if not isinstance(table, SqlTable):
            raise TerminalError(f"{self.target} is not a SQL table; only SQL targets are sharded")
        self._mark("shard", {})
        return purge_shard(table, self.run.cutoff, self.ledger, self.shard,
                           budget=lambda: SharedBudget(self.journal, self.run, self.target, self.shard, limit),
                           progress=progress)

    def failed(self, error: str) -> None:
        """The shard's purge raised ``error``; the target fails with it."""
        self._mark("shard_fail", {"error": error})
        self.settle_target()

    def finished(self, outcome: PurgeOutcome, message: str | None) -> None:
        """The shard's purge ended, with ``message`` saying why records remain (None: none do)."""
        self._mark("shard_done" if message is None else "shard_fail",
                   {"remaining": outcome.remaining, "held": outcome.held, "holds": list(outcome.holds),
                    "error": message})
        self.settle_target()

    def settle_target(self) -> None:
        """Sum the shards into the target's record: complete once every shard is, failed as soon as
        one failed (with its reason), else still running."""
        records = shard_records(self.journal, self.run, self.target)
        ended = [r for r in records if r.state != "shard"]
        failed = [r for r in records if r.state == "shard_fail"]
        if not failed and len(ended) < len(records):
            return  # other shards are still under way; the last to end sums them up
        values: dict[str, Any] = {
            "remaining": sum(int(r.outcome.get("remaining") or 0) for r in ended),
            "held": sum(int(r.outcome.get("held") or 0) for r in ended),
            "holds": json.dumps(sorted({h for r in ended for h in r.outcome.get("holds") or ()})),
        }
        if failed:
            first = failed[0]
            values.update(state="failed", error=f"shard {first.shard.name}: {first.outcome.get('error')}"[:500])
        else:
            values.update(state="complete", remaining=0, error=None)
        if len(ended) == len(records):
            values["finished_at"] = self.journal.now()
        self.journal.update_target(self.run, self.target, **values)

    def _mark(self, state: str, outcome: dict[str, Any]) -> None:
        with self.journal.engine.begin() as conn:
            conn.execute(update(purge_batches).where(*_markers(self.run, self.target),
                                                     purge_batches.c.batch_no == _marker(self.shard.index))
                         .values(state=state, bounds=_bounds(self.shard, outcome),
                                 recorded_at=utc_iso(self.journal.now())))


class ShardLedger(JournalLedger):
    """The batches of one shard: the target's, numbered apart from its other shards' and
    journaled with the shard's own bounds where the walk left a range open."""

    def __init__(self, journal: RunJournal, run: RunRecord, target: str, shard: Shard):
        super().__init__(journal, run, target)
        self.shard = shard

    def _key(self) -> tuple[Any, ...]:
        return _shard_batches(self.run, self.target, self.shard)

    def next_batch_no(self) -> int:
        """The shard's next batch number (``index + 1 + k * count``), never used before in the run."""
        with self._lock:
            if self._next is None:
                with self.journal.engine.connect() as conn:
                    top = conn.execute(select(func.max(purge_batches.c.batch_no)).where(*self._key())).scalar()
                self._next = top + self.shard.count if top else self.shard.index + 1
            number = self._next
            self._next += self.shard.count
            return number

    def pending(self, batch_no: int, descriptor: str, rows: int) -> None:
        """Record a batch of the shard about to happen, its range closed at the shard's ends."""
        super().pending(batch_no, self._clamp(descriptor), rows)

    def _update_pending(self, batch_no: int, values: dict[str, Any], descriptor: str | None) -> None:
        super()._update_pending(batch_no, values, None if descriptor is None else self._clamp(descriptor))

    def _clamp(self, descriptor: str) -> str:
        decoded = BatchDescriptor.decode(descriptor)
        return replace(decoded, span=self.shard.clamp(decoded.span)).encode()


class SharedBudget(RecordBudget):
    """The target's record limit shared by its shards, which may run in several processes at
    once: every reservation is claimed in the journal (in the shard's row, under a lock on
    the target's row), so the shards together never pass the limit.

    A shard that finds the limit taken waits up to ``wait`` seconds for claims other shards
    may still give back, then stops as a target at its limit does.
    """

    def __init__(self, journal: RunJournal, run: RunRecord, target: str, shard: Shard,
                 limit: RecordLimit | None, *, wait: float = 30.0, poll: float = 0.2):
        super().__init__(limit, 0)
        self.journal, self.run, self.target, self.shard = journal, run, target, shard
        self.wait, self.poll = wait, poll
        if limit is not None:
            # What an earlier attempt at this shard claimed and never purged comes back.
            with self._locked() as conn:
                done = conn.execute(select(func.coalesce(func.sum(purge_batches.c.rows_done), 0)).where(
                    *_shard_batches(run, target, shard), purge_batches.c.state == "done")).scalar_one()
                self._claim(conn, int(done), absolute=True)
                self.used = self._claims(conn)

    def reserve(self, wanted: int, *, wait: bool = True) -> int:
        """Up to ``wanted`` records this batch may purge, claimed in the journal; 0 at the limit
        (``wait`` False: at once, not after waiting for claims other shards may give back)."""
        if self.limit is None:
            return wanted
        deadline = time.monotonic() + self.wait
        while True:
            with self._locked() as conn:
                claimed = self._claims(conn)
                free = self.limit.records - claimed
                if free > 0:
                    granted = min(wanted, free)
                    self._claim(conn, granted)
                    with self._cond:
                        self._reserved += granted
                    return granted
                purged = int(conn.execute(select(func.coalesce(func.sum(purge_batches.c.rows_done), 0)).where(
                    *_batches(self.run, self.target), purge_batches.c.state == "done")).scalar_one())
            self.used = claimed
            with self._cond:
                mine = self._reserved
            if not wait or claimed - purged - mine <= 0 or time.monotonic() >= deadline:
                return 0  # nothing anyone holds can come back, or waited long enough
            time.sleep(self.poll)

    def settle(self, granted: int, purged: int) -> None:
        """A batch that claimed ``granted`` records purged ``purged``: the rest goes back to the target."""
        if self.limit is None:
            return
        if granted != purged:
            with self.journal.engine.begin() as conn:
                self._claim(conn, purged - granted)
        with self._cond:
            self._reserved -= granted
            self.used += purged
            self._cond.notify_all()

    @property
    def reached(self) -> bool:
        """Whether the shards together have claimed the whole limit."""
        if self.limit is None:
            return False
        with self.journal.engine.connect() as conn:
            self.used = self._claims(conn)
        return self.used >= self.limit.records

    @contextmanager
    def _locked(self) -> Iterator[Connection]:
        with self.journal.engine.begin() as conn:
            # A write first: it locks the target's row on every engine (SQLite: the database),
            # so two shards never both read the same free budget.
            conn.execute(update(purge_targets).where(
                purge_targets.c.category == self.run.category, purge_targets.c.run_id == self.run.run_id,
                purge_targets.c.target == self.target).values(state=purge_targets.c.state))
            yield conn

    def _claims(self, conn: Connection) -> int:
        return int(conn.execute(select(func.coalesce(func.sum(purge_batches.c.rows_done), 0))
                                .where(*_markers(self.run, self.target))).scalar_one())

    def _claim(self, conn: Connection, rows: int, *, absolute: bool = False) -> None:
        column = purge_batches.c.rows_done
        conn.execute(update(purge_batches).where(*_markers(self.run, self.target),
                                                 purge_batches.c.batch_no == _marker(self.shard.index))
                     .values(rows_done=rows if absolute else column + rows))


def _marker(index: int) -> int:
    return -(index + 1)


def _bounds(shard: Shard, outcome: dict[str, Any]) -> str:
    return json.dumps({"shard": shard.to_dict(), "outcome": outcome}, sort_keys=True)


def _batches(run: RunRecord, target: str) -> tuple[Any, ...]:
    return (purge_batches.c.category == run.category, purge_batches.c.run_id == run.run_id,
            purge_batches.c.target == target)


def _shard_batches(run: RunRecord, target: str, shard: Shard) -> tuple[Any, ...]:
    """The batches of one shard (not its marker): those numbered ``index + 1 + k * count``."""
    return (*_batches(run, target), purge_batches.c.batch_no > 0,
            (purge_batches.c.batch_no - 1) % shard.count == shard.index)


def _markers(run: RunRecord, target: str) -> tuple[Any, ...]:
    return (*_batches(run, target), purge_batches.c.batch_no < 0, purge_batches.c.state.in_(SHARD_STATES))
