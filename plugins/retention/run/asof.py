"""Whether a run's ``as_of`` is a plausible "now" (:func:`check_as_of`): checked before
anything is touched, by ``retention run`` first and by every run's start."""

from __future__ import annotations

from datetime import datetime, timedelta, timezone

from retention.clock import utc_iso
from retention.errors import InvalidAsOf

CLOCK_SKEW = timedelta(minutes=5)
"""How far a run's as_of may be ahead of this machine's clock (clocks of hosts drift)."""

EARLIEST_AS_OF = datetime(1970, 1, 1, tzinfo=timezone.utc)
"""No retention run measures from before this: an earlier as_of is a typo."""


def check_as_of(as_of: datetime, now: datetime) -> None:
    """Refuse an ``as_of`` that is not a plausible "now": a future one would purge records
    still inside their retention period; one before 1970 is a typo."""
    if as_of.tzinfo is None:
        raise InvalidAsOf(f"as_of {as_of.isoformat()} has no time zone; give one, e.g. 2026-06-01T00:00:00Z")
    if as_of > now + CLOCK_SKEW:
        raise InvalidAsOf(
            f"as_of {utc_iso(as_of)} is later than this machine's clock ({utc_iso(now)}, allowing "
            f"{CLOCK_SKEW.seconds // 60} min of skew): it would purge records still inside their retention "
            "period. Nothing was touched. Run without --as-of (in Airflow: without a future logical date); "
            "`retention plan --as-of` shows what a future date would purge"
        )
    if as_of < EARLIEST_AS_OF:
        raise InvalidAsOf(f"as_of {as_of.date().isoformat()} is before 1970: not a real run date; "
                          "check the year. Nothing was touched")
