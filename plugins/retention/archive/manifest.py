"""The archive manifest: every object a run archived, each table's columns, and totals.

A run writes one manifest, as canonical JSON (RFC 8785) so the same run always yields the
same bytes, and its certificate records their SHA-256. :class:`Manifest` is that document,
typed: :func:`build_manifest` writes it from what the journal recorded, :meth:`Manifest.parse`
reads it back, and a parsed manifest serializes to exactly the bytes it was read from.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, fields, replace
from typing import Any, TypeVar

from retention.archive.codec import CODECS, TableShape
from retention.errors import ConfigError, TerminalError
from retention.localfiles import open_regular

MANIFEST_LIMIT = 64 << 20
"""The most a manifest may be (64 MiB), generous for a run's manifest (an entry per archive object); a
larger object at a manifest's key is refused on its size, never read into memory."""

MANIFEST_TYPE = "retention/archive-manifest"
MANIFEST_VERSION = 1

_T = TypeVar("_T")


class MalformedManifest(ConfigError):
    """A manifest, or what a run would write as one, is not shaped as retention writes them."""


@dataclass(frozen=True)
class RuleVersion:
    """The rule file a run executed."""

    path: str
    sha256: str


@dataclass(frozen=True)
class Encryption:
    """How ``archive.sse`` asked the run's objects to be encrypted."""

    algorithm: str  # AES256 or aws:kms
    kms_key_id: str | None = None  # only for aws:kms with a chosen key


@dataclass(frozen=True)
class ArchivedTable:
    """One table's archived rows: its columns (for restore), how many, how deep in its family."""

    name: str  # as the target names it, ``schema.table`` or ``table``
    columns: tuple[tuple[str, str], ...]  # (name, codec)
    rows: int
    depth: int  # 0: the target's table, 1: a child, 2: a grandchild (restore goes in this order)

    @property
    def shape(self) -> TableShape:
        """The shape its objects' rows decode with."""
        return TableShape(self.name, self.columns)


@dataclass(frozen=True)
class RowsObject:
    """One archive object of table rows: one table, one batch."""

    target: str
    key: str
    table: str
    rows: int
    bytes: int
    sha256: str  # hex, of the whole object
    format: str  # jsonl.gz or parquet
    storage_class: str
    depth: int
    sse: str | None = None  # the encryption S3 reported, when archive.sse asked for one (else not written)

    @property
    def batch(self) -> tuple[str, str, str]:
        """The batch it belongs to: its target, and its key without the table part
        (``…/orders/000007.order_items.jsonl.gz`` is batch ``…/orders/000007``)."""
        folder, _, name = self.key.rpartition("/")
        return (self.target, folder, name.partition(".")[0])


@dataclass(frozen=True)
class ObjectCopy:
    """One purged S3 object and the archive's copy of it (``key`` None: nothing was kept).

    Copies were recorded with different fields over time (a copy settled after a crash has
    no ``version_id``; early ones no ``bucket`` or ``etag``) and a recorded field may be
    null (``version_id`` on an unversioned bucket): ``recorded`` names the optional fields
    the record holds, so it is written back exactly as it was. None: those not None.
    """

    target: str
    source: str  # the purged object's key in its bucket
    key: str | None  # the copy's key in the archive bucket
    bucket: str | None = None  # the purged object's bucket
    version_id: str | None = None
    bytes: int | None = None
    etag: str | None = None  # the source's ETag
    sha256: str | None = None  # the ChecksumSHA256 S3 reported for the copy (base64)
    storage_class: str | None = None
    verified: str | None = None  # how the copy was checked: size, size+md5, settled
    sse: str | None = None
    note: str | None = None  # why nothing was kept
    recorded: frozenset[str] | None = None

    def written_fields(self) -> frozenset[str]:
        """The optional fields its record holds."""
        if self.recorded is not None:
            return self.recorded
        return frozenset(name for name in _COPY_OPTIONAL if getattr(self, name) is not None)

    def same_as(self, head: Mapping[str, Any]) -> bool | None:
        """Whether the object ``head`` describes is this copy: by size, then whole-object
        SHA-256 or single-part ETag (MD5) where both sides know it; None when only the size agrees."""
        if head.get("ContentLength") != self.bytes:
            return False
        stored, recorded_sha = head.get("ChecksumSHA256") or "", self.sha256 or ""
        if stored and recorded_sha and "-" not in stored + recorded_sha:  # "-N": per part, not the object's
            return stored == recorded_sha
        etag, recorded = head.get("ETag") or "", self.etag or ""
        if etag and recorded and "-" not in etag + recorded:
            return etag == recorded
        return None


