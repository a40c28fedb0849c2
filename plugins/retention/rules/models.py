"""Retention rules: one YAML file per data category, validated before anything runs.

A rule says which records of a category expire (``retain_for`` after their age column)
and what happens to them. Loading is strict: unknown keys, malformed durations or cron
expressions and anything that is not a plain SQL identifier are errors that name the
file, line and field. Nothing here touches a database.
"""

from __future__ import annotations

import difflib
import functools
import hashlib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal, Union, get_args, get_origin

import pendulum
from croniter import croniter
from pydantic import (
    AfterValidator,
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    PlainSerializer,
    TypeAdapter,
    ValidationError,
    ValidationInfo,
    field_validator,
)

from retention.errors import InvalidAsOf, RuleError, RuleProblem
from retention.rules.strategies import Strategy
from retention.rules.yamlsource import LocatedDocument, YamlProblem, load_located

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_CATEGORY = re.compile(r"[a-z][a-z0-9_]{0,62}")
_CONNECTION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}")
_DURATION = re.compile(
    r"P(?:(?P<years>\d+)Y)?(?:(?P<months>\d+)M)?(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?"
)
_FAR_FUTURE = datetime(2200, 1, 1, tzinfo=timezone.utc)
MAX_RULE_FILE_BYTES = 256 * 1024
"""A rule file is read by reviewers line by line; anything larger is a mistake (or an attack)."""
SCHEDULE_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain SQL identifier: use letters, digits and _ "
            "(not starting with a digit, at most 63 characters)"
        )
    return value


def _table_name(value: Any) -> str:
    parts = value.split(".") if isinstance(value, str) else [value]
    if len(parts) > 2 or not all(isinstance(p, str) and _IDENTIFIER.fullmatch(p) for p in parts):
        raise ValueError(
            f"{value!r} is not a table name: use table or schema.table, each part letters, "
            "digits and _ (not starting with a digit)"
        )
    return value


def _category(value: Any) -> str:
    if not isinstance(value, str) or not _CATEGORY.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a category name: lower-case letters, digits and _, starting with a letter"
        )
    return value


def _connection_id(value: Any) -> str:
    if not isinstance(value, str) or not _CONNECTION_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not an Airflow connection id (letters, digits, _ . -)")
    return value


Identifier = Annotated[str, BeforeValidator(_identifier)]
TableName = Annotated[str, BeforeValidator(_table_name)]
Category = Annotated[str, BeforeValidator(_category)]
ConnectionId = Annotated[str, BeforeValidator(_connection_id)]
Text = Annotated[str, Field(min_length=1, max_length=2000)]


@dataclass(frozen=True)
class IsoDuration:
    """An ISO 8601 duration such as ``P2Y``, ``P18M``, ``P90D`` or ``PT36H``."""

    text: str
    years: int = 0
    months: int = 0
    weeks: int = 0
    days: int = 0
    hours: int = 0
    minutes: int = 0
    seconds: int = 0

    @classmethod
    def parse(cls, value: Any) -> IsoDuration:
        """Parse ``value``; raise ValueError with advice when it is not a positive duration."""
        text = value.strip().upper() if isinstance(value, str) else None
        match = _DURATION.fullmatch(text) if text else None
        if not match or text in ("P", "PT"):
            raise ValueError(
                f"{value!r} is not an ISO 8601 duration; write e.g. P90D, P18M, P2Y or PT36H"
            )
        parts = {name: int(v) for name, v in match.groupdict().items() if v}
        if not any(parts.values()):
            raise ValueError(f"{value!r} is zero: a retention period must be longer than nothing")
        duration = cls(text=text, **parts)
        try:
            too_long = duration.before(_FAR_FUTURE) < _FAR_FUTURE.replace(year=_FAR_FUTURE.year - 100)
        except (ValueError, OverflowError, InvalidAsOf):
            too_long = True
        if too_long:
            raise ValueError(f"{value!r} is longer than 100 years; write the period you mean")
        return duration

    def before(self, as_of: datetime) -> datetime:
        """The instant ``self`` before ``as_of``, by calendar arithmetic in UTC."""
        if as_of.tzinfo is None:
            raise ValueError("as_of must carry a time zone")
        start = pendulum.instance(as_of.astimezone(timezone.utc))
        try:
            cut = start.subtract(
                years=self.years, months=self.months, weeks=self.weeks, days=self.days,
                hours=self.hours, minutes=self.minutes, seconds=self.seconds,
            )
        except (ValueError, OverflowError):  # before year 1: a typo'd as_of, not a cutoff
            raise InvalidAsOf(
                f"as of {as_of.date().isoformat()}, retain_for {self.text} would cut off before year 1; "
                "give a real date as --as-of (ISO 8601, e.g. 2026-06-01)"
            ) from None
        return datetime(
            cut.year, cut.month, cut.day, cut.hour, cut.minute, cut.second, cut.microsecond,
            tzinfo=timezone.utc,
        )

    def __str__(self) -> str:
        return self.text


