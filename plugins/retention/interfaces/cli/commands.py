"""``retention``: validate rules, plan and run purges, list and verify certificates.

Exit status: 0 success; 1 a run that did not purge everything, a chain that does not
verify, or an operational error; 2 invalid rules or usage. Tables go to stdout,
progress and errors to stderr; ``--json`` prints what a machine should read.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import os
import sys
import time
import uuid
from datetime import date, datetime, timezone

from retention import __version__
from retention.errors import ConfigError, InvalidAsOf, RetentionError, RuleError, TerminalError, TransientError
from retention.interfaces.render import count, describe_certificate, moment, rate, size, table

DEFAULT_RULES_DIR = "retention_rules"

EXIT_OK, EXIT_FAILED, EXIT_INVALID = 0, 1, 2

log = logging.getLogger("retention")


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``retention`` console script."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    for handler in logging.getLogger().handlers:  # -v logs driver messages too: no password in them
        handler.addFilter(_redacted)
    try:
        return args.handler(args)
    except RuleError as exc:
        _err(f"invalid rules ({len(exc.problems)} problem{'s' if len(exc.problems) != 1 else ''}):")
        for problem in exc.problems:
            _err(f"  {problem}")
        _err("nothing was touched.")
        return EXIT_INVALID
    except ConfigError as exc:
        _err(f"configuration: {exc}")
        return EXIT_INVALID
    except RetentionError as exc:
        _err(f"error: {exc}")
        return EXIT_FAILED
    except Exception as exc:  # an operational failure: database down, network, …
        from sqlalchemy.exc import SQLAlchemyError

        if isinstance(exc, SQLAlchemyError):
            _err(f"database error: {getattr(exc, 'orig', exc)}")
            return EXIT_FAILED
        raise


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="retention",
        description="Declarative retention rules, purged in batches, proven by signed certificates.",
    )
    parser.add_argument("--version", action="version", version=f"retention {__version__}")
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress details")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def rules_options(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--rules", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR), metavar="DIR",
            help="rules directory (default: $RETENTION_RULES_DIR or ./retention_rules)",
        )
        cmd.add_argument("--category", help="only this category (all rules must still be valid)")
        cmd.add_argument("--as-of", type=_as_of, metavar="T",
                         help="the instant retention is measured from (ISO 8601; default: now)")

    def audit_option(cmd: argparse.ArgumentParser) -> None:
        cmd.add_argument(
            "--audit", default=os.environ.get("RETENTION_AUDIT_CONN", "retention_audit"), metavar="CONN_ID",
            help="connection id of the audit database (default: $RETENTION_AUDIT_CONN or retention_audit)",
        )

    cmd = commands.add_parser("validate", help="check rule files; exit 0 when valid, 2 otherwise")
    cmd.add_argument("rules", nargs="?", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR),
                     metavar="DIR")
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

    cmd = commands.add_parser("hold", help="place, list and release legal holds")
    holds = cmd.add_subparsers(dest="hold_command", required=True, metavar="ACTION")
    add = holds.add_parser("add", help="protect records from every rule, until released")
    audit_option(add)
    add.add_argument("--category", required=True)
    add.add_argument("--target", help="one target of the category (default: all of them)")
    scope = add.add_mutually_exclusive_group()
    scope.add_argument("--match", metavar="JSON", help="""rows whose columns equal these values, e.g. '{"customer_id": 42}'""")
    scope.add_argument("--prefix", metavar="KEY_PREFIX", help="S3 objects whose key starts with this")
    add.add_argument("--case", required=True, metavar="CASE_ID", help="the legal case or ticket, e.g. CASE-123")
    add.add_argument("--reason", required=True, metavar="TEXT")
    add.add_argument("--until", type=_day, metavar="DATE",
                     help="the last day (UTC) the hold is in force; it lapses when that day has passed on the clock")
    add.add_argument("--rules", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR), metavar="DIR",
                     help="rules directory, to check the category and target exist")
    add.add_argument("--force", action="store_true",
                     help="place the hold even if its category, target, column or prefix is unknown")
    add.set_defaults(handler=cmd_hold_add)
    listing = holds.add_parser("list", help="holds in force (--all: with released and lapsed ones)")
    audit_option(listing)
    listing.add_argument("--category")
    listing.add_argument("--all", action="store_true")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_hold_list)
    release = holds.add_parser("release", help="release a hold (recorded; the next run purges its records)")
    audit_option(release)
    release.add_argument("id", type=int)
    release.add_argument("--reason", required=True, metavar="TEXT")
    release.set_defaults(handler=cmd_hold_release)

    cmd = commands.add_parser("status", help="per target: last run, its result, and how far behind retention is")
    rules_options(cmd)
    audit_option(cmd)
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(handler=cmd_status)

    cmd = commands.add_parser("certificates", help="list purge certificates")
    audit_option(cmd)
    cmd.add_argument("--category")
    cmd.add_argument("--limit", type=int, help="newest N (default 50, or all with --since/--until; 0 for all)")
    cmd.add_argument("--since", type=_as_of, metavar="T", help="issued at or after T (a date, or a timestamp with zone)")
    cmd.add_argument("--until", type=_as_of, metavar="T", help="issued before T")
    cmd.add_argument("--seq", type=int, metavar="N", help="show certificate N in full: its targets, tables, "
                                                        "holds, approval and archive manifest")
    cmd.add_argument("--json", action="store_true", help="print the payloads as JSON lines")
    cmd.set_defaults(handler=cmd_certificates)

    cmd = commands.add_parser("verify", help="check signatures, seq order and the hash chain")
    audit_option(cmd)
    cmd.add_argument("--public-key", action="append", default=[], metavar="PEM",
                     help="trusted Ed25519 public key, for any seq (repeat while rotating keys); or --keyring")
    cmd.add_argument("--keyring", default=os.environ.get("RETENTION_KEYRING"), metavar="FILE",
                     help="the keyring: each public key with the seq range it may sign (default $RETENTION_KEYRING)")
    cmd.add_argument("--log-id", metavar="ID",
                     help="the log identity checkpoints must name (default $RETENTION_LOG_ID, or "
                          "retention/purge-certificates)")
    cmd.add_argument("--checkpoint", action="append", default=[], metavar="LOCATION",
                     help="signed checkpoints kept outside the database: a file, a directory or "
                          "s3://bucket/prefix (repeatable); catches a removed tail")
    cmd.add_argument("--checkpoint-connection", default="aws_default", metavar="CONN_ID",
                     help="AWS connection that reads s3:// checkpoints (default aws_default)")
    cmd.add_argument("--archives", action="store_true",
                     help="also check every archive run's manifest against its certificate, and that each "
                          "archived object is still there with its size and SHA-256")
    cmd.add_argument("--archive-connection", default="aws_default", metavar="CONN_ID",
                     help="AWS connection that reads the archives (default aws_default)")
    cmd.add_argument("--json", action="store_true")
    cmd.set_defaults(handler=cmd_verify)

    cmd = commands.add_parser("restore", help="put an archive back: rows into a database, objects into a bucket")
    cmd.add_argument("manifest", metavar="MANIFEST", nargs="?",
                     help="s3://bucket/key of a run's manifest.json, or a file (default with --seq: the one "
                          "its certificate records); only a manifest a certificate records is restored")
    cmd.add_argument("--seq", type=int, metavar="N", help="the certificate that records the manifest "
                                                        "(default: the one holding its SHA-256)")
    audit_option(cmd)
    cmd.add_argument("--public-key", action="append", default=[], metavar="PEM",
                     help="also check the certificate's signature with this key (repeatable)")
    cmd.add_argument("--into", required=True, metavar="CONN[.TABLE] | s3://BUCKET[/PREFIX]",
                     help="rows: connection id to restore into (.TABLE renames the parent table); "
                          "S3 objects: the bucket (and prefix) to copy them back to, each at its original key")
    cmd.add_argument("--archive-connection", default="aws_default", metavar="CONN_ID",
                     help="AWS connection that reads the archive (default aws_default)")
    cmd.set_defaults(handler=cmd_restore)

    cmd = commands.add_parser("checkpoint", help="sign the chain's current head into the checkpoint store now")
    audit_option(cmd)
    cmd.add_argument("--to", metavar="LOCATION", help="a directory or s3://bucket/prefix (default $RETENTION_CHECKPOINTS)")
    cmd.add_argument("--checkpoint-connection", default=os.environ.get("RETENTION_CHECKPOINTS_CONN", "aws_default"),
                     metavar="CONN_ID", help="AWS connection for an s3:// location (default aws_default)")
    cmd.add_argument("--public-key", action="append", default=[], metavar="PEM",
                     help="earlier keys the chain was signed with (the signing key's own is always trusted)")
    cmd.add_argument("--keyring", default=os.environ.get("RETENTION_KEYRING"), metavar="FILE",
                     help="verify the chain against the keyring instead (it must hold the signing key)")
    cmd.add_argument("--log-id", metavar="ID", help="the log identity to sign under (default $RETENTION_LOG_ID)")
    cmd.set_defaults(handler=cmd_checkpoint)

    cmd = commands.add_parser("airflow", help="prepare Airflow for the rules (pools)")
    airflow = cmd.add_subparsers(dest="airflow_command", required=True, metavar="ACTION")
    sync = airflow.add_parser("sync-pools", help="create or resize the pool retention__<conn_id> of every "
                                                 "connection the rules use (slots from <rules>/_pools.yaml)")
    sync.add_argument("--rules", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR), metavar="DIR",
                      help="rules directory (default: $RETENTION_RULES_DIR or ./retention_rules)")
    sync.add_argument("--dry-run", action="store_true", help="print the pools; change nothing in Airflow")
    sync.add_argument("--json", action="store_true", help="print the pools as `airflow pools import` JSON")
    sync.set_defaults(handler=cmd_airflow_sync_pools)

    cmd = commands.add_parser("keygen", help="create an Ed25519 signing key pair")
    cmd.add_argument("--out", required=True, metavar="DIR")
    cmd.set_defaults(handler=cmd_keygen)
    return parser


# -- commands ----------------------------------------------------------------------------


def cmd_validate(args: argparse.Namespace) -> int:
    from retention.rules.models import load_rules

    rules = load_rules(args.rules)
    print(f"✓ {count(len(rules), 'rule file')} valid in {args.rules}: "
          f"{', '.join(r.rule.category for r in rules)}")
    return EXIT_OK


def cmd_plan(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.plan.builder import build_plan
    from retention.rules.models import load_rules
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
    """The legal holds, when an audit database is configured; a plan can be made without one."""
    from retention.connections import env_var_name, from_environment
    from retention.evidence.audit import open_audit
    from retention.holds import HoldRegistry

    if not os.environ.get(env_var_name(audit)):
        print(f"(legal holds not checked: no audit connection {audit})", file=sys.stderr)
        return None
    return HoldRegistry(open_audit(from_environment, audit))


def cmd_run(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.evidence.signing import Signer
    from retention.plan.builder import build_plan
    from retention.rules.models import load_rules
    from retention.run.runner import RunAlreadyCertified, Runner, check_as_of
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
                certificate = runner.run(rule_file, run_id=run_id, as_of=as_of, progress=_Progress(),
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
                certificate = find_certificate(journal.engine, rule_file.rule.category, run_id)
                if certificate is None:
                    return EXIT_FAILED
            certificates.append(certificate)
    if args.json:
        for certificate in certificates:
            print(certificate.payload)
    else:
        _print_run_summary(certificates)
    return EXIT_OK if not errors and all(c.status == "complete" for c in certificates) else EXIT_FAILED


def _holds(args: argparse.Namespace):
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.holds import HoldRegistry

    return HoldRegistry(open_audit(from_environment, args.audit))


def cmd_hold_add(args: argparse.Namespace) -> int:
    match = None
    if args.match:
        try:
            match = json.loads(args.match)
        except json.JSONDecodeError as exc:
            raise ConfigError(f"--match is not JSON: {exc.msg}") from None
    from retention.holds import check_match

    check_match(match)  # before the scope checks, which compare its values with the table
    registry = _holds(args)
    warnings = _check_hold_scope(args, match, registry)
    hold = registry.add(category=args.category, target=args.target, match=match, prefix=args.prefix,
                        case_id=args.case, reason=args.reason, until=args.until)
    print(f"placed {hold.describe()}")
    print("  it protects its records from the next batch of any run on; release it with "
          f"`retention hold release {hold.id} --reason ...`")
    for warning in warnings:
        _err(f"warning: {warning}")
    return EXIT_OK


def _check_hold_scope(args: argparse.Namespace, match, registry) -> list[str]:
    """A hold must name what exists, or it protects nothing: its category (in the rules, else
    among those the audit database has run), its target, its columns (in the live table, else
    in the rule) and its S3 prefix. ``--force`` places it anyway. Returns warnings to print
    after placing it (a hold that matches no row now, and its near matches)."""
    from retention.rules.models import load_rules

    unreadable = ""
    try:
        rules = {r.rule.category: r.rule for r in load_rules(args.rules)}
    except RuleError as exc:  # still checked against the categories the audit database has seen
        rules, unreadable = {}, f" ({exc.problems[0]})" if exc.problems else ""
    notes: list[str] = []

    def unknown(message: str, effect: str = "it would protect nothing") -> None:
        if not args.force:
            raise ConfigError(f"{message}; {effect}. Check the spelling, or add --force to place it anyway")
        notes.append(f"--force: {message}; {effect}")

    rule = rules.get(args.category)
    if rule is None:
        seen = registry.seen_categories()
        if args.category in seen:
            notes.append(f"category {args.category} has no rule in {args.rules}: its target, columns and "
                         "prefix were not checked")
        else:
            unknown(f"no category {args.category!r} in the rules in {args.rules}{unreadable} or in the audit "
                    f"database{_did_you_mean(args.category, set(rules) | seen)}")
        return notes
    targets = [t for t in rule.targets if args.target in (None, t.name)]
    if not targets:
        unknown(f"category {args.category} has no target {args.target!r}"
                f"{_did_you_mean(args.target, [t.name for t in rule.targets])}")
        return notes
    if match is not None and any(t.kind != "sql" for t in targets):
        raise ConfigError("--match protects table rows; for S3 targets use --prefix")
    if args.prefix is not None and any(t.kind != "s3" for t in targets):
        raise ConfigError("--prefix protects S3 keys; for table rows use --match")
    for target in targets:
        if args.prefix is not None and not (args.prefix.startswith(target.prefix)
                                            or target.prefix.startswith(args.prefix)):
            unknown(f"--prefix {args.prefix!r} is outside target {target.name}'s prefix {target.prefix!r} "
                    f"(did you mean {target.prefix + args.prefix.lstrip('/')!r}?)")
        if match is not None:
            _check_hold_columns(target, match, unknown, notes,
                                target_named=args.target is not None or len(rule.targets) == 1)
    return notes


def _check_hold_columns(target, match: dict, unknown, notes: list[str], *, target_named: bool) -> None:
    """The match's columns against the live table when it is reachable, else against the rule."""
    import sqlalchemy as sa
    from sqlalchemy.exc import SQLAlchemyError

    from retention.connections import from_environment
    from retention.targets import Targets
    from retention.targets.sql.table import hold_match

    schema, _, name = target.table.rpartition(".")
    with Targets(from_environment) as targets:
        try:
            engine = targets.sql_engine(target.connection)
            table = sa.Table(name, sa.MetaData(), schema=schema or None, autoload_with=engine)
        except (ConfigError, SQLAlchemyError) as exc:
            why = str(getattr(exc, "orig", None) or exc).strip().splitlines()[0][:120]
            declared = dict.fromkeys([*target.key, target.age_column, *target.where])
            if target.anonymize:
                declared.update(dict.fromkeys([target.anonymize.marker, *target.anonymize.columns]))
            missing = [c for c in match if c not in declared]
            source = f"checked against the rule only: {target.location} is not reachable ({why})"
            if missing:
                unknown(f"target {target.name} declares no column {missing[0]!r} ({source})"
                        f"{_did_you_mean(missing[0], declared)}"
                        f"{'' if target_named else '; to hold rows of one target only, add --target'}",
                        "while it names a missing column, every run of the target stops")
            else:
                notes.append(f"{target.name}: columns {source}")
            return
        missing = [c for c in match if c not in table.c]
        if missing:
            unknown(f"table {target.location} has no column {missing[0]!r} (checked against the table)"
                    f"{_did_you_mean(missing[0], [c.name for c in table.c])}"
                    f"{'' if target_named else '; to hold rows of one target only, add --target'}",
                    "while it names a missing column, every run of the target stops")
            return
        for column, value in match.items():
            _check_match_type(target, table.c[column], value)
        exact = hold_match(table, match, engine.dialect.name)
        with engine.connect() as conn:
            held = conn.execute(sa.select(sa.func.count()).select_from(table).where(exact)).scalar_one()
            if held:
                notes.append(f"{target.name}: the hold protects {count(held, 'row')} of {target.location} now")
                return
            near = [sa.func.lower(sa.func.trim(table.c[c])) == v.strip().lower()
                    if isinstance(v, str) and isinstance(table.c[c].type, sa.String)
                    else table.c[c].is_not_distinct_from(v) for c, v in match.items()]
            columns = [table.c[c] for c in match]
            found = conn.execute(sa.select(*columns).where(*near).distinct().limit(5)).all()
    hint = ("; near matches (match is exact: case and spaces count): "
            + ", ".join(json.dumps(dict(zip(match, row)), default=str) for row in found)) if found else ""
    notes.append(f"{target.name}: the hold matches no row of {target.location} now{hint}")


