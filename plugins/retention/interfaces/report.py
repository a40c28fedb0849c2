"""``retention report``: the period's purge report an auditor files.

Per category: its legal basis and retention (from the rules), the runs certified in the
period, records purged / archived / anonymized / held / failed, approvals, failures as
incidents; the legal holds in force; and the verification of the whole chain (signatures,
seq order, hash chain, signed checkpoints) with its head and newest checkpoint, so the
report can be checked against the log. Reads the audit database; changes nothing.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import logging
import os
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from retention.errors import ConfigError
from retention.interfaces.cli.options import instant_argument
from retention.interfaces.schedule import csv_safe, period_in_words, write_output

log = logging.getLogger(__name__)

FORMATS = ("html", "csv", "json")

_CSV_FIELDS = ("seq", "issued_at", "category", "run_id", "run_status", "action", "target", "location",
               "target_status", "matched", "deleted", "archived", "anonymized", "held", "failed", "error",
               "entry_hash")


def build_report(engine, *, since: datetime, until: datetime, now: datetime, rules: Sequence | None = None,
                 keys=None, checkpoints: dict | None = None, holds=None) -> dict[str, Any]:
    """The report of certificates issued in ``[since, until)`` as a JSON-ready mapping."""
    from retention.evidence.chain import read_certificates
    from retention.evidence.verify import verify_chain

    if until <= since:
        raise ConfigError(f"--until {until.isoformat()} is not after --since {since.isoformat()}: "
                          "give the period's first instant, then the instant after its end")
    by_rule = {r.rule.category: r.rule for r in rules or []}
    categories: dict[str, dict[str, Any]] = {}
    rows: list[dict[str, Any]] = []
    incidents: list[dict[str, Any]] = []
    for cert in read_certificates(engine, since=since, until=until):
        if cert.problem is not None or not isinstance(cert.data.get("targets"), list):
            incidents.append({"seq": str(cert.seq), "category": str(cert.category), "run_id": str(cert.run_id),
                              "target": None, "error": f"unreadable certificate: {cert.problem or 'not a payload'}"})
            continue
        data = cert.data
        entry = categories.setdefault(cert.category, _category_entry(cert.category, by_rule.get(cert.category)))
        entry["runs"] += 1
        entry["statuses"][cert.status] = entry["statuses"].get(cert.status, 0) + 1
        if data.get("approval"):
            entry["approvals"].append({"seq": cert.seq, "run_id": cert.run_id, **data["approval"]})
        for target in data["targets"]:
            done = {"deleted": target.get("deleted", 0), "archived": target.get("archived", 0),
                    "anonymized": target.get("anonymized", 0)}
            for name, n in done.items():
                entry[name] += n
            entry["held"] += target.get("held", 0)
            entry["failed"] += target.get("failed", 0)
            rows.append({"seq": cert.seq, "issued_at": data.get("issued_at"), "category": cert.category,
                         "run_id": cert.run_id, "run_status": cert.status, "action": data.get("action"),
                         "target": target.get("name"), "location": target.get("location"),
                         "target_status": target.get("status"), "matched": target.get("matched"), **done,
                         "held": target.get("held", 0), "failed": target.get("failed", 0),
                         "error": target.get("error"), "entry_hash": cert.entry_hash})
            if target.get("status") != "complete":
                incident = {"seq": cert.seq, "category": cert.category, "run_id": cert.run_id,
                            "target": target.get("name"), "error": target.get("error") or target.get("status")}
                incidents.append(incident)
                entry["incidents"].append(incident)
        if data.get("archive_error"):
            incident = {"seq": cert.seq, "category": cert.category, "run_id": cert.run_id, "target": None,
                        "error": f"archive manifest not written: {data['archive_error']}"}
            incidents.append(incident)
            entry["incidents"].append(incident)
    for category, rule in by_rule.items():  # a category that did not run in the period is news too
        categories.setdefault(category, _category_entry(category, rule))
    in_force = [] if holds is None else [_hold(h) for h in holds.find()]
    verification: dict[str, Any]
    if keys is None:
        verification = {"checked": False, "ok": None,
                        "reason": "not verified: no --keyring or --public-key given"}
    else:
        checkpoints = checkpoints or {}
        result = verify_chain(engine, keys, checkpoints)
        newest = max(checkpoints) if checkpoints else None
        verification = {"checked": True, "ok": result.ok, "certificates": result.checked,
                        "head_seq": result.head_seq, "head_hash": result.head_hash,
                        "bad_seq": result.bad_seq, "reason": result.reason,
                        "newest_checkpoint": newest,
                        "newest_checkpoint_source": checkpoints[newest].source if newest is not None else None}
    return {"period": {"since": _iso(since), "until": _iso(until)}, "generated_at": _iso(now),
            "categories": [categories[c] for c in sorted(categories)], "certificates": rows,
            "incidents": incidents, "holds_in_force": in_force, "verification": verification}


def _category_entry(category: str, rule) -> dict[str, Any]:
    return {"category": category,
            "legal_basis": rule.legal_basis if rule else None,
            "retain_for": rule.retain_for.text if rule else None,
            "retention": period_in_words(rule.retain_for) if rule else "(no rule for this category in the rules given)",
            "action": rule.action if rule else None,
            "runs": 0, "statuses": {}, "deleted": 0, "archived": 0, "anonymized": 0, "held": 0, "failed": 0,
            "approvals": [], "incidents": []}


def _hold(hold) -> dict[str, Any]:
    return {"id": hold.id, "category": hold.category, "target": hold.target, "case_id": hold.case_id,
            "scope": "all records" if hold.whole else ("prefix " + hold.prefix if hold.prefix else "matching rows"),
            "until": hold.until.isoformat() if hold.until else None, "placed_at": str(hold.placed_at),
            "placed_by": hold.placed_by}


def _iso(moment: datetime) -> str:
    return moment.astimezone(timezone.utc).isoformat().replace("+00:00", "Z")


def render(report: dict[str, Any], fmt: str) -> str:
    """The report as ``html``, ``csv`` (one row per certificate and target) or ``json``."""
    if fmt == "json":
        return json.dumps(report, indent=2, ensure_ascii=False, default=str) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow(_CSV_FIELDS)
        for row in report["certificates"]:
            writer.writerow([csv_safe(row[f]) for f in _CSV_FIELDS])
        return out.getvalue()
    if fmt == "html":
        from jinja2 import Environment, PackageLoader, select_autoescape

        env = Environment(loader=PackageLoader("retention.interfaces", "templates"),
                          autoescape=select_autoescape(default=True, default_for_string=True))
        return env.get_template("report.html").render(report=report)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


# -- the command ----------------------------------------------------------------------


def register(commands) -> None:
    """Add ``retention report`` to the CLI's subparsers."""
    cmd = commands.add_parser("report", help="the period's purge report for an auditor (HTML, CSV or JSON)")
    cmd.add_argument("--since", type=instant_argument, required=True, metavar="T", help="first instant (a date is 00:00Z)")
    cmd.add_argument("--until", type=instant_argument, required=True, metavar="T", help="end of the period, excluded")
    cmd.add_argument("--format", choices=FORMATS, default="html", help="output format (default html)")
    cmd.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    cmd.add_argument("--audit", default=os.environ.get("RETENTION_AUDIT_CONN", "retention_audit"), metavar="CONN_ID",
                     help="connection id of the audit database (default: $RETENTION_AUDIT_CONN or retention_audit)")
    cmd.add_argument("--rules", default=os.environ.get("RETENTION_RULES_DIR", "retention_rules"), metavar="DIR",
                     help="rules directory, for each category's legal basis and retention")
    cmd.add_argument("--keyring", default=os.environ.get("RETENTION_KEYRING"), metavar="FILE",
                     help="verify the chain against this keyring (default $RETENTION_KEYRING)")
    cmd.add_argument("--public-key", action="append", default=[], metavar="PEM", help="or trust these keys")
    cmd.add_argument("--checkpoint", action="append", default=[], metavar="LOCATION",
                     help="signed checkpoints to check the chain against (a directory or s3://bucket/prefix)")
    cmd.add_argument("--checkpoint-connection", default="aws_default", metavar="CONN_ID")
    cmd.add_argument("--log-id", metavar="ID", help="the log identity checkpoints must name")
    cmd.set_defaults(handler=cmd_report)


