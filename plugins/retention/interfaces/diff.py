"""``retention diff --base REF``: what a rule change does to the schedule, as Markdown.

Meant for a pull-request comment: the rules at ``REF`` (read with ``git ls-tree`` and
``git show``, never a checkout, so the work tree is untouched) are compared by category
with the rules on disk. Changes that can destroy what must be kept are flagged: a
shortened retention, a changed action, a target added or removed, a filter dropped or
changed, a blast-radius limit (``max_fraction``, ``max_records``) raised or removed.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from retention.errors import ConfigError, RuleProblem

FLAG = "⚠️"
_REFERENCE_INSTANTS = tuple(datetime(2026, month, 28, tzinfo=timezone.utc) for month in (1, 2, 3, 6, 12))
"""Periods are compared by the cutoffs they give at these instants: P1M and P30D differ by month."""
_GIT_TIMEOUT = 60


@dataclass
class CategoryChange:
    """What changed in one category: lines of Markdown, and which of them are flagged."""

    category: str
    status: str  # added, removed, changed
    notes: list[str] = field(default_factory=list)
    flags: list[str] = field(default_factory=list)


@dataclass
class RulesDiff:
    """The comparison of the rules at a base ref with the rules on disk."""

    base: str
    base_commit: str
    changes: list[CategoryChange]
    base_problems: list[RuleProblem]

    @property
    def flagged(self) -> bool:
        """True when any change needs a second look (see the module docstring)."""
        return any(change.flags for change in self.changes)


def register(commands: argparse._SubParsersAction) -> None:
    """Add ``retention diff`` to the CLI's subcommands."""
    cmd = commands.add_parser("diff", help="what a rule change does to the schedule, in Markdown for a PR comment")
    cmd.add_argument("--base", required=True, metavar="REF",
                     help="git ref to compare with (e.g. origin/main); read with git show, no checkout")
    cmd.add_argument("--rules", default=os.environ.get("RETENTION_RULES_DIR", "retention_rules"), metavar="DIR",
                     help="rules directory (default: $RETENTION_RULES_DIR or ./retention_rules)")
    cmd.add_argument("--fail-on-flag", action="store_true",
                     help="exit 1 when a change is flagged (default: exit 0, the comment is the signal)")
    cmd.set_defaults(handler=cmd_diff)


def cmd_diff(args: argparse.Namespace) -> int:
    """Print the Markdown summary of the rule change against ``--base``."""
    result = diff_rules(args.base, args.rules)
    print(render_markdown(result), end="")
    return 1 if args.fail_on_flag and result.flagged else 0


def diff_rules(base: str, rules_dir: str | Path) -> RulesDiff:
    """Compare the rules in ``rules_dir`` with the same directory at git ref ``base``.

    The rules on disk must be valid (a RuleError otherwise, as ``validate``); base files
    that do not load are listed, not fatal: the change may be the fix.
    """
    from retention.rules.loader import load_rules, scan_rules

    rules_dir = Path(rules_dir)
    if not rules_dir.is_dir():
        raise ConfigError(f"rules directory {rules_dir} does not exist; pass --rules DIR")
    commit = _resolve(base, rules_dir)
    head = {r.rule.category: r.rule for r in load_rules(rules_dir)}
    with tempfile.TemporaryDirectory(prefix="retention-diff-") as tmp:
        names = _base_files(commit, rules_dir)
        for name in names:
            (Path(tmp) / name).write_bytes(_git(rules_dir, "show", f"{commit}:./{name}"))
        if names:
            loaded, problems = scan_rules(tmp)
        else:
            loaded, problems = [], []
        problems = [RuleProblem(f"{base}:{Path(p.path).name}", p.line, p.field, p.message)
                    for p in problems if Path(p.path) != Path(tmp)]
    before = {r.rule.category: r.rule for r in loaded}
    changes = []
    for category in sorted(set(before) | set(head)):
        change = _compare(category, before.get(category), head.get(category))
        if change is not None:
            changes.append(change)
    return RulesDiff(base, commit, changes, problems)


def render_markdown(result: RulesDiff) -> str:
    """The diff as Markdown: a summary line, flagged changes first, then the rest."""
    out = [f"### Retention rules: changes against `{_code(result.base)}` ({result.base_commit[:12]})", ""]
    if not result.changes and not result.base_problems:
        out += ["No change to the retention schedule.", ""]
        return "\n".join(out)
    flagged = [c for c in result.changes if c.flags]
    if flagged:
        out += [f"**{FLAG} {len(flagged)} of {len(result.changes)} changed categor"
                f"{'ies' if len(result.changes) != 1 else 'y'} need a second look** "
                "(shorter retention, another action, targets or filters changed, or a wider blast radius).", ""]
    else:
        out += [f"{len(result.changes)} changed categor{'ies' if len(result.changes) != 1 else 'y'}; nothing flagged.", ""]
    for change in sorted(result.changes, key=lambda c: (not c.flags, c.category)):
        out.append(f"#### `{change.category}` ({change.status})")
        out += [f"- {FLAG} **{line}**" for line in change.flags]
        out += [f"- {line}" for line in change.notes]
        out.append("")
    if result.base_problems:
        out += [f"Base rule files that did not load ({len(result.base_problems)}), compared as absent:", ""]
        out += [f"- {_text(str(p))}" for p in result.base_problems]
        out.append("")
    return "\n".join(out)


