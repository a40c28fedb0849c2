"""Legal holds: records a lawsuit or an investigation freezes, whatever the rules say.

A hold names a category, optionally one target, and optionally which records: a
``match`` of column values (SQL targets) or a key ``prefix`` (S3 targets). Without
either it pauses the whole target or category. Holds beat rules: every batch reads the
holds in force at that moment, so a hold placed after a run has planned still protects
its records. Holds are released, never deleted, and every change is an event in an
append-only history.

A dated hold (``until``) is in force through its ``until`` day on the clock, in UTC,
whatever ``as_of`` a run measures retention from: a backfill or a skewed as_of must not
end a hold early (nor keep a lapsed one alive).

A ``match`` is exact equality, case- and space-sensitive, on every backend (MariaDB
compares bytes, not by its collation): ``{"email": "Alice@x.com"}`` does not protect
``alice@x.com`` or ``Alice@x.com ``. ``retention hold add`` warns when a hold matches no
row and shows the near matches.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from datetime import date, datetime, timezone
from typing import TYPE_CHECKING, Any

from sqlalchemy import insert, or_, select, update

from retention.clock import utc_iso
from retention.errors import ConfigError, TerminalError
from retention.evidence.audit import legal_hold_events, legal_holds, purge_certificates, purge_runs
from retention.identity import check_typed_text, who

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine


@dataclass(frozen=True)
class Hold:
    """One legal hold, as placed (and perhaps released)."""

    id: int
    category: str
    target: str | None
    match: dict[str, Any] | None
    prefix: str | None
    case_id: str
    reason: str
    until: date | None
    placed_at: str
    placed_by: str
    released_at: str | None = None
    released_by: str | None = None
    release_reason: str | None = None

    @property
    def whole(self) -> bool:
        """True when the hold pauses its target (or category) entirely."""
        return self.match is None and self.prefix is None

    def in_force(self, now: datetime) -> bool:
        """Not released, and not lapsed on the clock: in force through its ``until`` day (UTC).

        ``now`` is the wall clock, never a run's as_of."""
        return self.released_at is None and not self.lapsed(now)

    def lapsed(self, now: datetime) -> bool:
        """True once the ``until`` day has passed on the clock (UTC)."""
        return self.until is not None and self.until < now.astimezone(timezone.utc).date()

    def state(self, now: datetime) -> str:
        """``in force``, ``lapsed after DAY`` or ``released DAY by WHO``, as ``hold list`` shows it."""
        if self.released_at is not None:
            return f"released {self.released_at[:10]} by {self.released_by}"
        return f"lapsed after {self.until}" if self.lapsed(now) else "in force"

    def applies_to(self, category: str, target: str) -> bool:
        """True when the hold names this category and this target (or all its targets)."""
        return self.category == category and self.target in (None, target)

    def describe(self) -> str:
        """``hold 3 (CASE-123): customer_id=42, until 2027-01-01``."""
        scope = "everything" if self.whole else (
            ", ".join(f"{k}={v!r}" for k, v in (self.match or {}).items()) or f"keys under {self.prefix!r}"
        )
        until = f", until {self.until}" if self.until else ""
        return f"hold {self.id} ({self.case_id}): {scope}{until}"


def check_match(match: Any) -> None:
    """A hold's ``match`` is a non-empty object of column: scalar value (compared exactly)."""
    if match is None:
        return
    if not isinstance(match, dict) or not match:
        raise ConfigError('--match takes a JSON object of column: value, e.g. \'{"customer_id": 42}\'')
    for column, value in match.items():
        if isinstance(value, (dict, list)):
            raise ConfigError(f"--match {column!r}: give a string, a number, true/false or null, "
                              f"not {json.dumps(value)} (a hold compares values exactly)")
        if (isinstance(value, float) and not math.isfinite(value)) or (
                isinstance(value, int) and not -(2**63) <= value < 2**63):
            raise ConfigError(f"--match {column!r}: {json.dumps(value)[:40]} is a number no database column holds "
                              "(integers are 64-bit, numbers finite)")




