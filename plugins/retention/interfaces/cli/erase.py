"""``erase request|list|plan``: erasure requests of data subjects (GDPR Art. 17)."""

from __future__ import annotations

import argparse
import json
import os
import sys
from typing import TYPE_CHECKING

from retention.errors import ConfigError, RetentionError
from retention.interfaces.cli.options import DEFAULT_RULES_DIR, EXIT_FAILED, EXIT_OK, _day, _err, audit_option
from retention.interfaces.render import table

RECEIPT_LIMIT, HASH_KEY_LIMIT = 16 << 20, 64 << 10
"""The most a receipt (one certificate and its signature) or a hash key file holds: past it, refused unread."""

if TYPE_CHECKING:
    from retention.erasure_requests import ErasureRegistry


def register(commands: argparse._SubParsersAction) -> None:
    """The ``erase`` command and its actions."""
    cmd = commands.add_parser("erase", help="file, plan and list erasure requests of data subjects")
    erase = cmd.add_subparsers(dest="erase_command", required=True, metavar="ACTION")
    request = erase.add_parser("request", help="file a request; the identity is kept only as an HMAC")
    _common(request)
    request.add_argument("--subject", required=True, metavar="TYPE=VALUE", help="e.g. email=ana@example.com")
    request.add_argument("--request", required=True, metavar="ID", help="the request's id, e.g. DSR-2026-0042")
    request.add_argument("--reason", default="erasure-requested", metavar="TEXT", help="e.g. consent-withdrawn")
    request.add_argument("--due", type=_day, metavar="DATE", help="default: received + due_within of _subjects.yaml")
    request.set_defaults(handler=cmd_erase_request)
    listing = erase.add_parser("list", help="requests, oldest first")
    audit_option(listing)
    listing.add_argument("--state", choices=["pending", "in_progress", "done", "partial", "denied"])
    listing.add_argument("--overdue", action="store_true", help="only requests past their due date, unanswered")
    listing.add_argument("--json", action="store_true")
    listing.set_defaults(handler=cmd_erase_list)
    plan = erase.add_parser("plan", help="what erasing a request's subject would do; changes nothing")
    _common(plan)
    plan.add_argument("id", metavar="ID")
    plan.add_argument("--json", action="store_true")
    plan.set_defaults(handler=cmd_erase_plan)
    run = erase.add_parser("run", help="erase one request's subject, or every pending request's, and certify it")
    _common(run)
    run.add_argument("id", nargs="?", metavar="ID", help="default: every pending (or interrupted) request")
    run.add_argument("--json", action="store_true")
    run.set_defaults(handler=cmd_erase_run)
    replay = erase.add_parser("replay", help="after a restore: erase again the subjects erased since DATE")
    _common(replay)
    replay.add_argument("--since", required=True, type=_day, metavar="DATE",
                        help="the day the restored backup or archive was taken")
    replay.set_defaults(handler=cmd_erase_replay)
    receipt = erase.add_parser("receipt", help="the signed receipt of a request, as self-contained JSON")
    audit_option(receipt)
    receipt.add_argument("id", metavar="ID")
    receipt.add_argument("--out", metavar="FILE", help="write it here (default: stdout)")
    receipt.set_defaults(handler=cmd_erase_receipt)
    check = commands.add_parser("verify-receipt", help="check an erasure receipt offline against a public key")
    check.add_argument("file", metavar="FILE")
    check.add_argument("--public-key", required=True, metavar="PEM")
    check.add_argument("--identity", metavar="TYPE=VALUE", help="also check the subject is this identity")
    check.add_argument("--hash-key-file", metavar="FILE", help="the hash key (RETENTION_HASH_KEY), with --identity")
    check.set_defaults(handler=cmd_verify_receipt)


def _common(cmd: argparse.ArgumentParser) -> None:
    audit_option(cmd)
    cmd.add_argument("--rules", default=os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR), metavar="DIR",
                     help="rules directory, with _subjects.yaml")


