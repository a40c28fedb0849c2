"""A retention rule as typed models: what expires, where it lives, and what happens to it.

A rule says which records of a category expire (``retain_for`` after their age column)
and what happens to them. The models forbid unknown keys and check what needs more
than one field (``age_from`` with ``key_date_format``, ``sse`` with ``kms_key_id``);
each field's own value is parsed by :mod:`retention.rules.fields`, and the checks that
need the whole rule (the action against its sections) are made by the loader.
Nothing here touches a database.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import BaseModel, ConfigDict, Field, TypeAdapter, ValidationInfo, field_validator

from retention.errors import RuleProblem
from retention.rules.fields import (
    Bucket,
    Category,
    ColumnStrategy,
    ConnectionId,
    Identifier,
    KeyColumns,
    KeyDateFormat,
    KeyDatePattern,
    KeyPrefix,
    KmsKeyId,
    RetainFor,
    RowFilter,
    Schedule,
    ServerSideEncryption,
    StorageClass,
    SubjectColumns,
    SubjectPrefix,
    TableName,
    Tags,
    Text,
)
from retention.rules.problems import dotted_path
from retention.rules.yamlsource import LocatedDocument


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class ChildTable(_StrictModel):
    """A table whose rows belong to a parent row: purged with it, children first."""

    table: TableName
    foreign_key: KeyColumns
    """Columns of this table that reference the parent's key, in the key's order."""
    children: list[ChildTable] = Field(default_factory=list)
    """Grandchildren, referencing this table's primary key."""


class AnonymizeSpec(_StrictModel):
    """Strip personal data instead of deleting the row."""

    marker: Identifier
    """A nullable timestamp column set when a row is anonymized; rows with it set are skipped."""
    columns: Annotated[dict[Identifier, ColumnStrategy], Field(min_length=1)]


class MaintenanceSpec(_StrictModel):
    """Upkeep after a large purge, so space and planner statistics catch up with the rows gone."""

    after_rows: Annotated[int, Field(ge=1)]
    """Run it when a purge of the target removed at least this many rows: PostgreSQL
    ``VACUUM (ANALYZE)``, MariaDB/MySQL ``OPTIMIZE TABLE``, SQLite ``ANALYZE`` (each table of
    the family). A failure is a warning and a note in the certificate, never a failed purge."""


class SqlTarget(_StrictModel):
    """A table in PostgreSQL, MariaDB/MySQL or SQLite whose expired rows are purged."""

    name: Identifier
    """Unique within the rule; names the target in plans, logs and certificates."""
    kind: Literal["sql"]
    connection: ConnectionId
    """Airflow connection id (``AIRFLOW_CONN_<ID>`` outside Airflow)."""
    table: TableName
    """``table`` or ``schema.table``."""
    key: KeyColumns
    """Primary key columns: batches walk them, so they must identify one row."""
    age_column: Identifier
    """The retention clock starts here; NULL never expires."""
    where: RowFilter = Field(default_factory=dict)
    """Equality (``status: closed``) or membership (``{in: [a, b]}``) filters, ANDed."""
    max_batch_rows: Annotated[int, Field(ge=1, le=1_000_000)] = 1_000_000
    """Upper bound on rows deleted by one transaction; batches adapt below it (each aims at
    a fraction of a second), so the default caps nothing a batch would reach on its own."""
    max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    """A run that would purge more than this share of the table's rows stops before touching anything."""
    max_records: Annotated[int | None, Field(ge=1)] = None
    """Likewise for a count of rows."""
    workers: Annotated[int, Field(ge=1, le=8)] = 1
    """Batches walked in parallel, each over its own share of the expired rows (more of
    the database's cores for large purges; each worker holds one connection)."""
    lock_wait_budget: Annotated[float, Field(gt=0, le=86_400)] = 600.0
    """Seconds a purge keeps coming back to rows other transactions hold locked (no
    batch waits more than 2 s on a lock) before it ends partial, leaving them."""
    max_replica_lag: Annotated[float | None, Field(gt=0, le=86_400)] = None
    """Seconds of replication lag past which batches pause (PostgreSQL: the replicas'
    ``replay_lag``; MariaDB/MySQL: ``Seconds_Behind_Master`` of the connection's
    ``replica_conn_ids``). Unset: the connection extra's ``max_replica_lag``, else 10."""
    lag_wait_budget: Annotated[float | None, Field(gt=0, le=86_400)] = None
    """Seconds a purge may spend paused on replica lag, in all, before it ends partial
    (unset: 600)."""
    maintenance: MaintenanceSpec | None = None
    """Optional upkeep after a large purge (off unless set)."""
    shard_rows: Annotated[int | None, Field(ge=1, le=1_000_000_000)] = None
    """Split the expired rows into shards of about this many rows (by the walk's order, at
    most a few hundred), each purged by its own task, so several workers share a large
    table; unset: one task purges the whole target."""
    children: list[ChildTable] = Field(default_factory=list)
    """Tables referencing this one, archived and deleted with it in the same batch."""
    anonymize: AnonymizeSpec | None = None
    """With ``action: anonymize``: which columns to strip, and the marker column."""
    subject: SubjectColumns = None
    """Identity type → column naming the data subject of a row (``{customer_id: customer_id}``),
    for erasure requests; the types are declared in ``_subjects.yaml``."""

    @property
    def location(self) -> str:
        """Where the records live, without credentials."""
        return f"{self.connection}:{self.table}"

    @property
    def age_source(self) -> str:
        """Where a record's age is read."""
        return self.age_column


