"""``validate``, ``plan``, ``run`` and ``status``: the commands that read the rules."""

from __future__ import annotations

import argparse
import json
import os
import sys
import uuid
from datetime import datetime

from retention.errors import InvalidAsOf, RuleError, TerminalError, TransientError
from retention.interfaces.cli.options import (
    DEFAULT_RULES_DIR,
    EXIT_FAILED,
    EXIT_INVALID,
    EXIT_OK,
    _err,
    _now,
    audit_option,
    rules_options,
)
from retention.interfaces.cli.progress import Progress
from retention.interfaces.render import count, moment, size, table


def register(commands: argparse._SubParsersAction) -> None:
    """The rule commands: validate, plan, run, status."""
    cmd = commands.add_parser("validate", help="check rule files; exit 0 when valid, 2 otherwise")
    cmd.add_argument("rules", nargs="?", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR),
                     metavar="DIR")
    cmd.add_argument("--require-subjects", action="store_true",
                     help="also report targets that do not say whose personal data they hold (erasure requests)")
    cmd.set_defaults(handler=cmd_validate)

    cmd = commands.add_parser("plan", help="show what each rule would purge; changes nothing")
    rules_options(cmd)
    audit_option(cmd)
    cmd.add_argument("--json", action="store_true", help="print the plan as JSON")
    cmd.set_defaults(handler=cmd_plan)

    cmd = commands.add_parser("run", help="purge expired records and certify the run")
    rules_options(cmd)
    audit_option(cmd)
    cmd.add_argument("--dry-run", action="store_true", help="plan only: change nothing, certify nothing")
    cmd.add_argument("--run-id", help="run id (default: cli__<as-of>__<random>)")
    cmd.add_argument("--approve-over-limit", metavar="REASON",
                     help="let a run purge more than a target's max_fraction/max_records; REASON goes into the certificate")
    cmd.add_argument("--wait", type=float, default=0.0, metavar="SECONDS",
                     help="wait this long for another run of the category to finish (default: stop at once)")
    cmd.add_argument("--json", action="store_true", help="print the certificates as JSON")
    cmd.set_defaults(handler=cmd_run)

    cmd = commands.add_parser("status", help="per target: last run, its result, and how far behind retention is")
    rules_options(cmd)
    audit_option(cmd)
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(handler=cmd_status)


def cmd_validate(args: argparse.Namespace) -> int:
    from retention.rules.loader import load_rules
    from retention.rules.subjects import load_subjects, subject_problems

    rules = load_rules(args.rules)
    problems = subject_problems(rules, load_subjects(args.rules), require=args.require_subjects)
    if problems:
        raise RuleError(problems)
    print(f"✓ {count(len(rules), 'rule file')} valid in {args.rules}: "
          f"{', '.join(r.rule.category for r in rules)}")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.plan.builder import build_plan
    from retention.rules.loader import load_rules
    from retention.targets import Targets

    rules = load_rules(args.rules, category=args.category)
    as_of = args.as_of or _now()
    _what_if(as_of)
    holds = _hold_registry_if_any(args.audit)
    with Targets(from_environment) as targets:
        plans = [build_plan(rule_file, as_of, targets, holds=holds) for rule_file in rules]
    if args.json:
        print(json.dumps([p.to_dict() for p in plans], indent=2))
        return EXIT_OK
    for plan in plans:
        _print_plan(plan)
    print(f"Plan only: nothing was changed. {count(sum(p.matched for p in plans))} would be purged.")
    return EXIT_OK


def _hold_registry_if_any(audit: str):
    """The legal holds, when an audit database is configured; a plan can be made without one.
    A plan changes nothing: an audit database without its tables has no hold, and gets none."""
    from retention.connections import env_var_name, from_environment
    from retention.evidence.audit import NoAuditTables, open_audit
    from retention.holds import HoldRegistry

    if not os.environ.get(env_var_name(audit)):
        print(f"(legal holds not checked: no audit connection {audit})", file=sys.stderr)
        return None
    try:
        return HoldRegistry(open_audit(from_environment, audit, create=False))
    except NoAuditTables:
        print(f"(no legal holds: audit connection {audit} has no audit tables yet)", file=sys.stderr)
        return None