def _registry(args: argparse.Namespace, *, create: bool = True) -> ErasureRegistry:
    """The requests in the audit database; ``create=False`` (a command that only reads them): a
    database without audit tables is refused, and none are created."""
    from retention.connections import from_environment
    from retention.erasure_requests import ErasureRegistry
    from retention.evidence.audit import open_audit

    return ErasureRegistry(open_audit(from_environment, args.audit, create=create))


def _subjects(rules_dir: str):
    from retention.rules.subjects import SUBJECTS_FILE, load_subjects

    subjects = load_subjects(rules_dir)
    if subjects is None:
        raise ConfigError(f"there is no {SUBJECTS_FILE} in {rules_dir}: declare the identity types requests may name")
    return subjects


def cmd_erase_request(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.erasure_requests import SubjectKey
    from retention.run.erase import file_erasure_request
    from retention.targets import Targets

    subjects = _subjects(args.rules)
    key = SubjectKey.from_environment()
    with Targets(from_environment) as targets:
        filed = file_erasure_request(_registry(args), subjects, subject=args.subject, request_id=args.request,
                                     reason=args.reason, due=args.due, targets=targets, key=key)
    resolved = len(filed.identities) - 1
    print(f"filed {filed.request_id}: {filed.subject_type} (kept as HMAC {filed.subject_hmac[:12]}…), resolved to "
          f"{resolved} further identit{'y' if resolved == 1 else 'ies'}; due {filed.due}")
    print(f"  `retention erase plan {filed.request_id}` shows what would be erased")
    return EXIT_OK


def cmd_erase_list(args: argparse.Namespace) -> int:
    registry = _registry(args, create=False)
    requests = registry.find(state=args.state, overdue=args.overdue)
    today = registry.today()
    if args.json:
        print(json.dumps([r.__dict__ | {"due": r.due.isoformat(), "identities": len(r.identities),
                                        "overdue": r.overdue(today)} for r in requests], indent=2))
        return EXIT_OK
    if not requests:
        print("No erasure requests." if not (args.state or args.overdue) else "No such requests.")
        return EXIT_OK
    rows = [[r.request_id, r.state, r.received_at[:10], r.due, "OVERDUE" if r.overdue(today) else "",
             r.reason, r.subject_type] for r in requests]
    print(table(["REQUEST", "STATE", "RECEIVED", "DUE", "", "REASON", "SUBJECT"], rows))
    return EXIT_OK


def cmd_erase_plan(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.erasure_requests import SubjectKey
    from retention.holds import HoldRegistry
    from retention.plan.erasure import build_erasure_plan
    from retention.rules.loader import load_rules
    from retention.targets import Targets

    registry = _registry(args, create=False)
    request = registry.get(args.id)
    rules = load_rules(args.rules)
    with Targets(from_environment) as targets:
        plan = build_erasure_plan(request, rules, targets, SubjectKey.from_environment(),
                                  holds=HoldRegistry(registry.engine))
    if args.json:
        print(json.dumps(plan.to_dict(), indent=2))
        return EXIT_OK
    print(f"{request.request_id} ({request.state}, due {request.due}): {request.subject_type} "
          f"HMAC {request.subject_hmac[:12]}…")
    print(table(["TARGET", "LOCATION", "WHAT"], [[s.key, s.location, s.describe()] for s in plan.steps]))
    return EXIT_OK


def cmd_erase_run(args: argparse.Namespace) -> int:
    from retention.holds import HoldRegistry
    from retention.run.erase import pending_requests

    registry = _registry(args)
    due = [args.id] if args.id else pending_requests(registry, HoldRegistry(registry.engine))
    return _erase(args, registry, due, replay=False)


def cmd_erase_replay(args: argparse.Namespace) -> int:
    from retention.run.erase import replayable_requests

    registry = _registry(args)
    ids = replayable_requests(registry, args.since)
    print(f"replaying {len(ids)} erasure request(s) answered since {args.since}")
    return _erase(args, registry, ids, replay=True)


def _erase(args: argparse.Namespace, registry: ErasureRegistry, ids: list[str], *, replay: bool) -> int:
    from retention.connections import from_environment
    from retention.erasure_requests import SubjectKey
    from retention.evidence.signing import Signer
    from retention.holds import HoldRegistry
    from retention.rules.loader import load_rules
    from retention.run.erase import erase_request
    from retention.targets import Targets

    rules = load_rules(args.rules)
    key, signer = SubjectKey.from_environment(), Signer.from_environment()
    results = []
    with Targets(from_environment) as targets:
        for request_id in ids:
            results.append(erase_request(request_id, rules=rules, registry=registry, holds=HoldRegistry(registry.engine),
                                         targets=targets, key=key, signer=signer, replay=replay))
    if getattr(args, "json", False):
        print(json.dumps([{"request": r.request.request_id, "state": r.request.state,
                           "certificate": r.certificate.data if r.certificate else None} for r in results], indent=2))
        return _partial_exit(results, quiet=True)
    if not results:
        print("No pending erasure requests.")
    for result in results:
        if result.certificate is None:
            print(f"{result.request.request_id}: already {result.request.state}; nothing to do")
            continue
        print(f"{result.request.request_id}: {result.request.state}, certificate {result.certificate.seq}")
        for entry in result.certificate.data["targets"]:
            print(f"  {entry['name']:<32} {_outcome_text(entry)}")
    return _partial_exit(results)


def _partial_exit(results: list, *, quiet: bool = False) -> int:
    """Say why each erasure ended partial; EXIT_FAILED when a target was refused or failed (the
    subject's records are not all gone and someone must look), EXIT_OK when only legal holds kept
    records (the hold beats the erasure, as held rows stay in a complete purge; the next erase
    run takes them once the hold is released). ``quiet``: the reasons go to stderr only."""
    from retention.interfaces.render import shown
    from retention.run.erase import failed_reasons, held_reasons

    failed = False
    for result in results:
        certificate = result.certificate
        if certificate is None or certificate.status == "done":
            continue
        head = f"{result.request.request_id}: erasure {certificate.status} (certificate {certificate.seq}): "
        failures = failed_reasons(certificate)
        if failures:
            failed = True
            _err(head + "; ".join(failures + held_reasons(certificate)))
            continue
        kept = held_reasons(certificate) or ["not every target finished"]
        print(shown(head + "; ".join(kept) + "; the next erase run takes them once the hold is released"),
              file=sys.stderr if quiet else sys.stdout)
    return EXIT_FAILED if failed else EXIT_OK


def _outcome_text(entry: dict) -> str:
    """One target of an erasure certificate, in words."""
    outcome, holds = entry["outcome"], entry.get("holds", [])
    parts = [{"erased": f"erased {entry['deleted']}", "anonymized": f"anonymized {entry['anonymized']}"}.get(
        outcome, entry.get("reason") or entry.get("error") or ("" if holds else outcome.replace("_", " ")))]
    if holds:
        parts.append(f"{entry['held']} retained under legal hold {', '.join(h['case'] for h in holds)}")
    return "; ".join(p for p in parts if p)


def cmd_erase_receipt(args: argparse.Namespace) -> int:
    from retention.evidence.chain import read_certificates
    from retention.evidence.receipt import build_receipt

    registry = _registry(args, create=False)
    request = registry.get(args.id)
    if request.certificate_seq is None:
        raise ConfigError(f"request {request.request_id} is {request.state}: it has no certificate yet "
                          f"(`retention erase run {request.request_id}`)")
    certificate = next(read_certificates(registry.engine, seq=request.certificate_seq), None)
    try:
        if certificate is None or certificate.problem is not None:
            raise ValueError(f"certificate {request.certificate_seq} is "
                             + ("missing" if certificate is None else f"unreadable: {certificate.problem}"))
        text = json.dumps(build_receipt(certificate), indent=2, sort_keys=True) + "\n"
    except ValueError as exc:  # the audit database was edited: no receipt vouches for what it holds now
        raise RetentionError(f"request {request.request_id}: {exc}; run `retention verify`") from None
    if args.out:
        try:
            with open(args.out, "w", encoding="utf-8") as stream:
                stream.write(text)
        except OSError as exc:
            raise ConfigError(f"--out {args.out}: cannot write ({exc.strerror or type(exc).__name__}); "
                              "choose a writable path") from None
        print(f"wrote the receipt of {request.request_id} (certificate {certificate.seq}) to {args.out}")
    else:
        print(text, end="")
    return EXIT_OK


def cmd_verify_receipt(args: argparse.Namespace) -> int:
    from retention.evidence.receipt import check_receipt
    from retention.evidence.signing import PublicKeys, read_local_file

    receipt = _read_receipt(args.file)
    public_key = next(iter(PublicKeys.from_pem_files([args.public_key]).by_id.values()))
    identity, hash_key = None, None
    if args.identity:
        kind, sep, value = args.identity.partition("=")
        if not sep or not args.hash_key_file:
            raise ConfigError("--identity takes TYPE=VALUE and needs --hash-key-file")
        hash_key = read_local_file(args.hash_key_file, what="--hash-key-file", limit=HASH_KEY_LIMIT).rstrip(b"\r\n")
        identity = (kind.strip(), value)
    check = check_receipt(receipt, public_key, identity=identity, hash_key=hash_key)
    if not check.ok:
        for problem in check.problems:
            _err(f"✗ {problem}")
        return EXIT_FAILED
    payload = check.payload
    print(f"✓ receipt of {payload['request']} verifies: certificate {payload['seq']}, {payload['status']}, "
          f"signed by {payload['key_id'][:16]}…" + ("; the subject is the identity given" if check.subject_checked else ""))
    for entry in payload["targets"]:
        print(f"  {entry['name']:<32} {_outcome_text(entry)}")
    return EXIT_OK


def _read_receipt(path: str):
    """The receipt at ``path`` as JSON; ConfigError naming the file (and the line) when it is not one."""
    from retention.evidence.signing import read_local_file

    data = read_local_file(path, what="receipt", limit=RECEIPT_LIMIT)
    try:
        return json.loads(data.decode("utf-8-sig"))
    except UnicodeDecodeError:
        raise ConfigError(f"receipt {path}: not UTF-8 text; give the JSON `retention erase receipt` wrote") from None
    except json.JSONDecodeError as exc:
        raise ConfigError(f"receipt {path}:{exc.lineno}: not JSON ({exc.msg} at column {exc.colno}); give the JSON "
                          "`retention erase receipt` wrote") from None
    except RecursionError:
        raise ConfigError(f"receipt {path}: nested too deeply to be a receipt") from None


def warn_erased_after_restore(engine, category: str, rules_dir: str | None = None) -> None:
    """After a restore: warn (stderr) when restored records of ``category`` belong to an erased subject."""
    from retention.connections import from_environment
    from retention.erasure_requests import HASH_KEY_ENV, ErasureRegistry, SubjectKey
    from retention.errors import RuleError
    from retention.rules.loader import load_rules
    from retention.run.erase import erased_records
    from retention.targets import Targets

    registry = ErasureRegistry(engine)
    if not any(r.state in ("done", "partial") for r in registry.find()):
        return
    if not os.environ.get(HASH_KEY_ENV):
        _err(f"warning: erased subjects' records may be among those restored; {HASH_KEY_ENV} is not set, "
             "so they were not looked for (`retention erase replay --since DATE` erases them again)")
        return
    try:
        rules = load_rules(rules_dir or os.environ.get("RETENTION_RULES_DIR", DEFAULT_RULES_DIR), category=category)
    except RuleError:
        _err("warning: the rules could not be read, so restored records of erased subjects were not looked for")
        return
    with Targets(from_environment) as targets:
        found = erased_records(rules, registry, targets, SubjectKey.from_environment())
    for step, records in sorted(found.items()):
        _err(f"warning: {step}: {records} restored record(s) belong to subjects erased on request; "
             "`retention erase replay --since DATE` (the day the archive was made) erases them again")
