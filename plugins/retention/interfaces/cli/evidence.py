"""``certificates``, ``verify`` and ``checkpoint``: reading and proving the certificate chain."""

from __future__ import annotations

import argparse
import json
import os

from retention.errors import ConfigError
from retention.interfaces.cli.options import (
    EXIT_FAILED,
    EXIT_OK,
    _err,
    audit_option,
    count_argument,
    id_argument,
    instant_argument,
)
from retention.interfaces.render import count, describe_certificate, moment, size, table


def register(commands: argparse._SubParsersAction) -> None:
    """The evidence commands: certificates, verify, checkpoint."""
    cmd = commands.add_parser("certificates", help="list purge certificates")
    audit_option(cmd)
    cmd.add_argument("--category")
    cmd.add_argument("--limit", type=count_argument, help="newest N (default 50, or all with --since/--until; 0 for all)")
    cmd.add_argument("--since", type=instant_argument, metavar="T", help="issued at or after T (a date, or a timestamp with zone)")
    cmd.add_argument("--until", type=instant_argument, metavar="T", help="issued before T")
    cmd.add_argument("--seq", type=id_argument, metavar="N", help="show certificate N in full: its targets, tables, "
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


def cmd_certificates(args: argparse.Namespace) -> int:
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.evidence.chain import read_certificates

    if args.since and args.until and args.until <= args.since:
        raise ConfigError(f"--until {args.until.isoformat()} is not after --since {args.since.isoformat()}: "
                          "no certificate can be issued in between")
    engine = open_audit(from_environment, args.audit, create=False)
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
            c.data["as_of"][:19] + "Z" if c.data.get("as_of") else "",  # an erasure has no AS OF
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
    from retention.evidence.checkpoints import CHECKPOINTS_ENV, log_identity
    from retention.evidence.stores import open_store
    from retention.interfaces.verification import verify_everything

    keys = _trusted_keys(args)
    engine = open_audit(from_environment, args.audit, create=False)
    stores = [open_store(where, s3_client_from_environment, args.checkpoint_connection) for where in args.checkpoint]
    found = verify_everything(
        engine, keys, stores, log_identity(args.log_id),
        archive_client=s3_client_from_environment(args.archive_connection) if args.archives else None)
    result, checkpoints, newest, unanchored = found.result, found.checkpoints, found.newest, found.unanchored
    archives = found.archives.to_dict() if found.archives is not None else None
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
            if checkpoints and newest is not None:
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


def cmd_checkpoint(args: argparse.Namespace) -> int:
    """Anchor the chain as it stands (after enabling checkpoints on an existing chain, say).

    The chain is verified first, with the signing key's own public key: a checkpoint must
    never vouch for a chain that does not verify.
    """
    from retention.aws import s3_client_from_environment
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.evidence.checkpoints import CHECKPOINTS_ENV, log_identity, publish
    from retention.evidence.signing import PublicKeys, Signer
    from retention.evidence.stores import open_store
    from retention.evidence.verify import verify_chain

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
    engine = open_audit(from_environment, args.audit, create=False)
    result = verify_chain(engine, keys)
    if not result.ok:
        _err(f"✗ not signing a chain that does not verify: certificate seq {result.bad_seq}: {result.reason}")
        return EXIT_FAILED
    if not result.checked:
        print("no certificates yet: nothing to checkpoint")
        return EXIT_OK
    assert result.head_seq is not None and result.head_hash is not None  # a verified chain of one or more has a head
    store = open_store(location, s3_client_from_environment, args.checkpoint_connection)
    name = publish(store, signer, result.head_seq, result.head_hash, origin)
    print(f"signed checkpoint of seq {result.head_seq} ({result.head_hash[:12]}) written to {store.location}/{name}")
    return EXIT_OK
