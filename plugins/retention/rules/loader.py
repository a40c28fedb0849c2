"""Reading rule files: one file, a directory of them, and what a broken file still says.

Loading is strict: unknown keys, malformed durations or cron expressions and anything
that is not a plain SQL identifier are errors that name the file, line and field, and
a rule must also make sense as a whole (an ``archive:`` section with ``action:
archive``, ``anonymize:`` sections with ``action: anonymize``, unique target names).
Scanning a directory keeps going past a bad file, so one typo cannot hide the rest.
"""

from __future__ import annotations

import difflib
import hashlib
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from retention.errors import RuleError, RuleProblem
from retention.localfiles import read_regular
from retention.rules.fields import parse_category, parse_schedule
from retention.rules.models import RetentionRule, RuleFile
from retention.rules.problems import dotted_path, validation_problems
from retention.rules.yamlsource import YamlProblem, load_located

MAX_RULE_FILE_BYTES = 256 * 1024
"""A rule file is read by reviewers line by line; anything larger is a mistake (or an attack)."""


def load_rule_file(path: str | os.PathLike[str]) -> RuleFile:
    """Load and validate one rule file; raise :class:`RuleError` naming file:line:field."""
    path = Path(path)
    try:
        raw = read_regular(path, MAX_RULE_FILE_BYTES)  # never an unbounded read, never a wait on a FIFO
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
        raise RuleError([RuleProblem(str(path), exc.line, dotted_path(exc.path) or None, exc.message)]) from None
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
        problems = validation_problems(path, document, exc, RetentionRule)
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


def scan_rules(directory: str | os.PathLike[str]) -> tuple[list[RuleFile], list[RuleProblem]]:
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
        # Anything but a directory: a FIFO or a device named *.yaml is a problem of its own, not a rule skipped.
        if p.suffix in (".yaml", ".yml") and not p.name.startswith("_") and not p.is_dir()
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


def salvage_fields(path: str | os.PathLike[str]) -> SalvagedFields:
    """The category, schedule, owner and action of a broken rule file, where each still validates.

    The invalid-rule DAG keeps the DAG id, schedule and owner of the rule it replaces, so
    a typo keeps failing where people were looking. Never raises.
    """
    try:
        raw = read_regular(path, MAX_RULE_FILE_BYTES)
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
    owner_text = owner.strip() if isinstance(owner, str) else ""
    action = data.get("action")
    return SalvagedFields(
        category=valid("category", parse_category),
        schedule=valid("schedule", parse_schedule),
        schedule_is_manual="schedule" in data and data["schedule"] is None,
        owner=owner_text if re.fullmatch(r"[A-Za-z0-9_.@-]{1,100}", owner_text) else None,
        action=action if action in ("delete", "archive", "anonymize") else None,
    )


def load_rules(directory: str | os.PathLike[str], *, category: str | None = None) -> list[RuleFile]:
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
