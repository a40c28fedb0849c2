"""What the compliance page shows, read through the engine's own readers.

Each function returns plain values a template renders: the certificates (chain), one in
full, a verification run as ``retention verify`` runs it, the retention status per target
(run.status), and the legal holds (HoldRegistry). Nothing here knows about HTTP.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
from collections.abc import Callable, Iterable
from datetime import date, datetime, timedelta, timezone
from typing import TYPE_CHECKING, Any

from retention.errors import ConfigError
from retention.interfaces.render import count, moment, size

if TYPE_CHECKING:
    from sqlalchemy.engine import Engine

    from retention.evidence.chain import Certificate
    from retention.evidence.signing import PublicKeys
    from retention.evidence.stores import CheckpointStore
    from retention.holds import Hold, HoldRegistry
    from retention.rules.models import RuleFile
    from retention.run.status import TargetStatus
    from retention.targets import Targets

STATUSES = ("complete", "partial", "failed")


@dataclasses.dataclass(frozen=True)
class CertificateFilter:
    """The certificates list's filters: all optional; ``until`` is the last day shown (inclusive)."""

    category: str | None = None
    status: str | None = None
    since: date | None = None
    until: date | None = None
    limit: int = 200

    def bounds(self) -> tuple[datetime | None, datetime | None]:
        """``issued_at`` bounds for the chain reader: from midnight of ``since`` to before the day after ``until``."""
        since = midnight(self.since) if self.since else None
        # Until the last day of the calendar (9999-12-31) is no bound at all: the day after it does not exist.
        until = midnight(self.until) + timedelta(days=1) if self.until and self.until < date.max else None
        return since, until


def certificate_rows(engine: Engine, chosen: CertificateFilter) -> list[dict[str, Any]]:
    """The certificates that pass the filters, newest first, as the listing shows them."""
    from retention.evidence.chain import read_certificates

    since, until = chosen.bounds()
    rows = []
    for certificate in read_certificates(engine, category=chosen.category or None, newest_first=True,
                                         since=since, until=until):
        if chosen.status and certificate.status != chosen.status:
            continue
        rows.append(_listed(certificate))
        if len(rows) >= chosen.limit:
            break
    return rows


class NotACertificate(ValueError):
    """A row whose payload is a JSON object, but lacks what every certificate retention signs has."""


def _not_a_certificate(exc: Exception) -> NotACertificate:
    missing = f"no {exc.args[0]!r} in it" if isinstance(exc, KeyError) else "its fields are not what retention writes"
    return NotACertificate(f"its payload is JSON, but not a certificate retention wrote ({missing})")


def _listed(c: Certificate) -> dict[str, Any]:
    problem = c.problem
    if problem is None:
        try:
            return _listed_certificate(c)
        except (KeyError, TypeError, ValueError, AttributeError) as exc:  # planted: JSON, but not ours
            problem = str(_not_a_certificate(exc))
    # Shown, not skipped: a planted row is news to whoever reviews the list.
    return {"seq": c.seq, "category": str(c.category), "status": "unreadable", "problem": problem,
            "run_id": str(c.run_id), "issued": "", "purged": "", "held": "", "failed": "", "hash": ""}


def _listed_certificate(c: Certificate) -> dict[str, Any]:
    totals = c.data.get("totals", {})
    uncounted = bool(totals.get("uncounted"))  # the plan failed: matched and failed are not counts
    return {"seq": c.seq, "category": c.category, "status": c.status, "problem": None, "run_id": c.run_id,
            "issued": moment(c.issued_at), "purged": f"{c.deleted:,}", "held": f"{totals.get('held', 0):,}",
            "failed": "?" if uncounted else f"{totals.get('failed', 0):,}", "hash": c.entry_hash[:12]}


def find_by_seq(engine: Engine, seq: int) -> Certificate | None:
    """The certificate with this seq, or None."""
    from retention.evidence.chain import read_certificates

    return next(iter(read_certificates(engine, seq=seq)), None)


def certificate_detail(certificate: Certificate, registry: HoldRegistry) -> dict[str, Any]:
    """One certificate in full: the run, its targets, the holds it honoured, approval, archive, issuer,
    signature. A payload that is JSON but lacks a certificate's fields raises :class:`NotACertificate`."""
    try:
        return _detail(certificate, registry)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise _not_a_certificate(exc) from None


def _detail(certificate: Certificate, registry: HoldRegistry) -> dict[str, Any]:
    data = certificate.data
    purged = {"anonymize": "anonymized", "archive": "archived"}.get(data.get("action", ""), "deleted")
    targets = []
    for t in data.get("targets", []):
        counted = t.get("counted", True)
        targets.append({
            "name": t["name"], "location": t["location"], "status": t["status"],
            "matched": f"{t['matched']:,}" if counted else "?", "purged": f"{t.get('anonymized', t['deleted']):,}",
            "held": f"{t.get('held', 0):,}", "failed": f"{t['failed']:,}" if counted else "?",
            "bytes": size(t.get("bytes")), "error": t.get("error") or "",
            "tables": ", ".join(f"{name} {n:,}" for name, n in (t.get("tables") or {}).items())
            if len(t.get("tables") or {}) > 1 else "",
        })
    honoured = [int(h) for h in data.get("holds") or []]
    holds = {h.id: h for h in registry.by_ids(honoured)}
    archive = data.get("archive")
    return {
        "seq": certificate.seq, "category": certificate.category, "status": certificate.status,
        "run_id": certificate.run_id, "action": data["action"], "purged_label": purged,
        "rule": data["rule"], "code_version": data.get("code_version"),
        "cutoff": moment(data["cutoff"]), "as_of": moment(data["as_of"]),
        "started": moment(data["started_at"]), "finished": moment(data["finished_at"]),
        "issued": moment(data["issued_at"]), "issued_by": data.get("issued_by") or "(not recorded)",
        "approval": data.get("approval"), "targets": targets,
        "holds": [{"id": h, "hold": holds.get(h)} for h in honoured],
        "archive": archive and {**archive, "objects": count(archive.get("objects"), "object")},
        "archive_error": data.get("archive_error"),
        "key_id": certificate.key_id, "signature": certificate.signature,
        "entry_hash": certificate.entry_hash, "prev_hash": certificate.prev_hash,
    }


