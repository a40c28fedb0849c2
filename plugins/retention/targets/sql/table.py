"""SQL targets: a rule's table bound to a live database (:class:`SqlTable`): its shape,
checked against the rule, the family of child tables purged with it, and the predicates
and counts of its expired and held rows.

How the expired rows are purged is the walk's (:mod:`retention.targets.sql.walk`), what a
batch does to them an action's (:mod:`retention.targets.sql.actions`), and a batch a crash
left pending is settled by :mod:`retention.targets.sql.settle`.

Time is an input: the cutoff is computed once per run and passed in.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from contextlib import contextmanager
from datetime import datetime, timezone
from typing import TYPE_CHECKING, Any, TypeVar

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
    type_coerce,
)
from sqlalchemy import types as sqltypes
from sqlalchemy.exc import DBAPIError, NoSuchTableError

from retention.errors import TargetError, TerminalError
from retention.retry import DEFAULT_DELAYS, attempts, is_transient
from retention.targets.base import Survey
from retention.targets.sql import settle, size, walk
from retention.targets.sql.family import Member, family_conditions, family_members, reflect_family
from retention.targets.sql.predicates import hold_match, lexicographic

if TYPE_CHECKING:
    from collections.abc import Callable, Iterator

    from sqlalchemy.engine import Connection, Engine
    from sqlalchemy.sql.elements import ColumnElement

    from retention.holds import Hold, HoldView
    from retention.rules.models import SqlTarget
    from retention.targets.base import BatchLedger, Progress, PurgeOutcome, RecordLimit
    from retention.targets.sql.actions import SqlAction
    from retention.targets.sql.descriptors import BatchRange
    from retention.targets.sql.lag import LagThrottle

log = logging.getLogger(__name__)

T = TypeVar("T")

class SqlTable:
    """A rule's SQL target bound to a live database."""

    def __init__(
        self, target: SqlTarget, engine: Engine, *, action: SqlAction | None = None, holds: HoldView | None = None,
        passes: int = 3, lock_timeout: float = 2.0, statement_timeout: float = 120.0,
        retry_delays: Sequence[float] = DEFAULT_DELAYS, throttle: LagThrottle | None = None,
        shapes: dict[Any, Any] | None = None,
    ):
        """``shapes``: where tables opened on one :class:`retention.targets.Targets` keep what
        they reflected, so a run's plan and its purge (one process) reflect each table once."""
        from retention.targets.sql.delete import DeleteRows

        self.target = target
        self.engine = engine
        self.action = action or DeleteRows()
        self.holds = holds
        self.passes = passes
        self.lock_timeout = lock_timeout
        self.statement_timeout = statement_timeout
        self.retry_delays = tuple(retry_delays)
        self.throttle = throttle
        """Pauses batches while replica lag is over the limit (None: never)."""
        self._table: Table | None = None
        self._family: Member | None = None
        self._shapes = shapes

    # -- shape ---------------------------------------------------------------------

    @property
    def table(self) -> Table:
        """The reflected table, checked against the rule on first use."""
        if self._table is None:
            self._table = self._shaped("table", self._reflect)
        return self._table

    def _shaped(self, part: str, reflect: Callable[[], T]) -> T:
        """``reflect()``, or what an earlier handle on the same target, connection and
        action reflected (and checked) in this process."""
        if self._shapes is None:
            return reflect()
        # Keys sorted: the run journal keeps a target with sorted keys, so the purge's copy of
        # it would otherwise differ from the plan's in the order of a mapping (the columns
        # an anonymize rewrites) and reflect the same table again.
        target = json.dumps(self.target.model_dump(mode="json"), sort_keys=True)
        key = (part, id(self.engine), target, self.action.removes_rows)
        if key not in self._shapes:
            self._shapes[key] = reflect()
        return self._shapes[key]

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
        uniques: list[list[str | None]] = [
            list(u["column_names"]) for u in insp.get_unique_constraints(table.name, table.schema)]
        # An expression in an index reflects as None: such an index never equals the key
        # (and None would not sort among names).
        uniques += [i["column_names"] for i in insp.get_indexes(table.name, table.schema) if i.get("unique")]
        if any(len(u) == len(key) and set(u) == set(key) for u in uniques):
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
            self._family = self._shaped("family", lambda: reflect_family(
                self.target, self.table, self.engine, removes_rows=self.action.removes_rows))
        return self._family

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
        holds = self.current_holds()
        notes += [f"{'paused by' if h.whole else 'protected by'} {h.describe()}: {h.reason}" for h in holds]
        if self.throttle is not None:
            lag = self.throttle.describe_now()
            notes += [lag] if lag else []
        expired = self.expired(cutoff)
        held_condition = self.held(holds)
        held = 0 if held_condition is None else self.with_retries(
            lambda conn: self.count(conn, and_(expired, held_condition), after_walk=False))
        matched, total, how = size.counted(self, self.unheld(expired, holds), cutoff)
        if how:
            notes.append(how)
        return Survey(matched=matched, total=total, held=held, notes=notes)

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

    def unheld(self, expired: ColumnElement[bool], holds: list[Hold]) -> ColumnElement[bool]:
        """``expired`` rows that none of ``holds`` protects."""
        held = self.held(holds)
        return expired if held is None else and_(expired, not_(held))

    def family_conditions(self, selection: ColumnElement[bool]) -> list[tuple[Member, ColumnElement[bool]]]:
        """Each table of the family with the condition picking its rows of the target's rows
        in ``selection``; deepest children first, the target last."""
        return family_conditions(self.family, selection)

    def older_than(self, cutoff: datetime) -> ColumnElement[bool]:
        """Rows whose age is strictly before ``cutoff`` (whatever the rule's filters say)."""
        return self._older_than(self.table.c[self.target.age_column], cutoff)

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
            parts.append(lexicographic(columns, batch.lower, ">"))
        if batch.upper is not None:
            parts.append(lexicographic(columns, batch.upper, "<="))
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
        holds = self.current_holds()
        age = self.table.c[self.target.age_column]
        unheld = self.unheld(expired, holds)
        held_condition = self.held(holds)

        def read(conn: Connection) -> tuple[int, int, Any]:
            # count() runs in a transaction of its own: first, before a query begins one.
            held = 0 if held_condition is None else self.count(conn, and_(expired, held_condition))
            count, oldest = conn.execute(select(func.count(), func.min(age)).where(unheld)).one()
            return count, held, oldest

        count, held, oldest = self.with_retries(read)
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

    # -- connections -----------------------------------------------------------------

    def current_holds(self) -> list[Hold]:
        """The holds in force now (none without a hold view)."""
        return self.holds.current() if self.holds is not None else []

    def count(self, conn: Connection, condition: ColumnElement[bool], *, after_walk: bool = True) -> int:
        """How many of the table's rows meet ``condition`` (read in a transaction of its own).

        ``after_walk``: the rows may have just been deleted (a bitmap scan then); before a
        walk (a plan) the planner chooses, usually an index-only scan of the age index.
        """
        with conn.begin():
            if after_walk and self.engine.dialect.name == "postgresql":
                # After a walk the age index still points at every row just deleted;
                # a bitmap scan checks each heap page once instead of each entry.
                conn.execute(text("SET LOCAL enable_indexscan = off"))
                conn.execute(text("SET LOCAL enable_indexonlyscan = off"))
            return int(conn.execute(select(func.count()).select_from(self.table).where(condition)).scalar_one())

    def with_retries(self, work: Callable[[Connection], T]) -> T:
        """Run ``work(conn)`` on a fresh connection, retrying transient database errors."""
        # The one retry policy, with this table's delays; only transient database errors retry.
        for attempt in attempts(lambda exc: isinstance(exc, DBAPIError) and is_transient(exc),
                                delays=self.retry_delays, what=self.target.name):
            with attempt, self.connect() as conn:
                return work(conn)
        raise AssertionError("unreachable: attempts() returns or raises")

    @contextmanager
    def connect(self) -> Iterator[Connection]:
        """A connection that never queues behind a long lock, nor runs a statement without end."""
        with self.engine.connect() as conn:
            self._session_timeouts(conn)
            yield conn

    def _session_timeouts(self, conn: Connection) -> None:
        # Session settings outlive a checkout: they are set once per database connection
        # (the pool's record of it forgets them when the connection is replaced), not at
        # every batch.
        settings = self._session_settings()
        record = conn.connection.info
        if not settings or record.get("retention.session") == settings:
            return
        if self.engine.dialect.name == "postgresql":
            conn.exec_driver_sql("; ".join(settings))  # one round trip
        else:
            for statement in settings:
                conn.exec_driver_sql(statement)
        conn.commit()
        record["retention.session"] = settings

    def _session_settings(self) -> tuple[str, ...]:
        """The statements that give a connection this table's timeouts."""
        dialect = self.engine.dialect.name
        if dialect == "postgresql":
            # JIT compiles each large statement's plan (tens of ms), which a batch's index
            # range never wins back.
            return (f"SET lock_timeout = '{int(self.lock_timeout * 1000)}ms'",
                    f"SET statement_timeout = '{int(self.statement_timeout * 1000)}ms'", "SET jit = off")
        if dialect == "mysql":
            # Repeatable read locks the gaps and the next row past a range: a batch next to
            # rows another transaction locks would wait on them too. Read committed locks
            # only the rows a batch deletes (ranges are fixed by the walk, not by snapshots).
            statements: tuple[str, ...] = (f"SET SESSION innodb_lock_wait_timeout = {max(1, round(self.lock_timeout))}",
                          "SET SESSION TRANSACTION ISOLATION LEVEL READ COMMITTED")
            if getattr(self.engine.dialect, "is_mariadb", False):
                statements += (f"SET SESSION max_statement_time = {self.statement_timeout}",)
            return statements
        return ()

    # -- writes --------------------------------------------------------------------

    def purge(
        self, cutoff: datetime, ledger: BatchLedger, *, progress: Progress | None = None,
        limit: RecordLimit | None = None,
    ) -> PurgeOutcome:
        """Purge every expired row in committed batches, resuming whatever a crash left
        (see :func:`retention.targets.sql.walk.purge`)."""
        return walk.purge(self, cutoff, ledger, progress=progress, limit=limit)

    def reconcile(self, cutoff: datetime, ledger: BatchLedger) -> int:
        """Settle pending batches by counting what is left of their ranges; return the rows
        confirmed purged (see :mod:`retention.targets.sql.settle`)."""
        return settle.settle_pending(self, self.expired(cutoff), ledger)


def _as_utc(value: Any) -> datetime | None:
    """An age column's value as an aware UTC datetime (naive values are UTC; dates start their day)."""
    if value is None:
        return None
    if isinstance(value, str):  # SQLite text
        value = datetime.fromisoformat(value.replace("Z", "+00:00"))
    if not isinstance(value, datetime):  # a date
        value = datetime(value.year, value.month, value.day)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