_COPY_OPTIONAL = ("bucket", "version_id", "bytes", "etag", "sha256", "storage_class", "verified", "sse", "note")


@dataclass(frozen=True)
class Totals:
    """How much the run archived: objects (row objects and copies), rows, bytes."""

    objects: int
    rows: int
    bytes: int


@dataclass(frozen=True)
class Manifest:
    """One run's archive: where it is, what it holds, and what it was archived under."""

    category: str
    run_id: str
    rule: RuleVersion
    as_of: str  # ISO 8601, UTC, as the certificate writes it
    cutoff: str
    connection: str  # the AWS connection that wrote the archive
    bucket: str
    format: str
    tables: tuple[ArchivedTable, ...]
    objects: tuple[RowsObject, ...]
    s3_objects: tuple[ObjectCopy, ...]
    totals: Totals
    sse: Encryption | None = None

    @property
    def copies(self) -> tuple[ObjectCopy, ...]:
        """The S3 objects of which the archive holds a copy."""
        return tuple(copy for copy in self.s3_objects if copy.key)

    @classmethod
    def build(cls, header: Mapping[str, Any], sql_objects: Iterable[Mapping[str, Any]],
              s3_objects: Iterable[Mapping[str, Any]]) -> Manifest:
        """The manifest of a run: ``header`` (category, run_id, rule, as_of, cutoff, connection,
        bucket, format, sse) and the objects its batches journaled; each row object's record
        also carries its table's ``columns``."""
        objects: list[RowsObject] = []
        tables: dict[str, ArchivedTable] = {}
        for i, record in enumerate(sql_objects):
            obj = _rows_object(_Fields({k: v for k, v in record.items() if k != "columns"}, f"objects[{i}]"))
            objects.append(obj)
            known = tables.get(obj.table)
            if known is None:  # the table's first object says its columns and depth
                known = ArchivedTable(obj.table, _columns(record.get("columns", []), f"objects[{i}].columns"),
                                      0, obj.depth)
            tables[obj.table] = replace(known, rows=known.rows + obj.rows)
        copies = [_object_copy(_Fields(record, f"s3_objects[{i}]")) for i, record in enumerate(s3_objects)]
        totals = Totals(objects=len(objects) + sum(1 for copy in copies if copy.key),
                        rows=sum(obj.rows for obj in objects),
                        bytes=sum(obj.bytes for obj in objects) + sum(copy.bytes or 0 for copy in copies))
        fields_ = _Fields(dict(header), "header")
        manifest = cls(**_header(fields_), tables=tuple(tables.values()), objects=tuple(objects),
                       s3_objects=tuple(copies), totals=totals)
        fields_.done()
        return manifest

    @classmethod
    def parse(cls, body: bytes, location: str) -> Manifest:
        """The manifest in ``body`` (read from ``location``, which errors name); ConfigError
        if it is not one, or not shaped as this version of retention writes them."""
        try:
            data = json.loads(body)
        except ValueError:
            raise ConfigError(f"{location} is not a retention archive manifest (not JSON)") from None
        if not isinstance(data, dict) or data.get("type") != MANIFEST_TYPE:
            raise ConfigError(f"{location} is not a retention archive manifest")
        try:
            return cls._from_fields(_Fields(data, "manifest"))
        except MalformedManifest as problem:
            raise MalformedManifest(f"{location} is not a retention archive manifest as this version "
                                    f"writes them: {problem}") from None

    @classmethod
    def _from_fields(cls, data: _Fields) -> Manifest:
        data.text("type")
        version = data.number("version")
        if version != MANIFEST_VERSION:
            raise MalformedManifest(f"it is of version {version}, and this version of retention reads "
                                    f"version {MANIFEST_VERSION}")
        tables = data.nested("tables")
        totals = data.nested("totals")
        manifest = cls(
            **_header(data),
            tables=tuple(_archived_table(name, tables.nested(name)) for name in list(tables.data)),
            objects=tuple(_rows_object(_Fields(item, f"{data.where}.objects[{i}]"))
                          for i, item in enumerate(data.array("objects"))),
            s3_objects=tuple(_object_copy(_Fields(item, f"{data.where}.s3_objects[{i}]"))
                             for i, item in enumerate(data.array("s3_objects"))),
            totals=Totals(totals.number("objects"), totals.number("rows"), totals.number("bytes")),
        )
        for part in (tables, totals, data):
            part.done()
        return manifest

    def to_dict(self) -> dict[str, Any]:
        """The JSON document, as the run wrote it."""
        header: dict[str, Any] = {
            "category": self.category, "run_id": self.run_id,
            "rule": {"path": self.rule.path, "sha256": self.rule.sha256},
            "as_of": self.as_of, "cutoff": self.cutoff, "connection": self.connection,
            "bucket": self.bucket, "format": self.format,
        }
        if self.sse is not None:
            header["sse"] = {"algorithm": self.sse.algorithm,
                             **({"kms_key_id": self.sse.kms_key_id} if self.sse.kms_key_id is not None else {})}
        return {
            "type": MANIFEST_TYPE, "version": MANIFEST_VERSION, **header,
            "tables": {t.name: {"columns": [list(c) for c in t.columns], "rows": t.rows, "depth": t.depth}
                       for t in self.tables},
            "objects": [_rows_object_dict(obj) for obj in self.objects],
            "s3_objects": [_object_copy_dict(copy) for copy in self.s3_objects],
            "totals": {"objects": self.totals.objects, "rows": self.totals.rows, "bytes": self.totals.bytes},
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON (RFC 8785): the bytes whose SHA-256 the certificate records."""
        import rfc8785

        return rfc8785.dumps(self.to_dict())


def build_manifest(header: dict[str, Any], sql_objects: list[dict[str, Any]],
                   s3_objects: list[dict[str, Any]]) -> bytes:
    """The run's manifest: every archive object, its rows and checksum, and each table's
    columns; canonical JSON so the same run always yields the same bytes."""
    return Manifest.build(header, sql_objects, s3_objects).to_bytes()


def read_manifest(location: str, s3_client_for: Callable[[], Any], *, sha256: str | None = None) -> Manifest:
    """A manifest from ``s3://bucket/key`` or a local file path; with ``sha256`` (what the
    certificate recorded), TerminalError unless the manifest's bytes hash to it."""
    body = manifest_bytes(location, s3_client_for)
    if sha256 is not None and hashlib.sha256(body).hexdigest() != sha256:
        raise TerminalError(f"manifest {location} is not the one the certificate records (SHA-256 differs)")
    return Manifest.parse(body, location)