class HoldRegistry:
    """The holds of one audit database."""

    def __init__(self, engine: Engine, *, clock=None):
        self.engine = engine
        self._clock = clock or (lambda: datetime.now(timezone.utc))

    def now(self) -> datetime:
        """The wall clock, in UTC: what dated holds lapse by."""
        return self._clock().astimezone(timezone.utc)

    def add(
        self, *, category: str, target: str | None = None, match: dict[str, Any] | None = None,
        prefix: str | None = None, case_id: str, reason: str, until: date | None = None, by: str | None = None,
    ) -> Hold:
        """Place a hold; it protects records from the next batch on."""
        if match is not None and prefix is not None:
            raise ConfigError("a hold takes --match (table rows) or --prefix (S3 keys), not both")
        check_match(match)
        if not case_id.strip() or not reason.strip():
            raise ConfigError("a hold needs a case id and a reason")
        check_typed_text("case id", case_id, an_id=True)
        check_typed_text("category", category)  # --force places a hold on names it cannot check, not on these
        check_typed_text("target", target or "")
        check_typed_text("reason", reason)
        today = self.now().date()
        if until is not None and until < today:
            raise ConfigError(f"--until {until} is in the past (today is {today} UTC): such a hold would protect "
                              "nothing; give the last day it must hold, or leave --until out until released")
        by = by or who()
        _check_lengths({"category": category, "target": target, "prefix": prefix, "case id": case_id,
                        "placed by": by})
        now = utc_iso(self._clock())
        values = {
            "category": category, "target": target, "match": json.dumps(match, sort_keys=True) if match else None,
            "prefix": prefix, "case_id": case_id, "reason": reason, "until": until.isoformat() if until else None,
            "placed_at": now, "placed_by": by,
        }
        with self.engine.begin() as conn:
            inserted = conn.execute(insert(legal_holds).values(**values)).inserted_primary_key
            assert inserted is not None  # an INSERT always reports its key
            hold_id = inserted[0]
            conn.execute(insert(legal_hold_events).values(
                hold_id=hold_id, event="placed", at=now, by=by, detail=json.dumps(values, sort_keys=True)))
        return self.get(hold_id)

    def release(self, hold_id: int, *, reason: str, by: str | None = None) -> Hold:
        """Release a hold (recorded, never deleted); its records are purged by the next run."""
        hold = self.get(hold_id)
        if hold.released_at is not None:
            raise ConfigError(f"hold {hold_id} was already released at {hold.released_at} by {hold.released_by}")
        if not reason.strip():
            raise ConfigError("a release needs a reason")
        check_typed_text("reason", reason)
        by = by or who()
        _check_lengths({"released by": by})
        now = utc_iso(self._clock())
        with self.engine.begin() as conn:
            conn.execute(update(legal_holds).where(legal_holds.c.id == hold_id, legal_holds.c.released_at.is_(None))
                         .values(released_at=now, released_by=by, release_reason=reason))
            conn.execute(insert(legal_hold_events).values(
                hold_id=hold_id, event="released", at=now, by=by, detail=json.dumps({"reason": reason})))
        return self.get(hold_id)

    def get(self, hold_id: int) -> Hold:
        """One hold by id; ConfigError when there is none."""
        holds = self.by_ids([hold_id])
        if not holds:
            raise ConfigError(f"there is no hold {hold_id}")
        return holds[0]

    def by_ids(self, ids: list[int]) -> list[Hold]:
        """Holds by id, released or not (to judge a batch by the holds it was judged by)."""
        if not ids:
            return []
        with self.engine.connect() as conn:
            rows = conn.execute(select(legal_holds).where(legal_holds.c.id.in_(ids)).order_by(legal_holds.c.id))
            return [_hold(r) for r in rows.mappings()]

    def find(self, *, category: str | None = None, include_released: bool = False) -> list[Hold]:
        """Holds, oldest first."""
        query = select(legal_holds).order_by(legal_holds.c.id)
        if category:
            query = query.where(legal_holds.c.category == category)
        if not include_released:
            query = query.where(legal_holds.c.released_at.is_(None))
        with self.engine.connect() as conn:
            return [_hold(r) for r in conn.execute(query).mappings()]

    def in_force(self, category: str, target: str, as_of: datetime | None = None) -> list[Hold]:
        """The holds protecting ``category``/``target`` records now, on this registry's clock.

        ``as_of`` is ignored: holds lapse by the clock, not by the instant a run measures from."""
        query = select(legal_holds).where(
            legal_holds.c.category == category,
            legal_holds.c.released_at.is_(None),
            or_(legal_holds.c.target.is_(None), legal_holds.c.target == target),
        )
        with self.engine.connect() as conn:
            holds = [_hold(r) for r in conn.execute(query).mappings()]
        now = self.now()
        return [h for h in holds if h.in_force(now)]

    def seen_categories(self) -> set[str]:
        """Categories this audit database has run or certified (to check a hold's category without rules)."""
        with self.engine.connect() as conn:
            runs = conn.execute(select(purge_runs.c.category).distinct()).scalars()
            certified = conn.execute(select(purge_certificates.c.category).distinct()).scalars()
            return set(runs) | set(certified)

    def history(self, hold_id: int) -> list[dict[str, Any]]:
        """Every event of a hold, oldest first."""
        with self.engine.connect() as conn:
            rows = conn.execute(select(legal_hold_events).where(legal_hold_events.c.hold_id == hold_id)
                                .order_by(legal_hold_events.c.id)).mappings()
            return [dict(r) for r in rows]