# -- comparing ---------------------------------------------------------------------------


def _compare(category: str, old: Any, new: Any) -> CategoryChange | None:
    if old is None:
        change = CategoryChange(category, "added")
        change.flags.append(f"new category: {_describe_rule(new)}")
        for target in new.targets:
            change.notes.append(f"target `{target.name}`: {_describe_target(target)}")
        return change
    if new is None:
        change = CategoryChange(category, "removed")
        change.flags.append(f"category removed: its records are no longer purged (was {_describe_rule(old)})")
        return change
    change = CategoryChange(category, "changed")
    shorter = _period_order(old.retain_for, new.retain_for)
    if shorter < 0:
        change.flags.append(f"retention shortened: `{old.retain_for}` → `{new.retain_for}`")
    elif shorter > 0:
        change.notes.append(f"retention lengthened: `{old.retain_for}` → `{new.retain_for}`")
    elif str(old.retain_for) != str(new.retain_for):
        change.notes.append(f"retention rewritten, same length: `{old.retain_for}` → `{new.retain_for}`")
    if old.action != new.action:
        change.flags.append(f"action changed: {old.action} → {new.action}")
    if old.archive != new.archive and old.action == new.action == "archive":
        change.flags.append(f"archive destination changed: {_archive(old.archive)} → {_archive(new.archive)}")
    for name, label in (("schedule", "schedule"), ("owner", "owner"), ("legal_basis", "legal basis"),
                        ("description", "description")):
        before, after = getattr(old, name), getattr(new, name)
        if before != after:
            change.notes.append(f"{label}: {_value(before)} → {_value(after)}")
    old_targets = {t.name: t for t in old.targets}
    new_targets = {t.name: t for t in new.targets}
    for name in sorted(set(old_targets) | set(new_targets)):
        before, after = old_targets.get(name), new_targets.get(name)
        if before is None:
            change.flags.append(f"target added: `{name}` ({_describe_target(after)})")
        elif after is None:
            change.flags.append(f"target removed: `{name}` ({_describe_target(before)}) is no longer purged")
        else:
            _compare_target(name, before, after, change)
    return change if change.flags or change.notes else None


def _compare_target(name: str, old: Any, new: Any, change: CategoryChange) -> None:
    if old.kind != new.kind or old.location != new.location:
        change.flags.append(f"target `{name}` now purges another place: "
                            f"`{_code(old.location)}` → `{_code(new.location)}`")
    if old.age_source != new.age_source:
        change.flags.append(f"target `{name}` reads age from another place: "
                            f"`{_code(old.age_source)}` → `{_code(new.age_source)}`")
    for field_name in ("where", "tags"):
        before, after = getattr(old, field_name, None), getattr(new, field_name, None)
        if before != after:
            dropped = sorted(set(before or {}) - set(after or {}))
            what = f" (dropped: {', '.join(f'`{d}`' for d in dropped)})" if dropped else ""
            change.flags.append(f"target `{name}` filter `{field_name}` changed{what}: "
                                f"{_value(before)} → {_value(after)}")
    if new.max_fraction > old.max_fraction:
        change.flags.append(f"target `{name}` blast radius widened: max_fraction {old.max_fraction:g} → "
                            f"{new.max_fraction:g}")
    elif new.max_fraction < old.max_fraction:
        change.notes.append(f"target `{name}` max_fraction lowered: {old.max_fraction:g} → {new.max_fraction:g}")
    if old.max_records is not None and new.max_records is None:
        change.flags.append(f"target `{name}` blast radius widened: max_records {old.max_records} removed "
                            "(no count limit)")
    elif old.max_records is not None and new.max_records > old.max_records:
        change.flags.append(f"target `{name}` blast radius widened: max_records {old.max_records} → "
                            f"{new.max_records}")
    elif old.max_records != new.max_records:
        change.notes.append(f"target `{name}` max_records: {old.max_records or 'none'} → {new.max_records}")
    if getattr(old, "children", None) != getattr(new, "children", None):
        change.flags.append(f"target `{name}` child tables changed: {_children(old)} → {_children(new)}")
    if getattr(old, "anonymize", None) != getattr(new, "anonymize", None):
        change.flags.append(f"target `{name}` anonymized columns changed")
    tuning = [f for f in ("max_batch_rows", "workers", "lock_wait_budget", "concurrency", "max_batch_keys",
                                "max_replica_lag", "lag_wait_budget", "maintenance")
              if getattr(old, f, None) != getattr(new, f, None)]
    if tuning:
        change.notes.append(f"target `{name}` tuning: " + ", ".join(
            f"{f} {getattr(old, f)} → {getattr(new, f)}" for f in tuning))


