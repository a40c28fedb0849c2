"""Restore: load archived rows back into a database, proving an archive is usable.

Reads a run's manifest, checks every object's SHA-256 against it, decodes rows with the
column codecs the manifest records, and inserts them (the target's table first, then
its children, so foreign keys hold) in chunked transactions.
"""

from __future__ import annotations

import hashlib
import json
import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from sqlalchemy import MetaData, Table, insert

from retention.archive import MANIFEST_TYPE, TableShape, decode_rows
from retention.errors import ConfigError, TerminalError

log = logging.getLogger(__name__)

CHUNK_ROWS = 5000


@dataclass(frozen=True)
class RestoreResult:
    """Rows put back, per table."""

    tables: dict[str, int]


def read_manifest(location: str, s3_client_for: Callable[[], Any]) -> dict[str, Any]:
    """A manifest from ``s3://bucket/key`` or a local file path."""
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        body = s3_client_for().get_object(Bucket=bucket, Key=key)["Body"].read()
    else:
        try:
            with open(location, "rb") as handle:
                body = handle.read()
        except OSError as exc:
            raise ConfigError(f"cannot read manifest {location}: {exc.strerror}") from None
    manifest = json.loads(body)
    if manifest.get("type") != MANIFEST_TYPE:
        raise ConfigError(f"{location} is not a retention archive manifest")
    return manifest


def restore(manifest: dict[str, Any], client: Any, engine, *, table: str | None = None) -> RestoreResult:
    """Insert every archived row of ``manifest`` into ``engine``'s database.

    ``table`` renames the manifest's first (parent) table; children keep their names.
    """
    depth = {name: info.get("depth", 0) for name, info in manifest["tables"].items()}
    if not depth:
        raise TerminalError("the manifest lists no table rows (an S3-object archive restores by copying objects)")
    parent = min(depth, key=depth.get)
    renames = {parent: table} if table else {}
    shapes = {name: TableShape(name, tuple(tuple(c) for c in info["columns"]))
              for name, info in manifest["tables"].items()}
    metadata = MetaData()
    reflected: dict[str, Table] = {}
    counts: dict[str, int] = {}
    # Parents before children, so foreign keys hold at every insert.
    order = sorted(manifest["objects"], key=lambda o: (depth[o["table"]], o["key"]))
    for obj in order:
        body = client.get_object(Bucket=manifest["bucket"], Key=obj["key"])["Body"].read()
        digest = hashlib.sha256(body).hexdigest()
        if digest != obj["sha256"] or len(body) != obj["bytes"]:
            raise TerminalError(f"archive object {obj['key']} does not match its manifest (sha256 {digest})")
        rows = decode_rows(shapes[obj["table"]], body, obj["format"])
        name = renames.get(obj["table"], obj["table"])
        if name not in reflected:
            schema, _, bare = name.rpartition(".")
            reflected[name] = Table(bare, metadata, schema=schema or None, autoload_with=engine)
        target = reflected[name]
        for start in range(0, len(rows), CHUNK_ROWS):
            with engine.begin() as conn:
                conn.execute(insert(target), rows[start : start + CHUNK_ROWS])
        counts[name] = counts.get(name, 0) + len(rows)
        log.info("restored %d rows of %s from %s", len(rows), name, obj["key"])
    return RestoreResult(counts)