def _hold(row) -> Hold:
    """The row as a hold; TerminalError naming it and the column when it was edited past reading
    (runs then stop: a hold that cannot be read protects what it may)."""
    column = "match"
    try:
        match = json.loads(row["match"]) if row["match"] else None
        if match is not None and not isinstance(match, dict):
            raise ValueError(match)
        column = "until"
        until = date.fromisoformat(row["until"]) if row["until"] else None
    except ValueError:
        raise TerminalError(f"hold {row['id']} in the audit database is unreadable: its {column} is not what "
                            "retention writes (edited outside it?); no run can honour it until it is repaired") from None
    return Hold(
        id=row["id"], category=row["category"], target=row["target"],
        match=match, prefix=row["prefix"],
        case_id=row["case_id"], reason=row["reason"],
        until=until,
        placed_at=row["placed_at"], placed_by=row["placed_by"], released_at=row["released_at"],
        released_by=row["released_by"], release_reason=row["release_reason"],
    )


class HoldView:
    """The holds of one target of one run, read afresh each time they are asked for.

    ``as_of`` is the run's, kept for context; which holds are in force is decided by the
    registry's clock."""

    def __init__(self, registry: HoldRegistry, category: str, target: str, as_of: datetime):
        self.registry = registry
        self.category = category
        self.target = target
        self.as_of = as_of
        self.honoured: set[int] = set()

    def current(self) -> list[Hold]:
        """The holds in force now (recorded as honoured by this run)."""
        holds = self.registry.in_force(self.category, self.target)
        self.honoured.update(h.id for h in holds)
        return holds

    def by_ids(self, ids: list[int]) -> list[Hold]:
        """Holds a batch was judged by, released or not."""
        return self.registry.by_ids(ids)


_COLUMNS = {"category": "category", "target": "target", "prefix": "prefix", "case id": "case_id",
            "placed by": "placed_by", "released by": "released_by"}


def _check_lengths(fields: dict[str, str | None]) -> None:
    """Refuse a field longer than its column, naming it (the database would raise a DataError
    on PostgreSQL and MariaDB and keep it whole on SQLite)."""
    for name, value in fields.items():
        limit = getattr(legal_holds.c[_COLUMNS[name]].type, "length", None)
        if value is not None and limit is not None and len(value) > limit:
            what = "release" if name == "released by" else "hold"
            raise ConfigError(f"the {what}'s {name} is {len(value)} characters; it may be at most {limit}")
