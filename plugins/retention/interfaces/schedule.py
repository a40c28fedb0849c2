"""``retention schedule``: the published retention schedule, generated from the rules.

GDPR Art. 30(1)(f) asks for "the envisaged time limits for erasure" of each category:
this module turns each rule into one entry a privacy notice can carry (category, what it
holds, legal basis, how long in words, what happens then, owner) and renders the entries
as Markdown, HTML, JSON or CSV. It reads rules only; nothing here touches a database.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import logging
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import asdict, dataclass

from retention.rules.fields import IsoDuration
from retention.rules.models import RuleFile

log = logging.getLogger(__name__)

FORMATS = ("md", "html", "json", "csv")

_UNITS = (("years", "year"), ("months", "month"), ("weeks", "week"), ("days", "day"),
          ("hours", "hour"), ("minutes", "minute"), ("seconds", "second"))


@dataclass(frozen=True)
class ScheduleEntry:
    """One category of the published schedule."""

    category: str
    description: str
    """What the category holds (the rule's description)."""
    legal_basis: str
    retain_for: str
    """The ISO 8601 period, as the rule writes it (``P2Y``)."""
    period: str
    """The period in words: ``2 years``."""
    starts: str
    """When the clock starts, in words: ``closed at`` (per target where they differ)."""
    retention: str
    """The whole time limit in words: ``2 years after closed at``."""
    action: str
    """``delete``, ``archive`` or ``anonymize``."""
    then: str
    """What happens when the period ends, in words."""
    owner: str
    runs: str
    """The rule's schedule (cron or preset), or ``manual``."""
    targets: tuple[str, ...]
    """Where the records live: ``name (location)`` per target, no credentials."""

    def to_dict(self) -> dict:
        """A JSON-ready mapping of the entry."""
        data = asdict(self)
        data["targets"] = list(self.targets)
        return data


def schedule_entries(rule_files: Iterable[RuleFile]) -> list[ScheduleEntry]:
    """One :class:`ScheduleEntry` per rule, in category order."""
    entries = []
    for rule_file in sorted(rule_files, key=lambda r: r.rule.category):
        rule = rule_file.rule
        period = period_in_words(rule.retain_for)
        starts = _starts(rule)
        entries.append(ScheduleEntry(
            category=rule.category,
            description=rule.description,
            legal_basis=rule.legal_basis,
            retain_for=rule.retain_for.text,
            period=period,
            starts=starts,
            retention=f"{period} after {starts}",
            action=rule.action,
            then=_then(rule),
            owner=rule.owner,
            runs=rule.schedule or "manual",
            targets=tuple(f"{t.name} ({t.location})" for t in rule.targets),
        ))
    return entries


def period_in_words(duration: IsoDuration) -> str:
    """``P2Y`` → ``2 years``; ``P1Y6M`` → ``1 year and 6 months``; ``PT36H`` → ``36 hours``."""
    parts = []
    for field, unit in _UNITS:
        n = getattr(duration, field)
        if n:
            parts.append(f"{n:,} {unit}{'' if n == 1 else 's'}")
    if len(parts) > 1:
        return ", ".join(parts[:-1]) + " and " + parts[-1]
    return parts[0] if parts else duration.text


def _age_in_words(target) -> str:
    """Where a record's age starts, as a reader says it: ``closed_at`` → ``closed at``."""
    if target.kind == "s3":
        return "the date in the object's key" if target.age_from == "key_date" else "the object was last modified"
    return target.age_column.replace("_", " ")


def _starts(rule) -> str:
    """One clock for the rule, or each target's where they differ."""
    words = [(t.name, _age_in_words(t)) for t in rule.targets]
    distinct = list(dict.fromkeys(w for _, w in words))
    if len(distinct) == 1:
        return distinct[0]
    return " / ".join(f"{w} ({name})" for name, w in words)


def _then(rule) -> str:
    if rule.action == "delete":
        return "deleted"
    if rule.action == "anonymize":
        columns = sorted({c for t in rule.targets if getattr(t, "anonymize", None) for c in t.anonymize.columns})
        return f"anonymized ({', '.join(columns)} stripped; the rest of the record is kept)"
    # The rules say where archives go, not for how long: that is the bucket's lifecycle.
    where = rule.archive.location if rule.archive else "the archive"
    return f"archived to {where} ({rule.archive.storage_class if rule.archive else ''}), then deleted from the source"


# -- rendering ------------------------------------------------------------------------

_COLUMNS = (("Category", "category"), ("What it holds", "description"), ("Legal basis", "legal_basis"),
            ("How long", "retention"), ("Then", "then"), ("Owner", "owner"))


def render(entries: Sequence[ScheduleEntry], fmt: str) -> str:
    """The schedule as ``md``, ``html``, ``json`` or ``csv`` text."""
    if fmt == "json":
        return json.dumps([e.to_dict() for e in entries], indent=2, ensure_ascii=False) + "\n"
    if fmt == "csv":
        return _csv(entries)
    if fmt == "html":
        return _html(entries)
    if fmt == "md":
        return _markdown(entries)
    raise ValueError(f"unknown format {fmt!r}; use one of {', '.join(FORMATS)}")


def _md_cell(text: str) -> str:
    # A rule's text must not break out of its cell: pipes end cells, newlines end rows,
    # and Markdown renders inline HTML (a privacy notice is published).
    text = html.escape(" ".join(str(text).split()), quote=False)
    for char in "\\|`*_[]":
        text = text.replace(char, "\\" + char)
    return text


def _markdown(entries: Sequence[ScheduleEntry]) -> str:
    lines = ["# Retention schedule", "",
             "Time limits for erasure of each category of personal data (GDPR Art. 30(1)(f)).", "",
             "| " + " | ".join(h for h, _ in _COLUMNS) + " |",
             "|" + "---|" * len(_COLUMNS)]
    for entry in entries:
        lines.append("| " + " | ".join(_md_cell(getattr(entry, f)) for _, f in _COLUMNS) + " |")
    return "\n".join(lines) + "\n"


def csv_safe(value: object) -> str:
    """A cell a spreadsheet shows as text: a leading ``= + - @`` would be run as a formula."""
    text = "" if value is None else str(value)
    return "'" + text if text[:1] in ("=", "+", "-", "@", "\t", "\r") else text


def _csv(entries: Sequence[ScheduleEntry]) -> str:
    out = io.StringIO()
    fields = ["category", "description", "legal_basis", "retain_for", "retention", "action", "then", "owner",
              "runs", "targets"]
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(fields)
    for entry in entries:
        data = entry.to_dict()
        data["targets"] = "; ".join(entry.targets)
        writer.writerow([csv_safe(data[f]) for f in fields])
    return out.getvalue()


def _html(entries: Sequence[ScheduleEntry]) -> str:
    from jinja2 import Environment, PackageLoader, select_autoescape

    env = Environment(loader=PackageLoader("retention.interfaces", "templates"),
                      autoescape=select_autoescape(default=True, default_for_string=True))
    return env.get_template("schedule.html").render(entries=entries, columns=_COLUMNS)


# -- the command ----------------------------------------------------------------------


def register(commands) -> None:
    """Add ``retention schedule`` to the CLI's subparsers."""
    cmd = commands.add_parser("schedule", help="the published retention schedule, from the rules "
                                               "(Markdown, HTML, JSON or CSV)")
    cmd.add_argument("--rules", default=os.environ.get("RETENTION_RULES_DIR", "retention_rules"), metavar="DIR",
                     help="rules directory (default: $RETENTION_RULES_DIR or ./retention_rules)")
    cmd.add_argument("--format", choices=FORMATS, default="md", help="output format (default md)")
    cmd.add_argument("--out", metavar="FILE", help="write to FILE instead of stdout")
    cmd.set_defaults(handler=cmd_schedule)


def cmd_schedule(args: argparse.Namespace) -> int:
    """Print (or write) the schedule; invalid rules raise RuleError, which the CLI reports."""
    from retention.rules.loader import load_rules

    text = render(schedule_entries(load_rules(args.rules)), args.format)
    write_output(text, args.out)
    return 0


def write_output(text: str, out: str | None) -> None:
    """Write ``text`` to ``out`` (or stdout); an unwritable file is a ConfigError naming it."""
    from retention.errors import ConfigError

    if out is None:
        sys.stdout.write(text)
        return
    try:
        with open(out, "w", encoding="utf-8") as stream:
            stream.write(text)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write ({exc.strerror}); choose a writable path") from None
    print(f"wrote {out}", file=sys.stderr)