def cmd_run(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.evidence.signing import Signer
    from retention.plan.builder import build_plan
    from retention.rules.loader import load_rules
    from retention.run.asof import check_as_of
    from retention.run.runner import RunAlreadyCertified, Runner
    from retention.targets import Targets

    rules = load_rules(args.rules, category=args.category)
    as_of = args.as_of or _now()
    if args.dry_run:
        _what_if(as_of)
        holds = _hold_registry_if_any(args.audit)
        with Targets(from_environment) as targets:
            for rule_file in rules:
                _print_plan(build_plan(rule_file, as_of, targets, holds=holds))
        print("Dry run: nothing was changed and no certificate was written.")
        return EXIT_OK
    check_as_of(as_of, _now())  # Runner.start checks too; this stops before the signer and the audit database
    if args.run_id is not None:  # it is printed, listed and signed: it must read as it is
        from retention.identity import check_typed_text

        check_typed_text("--run-id", args.run_id, an_id=True)
    signer = Signer.from_environment()  # before anything is touched: an uncertifiable run must not start
    base_id = args.run_id or f"cli__{as_of.strftime('%Y%m%dT%H%M%SZ')}__{uuid.uuid4().hex[:8]}"
    certificates, errors = [], 0
    with Runner.from_environment(audit=args.audit, signer=signer) as runner:
        journal = runner.journal
        try:
            for rule_file in rules:  # every category's run id, before any of them starts
                runner.refuse_certified(rule_file.rule.category,
                                        base_id if len(rules) == 1 else f"{base_id}__{rule_file.rule.category}")
        except RunAlreadyCertified as exc:
            _err(f"error: {exc}")
            return EXIT_INVALID
        for rule_file in rules:
            run_id = base_id if len(rules) == 1 else f"{base_id}__{rule_file.rule.category}"
            print(f"{rule_file.rule.category}: as of {moment(as_of)}, retain {rule_file.rule.retain_for} "
                  f"→ purging records older than {moment(rule_file.rule.cutoff(as_of))}", file=sys.stderr)
            try:
                certificate = runner.run(rule_file, run_id=run_id, as_of=as_of, progress=Progress(),
                                         approval=args.approve_over_limit, wait=args.wait)
            except (RuleError, InvalidAsOf):
                raise
            except RunAlreadyCertified as exc:  # certified since the check above
                _err(f"error: {exc}")
                return EXIT_INVALID
            except (TerminalError, TransientError) as exc:
                _err(f"{rule_file.rule.category}: {exc}")
                from retention.evidence.chain import find_certificate

                errors += 1
                found = find_certificate(journal.engine, rule_file.rule.category, run_id)
                if found is None:
                    return EXIT_FAILED
                certificate = found
            certificates.append(certificate)
    if args.json:
        for certificate in certificates:
            print(certificate.payload)
    else:
        _print_run_summary(certificates)
    return EXIT_OK if not errors and all(c.status == "complete" for c in certificates) else EXIT_FAILED


def cmd_status(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.rules.loader import load_rules
    from retention.run.status import overdue_erasures, retention_status
    from retention.targets import Targets

    rules = load_rules(args.rules, category=args.category)
    now = args.as_of or _now()
    engine = open_audit(from_environment, args.audit, create=False)  # a reader: the wrong database is refused
    skipped: list[str] = []
    with Targets(from_environment) as targets:
        report = retention_status(rules, engine, targets, now=now, skipped=skipped)
    for note in skipped:
        _err(f"! {note}")
    overdue = overdue_erasures(engine, now=now)
    for request in overdue:
        _err(f"! erasure request {request.request_id} is overdue: due {request.due}, {request.state}")
    if args.json:
        print(json.dumps([r.to_dict() for r in report], indent=2))
    else:
        rows = [[r.category, r.target, r.last_status or "never run", moment(r.last_certified) if r.last_certified else "",
                 "?" if r.expired is None else f"{r.expired:,}", "?" if r.held is None else f"{r.held:,}",
                 "?" if r.error else r.lag_text, "UNKNOWN" if r.error else "ok" if r.healthy else "BEHIND",
                 r.error or ""] for r in report]
        print(table(["CATEGORY", "TARGET", "LAST RESULT", "CERTIFIED", "OVERDUE", "HELD", "OLDEST OVERDUE BY", "STATE",
                     "ERROR"], rows, right=(4, 5, 6)))
    return EXIT_OK if all(r.healthy for r in report) and not overdue else EXIT_FAILED


def _print_plan(plan) -> None:
    print(f"{plan.category}  ({plan.rule_path})")
    print(f"  as of {moment(plan.as_of)}, retain {plan.retain_for} → cutoff {moment(plan.cutoff)}, "
          f"action {plan.action}")
    rows = []
    notes = []
    for target in plan.targets:
        share = f"{target.matched / target.total:.1%}" if target.total else "–"
        unit = target.unit
        rows.append([target.name, target.kind, target.location, count(target.matched, unit),
                     size(target.bytes), f"{target.held:,}", count(target.total, unit), share])
        notes += [f"  ! {target.name}: {note}" for note in target.notes]
    print("\n".join("  " + line for line in
                    table(["TARGET", "KIND", "LOCATION", "WOULD PURGE", "BYTES", "HELD", "OF", "SHARE"], rows,
                          right=(3, 4, 5, 6, 7)).splitlines()))
    for note in notes:
        print(note)
    print()


def _print_run_summary(certificates) -> None:
    rows = []
    for c in certificates:
        for t in c.data.get("targets", []):
            counted = t.get("counted", True)  # False: the plan never counted it, so 0 is not a count
            rows.append([c.category, t["name"], t["status"], f"{t['matched']:,}" if counted else "?",
                         f"{t['deleted'] + t.get('anonymized', 0):,}",
                         f"{t.get('held', 0):,}", f"{t['failed']:,}" if counted else "?", size(t.get("bytes")),
                         t["error"] or ""])
    print(table(["CATEGORY", "TARGET", "STATUS", "MATCHED", "PURGED", "HELD", "FAILED", "BYTES", "ERROR"], rows,
                right=(3, 4, 5, 6, 7)))
    for c in certificates:
        print(f"certificate seq {c.seq} for {c.category}: {c.status} (run {c.run_id}, hash {c.entry_hash[:12]})")


def _what_if(as_of: datetime) -> None:
    """A plan may look ahead (it touches nothing) but not before 1970; say a future one is a what-if."""
    from retention.run.asof import check_as_of

    now = _now()
    try:
        check_as_of(as_of, now)
    except InvalidAsOf:
        if as_of <= now:
            raise
        print(f"(as of {moment(as_of)} is in the future: a what-if; `retention run` refuses a future --as-of)",
              file=sys.stderr)