def _schedule(value: Any) -> str | None:
    if value is None:
        return None
    if isinstance(value, str):
        text = value.strip()
        if text in SCHEDULE_PRESETS:
            return text
        if len(text.split()) == 5 and croniter.is_valid(text):
            return text
    raise ValueError(
        f"{value!r} is not a schedule: use a 5-field cron expression (minute hour day month "
        f"weekday), one of {', '.join(SCHEDULE_PRESETS)}, or null for manual runs only"
    )


_SCALAR = (str, int, float, bool, type(None))


def _mapping(value: Any) -> Any:
    if not isinstance(value, dict):
        raise ValueError("expected a mapping of column: value or column: {in: [values]}")
    return value


def _condition(condition: Any) -> Any:
    if isinstance(condition, dict):
        unknown = [op for op in condition if op != "in"]
        if unknown:
            hint = " (did you mean 'in'?)" if difflib.get_close_matches(str(unknown[0]), ["in"], cutoff=0.3) else ""
            raise ValueError(f"unknown operator {unknown[0]!r}; the only one is 'in'{hint}")
        options = condition.get("in")
        if not isinstance(options, list) or not options:
            raise ValueError("'in' takes a non-empty list of values")
        if not all(isinstance(o, _SCALAR) and o is not None for o in options):
            raise ValueError("'in' values must be plain strings, numbers or booleans")
    elif not isinstance(condition, _SCALAR):
        raise ValueError(f"expected a value or {{in: [values]}}, got a {type(condition).__name__}")
    return condition


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


def _strategy_text(strategy: Strategy) -> Any:
    if strategy.kind in ("hash", "null"):
        return strategy.kind
    if strategy.kind == "redact":
        return {"redact": {"keep_last": strategy.keep_last}}
    return {"generalize": strategy.unit if strategy.unit != "prefix" else {"prefix": strategy.prefix}}


def _unique(values: list[str]) -> list[str]:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"listed more than once: {', '.join(dupes)}")
    return values


class ChildTable(_StrictModel):
    """A table whose rows belong to a parent row: purged with it, children first."""

    table: TableName
    foreign_key: Annotated[list[Identifier], Field(min_length=1), AfterValidator(_unique)]
    """Columns of this table that reference the parent's key, in the key's order."""
    children: list[ChildTable] = Field(default_factory=list)
    """Grandchildren, referencing this table's primary key."""


class AnonymizeSpec(_StrictModel):
    """Strip personal data instead of deleting the row."""

    marker: Identifier
    """A nullable timestamp column set when a row is anonymized; rows with it set are skipped."""
    columns: Annotated[
        dict[Identifier, Annotated[Strategy, BeforeValidator(Strategy.parse), PlainSerializer(_strategy_text)]],
        Field(min_length=1),
    ]


class SqlTarget(_StrictModel):
    """A table in PostgreSQL, MariaDB/MySQL or SQLite whose expired rows are purged."""

    name: Identifier
    """Unique within the rule; names the target in plans, logs and certificates."""
    kind: Literal["sql"]
    connection: ConnectionId
    """Airflow connection id (``AIRFLOW_CONN_<ID>`` outside Airflow)."""
    table: TableName
    """``table`` or ``schema.table``."""
    key: Annotated[list[Identifier], Field(min_length=1), AfterValidator(_unique)]
    """Primary key columns: batches walk them, so they must identify one row."""
    age_column: Identifier
    """The retention clock starts here; NULL never expires."""
    where: Annotated[
        dict[Identifier, Annotated[Any, BeforeValidator(_condition)]], BeforeValidator(_mapping)
    ] = Field(default_factory=dict)
    """Equality (``status: closed``) or membership (``{in: [a, b]}``) filters, ANDed."""
    max_batch_rows: Annotated[int, Field(ge=1, le=1_000_000)] = 100_000
    """Upper bound on rows deleted by one transaction; batches adapt below it."""
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
    children: list[ChildTable] = Field(default_factory=list)
    """Tables referencing this one, archived and deleted with it in the same batch."""
    anonymize: AnonymizeSpec | None = None
    """With ``action: anonymize``: which columns to strip, and the marker column."""

    @property
    def location(self) -> str:
        """Where the records live, without credentials."""
        return f"{self.connection}:{self.table}"

    @property
    def age_source(self) -> str:
        """Where a record's age is read."""
        return self.age_column