def manifest_bytes(location: str, s3_client_for: Callable[[], Any]) -> bytes:
    """The bytes at ``s3://bucket/key`` (S3's errors propagate) or in a local file, at most
    :data:`MANIFEST_LIMIT`: a larger one is refused unread (TerminalError in S3, ConfigError locally)."""
    limit = MANIFEST_LIMIT
    if location.startswith("s3://"):
        bucket, _, key = location[5:].partition("/")
        response = s3_client_for().get_object(Bucket=bucket, Key=key)
        stream = response["Body"]
        try:
            size = response.get("ContentLength")
            # Refused on its stated size before a byte is read; bounded read in case it is not stated.
            body: bytes = b"" if isinstance(size, int) and size > limit else stream.read(limit + 1)
        finally:
            stream.close()
        if len(body) > limit or (isinstance(size, int) and size > limit):
            raise TerminalError(f"manifest {location} is larger than {limit >> 20} MiB, more than any run's "
                                "manifest holds: it is not the one a run wrote; refused")
        return body
    try:
        with open_regular(location) as handle:  # /dev/zero would be read until memory ends; a FIFO waited on
            data = handle.read(limit + 1)
    except OSError as exc:
        raise ConfigError(f"cannot read manifest {location}: {exc.strerror}") from None
    if len(data) > limit:
        raise ConfigError(f"manifest {location} is larger than {limit >> 20} MiB, more than any run's manifest "
                          "holds; check the path")
    return data


# -- reading the JSON ---------------------------------------------------------------------------


def _header(data: _Fields) -> dict[str, Any]:
    """The run's fields of a manifest, as :class:`Manifest` arguments."""
    rule = data.nested("rule")
    sse = data.nested("sse") if "sse" in data.data else None
    found = {
        "category": data.text("category"), "run_id": data.text("run_id"),
        "rule": RuleVersion(rule.text("path"), rule.text("sha256")),
        "as_of": data.text("as_of"), "cutoff": data.text("cutoff"), "connection": data.text("connection"),
        "bucket": data.text("bucket"), "format": data.text("format"),
        "sse": None if sse is None else Encryption(sse.text("algorithm"), sse.optional(str, "kms_key_id")),
    }
    for part in (rule, sse):
        if part is not None:
            part.done()
    return found