def cmd_report(args: argparse.Namespace) -> int:
    """Write the report; exit 1 when the chain did not verify (the report still says why)."""
    from retention.aws import s3_client_from_environment
    from retention.connections import from_environment
    from retention.errors import RuleError
    from retention.evidence.audit import open_audit
    from retention.evidence.checkpoints import log_identity, read_all
    from retention.evidence.signing import PublicKeys
    from retention.evidence.stores import open_store
    from retention.holds import HoldRegistry
    from retention.rules.loader import load_rules

    if args.until <= args.since:
        raise ConfigError(f"--until {args.until.date()} is not after --since {args.since.date()}")
    if args.keyring and args.public_key:
        raise ConfigError("give --keyring or --public-key, not both")
    keys = (PublicKeys.from_keyring(args.keyring) if args.keyring
            else PublicKeys.from_pem_files(args.public_key) if args.public_key else None)
    if args.checkpoint and keys is None:
        raise ConfigError("--checkpoint needs --keyring or --public-key to check the checkpoints' signatures")
    try:
        rules = load_rules(args.rules)
    except RuleError as exc:  # the report is about what happened; say what could not be read
        log.warning("rules not read (%s): categories show no legal basis", exc.problems[0] if exc.problems else exc)
        rules = []
    engine = open_audit(from_environment, args.audit, create=False)
    checkpoints = {}
    if args.checkpoint and keys is not None:  # without keys it was refused above
        stores = [open_store(w, s3_client_from_environment, args.checkpoint_connection) for w in args.checkpoint]
        checkpoints = read_all(stores, keys, log_identity(args.log_id))
    report = build_report(engine, since=args.since, until=args.until, now=datetime.now(timezone.utc), rules=rules,
                          keys=keys, checkpoints=checkpoints, holds=HoldRegistry(engine))
    write_output(render(report, args.format), args.out)
    return 0 if report["verification"]["ok"] is not False else 1