_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
_KEY_DATE_FIELDS = {"Y": r"\d{4}", "m": r"\d{2}", "d": r"\d{2}", "H": r"\d{2}", "M": r"\d{2}", "S": r"\d{2}"}
_KEY_DATE_ORDER = "YmdHMS"


def _bucket(value: Any) -> str:
    if not isinstance(value, str) or not _BUCKET.fullmatch(value) or ".." in value:
        raise ValueError(
            f"{value!r} is not an S3 bucket name (3-63 lower-case letters, digits, dots and hyphens)"
        )
    return value


def _prefix(value: Any) -> str:
    if not isinstance(value, str) or value.startswith("/") or len(value) > 1024:
        raise ValueError(f"{value!r} is not a key prefix: no leading '/', at most 1024 characters")
    return value


def _string_map(value: Any) -> dict[str, str]:
    if not isinstance(value, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in value.items()
    ):
        raise ValueError("expected a mapping of tag: value, both strings (quote numbers: '2024')")
    return value


@dataclass(frozen=True)
class KeyDatePattern:
    """Reads the date a key starts with, e.g. ``receipts/%Y/%m/%d/`` for receipts/2024/01/31/…."""

    text: str
    regex: re.Pattern[str]
    finest: str

    @classmethod
    def parse(cls, value: Any) -> KeyDatePattern:
        """Compile a strftime-like pattern with %Y %m %d %H %M %S; ValueError with advice."""
        if not isinstance(value, str) or not value:
            raise ValueError("expected a pattern such as 'receipts/%Y/%m/%d/'")
        pieces, fields, i = [], [], 0
        while i < len(value):
            char = value[i]
            if char != "%":
                pieces.append(re.escape(char))
                i += 1
                continue
            directive = value[i + 1 : i + 2]
            if directive == "%":
                pieces.append("%")
            elif directive in _KEY_DATE_FIELDS:
                if directive in fields:
                    raise ValueError(f"%{directive} appears twice in {value!r}")
                fields.append(directive)
                pieces.append(f"(?P<{directive}>{_KEY_DATE_FIELDS[directive]})")
            else:
                raise ValueError(
                    f"%{directive or ''} is not supported in {value!r}; use %Y %m %d %H %M %S (and %% for %)"
                )
            i += 2
        if "Y" not in fields:
            raise ValueError(f"{value!r} has no %Y: the year must be part of the key")
        present = "".join(f for f in _KEY_DATE_ORDER if f in fields)
        if present != _KEY_DATE_ORDER[: len(present)]:
            missing = next(f for f in _KEY_DATE_ORDER if f not in fields)
            raise ValueError(f"{value!r} skips %{missing}: a key date needs every coarser field")
        return cls(value, re.compile("".join(pieces)), present[-1])

    def period(self, key: str) -> tuple[datetime, datetime] | None:
        """The UTC period a key's date names (start, end), or None if the key has no date."""
        match = self.regex.match(key)
        if not match:
            return None
        parts = {f: int(v) for f, v in match.groupdict().items()}
        try:
            start = datetime(
                parts["Y"], parts.get("m", 1), parts.get("d", 1), parts.get("H", 0),
                parts.get("M", 0), parts.get("S", 0), tzinfo=timezone.utc,
            )
        except ValueError:
            return None  # 2024/13/45: not a date
        step = {"Y": {"years": 1}, "m": {"months": 1}, "d": {"days": 1},
                "H": {"hours": 1}, "M": {"minutes": 1}, "S": {"seconds": 1}}[self.finest]
        end = pendulum.instance(start).add(**step)
        return start, datetime.fromtimestamp(end.timestamp(), tz=timezone.utc)

    def __str__(self) -> str:
        return self.text