class S3Target(_StrictModel):
    """Objects under a prefix of an S3 (or S3-compatible) bucket."""

    name: Identifier
    kind: Literal["s3"]
    connection: ConnectionId
    """Airflow AWS connection id; ``endpoint_url`` in its extra for MinIO or moto."""
    bucket: Bucket
    prefix: KeyPrefix = ""
    age_from: Literal["last_modified", "key_date"] = "last_modified"
    """``last_modified``: the object's newest version; ``key_date``: the date in its key."""
    key_date_format: Annotated[KeyDateFormat, Field(validate_default=True)] = None
    tags: Tags = Field(default_factory=dict)
    """Only objects carrying all these tags (one GetObjectTagging call per object)."""
    concurrency: Annotated[int, Field(ge=1, le=64)] = 8
    """Concurrent DeleteObjects requests (and HTTP connections)."""
    max_batch_keys: Annotated[int, Field(ge=1, le=1000)] = 1000
    """Object versions per DeleteObjects request (S3 allows 1000; some compatible stores fewer)."""
    max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    """A run that would purge more than this share of the objects under the prefix stops before touching anything."""
    max_records: Annotated[int | None, Field(ge=1)] = None
    """Likewise for a count of objects."""
    subject_prefix: SubjectPrefix = None
    """The key prefix of one data subject's objects, e.g. ``exports/{customer_id}/`` (each
    ``{type}`` an identity type of ``_subjects.yaml``), for erasure requests."""

    @field_validator("key_date_format")
    @classmethod
    def _key_date_needs_format(cls, value: KeyDatePattern | None, info: ValidationInfo) -> KeyDatePattern | None:
        age_from = info.data.get("age_from")
        if age_from == "key_date" and value is None:
            raise ValueError("age_from: key_date needs key_date_format, e.g. 'receipts/%Y/%m/%d/'")
        if age_from == "last_modified" and value is not None:
            raise ValueError("key_date_format is only read with age_from: key_date")
        return value

    @property
    def location(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def age_source(self) -> str:
        """Where an object's age is read."""
        return f"key date {self.key_date_format}" if self.age_from == "key_date" else "LastModified"


Target = Annotated[Union[SqlTarget, S3Target], Field(discriminator="kind")]


class ArchiveSpec(_StrictModel):
    """Where ``action: archive`` writes records before it deletes them."""

    connection: ConnectionId
    bucket: Bucket
    prefix: KeyPrefix = ""
    format: Literal["jsonl.gz", "parquet"] = "jsonl.gz"
    """Rows from tables: gzip JSON Lines, or Parquet (needs pyarrow)."""
    storage_class: StorageClass = "STANDARD"
    """The storage class copies of archived S3 objects land in (rows and manifests stay
    STANDARD, so a restore can read them without a thaw)."""
    sse: ServerSideEncryption = None
    """Server-side encryption of every archive object (rows, manifest, copies): ``AES256``
    (S3-managed keys) or ``aws:kms`` (with ``kms_key_id``); checked on each object after it is written."""
    kms_key_id: Annotated[KmsKeyId, Field(validate_default=True)] = None
    """With ``sse: aws:kms``: the KMS key id, key ARN, ``alias/name`` or alias ARN."""

    @field_validator("kms_key_id")
    @classmethod
    def _kms_key_needs_kms(cls, value: str | None, info: ValidationInfo) -> str | None:
        sse = info.data.get("sse")
        if sse == "aws:kms" and value is None:
            raise ValueError("sse: aws:kms needs kms_key_id (a key id, key ARN or alias/NAME): "
                             "archives are encrypted with the key you choose, never a default one")
        if sse != "aws:kms" and value is not None:
            raise ValueError(f"kms_key_id is only read with sse: aws:kms (sse is {sse or 'not set'})")
        return value

    @property
    def location(self) -> str:
        """``s3://bucket/prefix``."""
        return f"s3://{self.bucket}/{self.prefix}"

    @property
    def sse_manifest(self) -> dict[str, str] | None:
        """How the run's archive is encrypted, as its manifest records it (None: as the bucket does)."""
        if self.sse is None:
            return None
        return {"algorithm": self.sse, **({"kms_key_id": self.kms_key_id} if self.kms_key_id else {})}

    def sse_arguments(self) -> dict[str, str]:
        """The S3 request arguments that encrypt an object as ``sse`` asks (none without it)."""
        if self.sse is None:
            return {}
        if self.sse == "aws:kms":
            if self.kms_key_id is None:  # validation pairs them; never let the bucket pick the key
                raise ValueError("sse: aws:kms needs kms_key_id")
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        return {"ServerSideEncryption": self.sse}


class RetentionRule(_StrictModel):
    """How long one category of customer data may be kept, and where it lives."""

    category: Category
    description: Text
    owner: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$")]
    legal_basis: Text
    retain_for: RetainFor
    schedule: Schedule = "@daily"
    action: Literal["delete", "archive", "anonymize"]
    archive: ArchiveSpec | None = None
    """With ``action: archive``: where records go before they are deleted."""
    targets: Annotated[list[Target], Field(min_length=1)]
    erasure_exempt: Text | None = None
    """Why a subject's erasure request does not reach these records (a legal duty keeps them,
    GDPR Art. 17(3)(b)); erasures report them as retained for this reason."""

    def target(self, name: str) -> Target:
        """The target called ``name``; KeyError when there is none."""
        for target in self.targets:
            if target.name == name:
                return target
        raise KeyError(name)

    def cutoff(self, as_of: datetime) -> datetime:
        """Records older than this instant (strictly) have expired at ``as_of``."""
        return self.retain_for.before(as_of)


@dataclass(frozen=True)
class RuleFile:
    """A validated rule with the file it came from, for errors and certificates."""

    path: Path
    sha256: str
    rule: RetentionRule
    document: LocatedDocument

    @property
    def display_path(self) -> str:
        """``retention_rules/x.yaml``: the rules directory and file name, stable across hosts."""
        parent = self.path.resolve().parent.name
        return f"{parent}/{self.path.name}" if parent else self.path.name

    def problem(self, field_path: tuple[str | int, ...], message: str) -> RuleProblem:
        """A problem located at ``field_path`` of this file (for checks made after loading)."""
        return RuleProblem(
            str(self.path), self.document.line_of(field_path), dotted_path(field_path), message
        )


TARGET_ADAPTER: TypeAdapter[Target] = TypeAdapter(Target)
"""Validates one target definition (as journaled) back into its model."""
