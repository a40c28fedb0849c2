"""Data subjects: the identity types erasure requests name, and how one resolves to another.

``retention_rules/_subjects.yaml`` declares the identity types (``email``, ``customer_id``)
and, for a type the tables do not hold directly, how it resolves to one they do (an
email to the ``customer_id`` through a lookup table on a connection). Rule targets say
which column (SQL) or key template (S3) holds a subject's records; :func:`subject_problems`
checks those against the declared types, file:line:field like any rule problem, and with
``require=True`` also reports every target that does not say whether it holds a subject's
data. Nothing here touches a database.
"""

from __future__ import annotations

import hashlib
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from retention.errors import RuleError, RuleProblem
from retention.localfiles import read_regular
from retention.rules.fields import (
    ConnectionId,
    Identifier,
    IsoDuration,
    RetainFor,
    Schedule,
    TableName,
    Text,
    subject_placeholders,
)
from retention.rules.models import RuleFile, SqlTarget
from retention.rules.problems import dotted_path, validation_problems
from retention.rules.yamlsource import LocatedDocument, YamlProblem, load_located

SUBJECTS_FILE = "_subjects.yaml"
MAX_SUBJECTS_FILE_BYTES = 64 * 1024


class _StrictModel(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)


class Resolution(_StrictModel):
    """How an identity resolves to another: a lookup table mapping one column to the other."""

    to: Identifier
    """The identity type it resolves to (declared in the same file)."""
    connection: ConnectionId
    table: TableName
    match: Identifier
    """The lookup table's column holding this identity (compared exactly)."""
    column: Identifier
    """The lookup table's column holding the identity it resolves to."""


class IdentityType(_StrictModel):
    """One kind of identity a request may name."""

    description: Text
    resolve: Resolution | None = None
    """None: the identity is held by the targets themselves."""


class SubjectsConfig(_StrictModel):
    """The content of ``_subjects.yaml``."""

    schedule: Schedule = "@hourly"
    """How often the erasure DAG runs pending requests."""
    due_within: RetainFor = IsoDuration.parse("P1M")
    """A request's default due date after it is received (GDPR Art. 12(3): one month)."""
    identities: Annotated[dict[Identifier, IdentityType], Field(min_length=1)]


@dataclass(frozen=True)
class SubjectsFile:
    """A validated ``_subjects.yaml`` with the file it came from."""

    path: Path
    sha256: str
    config: SubjectsConfig
    document: LocatedDocument

    def problem(self, field_path: tuple[str | int, ...], message: str) -> RuleProblem:
        """A problem located at ``field_path`` of this file."""
        return RuleProblem(str(self.path), self.document.line_of(field_path), dotted_path(field_path), message)

    def resolution_path(self, identity: str) -> list[str]:
        """The identity types ``identity`` resolves through, itself first (``[email, customer_id]``)."""
        path = [identity]
        while (resolve := self.config.identities[path[-1]].resolve) is not None and resolve.to not in path:
            path.append(resolve.to)
        return path


def load_subjects(directory: str | os.PathLike[str]) -> SubjectsFile | None:
    """``_subjects.yaml`` of a rules directory, validated; None when there is none."""
    path = Path(directory) / SUBJECTS_FILE
    if not path.is_file():
        return None
    try:
        raw = read_regular(path, MAX_SUBJECTS_FILE_BYTES)  # never an unbounded read, never a wait on a FIFO
    except OSError as exc:
        raise RuleError([RuleProblem(str(path), None, None, f"cannot read: {exc.strerror}")]) from None
    if len(raw) > MAX_SUBJECTS_FILE_BYTES:
        raise RuleError([RuleProblem(str(path), None, None, f"larger than {MAX_SUBJECTS_FILE_BYTES // 1024} KiB")])
    try:
        document = load_located(raw.decode("utf-8"))
    except UnicodeDecodeError:
        raise RuleError([RuleProblem(str(path), None, None, "not UTF-8 text: save the file as UTF-8")]) from None
    except YamlProblem as exc:
        raise RuleError([RuleProblem(str(path), exc.line, dotted_path(exc.path) or None, exc.message)]) from None
    if not isinstance(document.data, dict):
        raise RuleError([RuleProblem(str(path), 1, None, "expected a mapping with identities: at the top level")])
    try:
        config = SubjectsConfig.model_validate(document.data)
    except ValidationError as exc:
        problems = validation_problems(path, document, exc, SubjectsConfig)
        raise RuleError(sorted(problems, key=lambda p: p.line or 0)) from None
    subjects = SubjectsFile(path, hashlib.sha256(raw).hexdigest(), config, document)
    problems = _resolution_problems(subjects)
    if problems:
        raise RuleError(problems)
    return subjects


def _resolution_problems(subjects: SubjectsFile) -> list[RuleProblem]:
    """Every ``resolve.to`` names a declared type, and resolution never loops."""
    identities = subjects.config.identities
    problems = []
    for name, identity in identities.items():
        if identity.resolve is None:
            continue
        if identity.resolve.to not in identities:
            problems.append(subjects.problem(("identities", name, "resolve", "to"),
                                             f"{identity.resolve.to!r} is not a declared identity type "
                                             f"(declared: {', '.join(sorted(identities))})"))
            continue
        path = subjects.resolution_path(name)
        last = identities[path[-1]].resolve
        if last is not None:
            problems.append(subjects.problem(("identities", name, "resolve", "to"),
                                             f"resolution loops: {' → '.join(path)} → {last.to}"))
    return problems


def subject_problems(rules: list[RuleFile], subjects: SubjectsFile | None, *, require: bool) -> list[RuleProblem]:
    """What the rules' subject declarations get wrong; with ``require``, also the targets that declare none.

    A target of a rule with ``erasure_exempt`` needs no declaration: erasures retain it."""
    declared = set(subjects.config.identities) if subjects else set()
    where = f"in {subjects.path}" if subjects else f"(there is no {SUBJECTS_FILE} beside the rules)"
    problems = []
    for rule_file in rules:
        exempt = rule_file.rule.erasure_exempt is not None
        for index, target in enumerate(rule_file.rule.targets):
            at: tuple[str | int, ...]
            declarations: list[tuple[tuple[str | int, ...], str]]
            if isinstance(target, SqlTarget):
                declarations = [(("targets", index, "subject", name), name) for name in target.subject or {}]
                undeclared, example = target.subject is None, "subject: {customer_id: customer_id}"
            else:
                at = ("targets", index, "subject_prefix")
                template = target.subject_prefix
                declarations = [(at, name) for name in subject_placeholders(template)] if template else []
                undeclared, example = template is None, 'subject_prefix: "exports/{customer_id}/"'
                if template and not template.startswith(target.prefix):
                    problems.append(rule_file.problem(at, f"{template!r} is outside the target's prefix "
                                                      f"{target.prefix!r}: start it with {target.prefix!r}"))
            for at, name in declarations:
                if name not in declared:
                    problems.append(rule_file.problem(at, f"identity type {name!r} is not declared {where}"))
            if require and undeclared and not exempt:
                problems.append(rule_file.problem(
                    ("targets", index),
                    f"target {target.name} does not say whose personal data it holds: add {example}, or "
                    "erasure_exempt: <why a legal duty keeps it> to the rule",
                ))
    return problems