def _period_order(old: Any, new: Any) -> int:
    """-1 when ``new`` keeps records for less time than ``old`` at any reference instant, 1 longer, 0 same."""
    shorter = any(new.before(t) > old.before(t) for t in _REFERENCE_INSTANTS)
    longer = any(new.before(t) < old.before(t) for t in _REFERENCE_INSTANTS)
    return -1 if shorter else (1 if longer else 0)


def _describe_rule(rule: Any) -> str:
    return (f"{rule.action} after `{rule.retain_for}`, {len(rule.targets)} target"
            f"{'s' if len(rule.targets) != 1 else ''}, schedule {_value(rule.schedule)}")


def _describe_target(target: Any) -> str:
    limit = f"max_fraction {target.max_fraction:g}"
    limit += f", max_records {target.max_records}" if target.max_records is not None else ", no max_records"
    return f"{target.kind} `{_code(target.location)}`, {limit}"


def _archive(spec: Any) -> str:
    return "none" if spec is None else f"`{_code(spec.location)}` ({spec.format}, {spec.storage_class})"


def _children(target: Any) -> str:
    names = []
    pending = list(getattr(target, "children", []) or [])
    while pending:
        child = pending.pop(0)
        names.append(child.table)
        pending.extend(child.children)
    return ", ".join(f"`{n}`" for n in names) or "none"


def _value(value: Any) -> str:
    if value is None:
        return "none"
    if isinstance(value, str):
        return f"“{_text(value)}”"
    return f"`{_code(repr(value) if not isinstance(value, dict) else str(value))}`"


def _text(value: str) -> str:
    """Free text from a rule file, unable to open Markdown or HTML constructs in the comment."""
    out = " ".join(value.split()).replace("&", "&amp;").replace("<", "&lt;").replace(">", "&gt;")
    for char in "\\`*_[]|#!~":
        out = out.replace(char, "\\" + char)
    return out


def _code(value: str) -> str:
    """Text for inside a code span: no backtick can close it, no newline can break the line."""
    return " ".join(value.split()).replace("`", "'")


# -- git ---------------------------------------------------------------------------------


def _resolve(base: str, rules_dir: Path) -> str:
    if not base or base.startswith("-") or any(c.isspace() or ord(c) < 32 for c in base):
        raise ConfigError(f"--base {base!r} is not a git ref: give a branch, tag or commit (e.g. origin/main)")
    try:
        _git(rules_dir, "rev-parse", "--git-dir")
    except ConfigError:
        raise ConfigError(f"rules directory {rules_dir} is not inside a git repository; diff compares "
                          "with a commit of the repository the rules live in") from None
    try:
        out = _git(rules_dir, "rev-parse", "--verify", "--quiet", "--end-of-options", f"{base}^{{commit}}")
    except ConfigError:
        raise ConfigError(f"--base {base!r} is not a commit in the repository of {rules_dir}: "
                          "fetch it first (in CI: actions/checkout with fetch-depth: 0)") from None
    return out.decode().strip()


def _base_files(commit: str, rules_dir: Path) -> list[str]:
    """Rule-directory entries at ``commit``: *.yaml files (an empty list if the directory did not exist)."""
    out = _git(rules_dir, "ls-tree", "-z", commit, "--", ".")
    # "<mode> <type> <sha>\t<path>": only files (a directory or submodule named x.yaml is not a rule).
    entries = [e.split("\t", 1) for e in out.decode("utf-8", "replace").split("\0") if "\t" in e]
    names = [Path(path).name for meta, path in entries if meta.split(" ")[1] == "blob"]
    return sorted(n for n in names if n.endswith((".yaml", ".yml")) and "/" not in n and not n.startswith("."))


def _git(cwd: Path, *args: str) -> bytes:
    try:
        result = subprocess.run(["git", *args], cwd=cwd, capture_output=True, timeout=_GIT_TIMEOUT, check=False)
    except FileNotFoundError:
        raise ConfigError("git is not installed; retention diff reads the base rules with git") from None
    except subprocess.TimeoutExpired:
        raise ConfigError(f"git {args[0]} took longer than {_GIT_TIMEOUT}s in {cwd}") from None
    if result.returncode != 0:
        message = result.stderr.decode("utf-8", "replace").strip().splitlines()
        raise ConfigError(f"git {args[0]} failed in {cwd}: {message[-1] if message else 'no message'}")
    return result.stdout


