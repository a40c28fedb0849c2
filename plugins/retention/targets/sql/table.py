"""SQL targets: find expired rows and purge them (delete, archive or anonymize) in short,
journaled batches, children before their parent.

Batches walk the expired rows in ``(age_column, key...)`` order. Each batch is a closed
key range: its upper bound is found by an index walk (``OFFSET n-1 LIMIT 1``), then
``DELETE ... WHERE expired AND range`` runs in one short transaction. Before that
transaction commits, the batch (range and row count) is recorded as *pending* in the
audit journal; after it commits, as *done*. A crash in between leaves a pending batch
whose range tells, by counting what is still there, whether the delete committed. So a
rerun neither loses nor double-counts a batch, whatever moment the crash hit.

What a batch does to its rows is an action (:mod:`retention.targets.sql.actions`); this
module owns the table's shape, the predicates, the walk and crash settlement.

Time is an input: the cutoff is computed once per run and passed in.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import (
    Column,
    MetaData,
    String,
    Table,
    and_,
    func,
    inspect,
    not_,
    or_,
    select,
    text,
    true,
    tuple_,
    type_coerce,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from retention.errors import TargetError, TerminalError
from retention.retry import attempts, is_transient
from retention.targets.base import BatchLedger, BatchResult, Progress, PurgeOutcome, RecordBudget, RecordLimit, Survey
from retention.targets.sql.descriptors import BatchRange, Bound, decode_range, encode_range
from retention.targets.sql.predicates import _lexicographic, hold_match
from retention.targets.sql.walk import (
    Batch,
    BatchOverCap,
    BatchSizer,
    _LockWait,
    _short,
    _Tally,
    is_lock_timeout,
)

if TYPE_CHECKING:
    from collections.abc import Iterator

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.sql.elements import ColumnElement

    from retention.holds import Hold, HoldView
    from retention.rules.models import SqlTarget
    from retention.targets.sql.actions import SqlAction

log = logging.getLogger(__name__)


__all__ = ["Batch", "BatchOverCap", "BatchRange", "BatchResult", "BatchSizer", "Bound", "Member", "SqlTable",
           "decode_range", "encode_range", "hold_match", "is_lock_timeout"]


@dataclass(frozen=True)
class Member:
    """A table of a target's family: the target itself, or a child declared under it.

    ``link`` are this table's columns that reference ``parent_key`` of its parent
    (both empty for the target itself).
    """

    name: str
    table: Table
    link: tuple[str, ...] = ()
    parent_key: tuple[str, ...] = ()
    children: tuple[Member, ...] = ()




class SqlTable:
    """A rule's SQL target bound to a live database."""

    def __init__(
        self, target: SqlTarget, engine: Engine, *, action: SqlAction | None = None, holds: HoldView | None = None,
        passes: int = 3, lock_timeout: float = 2.0, statement_timeout: float = 120.0,
        retry_delays: Sequence[float] = (0.5, 1, 2, 4, 8, 15),
    ):
        from retention.targets.sql.delete import DeleteRows

        self.target = target
        self.engine = engine
        self.action = action or DeleteRows()
        self.holds = holds
        self.passes = passes
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.retry_delays = tuple(retry_delays)
        self._table: Table | None = None
        self._family: Member | None = None

    # -- shape ---------------------------------------------------------------------

    @property
    def table(self) -> Table:
        """The reflected table, checked against the rule on first use."""
        if self._table is None:
            self._table = self._reflect()
        return self._table

    def _reflect(self) -> Table:
        schema, _, name = self.target.table.rpartition(".")
        try:
            table = Table(name, MetaData(), schema=schema or None, autoload_with=self.engine)
        except NoSuchTableError:
            raise TargetError(f"table {self.target.location} does not exist", "table") from None
        columns = {c.name: c for c in table.columns}
        for field, name_ in [("age_column", self.target.age_column)] + [
            ("key", k) for k in self.target.key
        ] + [(f"where.{c}", c) for c in self.target.where]:
            if name_ not in columns:
                raise TargetError(
                    f"column {name_!r} does not exist in {self.target.location} "
                    f"(columns: {', '.join(columns)})",
                    field,
                )
        self._check_key(table)
        self._check_age_type(columns[self.target.age_column])
        return table

    def _check_key(self, table: Table) -> None:
        key = list(self.target.key)
        pk = [c.name for c in table.primary_key.columns]
        if key == pk or sorted(key) == sorted(pk):
            return
        insp = inspect(self.engine)
        uniques = [u["column_names"] for u in insp.get_unique_constraints(table.name, table.schema)]
        uniques += [i["column_names"] for i in insp.get_indexes(table.name, table.schema) if i.get("unique")]
        if any(sorted(u) == sorted(key) for u in uniques):
            return
        raise TargetError(
            f"key {key} is not the primary key or a unique index of {self.target.location} "
            f"(primary key: {pk or 'none'}); batches walk the key, so it must identify one row",
            "key",
        )

    def _check_age_type(self, column: Column) -> None:
        if isinstance(column.type, (sqltypes.DateTime, sqltypes.Date)):
            return
        if self.engine.dialect.name == "sqlite" and isinstance(column.type, sqltypes.String):
            return  # SQLite keeps ISO 8601 text; julianday() reads it
        raise TargetError(
            f"age column {column.name!r} of {self.target.location} has type {column.type}; "
            "expected a date or timestamp",
            "age_column",
        )

    def check(self) -> None:
        """Raise TargetError unless the tables match the rule and its action."""
        self.family  # noqa: B018 - reflecting is the check
        self.action.check(self)

    @property
    def family(self) -> Member:
        """The target and its declared children, reflected and checked (once)."""
        if self._family is None:
            table = self.table
            children = tuple(
                self._child(table, tuple(self.target.key), child, f"children[{i}]")
                for i, child in enumerate(self.target.children)
            )
            family = Member(_qualified(table), table, children=children)
            if self.action.removes_rows:
                self._check_references(family)
            self._family = family
        return self._family

    def _child(self, parent: Table, parent_key: tuple[str, ...], spec, field: str) -> Member:
        schema, _, name = spec.table.rpartition(".")
        schema = schema or parent.schema
        try:
            table = Table(name, parent.metadata, schema=schema, autoload_with=self.engine)
        except NoSuchTableError:
            raise TargetError(f"child table {spec.table} does not exist in {self.target.connection}",
                              f"{field}.table") from None
        missing = [c for c in spec.foreign_key if c not in table.c]
        if missing:
            raise TargetError(f"column {missing[0]!r} does not exist in child table {spec.table}",
                              f"{field}.foreign_key")
        if len(spec.foreign_key) != len(parent_key):
            raise TargetError(
                f"{spec.table}.foreign_key has {len(spec.foreign_key)} columns but the key it references "
                f"({', '.join(parent_key)}) has {len(parent_key)}",
                f"{field}.foreign_key",
            )
        own_key = tuple(c.name for c in table.primary_key.columns)
        if spec.children and not own_key:
            raise TargetError(f"child table {spec.table} has no primary key for its own children to reference",
                              f"{field}.children")
        grandchildren = tuple(
            self._child(table, own_key, grandchild, f"{field}.children[{i}]")
            for i, grandchild in enumerate(spec.children)
        )
        return Member(_qualified(table), table, tuple(spec.foreign_key), parent_key, grandchildren)

    def _check_references(self, family: Member) -> None:
        """Every foreign key into a purged table must be declared as a child, or a batch
        would fail on it half-way (or cascade past the archive)."""
        insp = inspect(self.engine)
        members = list(family_members(family))
        declared = {(m.table.schema, m.table.name): m for m in members}
        references = insp.get_multi_foreign_keys(schema=family.table.schema)
        for (schema, name), keys in references.items():
            for fk in keys:
                parent = declared.get((fk.get("referred_schema") or family.table.schema, fk["referred_table"]))
                if parent is None or (schema, name) == (parent.table.schema, parent.table.name):
                    continue  # not into the family, or a table referencing itself
                child = declared.get((schema, name))
                if child is not None and child in parent.children:
                    continue
                columns = ", ".join(fk["constrained_columns"])
                raise TargetError(
                    f"{name}({columns}) references {parent.table.name} through constraint {fk['name']!r}, "
                    f"but the rule does not declare {name} under children of {parent.table.name}: purging "
                    f"{parent.table.name} would fail half-way or cascade past the archive. Declare "
                    f"{{table: {name}, foreign_key: [{columns}]}}",
                    "children",
                )

    def survey(self, cutoff: datetime) -> Survey:
        """Rows that would go, of how many, and what the rule reviewer should know."""
        notes = []
        if self.age_index() is None:
            notes.append(
                f"no index leads with {self.target.age_column}: every batch scans the table; "
                "add one before purging a large table"
            )
        insp = inspect(self.engine)
        for member in list(family_members(self.family))[1:]:
            leading: list[list[str | None]] = [i["column_names"][: len(member.link)] for i in insp.get_indexes(member.table.name, member.table.schema)]
            primary: list[str | None] = [c.name for c in member.table.primary_key.columns]
            leading.append(primary[: len(member.link)])
            if list(member.link) not in leading:
                notes.append(f"no index on {member.name}({', '.join(member.link)}): every batch scans {member.name}")
        notes += self.action.notes(self)
        holds = self._current_holds()
        notes += [f"{'paused by' if h.whole else 'protected by'} {h.describe()}: {h.reason}" for h in holds]
        expired = self.expired(cutoff)
        held_condition = self.held(holds)
        held = 0 if held_condition is None else self._with_retries(
            lambda conn: self._count(conn, and_(expired, held_condition)))
        matched = self._with_retries(lambda conn: self._count(conn, self._unheld(expired, holds)))
        return Survey(matched=matched, total=self.count_rows(), held=held, notes=notes)

    def age_index(self) -> str | None:
        """The name of an index that leads with the age column, or None."""
        insp = inspect(self.engine)
        for index in insp.get_indexes(self.table.name, self.table.schema):
            if index["column_names"][:1] == [self.target.age_column]:
                return index["name"]
        return None

    # -- predicates ----------------------------------------------------------------

    def expired(self, cutoff: datetime) -> ColumnElement[bool]:
        """Rows whose age is strictly before ``cutoff`` and that pass the rule's filters."""
        column = self.table.c[self.target.age_column]
        conditions = [self._older_than(column, cutoff)]
        for name, condition in self.target.where.items():
            col = self.table.c[name]
            if isinstance(condition, dict):
                conditions.append(col.in_(condition["in"]))
            elif condition is None:
                conditions.append(col.is_(None))
            else:
                conditions.append(col == condition)
        extra = self.action.condition(self)
        if extra is not None:
            conditions.append(extra)
        return and_(*conditions)

    def held(self, holds: list[Hold]) -> ColumnElement[bool] | None:
        """Rows the holds protect (None: no hold reaches a row of this table)."""
        conditions = []
        for hold in holds:
            if hold.whole or hold.match is None:
                if not hold.whole:
                    log.warning("%s on an SQL target has no --match; it protects the whole target", hold.describe())
                return true()
            missing = [c for c in hold.match if c not in self.table.c]
            if missing:
                raise TerminalError(
                    f"{hold.describe()} matches column {missing[0]!r}, which {self.target.location} does not "
                    "have: nothing is purged until the hold is corrected (release it and place it again)"
                )
            conditions.append(hold_match(self.table, hold.match, self.engine.dialect.name))
        return or_(*conditions) if conditions else None

    def _unheld(self, expired: ColumnElement[bool], holds: list[Hold]) -> ColumnElement[bool]:
        held = self.held(holds)
        return expired if held is None else and_(expired, not_(held))

    def family_conditions(self, selection: ColumnElement[bool]) -> list[tuple[Member, ColumnElement[bool]]]:
        """Each family member with the condition that picks the rows belonging to the
        target's rows in ``selection``; deepest children first, the target last."""
        ordered: list[tuple[Member, ColumnElement[bool]]] = []

        def visit(member: Member, condition: ColumnElement[bool]) -> None:
            for child in member.children:
                parent_key = [member.table.c[k] for k in child.parent_key]
                link = [child.table.c[c] for c in child.link]
                picked = select(*parent_key).where(condition)
                visit(child, link[0].in_(picked) if len(link) == 1 else tuple_(*link).in_(picked))
            ordered.append((member, condition))

        visit(self.family, selection)
        return ordered

    def _older_than(self, column: Column, cutoff: datetime) -> ColumnElement[bool]:
        cutoff = cutoff.astimezone(timezone.utc)
        is_date = isinstance(column.type, sqltypes.Date) and not isinstance(column.type, sqltypes.DateTime)
        if self.engine.dialect.name == "sqlite":
            # Text timestamps in any ISO form ('T' or ' ', with or without fractions or
            # offsets) compare correctly only as julian days.
            bound = cutoff.date().isoformat() if is_date else cutoff.strftime("%Y-%m-%d %H:%M:%S.%f")
            return func.julianday(column) < func.julianday(bound)
        if is_date:
            # A date is the whole day: it expires only once all of it is before the cutoff.
            return column < cutoff.date()
        if getattr(column.type, "timezone", False):
            return column < cutoff
        return column < cutoff.replace(tzinfo=None)  # naive columns hold UTC (documented)

    def walk_columns(self) -> list[ColumnElement[Any]]:
        """The columns batches walk in order: the age, then the key."""
        age: ColumnElement[Any] = self.table.c[self.target.age_column]
        if self.engine.dialect.name == "sqlite":
            # Walk the stored text itself, so bounds round-trip byte for byte.
            age = type_coerce(age, String)
        return [age] + [self.table.c[k] for k in self.target.key]

    def in_range(self, batch: BatchRange) -> ColumnElement[bool]:
        """Rows inside ``batch``'s walk range."""
        columns = self.walk_columns()
        parts = []
        if batch.lower is not None:
            parts.append(_lexicographic(columns, batch.lower, ">"))
        if batch.upper is not None:
            parts.append(_lexicographic(columns, batch.upper, "<="))
        return and_(true(), *parts)

    # -- reads ---------------------------------------------------------------------

    def count_expired(self, cutoff: datetime) -> int:
        """How many rows have expired at ``cutoff``."""
        with self.engine.connect() as conn:
            return conn.execute(
                select(func.count()).select_from(self.table).where(self.expired(cutoff))
            ).scalar_one()

    def oldest_expired(self, cutoff: datetime) -> tuple[int, int, datetime | None]:
        """Expired records still here (not held), held ones, and the oldest age among the first."""
        expired = self.expired(cutoff)
        holds = self._current_holds()
        age = self.table.c[self.target.age_column]
        unheld = self._unheld(expired, holds)
        held_condition = self.held(holds)

        def read(conn):
            count, oldest = conn.execute(select(func.count(), func.min(age)).where(unheld)).one()
            held = 0 if held_condition is None else self._count(conn, and_(expired, held_condition))
            return count, held, oldest

        count, held, oldest = self._with_retries(read)
        return count, held, _as_utc(oldest)

    def count_rows(self) -> int:
        """How many rows the table holds."""
        with self.engine.connect() as conn:
            return conn.execute(select(func.count()).select_from(self.table)).scalar_one()

    def expired_keys(self, cutoff: datetime) -> list[tuple[Any, ...]]:
        """Keys of the expired rows in walk order (for tests and small tables)."""
        key = [self.table.c[k] for k in self.target.key]
        with self.engine.connect() as conn:
            rows = conn.execute(
                select(*key).where(self.expired(cutoff)).order_by(*self.walk_columns())
            )
            return [tuple(r) for r in rows]

    # -- writes --------------------------------------------------------------------

    def purge(
        self, cutoff: datetime, ledger: BatchLedger, *, progress: Progress | None = None,
        limit: RecordLimit | None = None,
    ) -> PurgeOutcome:
        """Delete every expired row in committed batches, resuming whatever a crash left.

        Returns the rows deleted by this call (batches of earlier attempts are already
        in the ledger) and the expired rows still present when it stopped. No batch takes
        the run's total (earlier attempts included) past ``limit``.
        """
        self.reconcile(cutoff, ledger)
        budget = RecordBudget(limit, ledger.deleted() if limit is not None else 0)
        locks = _LockWait(self.target.lock_wait_budget)
        expired = self.expired(cutoff)
        done = _Tally(progress)
        for _ in range(self.passes):
            shares = self._shares(expired) if self.target.workers > 1 else [BatchRange(None, None)]
            if len(shares) == 1:
                self._walk(expired, ledger, self._sizer(), done, shares[0], budget, locks)
            else:
                with ThreadPoolExecutor(len(shares), thread_name_prefix=f"walk-{self.target.name}") as pool:
                    walks = [pool.submit(self._walk, expired, ledger, self._sizer(), done, share, budget, locks)
                             for share in shares]
                    for walk in walks:
                        walk.result()
            unheld = self._unheld(expired, self._current_holds())
            remaining = self._with_retries(lambda conn, unheld=unheld: self._count(conn, unheld))
            if remaining == 0 or budget.reached or locks.gave_up:
                break
            # Rows that became expired behind the walk (inserted with an old age while
            # it ran): walk again rather than leave them.
            log.info("%s: %d expired rows appeared behind the walk; walking again", self.target.name, remaining)
        held_condition = self.held(self._current_holds())
        held = 0 if held_condition is None else self._with_retries(
            lambda conn: self._count(conn, and_(expired, held_condition)))
        honoured = tuple(sorted(self.holds.honoured)) if self.holds else ()
        failures: tuple[str, ...] = ()
        stopped = None
        if remaining and locks.gave_up:
            failures = (f"locked by other transactions beyond the lock-wait budget of {locks.budget:g}s; "
                        "the next run takes them",)
        elif remaining and budget.reached:
            stopped = budget.stopped(remaining)
        return PurgeOutcome(done.rows, remaining, held=held, holds=honoured, failures=failures, stopped=stopped)

    def _sizer(self) -> BatchSizer:
        return BatchSizer(self.target.max_batch_rows, target_seconds=self.action.batch_seconds)

    def _shares(self, expired: ColumnElement[bool]) -> list[BatchRange]:
        """Split the expired rows into ``workers`` age ranges of about equal size.

        Each share is a closed range of the age alone, so shares never overlap and every
        row belongs to exactly one; a worker's batches never cross its share's end.
        """
        workers = self.target.workers
        age = self.walk_columns()[0]

        def bounds(conn):
            total = self._count(conn, expired)
            if total < workers * 10_000:  # not worth the threads
                return []
            found: list[Any] = []
            for i in range(1, workers):
                row = conn.execute(select(age).where(expired).order_by(age).offset(total * i // workers).limit(1)).first()
                if row is not None and (not found or row[0] > found[-1]):
                    found.append(row[0])
            return found

        cuts = self._with_retries(bounds)
        edges = [None, *[(cut,) for cut in cuts], None]
        return [BatchRange(edges[i], edges[i + 1]) for i in range(len(edges) - 1)]

    def _current_holds(self) -> list[Hold]:
        return self.holds.current() if self.holds is not None else []

    def _with_retries(self, work):
        """Run ``work(conn)`` on a fresh connection, retrying transient database errors."""
        # The one retry policy, with this table's delays; only transient database errors retry.
        for attempt in attempts(lambda exc: isinstance(exc, DBAPIError) and is_transient(exc),
                                delays=self.retry_delays, what=self.target.name):
            with attempt, self.engine.connect() as conn:
                self._session_timeouts(conn)
                return work(conn)
        raise AssertionError("unreachable")

    def _session_timeouts(self, conn: Connection) -> None:
        """A purge never queues behind a long lock, nor runs a statement without end."""
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            conn.execute(text(f"SET lock_timeout = '{int(self.lock_timeout * 1000)}ms'"))
            conn.execute(text(f"SET statement_timeout = '{int(self.statement_timeout * 1000)}ms'"))
        elif dialect == "mysql":
            conn.execute(text(f"SET SESSION innodb_lock_wait_timeout = {max(1, round(self.lock_timeout))}"))
            # Repeatable read locks the gaps and the next row past a range: a batch next to
            # rows another transaction locks would wait on them too. Read committed locks
            # only the rows a batch deletes (ranges are fixed by the walk, not by snapshots).
            conn.execute(text("SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED"))
            if getattr(self.engine.dialect, "is_mariadb", False):
                conn.execute(text(f"SET SESSION max_statement_time = {self.statement_timeout}"))
        conn.commit()

    def _walk(
        self,
        expired: ColumnElement[bool],
        ledger: BatchLedger,
        sizer: BatchSizer,
        done: _Tally,
        share: BatchRange,
        budget: RecordBudget,
        locks: _LockWait,
    ) -> int:
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
                rows, stop = self._walk_range(expired, ledger, span_sizer, done, span, budget, locks, locked)
                deleted += rows
                if stop:
                    return deleted
            if not locked:
                return deleted
            if locks.left() <= 0:
                locks.gave_up = True
                log.warning("%s: %d ranges still locked by other transactions after the lock-wait budget of "
                            "%gs; leaving them", self.target.name, len(locked), locks.budget)
                return deleted
            if deleted == before:  # nothing came free this round: give the other transactions time
                time.sleep(min(wait, locks.left()))
                wait = min(wait * 2, 15.0)
            log.info("%s: coming back to %d locked ranges", self.target.name, len(locked))
            # Much smaller batches: the rows around the locked ones go, and a range soon
            # holds only what is locked (each further try at it costs one lock timeout).
            work = [(span, BatchSizer(max(1, size // 64), start=max(1, size // 64),
                                      target_seconds=sizer.target_seconds)) for span, size in locked]

    def _walk_range(
        self,
        expired: ColumnElement[bool],
        ledger: BatchLedger,
        sizer: BatchSizer,
        done: _Tally,
        span: BatchRange,
        budget: RecordBudget,
        locks: _LockWait,
        locked: list[tuple[BatchRange, int]],
    ) -> tuple[int, bool]:
        """Purge one range batch after batch; ranges found locked are added to ``locked``.

        Returns the rows purged and whether the walk must stop (paused by a hold, or at
        the blast-radius limit).
        """
        lower: Bound | None = span.lower
        ceiling = span.upper
        deleted = 0
        while True:
            started = time.perf_counter()
            outcome = self._batch(expired, ledger, sizer, lower, ceiling, budget, locks)
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
                    log.debug("%s: batch %d: %d rows in %.3fs", self.target.name, batch.number, result.rows,
                              time.perf_counter() - started)
                    done.add(result.rows, result.seconds)
                sizer.observe(result.rows, result.seconds)
                upper = result.batch.upper
            if upper is None or upper == ceiling:
                return deleted, False
            lower = upper

    def _batch(
        self,
        expired: ColumnElement[bool],
        ledger: BatchLedger,
        sizer: BatchSizer,
        lower: Bound | None,
        ceiling: Bound | None,
        budget: RecordBudget,
        locks: _LockWait,
    ) -> tuple[Batch, BatchResult | None] | None:
        """Run the next batch after ``lower``, retrying what retrying can help.

        Returns the batch and its result, the batch and None when its rows were locked
        (it rolled back and is settled), or None when the walk must stop.
        """
        delays = list(self.retry_delays)
        attempt = 1
        while True:
            # Holds are read for every batch (and every retry): one placed after the
            # plan still protects its rows.
            holds = self._current_holds()
            held = self.held(holds)
            if held is not None and held.compare(true()):
                log.warning("%s: paused by %s", self.target.name, "; ".join(h.describe() for h in holds if h.whole))
                return None
            granted = budget.reserve(2 * sizer.size - 1)
            if granted == 0:
                log.warning("%s: blast-radius limit reached (%s); stopping", self.target.name,
                            budget.limit.describe if budget.limit is not None else "no limit")
                return None
            batch_expired = self._unheld(expired, holds)
            batch = Batch(
                number=ledger.next_batch_no(),
                window=and_(batch_expired, self.in_range(BatchRange(lower, ceiling))),
                expired=batch_expired, lower=lower, ceiling=ceiling,
                size=min(sizer.size, granted), cap=granted if budget.limit is not None else None,
                holds=tuple(h.id for h in holds), ledger=ledger,
            )
            try:
                with self.engine.connect() as conn:
                    self._session_timeouts(conn)
                    result = self.action.apply(self, conn, batch)
            except BatchOverCap as exc:
                # Rows arrived in the range after it was cut: smaller, and exact, next time.
                budget.settle(granted, 0)
                self._settle_after_error(expired, ledger)
                log.info("%s: %s; cutting it smaller", self.target.name, exc)
                sizer.size = max(1, batch.size // 2)
                continue
            except DBAPIError as exc:
                budget.settle(granted, 0)
                if is_lock_timeout(exc) and batch.span is not None:
                    # The batch rolled back; settle it (never move on with a batch pending).
                    self._reconcile(expired, ledger)
                    locks.hit()
                    log.info("%s: batch %d: rows locked by another transaction (%s); passing over them for now",
                             self.target.name, batch.number, _short(exc))
                    return batch, None
                self._settle_after_error(expired, ledger)
                if not delays or not is_transient(exc):
                    raise
                delay = delays.pop(0)
                attempt += 1
                log.warning("%s: batch %d: %s (transient); retrying in %.1fs (attempt %d)",
                            self.target.name, batch.number, _short(exc), delay, attempt)
                time.sleep(delay)
                continue
            except BaseException:
                budget.settle(granted, 0)
                self._settle_after_error(expired, ledger)
                raise
            budget.settle(granted, result.rows)
            return batch, result

    def upper_bound(
        self, conn: Connection, window: ColumnElement[bool], size: int, ceiling: Bound | None = None,
        *, exact: bool = False,
    ) -> Bound | None:
        """The last row of the next batch of ``size`` rows in walk order; ``ceiling`` (None:
        no end) if fewer remain.

        On PostgreSQL the age index does not hold the key, so ordering by (age, key)
        reads every row of the batch from the heap and sorts it; the age alone is found
        by the index, and when few rows share it the batch simply takes them all. The
        bound is then ``(age,)``: every row up to and including that age. ``exact``: never
        more than ``size`` rows.
        """
        columns = self.walk_columns()
        if self._postgres and not exact:
            row = conn.execute(
                select(columns[0]).where(window).order_by(columns[0]).offset(size - 1).limit(1)
            ).first()
            if row is None:
                return ceiling
            ties = conn.execute(
                select(func.count()).select_from(
                    select(columns[0]).where(window, columns[0] == row[0]).limit(size + 1).subquery()
                )
            ).scalar_one()
            if ties <= size:
                return (row[0],)
        row = conn.execute(
            select(*columns).where(window).order_by(*columns).offset(size - 1).limit(1)
        ).first()
        return tuple(row) if row is not None else ceiling

    _upper_bound = upper_bound  # the old name, which bench/archive_purge.py times

    @property
    def _postgres(self) -> bool:
        return self.engine.dialect.name == "postgresql"

    def reconcile(self, cutoff: datetime, ledger: BatchLedger) -> int:
        """Settle pending batches by counting what is left of their ranges.

        None left: the delete committed. All left: it rolled back. Some left: another
        writer touched the range; the difference is counted as deleted (and logged).
        Returns the rows confirmed deleted.
        """
        return self._reconcile(self.expired(cutoff), ledger)

    def _count(self, conn: Connection, condition: ColumnElement[bool]) -> int:
        with conn.begin():
            if self._postgres:
                # After a walk the age index still points at every row just deleted;
                # a bitmap scan checks each heap page once instead of each entry.
                conn.execute(text("SET LOCAL enable_indexscan = off"))
                conn.execute(text("SET LOCAL enable_indexonlyscan = off"))
            return conn.execute(select(func.count()).select_from(self.table).where(condition)).scalar_one()

    def _reconcile(self, expired: ColumnElement[bool], ledger: BatchLedger) -> int:
        pending = ledger.unresolved()
        confirmed = 0
        if not pending:
            return confirmed
        with self.engine.connect() as conn:
            for batch in pending:
                descriptor = json.loads(batch.descriptor)
                # Judge the batch by the holds it was cut with, not the ones in force now.
                holds = self.holds.by_ids(descriptor.get("holds", [])) if self.holds else []
                present = conn.execute(
                    select(func.count()).select_from(self.table).where(
                        self._unheld(expired, holds), self.in_range(decode_range(batch.descriptor))
                    )
                ).scalar_one()
                conn.rollback()
                gone = max(batch.rows - present, 0)
                if 0 < present < batch.rows:
                    log.warning(
                        "%s: batch %d was interrupted and %d of its %d rows are gone; counting them as purged",
                        self.target.name, batch.batch_no, gone, batch.rows,
                    )
                self.action.settle(self, batch, descriptor, gone, ledger)
                confirmed += gone
        return confirmed

    def _settle_after_error(self, expired: ColumnElement[bool], ledger: BatchLedger) -> None:
        try:
            self._reconcile(expired, ledger)
        except Exception:  # the original error matters more; the next attempt reconciles
            log.warning("%s: could not settle the interrupted batch now; the next attempt will",
                        self.target.name, exc_info=True)


def _as_utc(value: Any) -> datetime | None:
    """An age column's value as an aware UTC datetime (naive values are UTC; dates start their day)."""
    if value is None:
        return None
    if isinstance(value, str):  # SQLite text
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):  # a date
        value = datetime(value.year, value.month, value.day)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)







def family_members(member: Member) -> Iterator[Member]:
    """``member`` and every table under it, parents before children."""
    yield member
    for child in member.children:
        yield from family_members(child)


def _qualified(table: Table) -> str:
    return f"{table.schema}.{table.name}" if table.schema else table.name
