"""``hold add|list|release``, and the checks that a new hold names what exists."""

from __future__ import annotations

import argparse
import json
import os

from retention.errors import ConfigError, RuleError
from retention.interfaces.cli.options import DEFAULT_RULES_DIR, EXIT_OK, _day, _err, audit_option, id_argument
from retention.interfaces.render import count, table


def register(commands: argparse._SubParsersAction) -> None:
    """The ``hold`` command and its actions."""
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
    release.add_argument("id", type=id_argument)
    release.add_argument("--reason", required=True, metavar="TEXT")
    release.set_defaults(handler=cmd_hold_release)


def _holds(args: argparse.Namespace, *, create: bool = True):
    """The legal holds; ``create=False`` (listing them): a database without audit tables is
    refused, and none are created."""
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.holds import HoldRegistry

    return HoldRegistry(open_audit(from_environment, args.audit, create=create))


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
    from retention.rules.loader import load_rules

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
        if args.prefix is not None and target.kind == "s3" and not (args.prefix.startswith(target.prefix)
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
    from retention.targets.sql.predicates import hold_match

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
    registry = _holds(args, create=False)
    now = registry.now()  # a dated hold lapses by the clock, so "in force" is judged by it too
    holds = registry.find(category=args.category, include_released=args.all)
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