def _check_match_type(target, column, value) -> None:
    """A value of the column's kind: PostgreSQL refuses '42' against an integer, MariaDB matches '042'."""
    from sqlalchemy import types as sqltypes

    if value is None:
        return
    if isinstance(column.type, sqltypes.String) and not isinstance(value, str):
        raise ConfigError(f"--match {column.name!r}: {target.location}.{column.name} holds text; "
                          f"give the value as a JSON string, e.g. {json.dumps(str(value))}")
    if isinstance(column.type, sqltypes.Integer) and (not isinstance(value, int) or isinstance(value, bool)):
        raise ConfigError(f"--match {column.name!r}: {target.location}.{column.name} holds integers; "
                          f"give a JSON number, e.g. 42, not {json.dumps(value)}")


def _did_you_mean(word: str, choices) -> str:
    """`` (did you mean 'x'?)`` when a choice is close, else the choices there are."""
    import difflib

    choices = sorted(choices)
    close = difflib.get_close_matches(word, choices, n=1)
    if close:
        return f" (did you mean {close[0]!r}?)"
    return f" (there are: {', '.join(choices)})" if choices else ""


def cmd_hold_list(args: argparse.Namespace) -> int:
    registry = _holds(args)
    now = registry.now()  # a dated hold lapses by the clock, so "in force" is judged by it too
    holds = registry.list(category=args.category, include_released=args.all)
    if not args.all:
        holds = [h for h in holds if h.in_force(now)]
    if args.json:
        print(json.dumps([h.__dict__ | {"until": h.until.isoformat() if h.until else None, "state": h.state(now)}
                          for h in holds], indent=2))
        return EXIT_OK
    if not holds:
        print("No holds in force." if not args.all else "No holds.")
        return EXIT_OK
    rows = []
    for h in holds:
        scope = json.dumps(h.match, sort_keys=True) if h.match else (f"prefix {h.prefix}" if h.prefix else "everything")
        state = h.state(now)
        rows.append([h.id, h.case_id, h.category, h.target or "(all)", scope, h.until or "", state,
                     h.placed_at[:10], h.placed_by, h.reason])
    print(table(["ID", "CASE", "CATEGORY", "TARGET", "RECORDS", "UNTIL", "STATE", "PLACED", "BY", "REASON"],
                rows, right=(0,)))
    return EXIT_OK


