"""The values a rule file spells, each parsed and checked on its own.

Identifiers, table and category names, connection ids, durations, cron schedules,
row filters, S3 buckets, prefixes and key-date patterns, encryption settings: every
parser raises ValueError with advice (pydantic reports it at the field's line), and
each ``Annotated`` type here is what :mod:`retention.rules.models` declares its
fields with. Checks that need more than one field live on the models.
"""

from __future__ import annotations

import difflib
import re
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Annotated, Any, Literal

import pendulum
from croniter import croniter
from pydantic import AfterValidator, BeforeValidator, Field, PlainSerializer

from retention.errors import InvalidAsOf
from retention.rules.strategies import Strategy

_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")
_CATEGORY = re.compile(r"[a-z][a-z0-9_]{0,62}")
_CONNECTION_ID = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,249}")
_DURATION = re.compile(
    r"P(?:(?P<years>\d+)Y)?(?:(?P<months>\d+)M)?(?:(?P<weeks>\d+)W)?(?:(?P<days>\d+)D)?"
    r"(?:T(?=\d)(?:(?P<hours>\d+)H)?(?:(?P<minutes>\d+)M)?(?:(?P<seconds>\d+)S)?)?"
)
_FAR_FUTURE = datetime(2200, 1, 1, tzinfo=timezone.utc)
SCHEDULE_PRESETS = ("@hourly", "@daily", "@weekly", "@monthly", "@quarterly", "@yearly")


def _identifier(value: Any) -> str:
    if not isinstance(value, str) or not _IDENTIFIER.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a plain SQL identifier: use letters, digits and _ "
            "(not starting with a digit, at most 63 characters)"
        )
    return value


def parse_table_name(value: Any) -> str:
    """``table`` or ``schema.table``, each part a plain SQL identifier; ValueError with advice."""
    parts = value.split(".") if isinstance(value, str) else [value]
    if len(parts) > 2 or not all(isinstance(p, str) and _IDENTIFIER.fullmatch(p) for p in parts):
        raise ValueError(
            f"{value!r} is not a table name: use table or schema.table, each part letters, "
            "digits and _ (not starting with a digit)"
        )
    return value


def parse_category(value: Any) -> str:
    """A category name (it names the rule file and the DAG); ValueError with advice."""
    if not isinstance(value, str) or not _CATEGORY.fullmatch(value):
        raise ValueError(
            f"{value!r} is not a category name: lower-case letters, digits and _, starting with a letter"
        )
    return value


def _connection_id(value: Any) -> str:
    if not isinstance(value, str) or not _CONNECTION_ID.fullmatch(value):
        raise ValueError(f"{value!r} is not an Airflow connection id (letters, digits, _ . -)")
    return value


def _unique(values: list[str]) -> list[str]:
    dupes = sorted({v for v in values if values.count(v) > 1})
    if dupes:
        raise ValueError(f"listed more than once: {', '.join(dupes)}")
    return values


Identifier = Annotated[str, BeforeValidator(_identifier)]
TableName = Annotated[str, BeforeValidator(parse_table_name)]
Category = Annotated[str, BeforeValidator(parse_category)]
ConnectionId = Annotated[str, BeforeValidator(_connection_id)]
Text = Annotated[str, Field(min_length=1, max_length=2000)]
KeyColumns = Annotated[list[Identifier], Field(min_length=1), AfterValidator(_unique)]
"""Columns of a key, in the key's order: at least one, none twice."""


def _subject_columns(value: Any) -> Any:
    if value is not None and (not isinstance(value, dict) or not value):
        raise ValueError("expected a mapping of identity type: column, e.g. {customer_id: customer_id}")
    return value


SubjectColumns = Annotated[dict[Identifier, Identifier] | None, BeforeValidator(_subject_columns)]
"""Identity type → the column holding it (a row is the subject's when any of them matches)."""

_PLACEHOLDER = re.compile(r"\{([^{}]*)\}")


def parse_subject_prefix(value: Any) -> str | None:
    """A key template with ``{identity_type}`` placeholders, e.g. ``exports/{customer_id}/``."""
    if value is None:
        return None
    if not isinstance(value, str) or value.startswith("/") or len(value) > 1024:
        raise ValueError(f"{value!r} is not a key template: no leading '/', at most 1024 characters")
    names = _PLACEHOLDER.findall(value)
    if not names:
        raise ValueError(f"{value!r} names no identity: write e.g. 'exports/{{customer_id}}/'")
    for name in names:
        if not _IDENTIFIER.fullmatch(name):
            raise ValueError(f"{{{name}}} in {value!r} is not an identity type (letters, digits and _)")
    if "{" in _PLACEHOLDER.sub("", value) or "}" in _PLACEHOLDER.sub("", value):
        raise ValueError(f"{value!r} has an unbalanced brace")
    if not value.endswith("/"):
        # exports/{customer_id} would also match customer 42's neighbour 421.
        raise ValueError(f"{value!r} must end with '/' so one subject's prefix is not another's start")
    return value


def subject_placeholders(template: str) -> list[str]:
    """The identity types a subject prefix names, in order."""
    return _PLACEHOLDER.findall(template)


SubjectPrefix = Annotated[str | None, BeforeValidator(parse_subject_prefix)]


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
        text = value.strip().upper() if isinstance(value, str) else ""
        match = _DURATION.fullmatch(text) if text else None
        if match is None or text in ("P", "PT"):
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


RetainFor = Annotated[IsoDuration, BeforeValidator(IsoDuration.parse)]


def parse_schedule(value: Any) -> str | None:
    """A 5-field cron expression or a preset (None: manual runs only); ValueError with advice."""
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


Schedule = Annotated[str | None, BeforeValidator(parse_schedule)]


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


RowFilter = Annotated[dict[Identifier, Annotated[Any, BeforeValidator(_condition)]], BeforeValidator(_mapping)]
"""Equality (``status: closed``) or membership (``{in: [a, b]}``) per column."""


def _strategy_text(strategy: Strategy) -> Any:
    if strategy.kind in ("hash", "null"):
        return strategy.kind
    if strategy.kind == "redact":
        return {"redact": {"keep_last": strategy.keep_last}}
    return {"generalize": strategy.unit if strategy.unit != "prefix" else {"prefix": strategy.prefix}}


ColumnStrategy = Annotated[Strategy, BeforeValidator(Strategy.parse), PlainSerializer(_strategy_text)]
"""How one column is anonymized, serialized back the way the rule spells it."""


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


Bucket = Annotated[str, BeforeValidator(_bucket)]
KeyPrefix = Annotated[str, BeforeValidator(_prefix)]
Tags = Annotated[dict[str, str], BeforeValidator(_string_map)]


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


KeyDateFormat = Annotated[
    KeyDatePattern | None,
    BeforeValidator(lambda v: v if v is None or isinstance(v, KeyDatePattern) else KeyDatePattern.parse(v)),
    PlainSerializer(lambda v: None if v is None else v.text),
]
"""A key-date pattern as the rule spells it (None: the objects' age is not in their keys)."""


StorageClass = Literal["STANDARD", "STANDARD_IA", "ONEZONE_IA", "INTELLIGENT_TIERING", "GLACIER", "GLACIER_IR",
                       "DEEP_ARCHIVE"]


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


ServerSideEncryption = Annotated[str | None, BeforeValidator(_sse)]
KmsKeyId = Annotated[str | None, BeforeValidator(_kms_key_id)]