def verify_now(engine: Engine, keys: PublicKeys, stores: Iterable[CheckpointStore], origin: str, *,
               archives: Callable[[], Any] | None = None) -> dict[str, Any]:
    """Check the chain as ``retention verify`` does: signatures, seq order, hash links, the signed
    checkpoints in ``stores``, and with ``archives`` (an S3 client factory) every archive run."""
    from retention.interfaces.verification import verify_everything

    found = verify_everything(engine, keys, stores, origin, archive_client=archives() if archives else None)
    result, checkpoints, newest = found.result, found.checkpoints, found.newest
    figures = found.archives.to_dict() if found.archives is not None else None
    return {
        "ok": result.ok, "checked": result.checked, "head_seq": result.head_seq, "head_hash": result.head_hash,
        "bad_seq": result.bad_seq, "reason": result.reason, "keys": len(result.key_ids),
        "checkpoints": len(checkpoints), "newest_checkpoint": newest,
        "newest_source": checkpoints[newest].source if newest is not None else None,
        "not_checkpointed": found.unanchored,
        "archives": figures and {**figures, "size": size(figures["bytes"])},
    }


def status_rows(rule_files: list[RuleFile], engine: Engine, targets: Targets, now: datetime
                ) -> tuple[list[TargetStatus], list[str]]:
    """Every target's status, the failing ones first (unreadable, then most overdue); and notes on
    certificate rows passed over."""
    from retention.run.status import retention_status

    skipped: list[str] = []
    report = retention_status(rule_files, engine, targets, now=now, skipped=skipped)
    report.sort(key=lambda r: (r.healthy, r.error is None, -(r.lag_seconds or 0), r.category, r.target))
    return report, skipped


def hold_rows(registry: HoldRegistry) -> dict[str, Any]:
    """The holds in force, and every hold ever placed (newest first) with its events."""
    now = registry.now()
    everything = registry.find(include_released=True)
    shown = [_hold(h, now, registry.history(h.id)) for h in reversed(everything)]
    return {"in_force": [h for h in shown if h["in_force"]], "history": shown}


def _hold(hold: Hold, now: datetime, events: list[dict[str, Any]]) -> dict[str, Any]:
    scope = json.dumps(hold.match, sort_keys=True) if hold.match else (
        f"keys under {hold.prefix}" if hold.prefix else "everything")
    return {"id": hold.id, "case_id": hold.case_id, "category": hold.category, "target": hold.target or "(all)",
            "scope": scope, "until": hold.until.isoformat() if hold.until else "", "state": hold.state(now),
            "in_force": hold.in_force(now), "placed_at": hold.placed_at, "placed_by": hold.placed_by,
            "reason": hold.reason, "release_reason": hold.release_reason,
            "events": [{"event": e["event"], "at": e["at"], "by": e["by"]} for e in events]}


@dataclasses.dataclass(frozen=True)
class HoldRequest:
    """A hold as the page's form gives it: text fields, checked before anything is written."""

    category: str
    case_id: str
    reason: str
    target: str = ""
    match: str = ""
    prefix: str = ""
    until: str = ""


def place_hold(registry: HoldRegistry, request: HoldRequest, *, rules_dir: str, by: str) -> tuple[Hold, list[str]]:
    """Check and place a hold as ``retention hold add`` does (without ``--force``); the hold and its warnings."""
    from retention.holds import check_match
    from retention.interfaces.cli.holds import _check_hold_scope

    _fits_the_audit_database(request, by)
    match = None
    if request.match.strip():
        try:
            match = json.loads(request.match)
        except json.JSONDecodeError as exc:
            raise ConfigError(f'records: not JSON ({exc.msg}); write an object such as {{"customer_id": 42}}') from None
    check_match(match)
    try:
        until = date.fromisoformat(request.until) if request.until.strip() else None
    except ValueError:
        raise ConfigError(f"until: {request.until!r} is not a date; write YYYY-MM-DD") from None
    scope = argparse.Namespace(category=request.category, target=request.target or None,
                               prefix=request.prefix or None, rules=rules_dir, force=False)
    warnings = _check_hold_scope(scope, match, registry)
    hold = registry.add(category=request.category, target=request.target or None, match=match,
                        prefix=request.prefix or None, case_id=request.case_id, reason=request.reason,
                        until=until, by=by)
    return hold, warnings


def _fits_the_audit_database(request: HoldRequest, by: str) -> None:
    """Refuse a field longer than its column: PostgreSQL and MariaDB would fail the insert (or
    MariaDB outside strict mode cut it short), SQLite would keep it; the page says so in every case."""
    from retention.evidence.audit import legal_holds

    for name, label, value in (("case_id", "case id", request.case_id), ("category", "category", request.category),
                               ("target", "target", request.target), ("prefix", "S3 key prefix", request.prefix),
                               ("placed_by", "your user name", by)):
        most = getattr(legal_holds.c[name].type, "length", None)
        if most is not None and len(value) > most:
            raise ConfigError(f"{label}: at most {most} characters (the audit database keeps no more); "
                              f"this one has {len(value):,}")


def midnight(day: date) -> datetime:
    """Midnight UTC at the start of ``day``."""
    return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
