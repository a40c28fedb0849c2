"""``restore``: put an archive back."""

from __future__ import annotations

import argparse
from typing import TYPE_CHECKING, Any

from retention.errors import ConfigError
from retention.interfaces.cli.options import EXIT_FAILED, EXIT_OK, _err, audit_option, id_argument
from retention.interfaces.render import count, table

if TYPE_CHECKING:
    from retention.archive.manifest import Manifest


def register(commands: argparse._SubParsersAction) -> None:
    """The ``restore`` command."""
    cmd = commands.add_parser("restore", help="put an archive back: rows into a database, objects into a bucket")
    cmd.add_argument("manifest", metavar="MANIFEST", nargs="?",
                     help="s3://bucket/key of a run's manifest.json, or a file (default with --seq: the one "
                          "its certificate records); only a manifest a certificate records is restored")
    cmd.add_argument("--seq", type=id_argument, metavar="N", help="the certificate that records the manifest "
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


def cmd_restore(args: argparse.Namespace) -> int:
    """Put the archive a certificate records back: rows into a database, or objects into a bucket."""
    from retention.archive.restore import certified_manifest, restore
    from retention.connections import from_environment
    from retention.evidence.audit import open_audit
    from retention.evidence.signing import PublicKeys
    from retention.rules.fields import parse_table_name
    from retention.targets import Targets

    keys = PublicKeys.from_pem_files(args.public_key) if args.public_key else None
    conn_id, _, table = args.into.partition(".")
    if table and not args.into.startswith("s3://"):
        try:
            parse_table_name(table)
        except ValueError as exc:
            raise ConfigError(f"--into {args.into}: {exc}") from None
    engine = open_audit(from_environment, args.audit)
    with Targets(from_environment) as targets:
        # The S3 client only when the manifest is read: --seq is checked (it exists, it records an
        # archive) before the archive's connection is asked for.
        manifest, certificate = certified_manifest(engine, args.manifest,
                                                   lambda: targets.s3_client(args.archive_connection),
                                                   seq=args.seq, keys=keys)
        client = targets.s3_client(args.archive_connection)
        if args.into.startswith("s3://"):
            return _restore_objects(manifest, client, args.into)
        result = restore(manifest, client, targets.sql_engine(conn_id), certificate=certificate,
                         table=table or None)
    print(table_rows(result.tables, conn_id))
    from retention.interfaces.cli.erase import warn_erased_after_restore

    warn_erased_after_restore(engine, certificate.category)
    return EXIT_OK


def _restore_objects(manifest: Manifest, client: Any, into: str) -> int:
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