class S3Target(_StrictModel):
    """Objects under a prefix of an S3 (or S3-compatible) bucket."""

    name: Identifier
    kind: Literal["s3"]
    connection: ConnectionId
    """Airflow AWS connection id; ``endpoint_url`` in its extra for MinIO or moto."""
    bucket: Annotated[str, BeforeValidator(_bucket)]
    prefix: Annotated[str, BeforeValidator(_prefix)] = ""
    age_from: Literal["last_modified", "key_date"] = "last_modified"
    """``last_modified``: the object's newest version; ``key_date``: the date in its key."""
    key_date_format: Annotated[
        KeyDatePattern | None,
        BeforeValidator(lambda v: v if v is None or isinstance(v, KeyDatePattern) else KeyDatePattern.parse(v)),
        PlainSerializer(lambda v: None if v is None else v.text),
        Field(validate_default=True),
    ] = None
    tags: Annotated[dict[str, str], BeforeValidator(_string_map)] = Field(default_factory=dict)
    """Only objects carrying all these tags (one GetObjectTagging call per object)."""
    concurrency: Annotated[int, Field(ge=1, le=64)] = 8
    """Concurrent DeleteObjects requests (and HTTP connections)."""
    max_batch_keys: Annotated[int, Field(ge=1, le=1000)] = 1000
    """Object versions per DeleteObjects request (S3 allows 1000; some compatible stores fewer)."""
    max_fraction: Annotated[float, Field(gt=0, le=1)] = 0.5
    """A run that would purge more than this share of the objects under the prefix stops before touching anything."""
    max_records: Annotated[int | None, Field(ge=1)] = None
    """Likewise for a count of objects."""

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

STORAGE_CLASSES = ("STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER", "GLACIER_IR",
                   "DEEP_ARCHIVE")


SSE_ALGORITHMS = ("AES256", "aws:kms")
_KMS_KEY_ID = re.compile(
    r"(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}|mrk-[0-9a-f]{32}"
    r"|alias/[A-Za-z0-9/_-]{1,250}"
    r"|arn:aws[a-z-]*:kms:[a-z0-9-]+:\d{12}:(?:key/(?:[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}"
    r"|mrk-[0-9a-f]{32})|alias/[A-Za-z0-9/_-]{1,250}))"
)


def _sse(value: Any) -> str | None:
    if value is None:
        return None
    if value not in SSE_ALGORITHMS:
        by_lower = {a.lower(): a for a in SSE_ALGORITHMS}
        hint = difflib.get_close_matches(str(value).lower(), by_lower, n=1, cutoff=0.5)
        advice = f"; did you mean {by_lower[hint[0]]!r}?" if hint else ""
        raise ValueError(f"{value!r} is not a server-side encryption: use AES256 or aws:kms (with kms_key_id){advice}")
    return value


def _kms_key_id(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, str) or not _KMS_KEY_ID.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a KMS key: use a key id (1234abcd-12ab-34cd-56ef-1234567890ab), a key ARN, "
            "alias/NAME or an alias ARN"
        )
    return value


class ArchiveSpec(_StrictModel):
    """Where ``action: archive`` writes records before it deletes them."""

    connection: ConnectionId
    bucket: Annotated[str, BeforeValidator(_bucket)]
    prefix: Annotated[str, BeforeValidator(_prefix)] = ""
    format: Literal["jsonl.gz", "parquet"] = "jsonl.gz"
    """Rows from tables: gzip JSON Lines, or Parquet (needs pyarrow)."""
    storage_class: Literal[STORAGE_CLASSES] = "STANDARD"  # type: ignore[valid-type]
    """The storage class copies of archived S3 objects land in (rows and manifests stay
    STANDARD, so a restore can read them without a thaw)."""
    sse: Annotated[str | None, BeforeValidator(_sse)] = None
    """Server-side encryption of every archive object (rows, manifest, copies): ``AES256``
    (S3-managed keys) or ``aws:kms`` (with ``kms_key_id``); checked on each object after it is written."""
    kms_key_id: Annotated[str | None, BeforeValidator(_kms_key_id), Field(validate_default=True)] = None
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
            return {"ServerSideEncryption": "aws:kms", "SSEKMSKeyId": self.kms_key_id}
        return {"ServerSideEncryption": self.sse}