def _archived_table(name: str, data: _Fields) -> ArchivedTable:
    table = ArchivedTable(name, _columns(data.array("columns"), f"{data.where}.columns"),
                          data.number("rows"), data.number("depth"))
    data.done()
    return table


def _columns(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    if not isinstance(value, list) or not all(
            isinstance(c, list) and len(c) == 2 and isinstance(c[0], str) and c[1] in CODECS for c in value):
        raise MalformedManifest(f"{where} is not a list of [column, codec] ({', '.join(sorted(CODECS))})")
    return tuple((name, codec) for name, codec in value)


def _rows_object(data: _Fields) -> RowsObject:
    obj = RowsObject(
        target=data.text("target"), key=data.text("key"), table=data.text("table"), rows=data.number("rows"),
        bytes=data.number("bytes"), sha256=data.text("sha256"), format=data.text("format"),
        storage_class=data.text("storage_class"), depth=data.number("depth"), sse=data.optional(str, "sse"),
    )
    data.done()
    return obj


def _rows_object_dict(obj: RowsObject) -> dict[str, Any]:
    found = {f.name: getattr(obj, f.name) for f in fields(obj)}
    if obj.sse is None:  # unencrypted manifests keep the shape they had before archive.sse
        del found["sse"]
    return found


def _object_copy(data: _Fields) -> ObjectCopy:
    def text(name: str) -> str | None:
        return data.optional(str, name, null=True)

    copy = ObjectCopy(
        target=data.text("target"), source=data.text("source"), key=data.nullable(str, "key"),
        bucket=text("bucket"), version_id=text("version_id"), bytes=data.optional(int, "bytes", null=True),
        etag=text("etag"), sha256=text("sha256"), storage_class=text("storage_class"), verified=text("verified"),
        sse=text("sse"), note=text("note"),
        recorded=frozenset(name for name in _COPY_OPTIONAL if name in data.data),
    )
    data.done()
    return copy


def _object_copy_dict(copy: ObjectCopy) -> dict[str, Any]:
    found: dict[str, Any] = {"target": copy.target, "source": copy.source, "key": copy.key}
    for name in _COPY_OPTIONAL:
        if name in copy.written_fields():
            found[name] = getattr(copy, name)
    return found


_LABELS: dict[type, str] = {str: "text", int: "a whole number", list: "a list", dict: "an object"}


class _Fields:
    """One JSON object of a manifest, read field by field, each of the type it must be; a
    field it does not read is one this version does not know, and :meth:`done` refuses it."""

    def __init__(self, data: Any, where: str):
        if not isinstance(data, dict):
            raise MalformedManifest(f"{where} is not an object")
        self.data: dict[str, Any] = data
        self.where = where
        self.read: set[str] = set()

    def _get(self, kind: type[_T], name: str, label: str) -> _T:
        self.read.add(name)
        if name not in self.data:
            raise MalformedManifest(f"{self.where} has no {name}")
        value = self.data[name]
        if not isinstance(value, kind) or (kind is int and isinstance(value, bool)):
            raise MalformedManifest(f"{self.where}.{name} is not {label}")
        return value

    def text(self, name: str) -> str:
        """A string field."""
        return self._get(str, name, _LABELS[str])

    def number(self, name: str) -> int:
        """A whole-number field."""
        return self._get(int, name, _LABELS[int])

    def array(self, name: str) -> list[Any]:
        """A list field."""
        return self._get(list, name, _LABELS[list])

    def nested(self, name: str) -> _Fields:
        """An object field, to read in turn."""
        return _Fields(self._get(dict, name, _LABELS[dict]), f"{self.where}.{name}")

    def optional(self, kind: type[_T], name: str, *, null: bool = False) -> _T | None:
        """A field that may be absent (None), or with ``null``, also null."""
        if name not in self.data or (null and self.data[name] is None):
            self.read.add(name)
            return None
        return self._get(kind, name, _LABELS[kind])

    def nullable(self, kind: type[_T], name: str) -> _T | None:
        """A field that must be there, and may be null."""
        if self.data.get(name, ...) is None:
            self.read.add(name)
            return None
        return self._get(kind, name, f"{_LABELS[kind]} or null")

    def done(self) -> None:
        """MalformedManifest if the object holds a field nothing read."""
        unknown = sorted(set(self.data) - self.read)
        if unknown:
            raise MalformedManifest(f"{self.where} has fields this version does not know: {', '.join(unknown)}")
