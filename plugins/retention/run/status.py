"""Retention lag: per target, the last run, its result, and how far behind retention is now.

The number compliance cares about is how long the oldest record that should be gone
has overstayed its expiry: zero when every expired record is gone, a few hours between
nightly runs, days when purges fail. A target is healthy when its last run completed
and that lag is within two schedule intervals.
"""

from __future__ import annotations

import logging
from dataclasses import asdict, dataclass
from datetime import datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from croniter import croniter

from retention.clock import utc_iso
from retention.erasure_requests import ErasureRegistry
from retention.evidence.chain import read_certificates
from retention.holds import HoldRegistry, HoldView
from retention.targets import RunContext

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.erasure_requests import ErasureRequest
    from retention.rules.models import RetentionRule, RuleFile
    from retention.targets import Targets

log = logging.getLogger(__name__)

_PRESETS = {"@hourly": "0 * * * *", "@daily": "0 0 * * *", "@weekly": "0 0 * * 0",
            "@monthly": "0 0 1 * *", "@quarterly": "0 0 1 */3 *", "@yearly": "0 0 1 1 *"}


@dataclass(frozen=True)
class TargetStatus:
    """Where one target stands now."""

    category: str
    target: str
    location: str
    last_run: str | None
    last_status: str | None
    last_certified: str | None
    expired: int | None
    """None when the target could not be read (see ``error``)."""
    held: int | None
    oldest_expired: str | None
    lag_seconds: float | None
    healthy: bool
    error: str | None = None
    """Why the target could not be read now (class and code), or None."""

    @property
    def lag_text(self) -> str:
        """``0``, ``3 h``, ``12 d``."""
        if not self.lag_seconds:
            return "0"
        hours = self.lag_seconds / 3600
        return f"{hours:,.1f} h" if hours < 48 else f"{hours / 24:,.1f} d"

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready form."""
        return asdict(self)


def retention_status(rule_files: list[RuleFile], audit: Engine, targets: Targets, *, now: datetime,
                     skipped: list[str] | None = None) -> list[TargetStatus]:
    """The status of every target of ``rule_files`` at ``now``.

    Certificate rows that cannot be read are passed over (the newest readable one of a
    category counts) and described in ``skipped``, when given.
    """
    latest = _latest_certificates(audit, skipped if skipped is not None else [])
    registry = HoldRegistry(audit)
    report = []
    for rule_file in rule_files:
        rule = rule_file.rule
        cutoff = rule.cutoff(now)
        certificate = latest.get(rule.category)
        entries = _entries(certificate) or {} if certificate else {}
        tolerance = 2 * _interval(rule)
        for target in rule.targets:
            entry = entries.get(target.name)
            status = entry["status"] if entry else None
            context = RunContext(rule.action, rule.category, "status", now, rule.archive)
            try:
                handle = targets.open(target, context, holds=HoldView(registry, rule.category, target.name, now))
                expired, held, oldest = handle.oldest_expired(cutoff)
            except Exception as exc:  # one broken target must not hide the others
                from retention.retry import describe_error

                log.debug("status of %s.%s", rule.category, target.name, exc_info=True)
                report.append(TargetStatus(
                    category=rule.category, target=target.name, location=target.location,
                    last_run=certificate.run_id if certificate else None, last_status=status,
                    last_certified=utc_iso(_aware(certificate.issued_at)) if certificate else None,
                    expired=None, held=None, oldest_expired=None, lag_seconds=None, healthy=False,
                    error=f"cannot read {target.location}: {describe_error(exc)}",
                ))
                continue
            lag = (cutoff - oldest).total_seconds() if oldest is not None else None
            report.append(TargetStatus(
                category=rule.category, target=target.name, location=target.location,
                last_run=certificate.run_id if certificate else None, last_status=status,
                last_certified=utc_iso(_aware(certificate.issued_at)) if certificate else None,
                expired=expired, held=held, oldest_expired=utc_iso(oldest) if oldest else None,
                lag_seconds=lag, healthy=status == "complete" and (lag is None or lag <= tolerance.total_seconds()),
            ))
    return report


def _latest_certificates(audit: Engine, skipped: list[str]) -> dict[str, Any]:
    latest: dict[str, Any] = {}
    for certificate in read_certificates(audit):
        if certificate.problem is not None or _entries(certificate) is None:
            why = certificate.problem or "its payload is not a certificate as retention writes them"
            skipped.append(f"certificate row {certificate.label} is unreadable ({why}): passed over; "
                           "run `retention verify`")
            continue
        latest[certificate.category] = certificate  # seq order: the last one wins
    return latest


def _entries(certificate) -> dict[str, dict] | None:
    """The certificate's targets by name, each with a text status; None when the payload has no such shape."""
    targets = certificate.data.get("targets", [])
    if not isinstance(targets, list) or not all(
            isinstance(t, dict) and isinstance(t.get("name"), str) and isinstance(t.get("status"), str)
            for t in targets):
        return None
    if not isinstance(certificate.issued_at, datetime):
        return None
    return {t["name"]: t for t in targets}


def _interval(rule: RetentionRule) -> timedelta:
    """The time between two scheduled runs (a day for manual-only rules)."""
    expression = _PRESETS.get(rule.schedule or "", rule.schedule)
    if not expression:
        return timedelta(days=1)
    base = datetime(2026, 1, 1, tzinfo=timezone.utc)
    times = croniter(expression, base)
    first = times.get_next(datetime)
    return times.get_next(datetime) - first


def _aware(moment: datetime) -> datetime:
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def overdue_erasures(engine: Engine, *, now: datetime) -> list[ErasureRequest]:
    """Erasure requests past their due date and not answered (done or denied), oldest first."""
    return [r for r in ErasureRegistry(engine).find() if r.overdue(now.astimezone(timezone.utc).date())]