class RetentionRule(_StrictModel):
    """How long one category of customer data may be kept, and where it lives."""

    category: Category
    description: Text
    owner: Annotated[str, Field(min_length=1, max_length=100, pattern=r"^[A-Za-z0-9_.@-]+$")]
    legal_basis: Text
    retain_for: Annotated[IsoDuration, BeforeValidator(IsoDuration.parse)]
    schedule: Annotated[str | None, BeforeValidator(_schedule)] = "@daily"
    action: Literal["delete", "archive", "anonymize"]
    archive: ArchiveSpec | None = None
    """With ``action: archive``: where records go before they are deleted."""
    targets: Annotated[list[Target], Field(min_length=1)]

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
            str(self.path), self.document.line_of(field_path), _dotted(field_path), message
        )


TARGET_ADAPTER: TypeAdapter[Target] = TypeAdapter(Target)
"""Validates one target definition (as journaled) back into its model."""


def load_rule_file(path: str | Path) -> RuleFile:
    """Load and validate one rule file; raise :class:`RuleError` naming file:line:field."""
    path = Path(path)
    try:
        with path.open("rb") as stream:
            raw = stream.read(MAX_RULE_FILE_BYTES + 1)  # never read an unbounded file into memory
    except OSError as exc:
        raise RuleError([RuleProblem(str(path), None, None, f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_RULE_FILE_BYTES:
        raise RuleError([RuleProblem(str(path), None, None, f"larger than {MAX_RULE_FILE_BYTES // 1024} KiB, "
                                     "the most a rule file may be: split it or remove what is not a rule")])
    try:
        document = load_located(raw.decode("utf-8"))
    except UnicodeDecodeError as exc:
        line = raw[: exc.start].count(b"\n") + 1
        raise RuleError([RuleProblem(str(path), line, None, "not UTF-8 text: save the file as UTF-8")]) from None
    except YamlProblem as exc:
        raise RuleError([RuleProblem(str(path), exc.line, _dotted(exc.path) or None, exc.message)]) from None
    except Exception as exc:
        # The loader turns what it knows into YamlProblem; anything else must still be a
        # problem of this file, or one bad file would crash validation and every DAG.
        raise RuleError([RuleProblem(str(path), None, None,
                                     f"cannot be read as YAML ({type(exc).__name__}); check the file's syntax")]) from None
    if not isinstance(document.data, dict):
        raise RuleError([RuleProblem(str(path), 1, None, "expected a mapping of rule fields at the top level")])
    try:
        rule = RetentionRule.model_validate(document.data)
    except ValidationError as exc:
        problems = _problems(path, document, exc)
        raise RuleError(sorted(problems, key=lambda p: p.line or 0)) from None
    except Exception as exc:
        # Validators raise ValueError (which pydantic reports); this is the safety net.
        raise RuleError([RuleProblem(str(path), 1, None,
                                     f"cannot be validated ({type(exc).__name__}); check the file's structure")]) from None
    rule_file = RuleFile(path, hashlib.sha256(raw).hexdigest(), rule, document)
    problems = _action_problems(rule_file)
    if problems:
        raise RuleError(problems)
    seen: dict[str, int] = {}
    for index, target in enumerate(rule.targets):
        if target.name in seen:
            first = document.line_of(("targets", seen[target.name], "name"))
            raise RuleError([rule_file.problem(
                ("targets", index, "name"),
                f"target name {target.name!r} is already used on line {first}; target names are unique in a rule",
            )])
        seen[target.name] = index
    return rule_file


def _action_problems(rule_file: RuleFile) -> list[RuleProblem]:
    """What the action asks of the rule: an archive location, anonymize specs, SQL-only features."""
    rule = rule_file.rule
    problems = []
    if rule.action == "archive" and rule.archive is None:
        problems.append(rule_file.problem(("action",), "action: archive needs an archive: section "
                                          "(connection, bucket, prefix, format, storage_class)"))
    if rule.action != "archive" and rule.archive is not None:
        problems.append(rule_file.problem(("archive",), f"archive: is only read with action: archive "
                                          f"(this rule's action is {rule.action})"))
    for index, target in enumerate(rule.targets):
        anonymize = getattr(target, "anonymize", None)
        if rule.action == "anonymize":
            if target.kind != "sql":
                problems.append(rule_file.problem(("targets", index, "kind"),
                                                  "action: anonymize applies to SQL targets only"))
            elif anonymize is None:
                problems.append(rule_file.problem(("targets", index), "action: anonymize needs an anonymize: "
                                                  "section (marker and columns) on every target"))
            elif target.children:
                problems.append(rule_file.problem(("targets", index, "children"),
                                                  "children are not read with action: anonymize"))
            elif anonymize.marker in anonymize.columns:
                problems.append(rule_file.problem(("targets", index, "anonymize", "marker"),
                                                  "the marker column cannot also be anonymized"))
        elif anonymize is not None:
            problems.append(rule_file.problem(("targets", index, "anonymize"),
                                              f"anonymize: is only read with action: anonymize (this rule's "
                                              f"action is {rule.action})"))
    return problems


def scan_rules(directory: str | Path) -> tuple[list[RuleFile], list[RuleProblem]]:
    """Every rule in ``directory`` that is valid, and the problems of the rest.

    Used where one bad file must not stop the others (building DAGs). A file is named
    after its category (``<category>.yaml``), so the DAG id read from a broken file is
    the one its valid version had; a category that appears in two files is a problem of
    the second file (in name order). Files starting with ``_`` are configuration
    (``_pools.yaml``), not rules, and are skipped.
    """
    directory = Path(directory)
    if not directory.is_dir():
        return [], [RuleProblem(str(directory), None, None, "rules directory does not exist")]
    files = sorted(
        p for p in directory.iterdir()
        if p.suffix in (".yaml", ".yml") and not p.name.startswith("_") and p.is_file()
    )
    if not files:
        return [], [RuleProblem(str(directory), None, None, "no rule files (*.yaml) in this directory")]
    rules: list[RuleFile] = []
    problems: list[RuleProblem] = []
    seen: dict[str, RuleFile] = {}
    for path in files:
        try:
            loaded = load_rule_file(path)
        except RuleError as exc:
            problems.extend(exc.problems)
            continue
        if path.stem != loaded.rule.category:
            problems.append(loaded.problem(
                ("category",),
                f"category {loaded.rule.category!r} does not match the file name {path.name}: rename the "
                f"file to {loaded.rule.category}{path.suffix} (or fix the category), so the DAG id stays the same",
            ))
            continue
        first = seen.get(loaded.rule.category)
        if first is not None:
            problems.append(
                loaded.problem(
                    ("category",),
                    f"category {loaded.rule.category!r} is already defined in {first.path}; "
                    "each category has exactly one rule file",
                )
            )
            continue
        seen[loaded.rule.category] = loaded
        rules.append(loaded)
    return rules, problems


@dataclass(frozen=True)
class SalvagedFields:
    """What can still be read from a rule file that does not validate (each field or None)."""

    category: str | None = None
    schedule: str | None = None
    """None when unreadable; ``manual`` is reported as ``schedule_is_manual``."""
    schedule_is_manual: bool = False
    owner: str | None = None
    action: str | None = None


def salvage_fields(path: str | Path) -> SalvagedFields:
    """The category, schedule, owner and action of a broken rule file, where each still validates.

    The invalid-rule DAG keeps the DAG id, schedule and owner of the rule it replaces, so
    a typo keeps failing where people were looking. Never raises.
    """
    try:
        with Path(path).open("rb") as stream:
            raw = stream.read(MAX_RULE_FILE_BYTES + 1)
        if len(raw) > MAX_RULE_FILE_BYTES:
            return SalvagedFields()
        data = load_located(raw.decode("utf-8")).data
    except Exception:
        return SalvagedFields()
    if not isinstance(data, dict):
        return SalvagedFields()

    def valid(name: str, check: Any) -> Any:
        try:
            return check(data[name]) if name in data else None
        except Exception:
            return None

    owner = data.get("owner")
    owner_ok = isinstance(owner, str) and re.fullmatch(r"[A-Za-z0-9_.@-]{1,100}", owner.strip())
    action = data.get("action")
    return SalvagedFields(
        category=valid("category", _category),
        schedule=valid("schedule", _schedule),
        schedule_is_manual="schedule" in data and data["schedule"] is None,
        owner=owner.strip() if owner_ok else None,
        action=action if action in ("delete", "archive", "anonymize") else None,
    )


def load_rules(directory: str | Path, *, category: str | None = None) -> list[RuleFile]:
    """All rules in ``directory``, or raise :class:`RuleError` if any file is invalid.

    With ``category``, only that rule is returned, but every file must still be valid:
    a run never starts while the rules as a whole are broken.
    """
    rules, problems = scan_rules(directory)
    if problems:
        raise RuleError(problems)
    if category is None:
        return rules
    chosen = [r for r in rules if r.rule.category == category]
    if not chosen:
        known = [r.rule.category for r in rules]
        hint = difflib.get_close_matches(category, known, n=1)
        advice = f"; did you mean {hint[0]!r}?" if hint else f" (known: {', '.join(known)})"
        raise RuleError([RuleProblem(str(directory), None, "category", f"no rule for category {category!r}{advice}")])
    return chosen


def _problems(path: Path, document: LocatedDocument, exc: ValidationError) -> list[RuleProblem]:
    problems = []
    for error in exc.errors(include_url=False):
        data_path = _data_path(document.data, error["loc"])
        message = _message(error, data_path, document.data)
        problems.append(
            RuleProblem(str(path), document.line_of(data_path), _dotted(data_path) or None, message)
        )
    return problems


def _data_path(data: Any, loc: tuple) -> tuple[str | int, ...]:
    """Map a pydantic error location onto the document, dropping union tags."""
    path: list[str | int] = []
    node = data
    for part in loc:
        if isinstance(node, dict) and part in node:
            node = node[part]
            path.append(part)
        elif isinstance(node, list) and isinstance(part, int) and part < len(node):
            node = node[part]
            path.append(part)
        elif isinstance(part, str) and part in _field_names():
            # A missing field: keep it so the message names it; the line is the parent's.
            path.append(part)
            node = None
        # Anything else is a union tag ('sql'), which the document does not spell.
    return tuple(path)


def _message(error: dict, data_path: tuple[str | int, ...], data: Any) -> str:
    kind = error["type"]
    if kind == "missing":
        return "is required"
    if kind == "extra_forbidden":
        key = data_path[-1] if data_path else "?"
        allowed = _allowed_keys(data_path[:-1], data)
        hint = difflib.get_close_matches(str(key), allowed, n=1, cutoff=0.6)
        advice = f"did you mean {hint[0]!r}?" if hint else f"allowed here: {', '.join(sorted(allowed))}"
        return f"unknown key {key!r}; {advice}"
    message = error["msg"]
    return message.removeprefix("Value error, ")


def _model_members(annotation: Any) -> list[type[BaseModel]]:
    """The pydantic models an annotation may hold (through list, Optional, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = get_origin(annotation)
    if origin is None:
        return []
    members: list[type[BaseModel]] = []
    for arg in get_args(annotation):
        members.extend(_model_members(arg))
    return members


def _allowed_keys(parent: tuple[str | int, ...], data: Any) -> list[str]:
    models: list[type[BaseModel]] = [RetentionRule]
    node = data
    for part in parent:
        node = node[part] if isinstance(node, (dict, list)) else None
        if isinstance(part, int):
            continue
        nested: list[type[BaseModel]] = []
        for model in models:
            field = model.model_fields.get(part)
            if field is not None:
                nested.extend(_model_members(field.annotation))
        models = nested
    # Among union members (sql, s3), the one the document's `kind` names.
    kind = node.get("kind") if isinstance(node, dict) else None
    chosen = [m for m in models if "kind" in m.model_fields and kind in get_args(m.model_fields["kind"].annotation)]
    return sorted({name for model in (chosen or models) for name in model.model_fields})


@functools.cache
def _field_names() -> set[str]:
    names: set[str] = set()
    pending: list[type[BaseModel]] = [RetentionRule]
    visited: set[type[BaseModel]] = set()
    while pending:
        model = pending.pop()
        if model in visited:
            continue  # models nest recursively (children of children)
        visited.add(model)
        for name, field in model.model_fields.items():
            names.add(name)
            pending.extend(_model_members(field.annotation))
    return names


def _dotted(path: tuple[str | int, ...]) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out