def cmd_hold_release(args: argparse.Namespace) -> int:
    hold = _holds(args).release(args.id, reason=args.reason)
    print(f"released {hold.describe()}; the next run purges what it protected (if expired)")
    return EXIT_OK


def cmd_status(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.rules.models import load_rules
    from retention.run.status import retention_status
    from retention.targets import Targets

    rules = load_rules(args.rules, category=args.category)
    now = args.as_of or _now()
    engine = open_audit(from_environment, args.audit)
    skipped: list[str] = []
    with Targets(from_environment) as targets:
        report = retention_status(rules, engine, targets, now=now, skipped=skipped)
    for note in skipped:
        _err(f"! {note}")
    if args.json:
        print(json.dumps([r.to_dict() for r in report], indent=2))
    else:
        rows = [[r.category, r.target, r.last_status or "never run", moment(r.last_certified) if r.last_certified else "",
                 "?" if r.expired is None else f"{r.expired:,}", "?" if r.held is None else f"{r.held:,}",
                 "?" if r.error else r.lag_text, "UNKNOWN" if r.error else "ok" if r.healthy else "BEHIND",
                 r.error or ""] for r in report]
        print(table(["CATEGORY", "TARGET", "LAST RESULT", "CERTIFIED", "OVERDUE", "HELD", "OLDEST OVERDUE BY", "STATE",
                     "ERROR"], rows, right=(4, 5, 6)))
    return EXIT_OK if all(r.healthy for r in report) else EXIT_FAILED


def cmd_certificates(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.evidence.chain import read_certificates

    engine = open_audit(from_environment, args.audit)
    if args.seq is not None:
        certificate = next((c for c in read_certificates(engine, seq=args.seq)), None)
        if certificate is None:
            _err(f"no certificate with seq {args.seq}")
            return EXIT_FAILED
        shown = certificate.payload if args.json and certificate.problem is None else _described(certificate)
        if shown is None:
            _err(f"certificate {args.seq} is unreadable: {_unreadable(certificate)}; run `retention verify`")
            return EXIT_FAILED
        print(shown)
        return EXIT_OK
    limit = args.limit if args.limit is not None else (0 if args.since or args.until else 50)
    certificates = list(read_certificates(engine, category=args.category, newest_first=True,
                                          limit=limit or None, since=args.since, until=args.until))
    certificates.reverse()
    if args.json:
        for certificate in certificates:
            if certificate.problem is None:
                print(certificate.payload)
            else:  # still one JSON object a line
                print(json.dumps({"seq": certificate.seq if isinstance(certificate.seq, int) else str(certificate.seq),
                                  "unreadable": True, "problem": certificate.problem}))
        return EXIT_OK
    if not certificates:
        print("No certificates yet.")
        return EXIT_OK
    rows, unreadable = [], 0
    for c in certificates:
        row = _listed(c)
        if row is None:  # shown, not skipped: a planted row is news to whoever reviews the listing
            unreadable += 1
            row = [str(c.seq)[:20], "", str(c.category)[:63], "unreadable", "", "", "", "", str(c.run_id)[:60], ""]
        rows.append(row)
    print(table(["SEQ", "ISSUED", "CATEGORY", "STATUS", "PURGED", "HELD", "FAILED", "AS OF", "RUN", "HASH"],
                rows, right=(0, 4, 5, 6)))
    if unreadable:
        _err(f"! {count(unreadable, 'row')} could not be read as certificates: `retention certificates --seq N` "
             "says why, `retention verify` names the first")
    return EXIT_OK


def _listed(c) -> list | None:
    """A certificate's row in the listing; None when its row or payload cannot be read."""
    if c.problem is not None:
        return None
    try:
        totals = c.data.get("totals", {})
        uncounted = totals.get("uncounted")  # the plan failed: matched and failed are not counts
        return [
            c.seq, moment(c.issued_at), c.category, f"{c.status} (plan)" if uncounted else c.status, f"{c.deleted:,}",
            f"{totals.get('held', 0):,}", "?" if uncounted else f"{totals.get('failed', 0):,}",
            c.data.get("as_of", "")[:19] + "Z",
            c.run_id, c.entry_hash[:12],
        ]
    except (AttributeError, KeyError, TypeError, ValueError):
        return None


def _described(certificate) -> str | None:
    """A certificate in full; None when its row or payload cannot be read."""
    if certificate.problem is not None:
        return None
    try:
        return describe_certificate(certificate)
    except (AttributeError, KeyError, TypeError, ValueError, IndexError):
        return None


def _unreadable(certificate) -> str:
    return certificate.problem or "its payload is JSON, but not a certificate as retention writes them"


def cmd_verify(args: argparse.Namespace) -> int:
    from retention.aws import s3_client_from_environment
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.evidence.chain import Verification, count_certificates, verify_chain
    from retention.evidence.checkpoints import (
        CHECKPOINTS_ENV,
        CheckpointError,
        NoCheckpoints,
        log_identity,
        open_store,
        read_all,
    )

    keys = _trusted_keys(args)
    origin = log_identity(args.log_id)

    checkpoints = {}
    engine = open_audit(from_environment, args.audit)
    try:
        stores = [open_store(where, s3_client_from_environment, args.checkpoint_connection)
                  for where in args.checkpoint]
        checkpoints = read_all(stores, keys, origin)
    except NoCheckpoints as exc:
        # Before the first certificate there is nothing to checkpoint; after it, an empty store is a loss.
        result = Verification(0, None, None, reason=None if count_certificates(engine) == 0 else str(exc))
    except CheckpointError as exc:
        result = Verification(0, None, None, reason=str(exc))
    else:
        result = verify_chain(engine, keys, checkpoints)
    archives = None
    if args.archives and result.ok:
        archives = _check_archives(engine, s3_client_from_environment(args.archive_connection))
        if archives["problem"]:
            result = dataclasses.replace(result, bad_seq=archives["bad_seq"], reason=archives["problem"])
    newest = max(checkpoints) if checkpoints else None
    # A tail cut after the newest checkpoint would go unseen: say how much is exposed.
    unanchored = max((result.head_seq or 0) - newest, 0) if newest is not None and result.ok else None
    if args.json:
        print(json.dumps({
            "ok": result.ok, "checked": result.checked, "head_seq": result.head_seq,
            "head_hash": result.head_hash, "bad_seq": result.bad_seq, "reason": result.reason,
            "checkpoints": len(checkpoints), "newest_checkpoint": newest, "archives": archives,
            "not_checkpointed": unanchored,
        }))
    elif result.ok:
        if result.checked == 0:
            print("✓ no certificates to verify yet")
        else:
            print(f"✓ {count(result.checked, 'certificate')} verified: every signature valid "
                  f"({len(result.key_ids)} key{'s' if len(result.key_ids) != 1 else ''}), "
                  f"seq 1–{result.head_seq} without gaps, hash chain intact")
            print(f"  head: seq {result.head_seq} {result.head_hash}")
            if checkpoints:
                print(f"  {count(len(checkpoints), 'signed checkpoint')} agree with the chain; the newest, "
                      f"seq {newest}, shows no certificate up to it was removed")
                print(f"  ({checkpoints[newest].source})")
                if unanchored:
                    span = f"{newest + 1}" if unanchored == 1 else f"{newest + 1}–{result.head_seq}"
                    print(f"  {count(unanchored, 'certificate')} not yet checkpointed (seq {span}): "
                          f"a removed tail past seq {newest} would not show; `retention checkpoint` anchors them")
            else:
                print("  (no --checkpoint given: a removed tail is caught only against the signed checkpoints "
                      f"runs write outside the database when {CHECKPOINTS_ENV} is set)")
            if archives is not None:
                print(f"  archives of {count(archives['runs'], 'run')}: every manifest is the one its certificate "
                      f"records; {count(archives['objects'], 'object')} ({size(archives['bytes'])}) still there, "
                      "sizes and SHA-256 as archived")
    elif result.bad_seq is None:
        _err(f"✗ {result.reason}")
    else:
        _err(f"✗ certificate seq {result.bad_seq}: {result.reason}")
        if result.checked:
            _err(f"  seq 1–{result.head_seq} verified before it")
    return EXIT_OK if result.ok else EXIT_FAILED


def _trusted_keys(args: argparse.Namespace):
    """The keyring (each key for its seq range), or PEM public keys (any key for any seq)."""
    from retention.evidence.signing import PublicKeys

    if args.public_key and args.keyring:
        raise ConfigError("give --keyring (or $RETENTION_KEYRING) or --public-key, not both: the keyring's "
                          "seq ranges would not bind keys given beside it")
    if args.keyring:
        return PublicKeys.from_keyring(args.keyring)
    if not args.public_key:
        raise ConfigError("say which keys to trust: --keyring FILE (each key with the seqs it may sign) "
                          "or --public-key PEM")
    return PublicKeys.from_pem_files(args.public_key)


def _check_archives(engine, client) -> dict:
    """Each archive run's manifest against its certificate, and its objects against the manifest."""
    from botocore.exceptions import ClientError

    from retention.archive.restore import check_archive, read_manifest
    from retention.aws import s3_error_code
    from retention.evidence.chain import read_certificates

    figures = {"runs": 0, "objects": 0, "bytes": 0, "problem": None, "bad_seq": None}
    for certificate in read_certificates(engine):
        recorded = certificate.data.get("archive")
        if not recorded:
            continue
        try:
            manifest = read_manifest(recorded["manifest"], lambda: client, sha256=recorded["sha256"])
        except TerminalError as exc:
            return figures | {"problem": f"archive: {exc}", "bad_seq": certificate.seq}
        except ClientError as exc:
            return figures | {"problem": f"archive: manifest {recorded['manifest']} cannot be read "
                                         f"({s3_error_code(exc)})", "bad_seq": certificate.seq}
        checked = check_archive(manifest, client)
        figures["runs"] += 1
        figures["objects"] += checked.objects
        figures["bytes"] += checked.bytes
        if checked.problems:
            more = f" (and {len(checked.problems) - 1} more)" if len(checked.problems) > 1 else ""
            return figures | {"problem": f"archive: {checked.problems[0]}{more}", "bad_seq": certificate.seq}
    return figures


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Anchor the chain as it stands (after enabling checkpoints on an existing chain, say).

    The chain is verified first, with the signing key's own public key: a checkpoint must
    never vouch for a chain that does not verify.
    """
    from retention.aws import s3_client_from_environment
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.evidence.chain import verify_chain
    from retention.evidence.checkpoints import CHECKPOINTS_ENV, log_identity, open_store, publish
    from retention.evidence.signing import PublicKeys, Signer

    location = args.to or os.environ.get(CHECKPOINTS_ENV)
    if not location:
        raise ConfigError(f"say where with --to, or set {CHECKPOINTS_ENV}")
    origin = log_identity(args.log_id)
    signer = Signer.from_environment()
    if args.keyring and not args.public_key:
        keys = PublicKeys.from_keyring(args.keyring)
        if signer.key_id not in keys.by_id:
            raise ConfigError(f"the signing key ({signer.key_id[:16]}…) is not in the keyring {args.keyring}: "
                              "add its line (`retention keygen` printed it) before it signs anything")
    else:
        keys = PublicKeys({**PublicKeys.from_pem_files(args.public_key).by_id,
                           signer.key_id: signer.private_key.public_key()})
    engine = open_audit(from_environment, args.audit)
    result = verify_chain(engine, keys)
    if not result.ok:
        _err(f"✗ not signing a chain that does not verify: certificate seq {result.bad_seq}: {result.reason}")
        return EXIT_FAILED
    if not result.checked:
        print("no certificates yet: nothing to checkpoint")
        return EXIT_OK
    store = open_store(location, s3_client_from_environment, args.checkpoint_connection)
    name = publish(store, signer, result.head_seq, result.head_hash, origin)
    print(f"signed checkpoint of seq {result.head_seq} ({result.head_hash[:12]}) written to {store.location}/{name}")
    return EXIT_OK


def cmd_restore(args: argparse.Namespace) -> int:
    from retention.archive.restore import certified_manifest, restore
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.evidence.signing import PublicKeys
    from retention.rules.models import _table_name
    from retention.targets import Targets

    keys = PublicKeys.from_pem_files(args.public_key) if args.public_key else None
    conn_id, _, table = args.into.partition(".")
    if table and not args.into.startswith("s3://"):
        try:
            _table_name(table)
        except ValueError as exc:
            raise ConfigError(f"--into {args.into}: {exc}") from None
    engine = open_audit(from_environment, args.audit)
    with Targets(from_environment) as targets:
        client = targets.s3_client(args.archive_connection)
        manifest, certificate = certified_manifest(engine, args.manifest, lambda: client, seq=args.seq, keys=keys)
        if args.into.startswith("s3://"):
            return _restore_objects(manifest, client, args.into)
        result = restore(manifest, client, targets.sql_engine(conn_id), certificate=certificate,
                         table=table or None)
    print(table_rows(result.tables, conn_id))
    return EXIT_OK


def _restore_objects(manifest: dict, client, into: str) -> int:
    from retention.archive.restore import THAW_DAYS, restore_objects

    result = restore_objects(manifest, client, into)
    print(table(["OBJECTS", "COUNT"], [["restored now", f"{len(result.restored):,}"],
                                       ["already back", f"{len(result.present):,}"],
                                       ["thawing (GLACIER / DEEP_ARCHIVE)", f"{len(result.thawing):,}"],
                                       ["left alone: another object is there", f"{len(result.conflicts):,}"]],
                right=(1,)))
    for where in result.conflicts:
        _err(f"  conflict: {where} holds a different object; move it, or restore under another prefix")
    if result.thawing:
        _err(f"S3 is thawing {count(len(result.thawing), 'object')} (hours for Standard retrieval; they stay "
             f"readable {THAW_DAYS} days): run the same command again later to copy them back.")
    return EXIT_OK if result.complete else EXIT_FAILED


def table_rows(tables: dict[str, int], conn_id: str) -> str:
    """The restore summary."""
    return table(["TABLE", "ROWS RESTORED"], [[f"{conn_id}:{name}", f"{n:,}"] for name, n in tables.items()],
                 right=(1,))


def cmd_keygen(args: argparse.Namespace) -> int:
    from retention.evidence.signing import SIGNING_KEY_ENV, Signer, generate_keypair, keyring_line

    private_path, public_path = generate_keypair(args.out)
    print(f"private key: {private_path} (keep secret; set {SIGNING_KEY_ENV}={private_path})")
    print(f"public key:  {public_path} (give to verifiers: retention verify --public-key {public_path})")
    line = keyring_line(Signer.from_pem_file(private_path).private_key.public_key())
    print(f"keyring line: {line}")
    print("  (FIRST_SEQ: the seq of the first certificate it signs, the chain's head + 1; end the previous "
          "key's line with its last seq)")
    return EXIT_OK


# -- helpers -------------------------------------------------------------------------------


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


class _Progress:
    """Prints a line per target at most every two seconds, and one when a target finishes."""

    def __init__(self, interval: float = 2.0):
        self.interval = interval
        self.started: dict[str, float] = {}
        self.shown = 0.0

    def __call__(self, target: str, deleted: int, matched: int | None, rows: int, seconds: float) -> None:
        now = time.monotonic()
        self.started.setdefault(target, now - seconds)
        if now - self.shown < self.interval and (matched is None or deleted < matched):
            return
        self.shown = now
        share = f" ({deleted / matched:.0%})" if matched else ""
        elapsed = now - self.started[target]
        print(f"  {target}: {deleted:,}{' of ' + format(matched, ',') if matched else ''} purged{share}, "
              f"{rate(deleted, elapsed)}, last batch {rows:,} rows in {seconds * 1000:.0f} ms",
              file=sys.stderr)


def cmd_airflow_sync_pools(args: argparse.Namespace) -> int:
    """Write the pools the rules need through Airflow's own ``airflow pools import``."""
    import importlib.util
    import subprocess
    import tempfile

    from retention.interfaces.pools import (
        import_document,
        load_pool_config,
        load_pool_rules,
        required_pools,
        rule_connections,
    )

    rules = load_pool_rules(args.rules)
    used = sorted({c for r in rules for c in rule_connections(r.rule)})
    pools = required_pools(rules, load_pool_config(args.rules, known=used))
    document = import_document(pools)
    if args.json:
        print(json.dumps(document, indent=2))
    else:
        print(table(["pool", "slots", "used by"], [[p.name, str(p.slots), p.description] for p in pools]))
    if args.dry_run:
        print("Dry run: no pool was changed.", file=sys.stderr)
        return EXIT_OK
    if importlib.util.find_spec("airflow") is None:
        raise ConfigError("Airflow is not installed in this environment: run sync-pools where Airflow runs "
                          "(e.g. the airflow-init container), or use --json and `airflow pools import`")
    with tempfile.NamedTemporaryFile("w", suffix=".json", prefix="retention-pools-") as handle:
        json.dump(document, handle)
        handle.flush()
        done = subprocess.run([sys.executable, "-m", "airflow", "pools", "import", handle.name],
                              capture_output=True, text=True, env=os.environ.copy())
    if done.returncode != 0:
        last = (done.stderr.strip() or done.stdout.strip() or "no output").splitlines()[-1][:300]
        raise RetentionError(f"`airflow pools import` failed (exit {done.returncode}): {last}; "
                             "no retention pool may exist yet, and purge tasks wait for theirs")
    print(f"✓ {count(len(pools), 'pool')} set in Airflow.", file=sys.stderr)
    return EXIT_OK


def _as_of(text: str) -> datetime:
    try:
        if len(text) == 10:
            day = date.fromisoformat(text)
            return datetime(day.year, day.month, day.day, tzinfo=timezone.utc)
        value = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO 8601 date or timestamp") from None
    if value.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no time zone; add Z or an offset such as +02:00")
    return value.astimezone(timezone.utc)


def _what_if(as_of: datetime) -> None:
    """A plan may look ahead (it touches nothing) but not before 1970; say a future one is a what-if."""
    from retention.run.runner import check_as_of

    now = _now()
    try:
        check_as_of(as_of, now)
    except InvalidAsOf:
        if as_of <= now:
            raise
        print(f"(as of {moment(as_of)} is in the future: a what-if; `retention run` refuses a future --as-of)",
              file=sys.stderr)


def _day(text: str) -> date:
    try:
        return date.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a date; write YYYY-MM-DD, e.g. 2027-01-31") from None


def _now() -> datetime:
    return datetime.now(timezone.utc)


def _redacted(record: logging.LogRecord) -> bool:
    """A logging filter: the record's message with every known secret scrubbed."""
    from retention.connections import redact

    message = record.getMessage()
    cleaned = redact(message)
    if cleaned != message:
        record.msg, record.args = cleaned, None
    return True


def _err(message: str) -> None:
    from retention.connections import redact

    print(redact(message), file=sys.stderr)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())

